"""The shared benchmark harness: providers x cases x modes -> timed, recorded rows.

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
import csv
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

MODES = ("forward", "backward", "full")
BACKENDS = ("reference", "cpu", "torch", "triton", "cuda")  # a name this fastlm lacks: skipped, with the reason
BENCH_DIR = Path(__file__).resolve().parent
MAX_INPUT_SETS = 8

# Columns in the order the CSV writes them (extra keys, e.g. case params, follow).
COLUMNS = (
    "run_id", "timestamp", "bench", "baseline", "case", "provider", "mode", "status", "reason",
    "ms_median", "ms_p20", "ms_p80", "reps", "input_sets", "peak_mb",
    "flops", "bytes", "tflops", "gbps", "frac_matmul", "frac_copy",
    "ceiling_copy_gbps", "ceiling_matmul_tflops",
    "device", "device_type", "python", "torch", "triton", "transformers", "cuda", "commit",
)
META_COLUMNS = ("device", "device_type", "python", "torch", "triton", "transformers", "cuda", "commit")


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


# ------------------------------------------------------------------------ statistics
def quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values (numpy's default method)."""
    if not sorted_values:
        raise ValueError("quantile of no values")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms: Iterable[float]) -> dict:
    """Median, 20th and 80th percentile, mean, min and count of timings in ms."""
    values = sorted(float(t) for t in times_ms)
    return {
        "ms_median": quantile(values, 0.5),
        "ms_p20": quantile(values, 0.2),
        "ms_p80": quantile(values, 0.8),
        "ms_mean": sum(values) / len(values),
        "ms_min": values[0],
        "reps": len(values),
    }


def derived(ms: float, flops: float | None, nbytes: float | None, ceilings: dict | None) -> dict:
    """TFLOP/s and GB/s from counted work and a time, and their fraction of the ceilings."""
    out = {"tflops": None, "gbps": None, "frac_matmul": None, "frac_copy": None}
    if ms is None or ms <= 0:
        return out
    seconds = ms * 1e-3
    ceilings = ceilings or {}
    if flops:
        out["tflops"] = flops / seconds / 1e12
        if ceilings.get("matmul_tflops"):
            out["frac_matmul"] = out["tflops"] / ceilings["matmul_tflops"]
    if nbytes:
        out["gbps"] = nbytes / seconds / 1e9
        if ceilings.get("copy_gbps"):
            out["frac_copy"] = out["gbps"] / ceilings["copy_gbps"]
    return out


# ---------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(call: Callable[[int], Any], device: torch.device, n_sets: int = 1, *,
               warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 5,
               max_reps: int = 1000) -> list[float]:
    """Per-call times in ms of ``call(i)`` (i rotates over ``n_sets`` input sets)."""
    # Warm-up: every input set at least once, then until warmup_ms has passed.  The
    # median warm-up call (not the mean: the first call may autotune or compile) sizes
    # the timed loop.
    _sync(device)
    t0 = time.perf_counter()
    n, warm = 0, []
    while n < max(n_sets, 2) or (time.perf_counter() - t0) * 1e3 < warmup_ms:
        t = time.perf_counter()
        call(n % n_sets)
        _sync(device)
        warm.append((time.perf_counter() - t) * 1e3)
        n += 1
    estimate = quantile(sorted(warm), 0.5)
    reps = int(max(min_reps, min(max_reps, rep_ms / max(estimate, 1e-6))))
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            call(i % n_sets)
            ends[i].record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    times = []
    for i in range(reps):
        t = time.perf_counter()
        call(i % n_sets)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except Exception:
            return None


class _RssPeak:
    """Samples the resident set size in a thread; ``growth`` = peak - RSS at entry."""

    def __init__(self, interval_s: float = 2e-4):
        self.interval_s = interval_s
        self.growth = None

    def __enter__(self):
        self.start = _rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self.start is not None:
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss is not None and rss > self.peak:
                self.peak = rss
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        if self.start is not None:
            self._thread.join()
            rss = _rss_bytes()
            self.growth = max(self.peak, rss or 0) - self.start
        return False


def peak_memory_mb(call: Callable[[], Any], device: torch.device) -> float | None:
    """Extra peak memory of one call in MiB (see the module docstring for what CPU measures)."""
    if device.type == "cuda":
        from fastlm.finetune.memory import PeakMemory

        with PeakMemory(device) as peak:
            result = call()
        del result
        return peak.growth / 2**20
    with _RssPeak() as probe:
        result = call()
    del result
    return None if probe.growth is None else probe.growth / 2**20


# -------------------------------------------------------------------------- ceilings
_CEILINGS: dict = {}


def _median_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    return summarize(time_calls(lambda i: fn(), device, warmup_ms=10.0, rep_ms=0.0,
                                min_reps=reps, max_reps=reps))["ms_median"]


def measure_ceilings(device: torch.device | str, matmul_dtype: torch.dtype | None = None,
                     copy_bytes: int | None = None, matmul_n: int | None = None) -> dict:
    """Copy bandwidth and matmul rate of ``device``, measured now (cached per process).

    Copy: ``dst.copy_(src)`` of ``copy_bytes`` (1 GiB on GPU, 256 MiB on CPU), counting
    the bytes read plus the bytes written.  Matmul: an ``n x n x n`` product of random
    matrices (8192 bf16 on GPU, 2048 fp32 on CPU), 2 n^3 flops.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gpu = device.type == "cuda"
    matmul_dtype = matmul_dtype or (torch.bfloat16 if gpu else torch.float32)
    copy_bytes = copy_bytes or (2**30 if gpu else 2**28)
    matmul_n = matmul_n or (8192 if gpu else 2048)
    key = (str(device), matmul_dtype, copy_bytes, matmul_n)
    if key in _CEILINGS:
        return _CEILINGS[key]

    def copy_ms() -> float:  # the buffers are freed on return, before the matmul's are made
        src = torch.randn(copy_bytes // 4, device=device)
        dst = torch.empty_like(src)
        return _median_ms(lambda: dst.copy_(src), device, reps=20 if gpu else 5)

    def matmul_ms() -> float:
        a = torch.randn(matmul_n, matmul_n, device=device, dtype=matmul_dtype)
        b = torch.randn(matmul_n, matmul_n, device=device, dtype=matmul_dtype)
        return _median_ms(lambda: a @ b, device, reps=20 if gpu else 3)

    copy_ms, mm_ms = copy_ms(), matmul_ms()
    result = {
        "copy_gbps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9,
        "matmul_tflops": 2 * matmul_n**3 / (mm_ms * 1e-3) / 1e12,
        "copy_bytes": copy_bytes,
        "matmul_n": matmul_n,
        "matmul_dtype": str(matmul_dtype).replace("torch.", ""),
    }
    _CEILINGS[key] = result
    return result


# ------------------------------------------------------------------------ metadata
def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit(repo: Path = BENCH_DIR.parent) -> str:
    """``FASTLM_GIT_COMMIT`` if set, else ``git rev-parse HEAD`` (+"-dirty"), else "unknown"."""
    if os.environ.get("FASTLM_GIT_COMMIT"):
        return os.environ["FASTLM_GIT_COMMIT"]
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str) -> dict:
    """Device, versions, commit and time of this run (recorded with every row)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()} ({torch.get_num_threads()} threads)"
    return {
        "device": name,
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _dist_version("triton"),
        "transformers": _dist_version("transformers"),
        "cuda": torch.version.cuda or "none",
        "commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }


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


# ------------------------------------------------------------------------- recording
def results_dir_default() -> Path:
    """``FASTLM_BENCH_RESULTS`` if set (gpu_check.sh's dry run uses it), else ``bench/results``."""
    return Path(os.environ.get("FASTLM_BENCH_RESULTS") or BENCH_DIR / "results")


class Recorder:
    """Appends result rows to ``<results_dir>/<name>.csv`` and ``<name>.json``.

    The CSV has one row per measurement with the metadata repeated in every row (a
    header change, e.g. new param columns, rewrites the file with the union of columns).
    The JSON is a list of runs, each ``{"meta": environment, "ceilings": ..., "rows": [...]}``.
    """

    def __init__(self, name: str, results_dir: str | Path | None = None):
        self.dir = Path(results_dir) if results_dir is not None else results_dir_default()
        self.csv_path = self.dir / f"{name}.csv"
        self.json_path = self.dir / f"{name}.json"

    def write(self, rows: list[dict], meta: dict, ceilings: dict) -> None:
        """Append ``rows``; rows of a run already in the JSON (same ``run_id``) join it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._append_csv(rows)
        self._append_json({"meta": meta, "ceilings": ceilings, "rows": rows})

    def _append_csv(self, rows: list[dict]) -> None:
        old_rows, old_cols = [], []
        if self.csv_path.exists() and self.csv_path.stat().st_size:
            with open(self.csv_path, newline="") as f:
                reader = csv.DictReader(f)
                old_cols = list(reader.fieldnames or [])
                old_rows = list(reader)
        cols = list(old_cols) or [c for c in COLUMNS]
        for row in rows:
            cols += [k for k in row if k not in cols]
        mode = "a" if cols == old_cols else "w"
        with open(self.csv_path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            if mode == "w":
                writer.writeheader()
                writer.writerows(old_rows)
            writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)

    def _append_json(self, run: dict) -> None:
        runs = []
        if self.json_path.exists():
            try:
                runs = json.loads(self.json_path.read_text())
                if not isinstance(runs, list):
                    raise ValueError("not a list of runs")
            except ValueError as exc:
                backup = self.json_path.with_suffix(f".json.bad-{int(time.time())}")
                self.json_path.rename(backup)
                warnings.warn(f"{self.json_path} was unreadable ({exc}); moved to {backup}")
                runs = []
        run_id = run["rows"][0].get("run_id") if run["rows"] else None
        if runs and run_id is not None and runs[-1]["rows"] and runs[-1]["rows"][0].get("run_id") == run_id:
            runs[-1]["rows"] += run["rows"]
        else:
            runs.append(run)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(runs, indent=1, default=str))
        tmp.replace(self.json_path)


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
