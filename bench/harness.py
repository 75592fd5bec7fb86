"""The shared benchmark harness: providers x cases x modes -> timed, recorded rows.
(Its measuring and recording halves live in bench/measuring.py and bench/records.py; this
module re-exports them, so scripts import ``harness`` only.)

A bench script describes *what* to run and the harness does the rest::

    import harness
    from harness import Case, Provider

    def make(device):                       # one fresh random input set
        return {"x": torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)}

    cases = [Case("4096x4096", make, grad=("x",), params={"rows": 4096, "cols": 4096},
                  bytes={"forward": 2 * 2 * 4096**2})]        # minimal bytes per mode
    providers = [Provider("torch", lambda inp: torch.softmax(inp["x"], -1)),
                 *harness.fastlm_providers(lambda inp, backend: fastlm.ops.softmax(inp["x"], backend=backend))]
    args = harness.arg_parser("softmax").parse_args()
    harness.run("softmax", cases, providers, **harness.run_kwargs(args))

API
---
``Case(name, make_inputs, grad=(), flops={}, bytes={}, params={}, modes=None)``
    ``make_inputs(device) -> dict`` builds one input set from fresh random data (never
    zeros).  ``grad`` names the inputs that require grad in every mode (so "forward" is
    the training forward; give ``grad=()`` for an inference forward).  ``flops`` /
    ``bytes`` map a mode to the work the caller counts (the rate and the fraction of the
    ceiling derive from them).  ``params`` are recorded as columns; ``modes`` limits the
    case to some modes.
``Provider(name, fn, skip=None, modes=MODES)``
    ``fn(inputs) -> tensor or tuple of tensors``.  ``skip(case, device) -> reason | None``
    says before any run why it cannot serve a case.  An ``fn`` that finds out only when
    called raises :class:`Unsupported` (fastlm's ``BackendError`` and
    ``NotImplementedError`` count the same): the row is "skipped" with that reason.  Any
    other exception gives an "error" row with the message; the run goes on.
``fastlm_providers(call, backends=BACKENDS, name="fastlm-{backend}", skip=None)``
    one provider per fastlm backend, ``call(inputs, backend)``; a backend that cannot run
    in this process (extension not built, no Triton, the Triton *interpreter*) is skipped
    with the registry's reason.
``run(name, cases, providers, modes=MODES, device=None, baseline=None, ...) -> list[dict]``
    measures every (case, provider, mode), shows a tqdm bar (a line per case when stderr
    is not a terminal), measures the ceilings once, appends the rows to
    ``bench/results/<name>.csv`` and ``.json`` after each case (see :class:`Recorder`; a
    run cut off by a time limit keeps its finished cases) and prints a markdown table
    (``bench/report.py``) with speedups over ``baseline``.
``measure_ceilings(device, matmul_dtype=None) -> dict``
    the device's copy bandwidth (GB/s, bytes read + written by one large copy) and matmul
    rate (TFLOP/s, a large bf16 matmul on GPU, fp32 on CPU), measured now, on random data.
``Recorder(name, results_dir=None)``; ``environment(device)``; ``summarize(times)``.
``arg_parser(description)`` / ``run_kwargs(args)``: the flags every bench script shares
(``--quick`` for a small CPU run, ``--gpu-check`` for the short GPU-sized run of
``bench/gpu_check.sh``, ``--dry-run`` for that script's dry run: the ``--quick`` sizes,
only the first case, one timed call each, no ceilings; ``--device``, ``--modes``,
``--providers``, ``--rep-ms`` ...).
``backend_skip_reason(backend, device)``: why a fastlm backend cannot be timed here.

Modes: ``forward`` times ``fn``; ``backward`` runs ``fn`` once per input set (untimed)
and times ``torch.autograd.grad`` of its outputs (fixed random output gradients,
``retain_graph=True``); ``full`` times forward + backward together.

Timing: on CUDA each call sits between two CUDA events (the time includes launch gaps
when the host cannot keep ahead); on CPU ``time.perf_counter``.  Warm-up runs until
``warmup_ms`` has passed (so autotuning, compilation and handle creation stay out),
then ``rep_ms`` decides the number of timed calls (clamped to [min_reps, max_reps]).
Rows report the median and the 20th / 80th percentiles.  When one input set is smaller
than four times the last-level cache, up to 8 sets are made and the calls rotate over
them, so a fast kernel is not timed reading from cache.

Peak memory (``peak_mb``): on CUDA, ``torch.cuda.max_memory_allocated`` during one call
minus what was allocated before it (``fastlm.finetune.memory.PeakMemory``: the inputs and,
in backward mode, the saved graph are not counted; outputs and workspaces are).  On CPU there is no allocator counter: a
thread samples the process's resident set size (``/proc/self/statm``, about every
0.2 ms) during one call and reports the growth over the RSS before it.  That is a lower
bound and a rough one: blocks the allocator reuses from its free lists, and spikes
shorter than the sampling interval, are not seen.  Running the script with
``MALLOC_MMAP_THRESHOLD_=65536`` (glibc) makes large tensors come from, and go back
to, the OS, so the growth then tracks them better.  Compare CPU memory numbers only
between large differences.

For a number that no short peak escapes, ``fastlm.finetune.memory.PeakMemory`` resets the
kernel's own high-water mark (``VmHWM``, writing 5 to ``/proc/self/clear_refs``) and reports
its growth over the resident size before the block; the scripts run it in a fresh process
with ``MALLOC_MMAP_THRESHOLD_=65536`` (bench_training, bench_cross_entropy --cpu-targets,
bench_deberta_training, bench_sentence_transformers).

Nothing here asserts a time; tests of the harness live in ``tests/test_bench_harness.py``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

# the records half of the harness (bench/records.py), re-exported: scripts import harness only
from records import (BENCH_DIR, COLUMNS, META_COLUMNS, Recorder, environment, git_commit,  # noqa: F401
                     results_dir_default)
# and its measuring half (bench/measuring.py): statistics, timing, peak memory, ceilings
from measuring import derived, measure_ceilings, peak_memory_mb, summarize, time_calls  # noqa: F401

MODES = ("forward", "backward", "full")
BACKENDS = ("reference", "cpu", "torch", "triton", "cuda")  # a name this fastlm lacks: skipped, with the reason
MAX_INPUT_SETS = 8

class Unsupported(Exception):
    """Raised by a provider's ``fn`` when it cannot serve this input (row: "skipped")."""


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One input configuration (see the module docstring)."""

    name: str
    make_inputs: Callable[[torch.device], dict]
    grad: tuple = ()
    flops: dict = field(default_factory=dict)
    bytes: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    modes: tuple | None = None  # the modes worth measuring for this case (None: all asked for)


@dataclass
class Provider:
    """One implementation under test (see the module docstring)."""

    name: str
    fn: Callable[[dict], Any]
    skip: Callable[[Case, torch.device], str | None] | None = None
    modes: tuple = MODES

    def skip_reason(self, case: Case, device: torch.device, mode: str) -> str | None:
        if mode not in self.modes:
            return f"{self.name} does not implement mode {mode}"
        return self.skip(case, device) if self.skip is not None else None


def skip_exceptions() -> tuple:
    excs = [Unsupported, NotImplementedError]
    try:
        from fastlm.registry import BackendError

        excs.append(BackendError)
    except Exception:  # fastlm not importable: nothing more to recognise
        pass
    return tuple(excs)


def backend_skip_reason(backend: str, device: torch.device | str) -> str | None:
    """Why fastlm backend ``backend`` cannot be timed on ``device`` tensors in this process
    (not registered, unavailable, wrong device, or the Triton interpreter), or None."""
    device = torch.device(device)
    try:
        from fastlm import registry
    except Exception as exc:
        return f"fastlm not importable: {type(exc).__name__}: {exc}"
    b = registry.BACKENDS.get(backend)
    if b is None:
        return f"backend {backend!r} is not registered in this fastlm ({', '.join(registry.BACKENDS)})"
    why = b.unavailable_reason()
    if why:
        return why
    if backend == "triton" and registry.triton_interpreted():
        return "TRITON_INTERPRET=1: the Triton interpreter is not benchmarked"
    devices = b.devices()
    if devices and device.type not in devices:
        return f"{backend} runs on {'/'.join(sorted(devices))} tensors, not {device.type}"
    return None


def fastlm_providers(call: Callable[[dict, str], Any], backends: Iterable[str] = BACKENDS,
                     name: str = "fastlm-{backend}", skip: Callable | None = None) -> list[Provider]:
    """One :class:`Provider` per fastlm backend: ``call(inputs, backend)`` runs the op.

    ``name`` is formatted with the backend (e.g. ``"fastlm-{backend}-varlen"``).
    A backend that cannot run in this process (compiled extension missing, Triton not
    installed, CPU tensors for a GPU backend) is skipped with the registry's reason, and
    so is the Triton interpreter (``TRITON_INTERPRET=1``), which is for tests, not
    timing.  ``skip(case, device, backend)`` adds case-specific refusals.  A backend that
    refuses an input when called raises ``BackendError``: that row is "skipped" too.
    """
    def make(backend: str) -> Provider:
        def reason(case: Case, device: torch.device) -> str | None:
            why = backend_skip_reason(backend, device)
            if why is None and skip is not None:
                why = skip(case, device, backend)
            return why

        return Provider(name.format(backend=backend), lambda inputs: call(inputs, backend), reason)

    return [make(b) for b in backends]


# ------------------------------------------------------------------------ inputs
def _cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError):
        return 32 * 2**20


def input_bytes(inputs: dict) -> int:
    return sum(v.numel() * v.element_size() for v in inputs.values() if isinstance(v, torch.Tensor))


# --------------------------------------------------------------------------- running
def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    raise TypeError(f"provider returned {type(out).__name__}, expected a tensor or a tuple of tensors")


def _grad_outputs(outs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Fixed random gradients for the differentiable outputs (ones for a scalar loss)."""
    return [torch.ones_like(o) if o.numel() == 1 else torch.randn_like(o) for o in outs]


def _differentiable(out) -> list[torch.Tensor]:
    outs = [o for o in _tensors(out) if o.requires_grad]
    if not outs:
        raise Unsupported("the output does not require grad: no backward to time")
    return outs


class _Measurement:
    """Builds the timed call for one (case inputs, provider, mode)."""

    def __init__(self, sets: list[dict], leaves: list[list[torch.Tensor]], provider: Provider, mode: str):
        self.sets, self.leaves, self.fn, self.mode = sets, leaves, provider.fn, mode
        self.state = []
        if mode in ("backward", "full"):
            for inputs in sets:
                outs = _differentiable(self.fn(inputs))
                grads = _grad_outputs(outs)
                self.state.append((outs if mode == "backward" else None, grads))

    def call(self, i: int):
        if self.mode == "forward":
            return self.fn(self.sets[i])
        outs, grads = self.state[i]
        if self.mode == "full":
            outs = _differentiable(self.fn(self.sets[i]))
        return torch.autograd.grad(outs, self.leaves[i], grads, retain_graph=self.mode == "backward",
                                   allow_unused=True)


def _make_sets(case: Case, device: torch.device, rotate: bool) -> list[dict]:
    first = case.make_inputs(device)
    n = 1
    if rotate:
        size = max(input_bytes(first), 1)
        n = max(1, min(MAX_INPUT_SETS, math.ceil(4 * _cache_bytes(device) / size)))
    sets = [first] + [case.make_inputs(device) for _ in range(n - 1)]
    for inputs in sets:
        for name in case.grad:
            inputs[name].requires_grad_(True)
    return sets


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure(case: Case, provider: Provider, mode: str, device: torch.device, sets: list[dict],
            ceilings: dict | None, *, warmup_ms: float, rep_ms: float, min_reps: int,
            max_reps: int, memory: bool = True) -> dict:
    """One result row (without metadata) for ``provider`` on ``case`` in ``mode``."""
    row = {"case": case.name, "provider": provider.name, "mode": mode, **case.params}
    flops, nbytes = case.flops.get(mode), case.bytes.get(mode)
    row.update(flops=flops, bytes=nbytes, input_sets=len(sets))
    why = provider.skip_reason(case, device, mode)
    if case.modes is not None and mode not in case.modes:
        why = f"case {case.name} is measured in {'/'.join(case.modes)} only"
    if why:
        return {**row, "status": "skipped", "reason": why}
    leaves = [[inputs[name] for name in case.grad] for inputs in sets]
    if mode != "forward" and not case.grad:
        return {**row, "status": "skipped", "reason": "case has no grad inputs"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = _Measurement(sets, leaves, provider, mode)
            times = time_calls(m.call, device, len(sets), warmup_ms=warmup_ms, rep_ms=rep_ms,
                               min_reps=min_reps, max_reps=max_reps)
            peak = peak_memory_mb(lambda: m.call(0), device) if memory else None
        stats = summarize(times)
        row.update(status="ok", reason="", peak_mb=peak, **stats)
        row.update(derived(stats["ms_median"], flops, nbytes, ceilings))
    except skip_exceptions() as exc:
        row.update(status="skipped", reason=f"{type(exc).__name__}: {exc}".strip()[:300])
    except Exception as exc:  # recorded, never fatal: the next provider still runs
        msg = "out of memory" if isinstance(exc, torch.cuda.OutOfMemoryError) else f"{type(exc).__name__}: {exc}"
        row.update(status="error", reason=msg.strip().splitlines()[0][:300] if msg.strip() else type(exc).__name__)
    finally:
        m = None
        _release(device)
    return row


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run(name: str, cases: list[Case], providers: list[Provider], modes: Iterable[str] = MODES, *,
        device: torch.device | str | None = None, warmup_ms: float | None = None,
        rep_ms: float | None = None, min_reps: int | None = None, max_reps: int = 1000,
        rotate: bool = True, ceilings: bool = True, record: bool = True,
        results_dir: str | Path | None = None, progress: bool = True, memory: bool = True,
        print_table: bool = True, baseline: str | None = None, cases_limit: int | None = None) -> list[dict]:
    """Measure every (case, provider, mode); record and print the results (see module doc).

    Rows are appended to the results files after each case, so a run cut off by a time
    limit keeps the cases it finished.  ``baseline`` names the provider the report's
    speedups are relative to (recorded in every row).  ``cases_limit``: only the first cases.
    """
    cases = cases[:cases_limit] if cases_limit is not None else cases
    device = torch.device(device) if device is not None else default_device()
    gpu = device.type == "cuda"
    warmup_ms = warmup_ms if warmup_ms is not None else (25.0 if gpu else 20.0)
    rep_ms = rep_ms if rep_ms is not None else (200.0 if gpu else 100.0)
    min_reps = min_reps if min_reps is not None else (10 if gpu else 3)
    modes = tuple(modes)
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    env = environment(device)
    ceiling = measure_ceilings(device) if ceilings else {}
    meta = {"run_id": f"{env['timestamp']}-{uuid.uuid4().hex[:8]}", "timestamp": env["timestamp"], "bench": name,
            "baseline": baseline or "", "ceiling_copy_gbps": ceiling.get("copy_gbps"),
            "ceiling_matmul_tflops": ceiling.get("matmul_tflops"), **{k: env[k] for k in META_COLUMNS}}
    recorder = Recorder(name, results_dir) if record else None
    rows = []
    from tqdm.auto import tqdm

    # A bar on a terminal; in a log file (gpu_check.sh) one line per finished case instead.
    interactive = progress and sys.stderr.isatty()
    bar = tqdm(total=len(cases) * len(providers) * len(modes), desc=name, disable=not interactive,
               file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        case_rows = []
        sets = None
        try:
            sets = _make_sets(case, device, rotate)
        except Exception as exc:  # e.g. out of memory for the inputs themselves
            reason = f"inputs could not be made: {type(exc).__name__}: {exc}"[:300]
        for provider in providers:
            for mode in modes:
                bar.set_postfix_str(f"{case.name} {provider.name} {mode}", refresh=False)
                if sets is None:
                    row = {"case": case.name, "provider": provider.name, "mode": mode, **case.params,
                           "status": "error", "reason": reason}
                else:
                    row = measure(case, provider, mode, device, sets, ceiling, warmup_ms=warmup_ms,
                                  rep_ms=rep_ms, min_reps=min_reps, max_reps=max_reps, memory=memory)
                case_rows.append({**row, **meta})
                bar.update()
        del sets
        _release(device)
        if recorder is not None:
            recorder.write(case_rows, env, ceiling)
        rows += case_rows
        if progress and not interactive:
            ok = sum(r["status"] == "ok" for r in case_rows)
            print(f"{name}: case {i + 1}/{len(cases)} {case.name}: {ok}/{len(case_rows)} measured "
                  f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    bar.close()
    if print_table:
        sys.path.insert(0, str(BENCH_DIR)) if str(BENCH_DIR) not in sys.path else None
        import report

        print(report.markdown(rows, ceilings=ceiling, env=env))
    return rows


# ------------------------------------------------------------------------------ CLI
class _DryRun(argparse.Action):
    """``--dry-run`` also sets ``--quick``, so every script picks its small sizes."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.dry_run = namespace.quick = True


def arg_parser(description: str) -> argparse.ArgumentParser:
    """The flags every bench script shares (add your own before ``parse_args``)."""
    p = argparse.ArgumentParser(description=description)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small shapes, minutes on a laptop CPU")
    size.add_argument("--gpu-check", action="store_true",
                      help="the short GPU-sized run of bench/gpu_check.sh (a minute or two)")
    p.add_argument("--dry-run", action=_DryRun,
                   help="bench/gpu_check.sh's dry run: --quick sizes, first case only, one timed call, no ceilings "
                        "(a script with a tiny variant of its --gpu-check workloads reads args.dry_run)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of forward,backward,full")
    p.add_argument("--providers", default=None, help="comma-separated provider names to keep (default: all)")
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None, help="timed milliseconds per measurement")
    p.add_argument("--results-dir", default=None, help="default: bench/results (or $FASTLM_BENCH_RESULTS)")
    p.add_argument("--no-record", action="store_true", help="do not append to the results files")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring copy/matmul ceilings")
    p.add_argument("--no-progress", action="store_true")
    return p


def run_kwargs(args: argparse.Namespace) -> dict:
    """``run()`` keyword arguments from :func:`arg_parser`'s flags."""
    kw = {
        "modes": tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        "device": args.device,
        "warmup_ms": args.warmup_ms,
        "rep_ms": args.rep_ms,
        "record": not args.no_record,
        "ceilings": not args.no_ceilings,
        "results_dir": args.results_dir,
        "progress": not args.no_progress,
    }
    if getattr(args, "gpu_check", False):  # gpu_check.sh gives each bench script about a minute
        kw["rep_ms"] = 50.0 if args.rep_ms is None else args.rep_ms
        kw["warmup_ms"] = 10.0 if args.warmup_ms is None else args.warmup_ms
    if getattr(args, "dry_run", False):  # gpu_check.sh's dry run: every code path, as little work as possible
        kw.update(cases_limit=1, min_reps=1, max_reps=1, warmup_ms=0.0, rep_ms=0.0, ceilings=False)
    return kw


def select_providers(providers: list[Provider], names: str | None) -> list[Provider]:
    """Keep the providers named in a comma-separated list (``--providers``); all if None."""
    if not names:
        return providers
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(wanted) - {p.name for p in providers})
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; known: {[p.name for p in providers]}")
    return [p for p in providers if p.name in wanted]
