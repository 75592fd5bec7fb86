"""How the harness measures (part of bench/harness.py, which re-exports it): statistics of
timings, interleaved timing of calls over rotating input sets, peak memory of one call, and
the copy / matmul ceilings measured in the same run that rows are reported against."""
from __future__ import annotations

import math
import os
import threading
import time
from typing import Any, Callable, Iterable

import torch

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
