"""Which op x backend kernels passed the test suite on a GPU: evidence for ``verified=``.

Two halves, both used by ``bench/gpu_check.sh``:

* a pytest plugin (``pytest -p gpu_verification``, with ``bench/`` on ``PYTHONPATH``):
  before collection it wraps every registered op's kernel functions (``<op>_<stage>`` in
  the reference and Triton modules, and the ``torch.ops.fastlm_C`` namespace handed out
  by ``fastlm._ext.kernels()``), so every kernel a test actually *calls*, through the op
  or directly, is noted as (op, backend, device of its first tensor argument), and
  appends one JSON line per finished test to ``$GPU_VERIFICATION_RECORDS``:
  ``{"nodeid", "file", "outcome", "duration", "kernels": [[op, backend, device], ...]}``.
  Lines are written as tests finish, so a run killed by its time limit keeps what ran;
  under pytest-xdist each worker appends its own tests' lines.
* ``python bench/gpu_verification.py RECORDS --out gpu_verification.json [--incomplete]``
  folds the lines into ``{op: {backend: {...}}}`` for the kernels that ran on ``cuda``:
  ``status`` is "passed" when at least one test called the kernel on the GPU and no test
  that called it failed, "failed" when one did, "incomplete" when none failed but the
  tests of its op did not all run (a file with selected tests that left no record, or
  ``--incomplete`` without a record of the selection); registered GPU rows no test reached are
  listed as "not exercised".  Each entry carries the counts, up to five failing test
  ids, the date and the device.  Also prints a markdown table.

A kernel reached some other way (``torch.ops.fastlm_C`` spelled out instead of through
``fastlm._ext.kernels()``) counts only in its file's pass/fail totals (``groups``).  A
failing test that called several kernels counts against all of them.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path

# ----------------------------------------------------------------------- pytest plugin
_current: set = set()
_outcomes: dict = {}
_ran_here: set = set()  # under pytest-xdist the controller sees reports of tests it did not run


def _device_of(args, kwargs) -> str:
    import torch

    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "?"


def _load_ops() -> list[str]:
    """``registry.ops()``, after resolving fastlm.ops' public functions through its lazy
    ``__getattr__``: importing the op modules by name first (as ``registry.ops()`` does)
    would leave e.g. ``fastlm.ops.softmax`` bound to the submodule, not the function."""
    import fastlm.ops
    from fastlm import registry

    for name in getattr(fastlm.ops, "__all__", ()):
        getattr(fastlm.ops, name)
    return registry.ops()


class _Recorded:
    """Stands in for one kernel: notes (op, backend, device) when called, else delegates."""

    def __init__(self, fn, op: str, backend: str | None):
        self._fn, self._op, self._backend = fn, op, backend

    def __call__(self, *args, **kwargs):
        device = _device_of(args, kwargs)
        # fastlm_C holds both the C++ CPU and the CUDA kernels: the device says which ran.
        backend = self._backend or ("cuda" if device == "cuda" else "cpu")
        _current.add((self._op, backend, device))
        return self._fn(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._fn, name)


class _RecordingNamespace:
    """Stands in for ``torch.ops.fastlm_C`` as returned by ``fastlm._ext.kernels()``."""

    def __init__(self, namespace, ops):
        self._ns, self._ops = namespace, sorted(ops, key=len, reverse=True)

    def __getattr__(self, name):
        kernel = getattr(self._ns, name)  # AttributeError for a missing kernel, as before
        op = next((o for o in self._ops if name.startswith(o + "_")), None)
        return kernel if op is None else _Recorded(kernel, op, None)


def pytest_configure(config):
    """Wrap every kernel before test modules import them (``from ... import attention_forward``)."""
    import importlib
    import inspect

    try:
        from fastlm import _ext, registry

        ops = _load_ops()
    except Exception as exc:  # the records then show no kernels; the tests themselves will fail
        print(f"gpu_verification: fastlm not importable ({exc}); no kernel evidence", file=sys.stderr)
        return
    for op in ops:
        for backend, impl in registry.table(op).items():
            if impl.module == "fastlm_C":
                continue
            try:
                module = importlib.import_module(impl.module)
            except Exception:  # e.g. no triton here: its tests will say so
                continue
            for name, fn in list(vars(module).items()):
                if name.startswith(op + "_") and inspect.isfunction(fn):
                    setattr(module, name, _Recorded(fn, op, backend))
    kernels = _ext.kernels
    _ext.kernels = lambda: _RecordingNamespace(kernels(), ops)


def _tryfirst(fn):
    import pytest

    return pytest.hookimpl(tryfirst=True)(fn)


@_tryfirst
def pytest_runtest_setup(item):
    _current.clear()
    _ran_here.add(item.nodeid)


def pytest_collection_finish(session):
    """Note what was selected to run, so the summary can tell which files finished."""
    path = os.environ.get("GPU_VERIFICATION_RECORDS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"collected": [item.nodeid for item in session.items]}) + "\n")


def pytest_runtest_logreport(report):
    if report.nodeid not in _ran_here:
        return
    state = _outcomes.setdefault(report.nodeid, {"outcome": "passed", "duration": 0.0})
    state["duration"] += report.duration
    if report.failed:
        state["outcome"] = "failed" if report.when == "call" else "error"
    elif report.skipped and state["outcome"] == "passed":
        state["outcome"] = "skipped"
    if report.when == "teardown":
        path = os.environ.get("GPU_VERIFICATION_RECORDS")
        if path:
            record = {"nodeid": report.nodeid, "file": report.nodeid.split("::")[0], **state,
                      "kernels": sorted(_current)}
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        _outcomes.pop(report.nodeid, None)
        _ran_here.discard(report.nodeid)
        _current.clear()


# ------------------------------------------------------------------------- summary
def load_records(path: str | Path) -> list[dict]:
    records = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut off when the run was killed
    return records


def _registered_gpu_rows() -> list[tuple[str, str]]:
    try:
        from fastlm import registry

        return [(op, b) for op in _load_ops() for b, impl in registry.table(op).items()
                if registry.BACKENDS[b].runs_on_gpu]
    except Exception:
        return []


def _op_of_file(path: str, ops) -> str | None:
    """The op a test file belongs to by name (the longest op name in it): test_varlen_attention.py
    -> attention, test_linear_cross_entropy.py -> linear_cross_entropy."""
    name = Path(path).name
    found = [op for op in ops if op in name]
    return max(found, key=len) if found else None


def summarize(records: list[dict], device: str, complete: bool = True, date: str | None = None) -> dict:
    """``{"device", "date", "complete", "ops": {op: {backend: entry}}, "groups": {file: counts}}``.

    A file is complete when every test selected in it left a record.  A kernel with no
    failure is "incomplete" while a test file of its op (by name) is not complete, or when
    ``complete=False`` (the run was cut off) and the selection was never recorded.
    """
    date = date or _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    ops: dict = {}
    groups: dict = {}
    collected, seen = set(), set()
    for rec in records:
        if "collected" in rec:
            collected.update(rec["collected"])
            continue
        seen.add(rec["nodeid"])
        g = groups.setdefault(rec["file"], {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "not run": 0})
        g[rec["outcome"]] = g.get(rec["outcome"], 0) + 1
        for op, backend, dev in rec.get("kernels", []):
            if dev != "cuda":
                continue
            e = ops.setdefault(op, {}).setdefault(backend, {"tests_passed": 0, "tests_failed": 0, "failing": []})
            if rec["outcome"] == "passed":
                e["tests_passed"] += 1
            elif rec["outcome"] in ("failed", "error"):
                e["tests_failed"] += 1
                if len(e["failing"]) < 5:
                    e["failing"].append(rec["nodeid"])
    for nodeid in collected - seen:
        g = groups.setdefault(nodeid.split("::")[0], {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "not run": 0})
        g["not run"] += 1
    registered = _registered_gpu_rows()
    all_ops = set(ops) | {op for op, _ in registered}
    if collected or complete:
        unfinished = {_op_of_file(f, all_ops) for f, g in groups.items() if g["not run"]}
    else:  # cut off with no record of what was selected: nothing can be called finished
        unfinished = all_ops
    for op, backends in ops.items():
        for e in backends.values():
            if e["tests_failed"]:
                e["status"] = "failed"
            elif op in unfinished:
                e["status"] = "incomplete"
            else:
                e["status"] = "passed" if e["tests_passed"] else "not exercised"
            e.update(date=date, device=device)
    for op, backend in registered:
        ops.setdefault(op, {}).setdefault(backend, {"status": "not exercised", "tests_passed": 0, "tests_failed": 0,
                                                    "failing": [], "date": date, "device": device})
    complete = complete and not any(g["not run"] for g in groups.values())
    return {"device": device, "date": date, "complete": complete, "ops": ops, "groups": groups}


def markdown(summary: dict) -> str:
    lines = [f"GPU test evidence on {summary['device']}, {summary['date']}"
             + ("" if summary["complete"] else " (test run did NOT finish)"), "",
             "| op | backend | status | tests passed | tests failed |", "|---|---|---|---|---|"]
    for op in sorted(summary["ops"]):
        for backend, e in sorted(summary["ops"][op].items()):
            lines.append(f"| {op} | {backend} | {e['status']} | {e['tests_passed']} | {e['tests_failed']} |")
    lines += ["", "| test file | passed | failed | error | skipped | not run |", "|---|---|---|---|---|---|"]
    for f, g in sorted(summary["groups"].items()):
        lines.append(f"| {f} | {g['passed']} | {g['failed']} | {g['error']} | {g['skipped']} | {g['not run']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Fold gpu_verification records into op -> backend -> status.")
    p.add_argument("records", help="the JSON-lines file the plugin wrote")
    p.add_argument("--out", required=True, help="gpu_verification.json to write")
    p.add_argument("--device", default=None, help="default: torch.cuda.get_device_name() or 'cpu (no GPU)'")
    p.add_argument("--incomplete", action="store_true", help="the test run was cut off")
    p.add_argument("--md", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    device = args.device
    if device is None:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no GPU)"
    summary = summarize(load_records(args.records), device, complete=not args.incomplete)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    text = markdown(summary)
    if args.md:
        Path(args.md).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
