"""Backends, per-op implementation tables, and per-call backend selection.

Dispatch is data: every op module registers one :class:`Implementation` row per
backend that has a kernel for it, saying which dtypes it takes and, through
``limits``, which inputs it refuses and why.  :func:`select` walks the rows in
:data:`PRIORITY` order and returns the first that can serve the call.

* ``backend="auto"`` (or unset) picks the fastest row that supports the input and
  is trusted: a GPU kernel that has never passed the test suite on a real GPU
  (``verified=None``) is never auto-selected, nor is the Triton interpreter.
* An explicit ``backend=`` (or ``FASTLM_BACKEND``) that cannot serve the input
  raises :class:`BackendError` listing the reasons.

Nothing here imports a kernel module, compiles, or queries a device.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from fastlm import _ext

PRIORITY = ("cuda", "triton", "cpu", "reference")
UNVERIFIED = "compiled, unverified (never run on a GPU): not auto-selected"


class BackendError(ValueError, RuntimeError):
    """An explicitly requested backend cannot serve this input (or no backend can)."""


def triton_interpreted() -> bool:
    """True under ``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors, slowly."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------- backends
@dataclass(frozen=True)
class Backend:
    """A family of kernels: where it runs and whether it can run in this process."""

    name: str
    summary: str
    runs_on_gpu: bool
    _devices: Callable[[], frozenset]
    _unavailable: Callable[[], str | None]

    def devices(self) -> frozenset:
        """Device types this backend takes tensors from (an empty set means any)."""
        return self._devices()

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run in this process at all, or None."""
        return self._unavailable()


def _triton_unavailable() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def _cuda_unavailable() -> str | None:
    why = _ext.unavailable_reason()
    if why:
        return why
    if not _ext.with_cuda():
        return "fastlm._C was built without CUDA kernels (CPU-only torch, no nvcc, or FASTLM_SKIP_CUDA_BUILD=1)"
    return None


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("cuda", "CUDA C++ kernels in fastlm._C", True,
                lambda: frozenset({"cuda"}), _cuda_unavailable),
        Backend("triton", "Triton kernels in fastlm.kernels", True,
                lambda: frozenset({"cuda", "cpu"} if triton_interpreted() else {"cuda"}),
                _triton_unavailable),
        Backend("cpu", "C++ CPU kernels in fastlm._C", False,
                lambda: frozenset({"cpu"}), _ext.unavailable_reason),
        Backend("reference", "pure PyTorch, fp32 accumulation: the ground truth", False,
                lambda: frozenset(), lambda: None),
    )
}


# --------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Problem:
    """What a backend needs to know about one call to decide whether it can serve it.

    ``attrs`` holds op-specific facts (head_dim, row length, features, ...); read
    them with ``problem["head_dim"]`` or ``problem.get("dropout", False)``.
    """

    device: str
    dtype: torch.dtype
    attrs: tuple = ()

    @staticmethod
    def of(device: torch.device | str, dtype: torch.dtype, **attrs) -> "Problem":
        device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
        return Problem(device_type, dtype, tuple(sorted(attrs.items())))

    def get(self, key, default=None):
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    def __getitem__(self, key):
        sentinel = object()
        value = self.get(key, sentinel)
        if value is sentinel:
            raise KeyError(key)
        return value


def _no_limits(problem: Problem) -> Iterable[str]:
    return ()


# ---------------------------------------------------------------------- implementations
@dataclass(frozen=True)
class Implementation:
    """One backend's kernels for one op.

    The kernels are the functions ``<op>_<stage>`` (``softmax_forward``,
    ``softmax_backward``, ...) found in ``module``: a Python module path for the
    reference and Triton backends, or ``"fastlm_C"`` for the C++/CUDA kernels
    registered under ``torch.ops.fastlm_C`` by the compiled extension.
    """

    op: str
    backend: str
    module: str
    dtypes: tuple
    limits: Callable[[Problem], Iterable[str]] = _no_limits
    # GPU backends only: None until the kernels pass the test suite on a real GPU,
    # then where and when they did (e.g. "H200, 2026-12-01, bench/results/...").
    verified: str | None = None

    def function(self, stage: str) -> Callable:
        name = f"{self.op}_{stage}"
        if self.module == "fastlm_C":
            return getattr(_ext.kernels(), name)
        return getattr(importlib.import_module(self.module), name)

    def unsupported_reasons(self, problem: Problem) -> list[str]:
        """Readable reasons this implementation cannot serve ``problem`` (empty: it can)."""
        backend = BACKENDS[self.backend]
        why = backend.unavailable_reason()
        if why:
            return [why]
        if self.module == "fastlm_C":
            why = _compiled_kernel_missing(f"{self.op}_forward", "CUDA" if self.backend == "cuda" else "CPU")
            if why:
                return [why]
        reasons = []
        devices = backend.devices()
        if devices and problem.device not in devices:
            extra = " (set TRITON_INTERPRET=1 to interpret on CPU)" if self.backend == "triton" else ""
            reasons.append(f"runs on {'/'.join(sorted(devices))} tensors, not {problem.device}{extra}")
        if problem.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {str(problem.dtype).replace('torch.', '')} not supported (supports {names})")
        reasons.extend(self.limits(problem))
        return reasons

    def auto_exclusion(self, problem: Problem) -> str | None:
        """Why ``auto`` skips this implementation although it could run, or None."""
        if BACKENDS[self.backend].runs_on_gpu:
            if problem.device == "cpu" and self.backend == "triton":
                return "Triton interpreter is for tests only: never auto-selected"
            if self.verified is None:
                return UNVERIFIED
        return None

    @property
    def status(self) -> str:
        """Trust status for ``fastlm info``."""
        if not BACKENDS[self.backend].runs_on_gpu:
            return "tested on CPU"
        return f"verified on GPU: {self.verified}" if self.verified else "compiled, unverified"


@functools.lru_cache(maxsize=None)
def _compiled_kernel_missing(name: str, dispatch_key: str) -> str | None:
    """A ``fastlm._C`` built from older sources may lack a kernel: say so instead of crashing."""
    # A kernel registered for the device, or one composite kernel for every device.
    keys = (dispatch_key, "CompositeExplicitAutograd", "CompositeImplicitAutograd")
    if not hasattr(_ext.kernels(), name) or not any(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"fastlm_C::{name}", key) for key in keys):
        return f"fastlm._C has no {dispatch_key} kernel fastlm_C::{name} (rebuild the extension)"
    return None


_TABLES: dict[str, dict[str, Implementation]] = {}


def register(*impls: Implementation) -> None:
    """Add implementation rows (one per backend) to their ops' tables."""
    for impl in impls:
        if impl.backend not in BACKENDS:
            raise ValueError(f"unknown backend {impl.backend!r}")
        _TABLES.setdefault(impl.op, {})[impl.backend] = impl


def table(op: str) -> dict[str, Implementation]:
    """The registered implementations of ``op``, by backend name."""
    if op not in _TABLES:
        importlib.import_module("fastlm.ops")  # op modules register on import
    return _TABLES[op]


def ops() -> list[str]:
    """Every registered op's name."""
    importlib.import_module("fastlm.ops")
    return sorted(_TABLES)


def check_backend_name(backend: str | None) -> str:
    """Validate a user's ``backend=`` argument (None means "auto")."""
    if backend is None:
        return "auto"
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")
    return backend


def requested_backend(backend: str | None) -> str:
    """The caller's backend, or ``FASTLM_BACKEND`` when the caller says auto."""
    backend = check_backend_name(backend)
    if backend == "auto":
        env = os.environ.get("FASTLM_BACKEND", "").strip()
        if env:
            try:
                return check_backend_name(env)
            except ValueError as exc:
                raise ValueError(f"FASTLM_BACKEND: {exc}") from None
    return backend


def select(op: str, problem: Problem, backend: str | None = "auto") -> Implementation:
    """The implementation that serves this call (see module docstring)."""
    wanted = requested_backend(backend)
    rows = table(op)
    if wanted != "auto":
        impl = rows.get(wanted)
        if impl is None:
            raise BackendError(f"fastlm.{op}: backend {wanted!r} has no kernel for this op (it has: {', '.join(rows)})")
        reasons = impl.unsupported_reasons(problem)
        if reasons:
            raise BackendError(f"fastlm.{op}: backend {wanted!r} cannot serve this input: " + "; ".join(reasons))
        return impl
    report = []
    for name in PRIORITY:
        impl = rows.get(name)
        if impl is None:
            continue
        reasons = impl.unsupported_reasons(problem)
        if not reasons:
            excluded = impl.auto_exclusion(problem)
            if excluded is None:
                return impl
            reasons = [excluded]
        report.append(f"{name}: {'; '.join(reasons)}")
    raise BackendError(f"fastlm.{op}: no backend can serve this input:\n  " + "\n  ".join(report))


def explain(op: str, problem: Problem) -> dict[str, list[str]]:
    """For each backend of ``op``: why it would not be auto-selected for ``problem`` (empty: it could be)."""
    out = {}
    for name, impl in table(op).items():
        reasons = impl.unsupported_reasons(problem)
        excluded = None if reasons else impl.auto_exclusion(problem)
        out[name] = reasons + ([excluded] if excluded else [])
    return out
