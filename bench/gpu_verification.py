"""Which op x backend kernels passed the test suite on a GPU: evidence for ``verified=``.

Three parts, used by ``bench/gpu_check.sh``:

* a pytest plugin (``pytest -p gpu_verification``, with ``bench/`` on ``PYTHONPATH``):
  before collection it wraps every registered op's kernel functions (``<op>_<stage>`` in
  the reference and Triton modules, and the ``torch.ops.fastlm_C`` namespace handed out
  by ``fastlm._ext.kernels()``), so every kernel a test actually *calls*, through the op
  or directly, is noted as (op, backend, device of its first tensor argument).  It appends
  JSON lines to ``$GPU_VERIFICATION_RECORDS`` as the run goes: the selection
  (``{"collected": [[nodeid, backend], ...]}``), each test's start
  (``{"started": nodeid, "backend": ...}``) and each finished test
  (``{"nodeid", "file", "backend", "outcome", "duration", "kernels": [[op, backend, device], ...]}``),
  where ``backend`` is the one the test declares (mark ``backend(NAME)``, tests/_backends.py).
  A test that started and never finished crashed its process (a thread-method timeout, a
  segfault): it counts as failed for its declared backend.  Under pytest-xdist, a test
  that fails with a CUDA error after which the device no longer answers ends its worker
  once its record is written, so pytest-xdist starts a fresh one (a new CUDA context)
  instead of failing every later test of that worker.
* ``python bench/gpu_verification.py fold RECORDS --out gpu_verification.json [--incomplete]``
  folds the lines into ``{op: {backend: {...}}}`` for the kernels that ran on ``cuda``:
  ``status`` is "passed" when at least one test called the kernel on the GPU and no test
  that called it, or declared its backend, failed or crashed; "failed" when one did;
  "incomplete" when none failed but tests of that op and backend did not all run (selected
  and never started, or ``--incomplete`` without a record of the selection); registered
  GPU rows no test reached are "not exercised".  Each entry carries the counts, up to five
  failing test ids, the date and the device.  Also prints a markdown table.
* ``python bench/gpu_verification.py changes gpu_verification.json`` lists the exact
  ``verified=`` edits it supports: the registry rows (file:line) to mark, each with the
  value to write, then the rows to leave (or un-mark) and why.

A kernel reached some other way (``torch.ops.fastlm_C`` spelled out instead of through
``fastlm._ext.kernels()``) counts only in its file's totals (``groups``) and through the
test's declared backend.  A failing test that called several kernels counts against all.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import sys
from pathlib import Path

import pytest

# ----------------------------------------------------------------------- pytest plugin
_current: set = set()
_outcomes: dict = {}
_ran_here: dict = {}  # nodeid -> declared backend; under xdist the controller sees others' reports too


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


def _write(record: dict) -> None:
    path = os.environ.get("GPU_VERIFICATION_RECORDS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _declared_backend(item) -> str | None:
    from _backends import declared_backend  # tests/ is on pytest's pythonpath

    return declared_backend(item)


def pytest_collection_finish(session):
    """Note what was selected to run, so the summary can tell which tests never started."""
    _write({"collected": [[item.nodeid, _declared_backend(item)] for item in session.items]})


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _current.clear()
    _ran_here[item.nodeid] = _declared_backend(item)
    _write({"started": item.nodeid, "backend": _ran_here[item.nodeid]})


def _final_record(nodeid: str, state: dict, **extra) -> dict:
    return {"nodeid": nodeid, "file": nodeid.split("::")[0], "backend": _ran_here.get(nodeid), **state,
            "kernels": sorted(_current), **extra}


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
        _write(_final_record(report.nodeid, state))
        _outcomes.pop(report.nodeid, None)
        _ran_here.pop(report.nodeid, None)
        _current.clear()


CUDA_ERROR_MARKERS = ("CUDA error", "CUDA_ERROR", "cudaError", "device-side assert", "illegal memory access",
                      "unspecified launch failure")


def cuda_context_lost(failure_text: str) -> bool:
    """After a failure that mentions a CUDA error: True when the device no longer answers
    (an illegal access, a device-side assert or a launch failure leaves the context unusable)."""
    if not any(marker in failure_text for marker in CUDA_ERROR_MARKERS):
        return False
    import torch

    try:
        torch.cuda.synchronize()
        return float(torch.ones(1, device="cuda").add_(1).item()) != 2.0
    except Exception:
        return True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under pytest-xdist only: a test that failed with a CUDA error that broke the device
    context writes its record and ends its worker, which pytest-xdist replaces
    (``--max-worker-restart``) and reports the test as crashed."""
    outcome = yield
    report = outcome.get_result()
    if (report.when == "call" and report.failed and os.environ.get("PYTEST_XDIST_WORKER")
            and cuda_context_lost(str(report.longrepr))):
        state = {"outcome": "failed", "duration": report.duration}
        _write(_final_record(item.nodeid, state, note="CUDA context lost: worker replaced"))
        sys.stderr.write(f"gpu_verification: {item.nodeid} broke the CUDA context; ending this worker\n"
                         f"{report.longrepr}\n")
        sys.stderr.flush()
        os._exit(3)


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


OUTCOMES = ("passed", "failed", "error", "crashed", "skipped", "not run")


def summarize(records: list[dict], device: str, complete: bool = True, date: str | None = None) -> dict:
    """``{"device", "date", "complete", "ops": {op: {backend: entry}}, "groups": {file: counts}}``.

    Evidence for (op, backend): a test passed that called the kernel on the GPU; against it:
    a test failed (or errored, or crashed: started, never finished) that called it or that
    declared that backend (for a test file of that op, by name).  A row with no failure is
    "incomplete" while tests of its op and backend (or of its op with no declared backend)
    were selected and never started, or when ``complete=False`` (a run was cut off) and no
    selection was recorded at all.
    """
    date = date or _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    registered = _registered_gpu_rows()
    known_ops = {op for op, _ in registered} | {k[0] for r in records for k in r.get("kernels", [])}
    collected, started, finished = {}, {}, {}
    for rec in records:
        if "collected" in rec:
            collected.update((nodeid, backend) for nodeid, backend in rec["collected"])
        elif "started" in rec:
            started[rec["started"]] = rec.get("backend")
        else:
            finished[rec["nodeid"]] = rec
    for nodeid in started.keys() - finished.keys():  # its process died under it
        finished[nodeid] = {"nodeid": nodeid, "file": nodeid.split("::")[0], "backend": started[nodeid],
                            "outcome": "crashed", "kernels": []}
    ops: dict = {}
    groups: dict = {}

    def entry(op, backend):
        return ops.setdefault(op, {}).setdefault(backend, {"tests_passed": 0, "tests_failed": 0, "failing": []})

    for rec in finished.values():
        g = groups.setdefault(rec["file"], dict.fromkeys(OUTCOMES, 0))
        g[rec["outcome"]] = g.get(rec["outcome"], 0) + 1
        used = {(op, backend) for op, backend, dev in rec.get("kernels", []) if dev == "cuda"}
        if rec["outcome"] == "passed":
            for key in used:
                entry(*key)["tests_passed"] += 1
        elif rec["outcome"] in ("failed", "error", "crashed"):
            op = _op_of_file(rec["file"], known_ops)
            if op is not None and rec.get("backend"):
                used.add((op, rec["backend"]))
            for key in used:
                e = entry(*key)
                e["tests_failed"] += 1
                if len(e["failing"]) < 5:
                    e["failing"].append(rec["nodeid"])
    unfinished = set()
    for nodeid in collected.keys() - finished.keys():
        file = nodeid.split("::")[0]
        groups.setdefault(file, dict.fromkeys(OUTCOMES, 0))["not run"] += 1
        unfinished.add((_op_of_file(file, known_ops), collected[nodeid]))
    if not complete and not collected:  # cut off with no record of what was selected
        unfinished |= {(op, None) for op in known_ops}
    for op, backend in registered:
        entry(op, backend)
    for op, backends in ops.items():
        for backend, e in backends.items():
            if e["tests_failed"]:
                e["status"] = "failed"
            elif (op, backend) in unfinished or (op, None) in unfinished:
                e["status"] = "incomplete"
            else:
                e["status"] = "passed" if e["tests_passed"] else "not exercised"
            e.update(date=date, device=device)
    complete = complete and not unfinished and not any(g["crashed"] for g in groups.values())
    return {"device": device, "date": date, "complete": complete, "ops": ops, "groups": groups}


def markdown(summary: dict) -> str:
    lines = [f"GPU test evidence on {summary['device']}, {summary['date']}"
             + ("" if summary["complete"] else " (NOT every selected test finished)"), "",
             "| op | backend | status | tests passed | tests failed |", "|---|---|---|---|---|"]
    for op in sorted(summary["ops"]):
        for backend, e in sorted(summary["ops"][op].items()):
            lines.append(f"| {op} | {backend} | {e['status']} | {e['tests_passed']} | {e['tests_failed']} |")
    lines += ["", "| test file | " + " | ".join(OUTCOMES) + " |", "|---|" + "---|" * len(OUTCOMES)]
    for f, g in sorted(summary["groups"].items()):
        lines.append(f"| {f} | " + " | ".join(str(g.get(k, 0)) for k in OUTCOMES) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------- verified= edits
def _row_location(op: str, backend: str, root: Path) -> str:
    """``fastlm/ops/<op>.py:LINE`` of the op's ``Implementation(..., "<backend>", ...)`` row."""
    path = root / "fastlm" / "ops" / f"{op}.py"
    pattern = re.compile(r'Implementation\(\s*[^,]+,\s*"' + re.escape(backend) + '"')
    try:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                return f"{path.relative_to(root)}:{number}"
    except OSError:
        pass
    return f"{path.relative_to(root)} (row not found)"


def verified_changes(summary: dict, evidence: str, root: Path, current: dict) -> list[str]:
    """The ``verified=`` edits ``summary`` supports, as lines: ``SET`` rows first (the value to
    write), then ``UNSET`` (marked verified, but not passed now) and ``leave`` rows with why.
    ``current`` maps (op, backend) to the row's present ``verified`` value, for the GPU rows."""
    value = f"{summary['device']}, {summary['date']}, {evidence}"
    head = [f"verified= edits from {evidence} ({summary['device']}, {summary['date']}"
            + ("" if summary["complete"] else "; NOT every selected test finished") + "):"]
    sets, unsets, leaves = [], [], []
    for (op, backend), now in sorted(current.items()):
        e = summary["ops"].get(op, {}).get(backend, {"status": "not exercised", "tests_passed": 0, "failing": []})
        where = f"{_row_location(op, backend, root)}  {op}/{backend}"
        why = e["status"] + (f": {', '.join(e['failing'])}" if e.get("failing") else "")
        if e["status"] == "passed" and now is None:
            sets.append(f"SET    {where}  verified={value!r}  ({e['tests_passed']} tests passed)")
        elif e["status"] == "passed":
            leaves.append(f"leave  {where}  already verified={now!r}; passed again")
        elif now is not None:
            unsets.append(f"UNSET  {where}  verified={now!r} but now {why}")
        else:
            leaves.append(f"leave  {where}  {why}")
    return head + sets + unsets + leaves


def _current_verified() -> dict:
    from fastlm import registry

    return {(op, b): impl.verified for op in _load_ops() for b, impl in registry.table(op).items()
            if registry.BACKENDS[b].runs_on_gpu}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    fold = sub.add_parser("fold", help="records -> gpu_verification.json (+ markdown)")
    fold.add_argument("records", help="the JSON-lines file the plugin wrote")
    fold.add_argument("--out", required=True, help="gpu_verification.json to write")
    fold.add_argument("--device", default=None, help="default: torch.cuda.get_device_name() or 'cpu (no GPU)'")
    fold.add_argument("--incomplete", action="store_true", help="a test run was cut off")
    fold.add_argument("--md", default=None, help="also write the markdown table here")
    changes = sub.add_parser("changes", help="gpu_verification.json -> the verified= edits it supports")
    changes.add_argument("summary", help="a committed gpu_verification.json (cite this path)")
    args = p.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    if args.command == "changes":
        path = Path(args.summary).resolve()
        evidence = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        print("\n".join(verified_changes(json.loads(path.read_text()), evidence, root, _current_verified())))
        return 0
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
