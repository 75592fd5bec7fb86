"""What the Triton kernels share: autotuning plumbing and a rounding helper.

Autotuning (``triton.autotune`` with ``prune_configs_by=pruner(...)``):

* Configs are pruned against the GPU's shared memory per program (the opt-in maximum:
  227 KiB on H100/H200, 163 KiB on A100).  The limit is read from the driver at the
  first launch on a device (the pruner runs then), never at import, and cached.
* When no config fits at its pipeline depth, the same configs with ``num_stages=1`` (no
  multi-buffered operand copies: the least shared memory each tile size can take) are
  benchmarked instead; only if none of those fits either is the smallest one run.
* ``FASTLM_TRITON_AUTOTUNE=0`` pins every autotuned kernel to one config, the first
  that fits the device, without benchmarking (tests: deterministic, no tuning time);
  benchmarks leave it unset and autotune.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import triton
import triton.language as tl


def autotune_enabled() -> bool:
    """False under ``FASTLM_TRITON_AUTOTUNE=0`` (read at each tuning, i.e. each new key)."""
    return os.environ.get("FASTLM_TRITON_AUTOTUNE", "1").strip() != "0"


def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one program may use on this CUDA device."""
    return _shared_memory_limit(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _shared_memory_limit(index: int) -> int:
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])


def one_stage(config: triton.Config) -> triton.Config:
    """``config`` without software pipelining (``num_stages=1``)."""
    return triton.Config(dict(config.kwargs), num_warps=config.num_warps, num_stages=1)


def choose(configs: list[triton.Config], shared_bytes: Callable[[triton.Config], int], limit: int,
           preferred: Callable[[triton.Config], bool] = lambda c: True) -> list[triton.Config]:
    """The configs to benchmark, best first: those that are ``preferred`` (e.g. within a
    register budget) and fit ``limit`` bytes of shared memory; else those that fit; else
    their ``num_stages=1`` copies that fit; else the one-stage copy needing the least.
    Under ``FASTLM_TRITON_AUTOTUNE=0`` only the first of the list."""
    fits = [c for c in configs if shared_bytes(c) <= limit]
    chosen = [c for c in fits if preferred(c)] or fits
    if not chosen:
        single = [one_stage(c) for c in configs]
        chosen = [c for c in single if shared_bytes(c) <= limit] or [min(single, key=shared_bytes)]
    return chosen if autotune_enabled() else chosen[:1]


def pruner(shared_bytes, preferred=None) -> dict:
    """``prune_configs_by`` for ``triton.autotune``: :func:`choose` against the shared
    memory of the device the launch's first tensor argument lives on.
    ``shared_bytes(config, named_args, meta)`` estimates a config's shared memory (an
    upper bound: tests/test_triton_compile.py checks it against the compiler's figure);
    ``preferred(config, named_args, meta)`` marks the configs to try first."""
    def prune(configs, named_args, **meta):
        device = next(a.device for a in named_args.values() if isinstance(a, torch.Tensor))
        return choose(configs, lambda c: shared_bytes(c, named_args, meta), shared_memory_limit(device),
                      (lambda c: preferred(c, named_args, meta)) if preferred else (lambda c: True))

    prune.shared_bytes = shared_bytes  # for tests/test_triton_compile.py
    return {"early_config_prune": prune}


@triton.jit
def narrow(x, dtype: tl.constexpr):
    """fp32 -> ``dtype``, rounding to nearest even.  For bf16 the rounding is done by hand
    first: a no-op on a GPU (whose cast rounds the same way), and right under
    TRITON_INTERPRET=1, whose fp32 -> bf16 cast truncates (twice the error)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
