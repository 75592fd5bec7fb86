"""Backends, per-op implementation tables, and per-call backend selection.

Dispatch is data.  :data:`BACKENDS` lists the kernel families in priority order; every
op module registers one :class:`Implementation` row per backend that has kernels for
it, declaring its limits as fields (dtypes, head dims, maximum length, supported
optional features); :func:`select` reads them through one generic rule.

* ``backend="auto"`` (or unset) picks the first row, in :data:`BACKENDS` order, that
  can serve the input and is trusted: a row of a backend whose kernels we wrote for a
  GPU counts only once the test suite has passed on a real GPU (``verified``), and the
  Triton interpreter (CPU tensors under ``TRITON_INTERPRET=1``) is never picked.
  PyTorch's own fused kernels (backend ``torch``) are trusted as PyTorch ships them:
  what our tests check is the mapping of our contracts onto them.
* A backend with several kernels for one op (``torch``: flash and memory-efficient
  attention) lists them in its row as :class:`Kernel` entries, each with its own limits;
  the row serves a call when one of them does, and the first that does runs it.
* An explicit ``backend=`` (or ``FASTLM_BACKEND``) that cannot serve the input raises
  :class:`BackendError` naming the input and every reason.
* Each decision is cached per (op, problem, request, environment): ``select`` runs per
  layer per step, and after the first call it costs a dictionary lookup.

Nothing here imports a kernel module, compiles, or queries a device; each backend's
availability is probed once per process, on first use.

Adding a backend (data only)
----------------------------
1. Insert a :class:`Backend` into ``BACKENDS`` at its priority (as ``torch``, PyTorch's
   own fused GPU kernels, trusted without a fastlm GPU record, sits between triton and
   cpu)::

       Backend("torch", "PyTorch's own fused CUDA kernels", frozenset({"cuda"}),
               _torch_unavailable, trusted="vendor kernels, mapping tested on CPU"),

2. Write its kernels as ``<op>_forward`` / ``<op>_backward`` functions in one module per
   op, following the op's kernel-level contract (``fastlm/reference/<op>.py``).
3. Add one :class:`Implementation` row per op it serves to that op's ``registry.register``
   call in ``fastlm/ops/<op>.py``, with its limits.  ``fastlm info`` then lists it, and the
   op's tests take it where ``tests/_backends.py`` says it can run.

Adding an op
------------
Copy the template described in :mod:`fastlm.ops._common` (one ``fastlm/ops/<op>.py``):
it defines the op's ``FEATURES``, registers its rows, builds a :class:`Problem` per call
and calls :func:`select` from inside its ``torch.library`` ops.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple

import torch

from fastlm import _ext

UNVERIFIED = "compiled, unverified (never run on a GPU): not auto-selected"


class BackendError(ValueError, RuntimeError):
    """An explicitly requested backend cannot serve this input (or no backend can)."""


def triton_interpreted() -> bool:
    """True under ``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors, slowly."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- backends
def _available() -> str | None:
    return None


def _triton_unavailable() -> str | None:
    return None if importlib.util.find_spec("triton") is not None else "triton is not installed"


def _torch_unavailable() -> str | None:
    return importlib.import_module("fastlm.aten").unavailable_reason()


def _cuda_unavailable() -> str | None:
    why = _ext.unavailable_reason()
    if why is None and not _ext.with_cuda():
        why = "fastlm._C was built without CUDA kernels (CPU-only torch, no nvcc, or FASTLM_SKIP_CUDA_BUILD=1)"
    return why


@dataclass(frozen=True)
class Backend:
    """A family of kernels: where it runs, whether it can run here, and how far it is trusted.

    ``device_types``: the tensors' device types it takes (empty: any).
    ``probe``: why it cannot run in this process at all, or None; called once per process.
    ``trusted``: the status of its rows when they need no GPU record (e.g. "tested on
    CPU"); None means a row may be auto-selected only once its ``verified`` is set.
    ``interpreted_device_types``: extra device types it takes under ``TRITON_INTERPRET=1``
    (tests only, never auto-selected).
    """

    name: str
    summary: str
    device_types: frozenset
    probe: Callable[[], str | None] = _available
    trusted: str | None = None
    interpreted_device_types: frozenset = frozenset()

    @property
    def runs_on_gpu(self) -> bool:
        return "cuda" in self.device_types

    def devices(self) -> frozenset:
        """Device types this backend takes tensors from in this process (empty: any)."""
        if self.interpreted_device_types and triton_interpreted():
            return self.device_types | self.interpreted_device_types
        return self.device_types

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run in this process at all, or None (probed once)."""
        return _probe(self.name)


# In priority order: ``auto`` tries them top to bottom.
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("cuda", "CUDA C++ kernels in fastlm._C", frozenset({"cuda"}), _cuda_unavailable),
        Backend("triton", "Triton kernels in fastlm.kernels", frozenset({"cuda"}), _triton_unavailable,
                interpreted_device_types=frozenset({"cpu"})),
        Backend("torch", "PyTorch's own fused CUDA kernels, mapped in fastlm.aten", frozenset({"cuda"}),
                _torch_unavailable, trusted="vendor kernels, mapping tested on CPU"),
        Backend("cpu", "C++ CPU kernels in fastlm._C", frozenset({"cpu"}), _ext.unavailable_reason,
                trusted="tested on CPU"),
        Backend("reference", "pure PyTorch, fp32 accumulation: the ground truth", frozenset(),
                trusted="tested on CPU"),
    )
}


@functools.cache
def _probe(name: str) -> str | None:
    return BACKENDS[name].probe()


# --------------------------------------------------------------------------- problems
class Problem(NamedTuple):
    """What a backend needs to know about one call to decide whether it can serve it.

    ``head_dim`` and ``length`` (the longest row or sequence the kernel sees) are None
    when the op has no such size; ``features`` names the optional features the call
    needs, from the op's ``FEATURES``.  Hashable: decisions are cached by it.
    """

    device: str
    dtype: torch.dtype
    head_dim: int | None = None
    length: int | None = None
    features: frozenset = frozenset()

    @staticmethod
    def of(device: torch.device | str, dtype: torch.dtype, *, head_dim: int | None = None,
           length: int | None = None, features: Iterable[str] = ()) -> "Problem":
        device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
        return Problem(device_type, dtype, head_dim, length, frozenset(features))


@dataclass(frozen=True)
class Sizes:
    """The sizes a kernel takes: ``values`` when given, else ``lo..hi`` (``hi`` None: no
    bound) in steps of ``multiple``.  ``Sizes.of(64, 128)``; ``Sizes(16, 256)``."""

    lo: int = 1
    hi: int | None = None
    multiple: int = 1
    values: frozenset | None = None

    @staticmethod
    def of(*values: int) -> "Sizes":
        return Sizes(values=frozenset(values))

    def __contains__(self, n: int) -> bool:
        if self.values is not None:
            return n in self.values
        return n >= self.lo and (self.hi is None or n <= self.hi) and n % self.multiple == 0

    def __str__(self) -> str:
        if self.values is not None:
            return "{" + ", ".join(map(str, sorted(self.values))) + "}"
        text = f"{self.lo}..{'' if self.hi is None else self.hi}"
        return text + (f" (multiples of {self.multiple})" if self.multiple > 1 else "")


# ---------------------------------------------------------------------- implementations
def _limit_reasons(limits: "Implementation | Kernel", problem: Problem) -> list[str]:
    """Which of the declared limits (dtypes, head_dims, max_length, features) ``problem`` exceeds."""
    reasons = []
    if problem.dtype not in limits.dtypes:
        names = ", ".join(_dtype_name(d) for d in limits.dtypes)
        reasons.append(f"dtype {_dtype_name(problem.dtype)} not supported (supports {names})")
    if limits.head_dims is not None and problem.head_dim is not None and problem.head_dim not in limits.head_dims:
        reasons.append(f"head_dim {problem.head_dim} outside {limits.head_dims}")
    if limits.max_length is not None and problem.length is not None and problem.length > limits.max_length:
        reasons.append(f"length {problem.length} > {limits.max_length}")
    missing = problem.features - limits.features
    if missing:
        reasons.append(f"{', '.join(sorted(missing))} not supported")
    return reasons


@dataclass(frozen=True)
class Kernel:
    """One of several kernels a backend has for an op, with its own limits (fields as
    :class:`Implementation`'s).  E.g. the ``torch`` attention row: PyTorch's flash kernel
    (fp16/bf16, windows, bottom-right causal) and its memory-efficient one (fp32 too,
    padding masks, top-left causal; no window)."""

    name: str
    dtypes: tuple
    head_dims: Sizes | None = None
    max_length: int | None = None
    features: frozenset = frozenset()


@dataclass(frozen=True)
class Implementation:
    """One backend's kernels for one op, and the limits of those kernels.

    The kernels are the functions ``<op>_<stage>`` (``softmax_forward``, ...) found in
    ``module``: a Python module path, or ``"fastlm_C"`` for the C++/CUDA kernels
    registered under ``torch.ops.fastlm_C`` by the compiled extension.
    Limits: ``dtypes``; ``head_dims`` (None: any); ``max_length`` (None: any); and
    ``features``, the optional features of the op it supports (a call needing any other
    is refused).  ``kernels``: when the module has several kernels with different limits,
    one :class:`Kernel` each, in the order it prefers them; the row's own limits are then
    their union and a call is served when one kernel's limits allow it (the module runs
    the first such kernel, :meth:`kernel_for`).
    """

    op: str
    backend: str
    module: str
    dtypes: tuple
    head_dims: Sizes | None = None
    max_length: int | None = None
    features: frozenset = frozenset()
    # Rows of a backend that is not ``trusted``: None until the kernels pass the test
    # suite on a real GPU, then where and when they did ("H200, 2026-12-01, bench/results/...").
    verified: str | None = None
    kernels: tuple = ()

    def function(self, stage: str) -> Callable:
        name = f"{self.op}_{stage}"
        if self.module == "fastlm_C":
            return getattr(_ext.kernels(), name)
        return getattr(importlib.import_module(self.module), name)

    def limit_reasons(self, problem: Problem) -> list[str]:
        """Which of this row's declared limits ``problem`` exceeds (empty: none).  With
        ``kernels``: the reasons of each kernel, when none of them can serve it."""
        reasons = _limit_reasons(self, problem)
        if reasons or not self.kernels or self.kernel_for(problem) is not None:
            return reasons
        return [f"{k.name}: {'; '.join(_limit_reasons(k, problem))}" for k in self.kernels]

    def kernel_for(self, problem: Problem) -> Kernel | None:
        """The first of ``kernels`` whose limits allow ``problem`` (None: none does)."""
        return next((k for k in self.kernels if not _limit_reasons(k, problem)), None)

    def unsupported_reasons(self, problem: Problem) -> list[str]:
        """Readable reasons this implementation cannot serve ``problem`` (empty: it can).

        A backend is probed only for tensors on its devices (probing ``torch`` reads the
        GPU's compute capability: a CPU call must not initialise CUDA)."""
        backend = BACKENDS[self.backend]
        devices = backend.devices()
        reasons = []
        if devices and problem.device not in devices:
            interpretable = problem.device in backend.interpreted_device_types
            hint = " (set TRITON_INTERPRET=1 to interpret on CPU)" if interpretable else ""
            reasons.append(f"runs on {'/'.join(sorted(devices))} tensors, not {problem.device}{hint}")
        else:
            why = backend.unavailable_reason()
            if why is None and self.module == "fastlm_C":
                why = _compiled_kernel_missing(f"{self.op}_forward", "CUDA" if backend.runs_on_gpu else "CPU")
            if why:
                return [why]
        return reasons + self.limit_reasons(problem)

    def auto_exclusion(self, device: str | None = None) -> str | None:
        """The auto rule: why ``auto`` skips this row although it may serve the input (on
        ``device`` tensors when given), or None.  ``select`` and ``fastlm info`` both use it."""
        backend = BACKENDS[self.backend]
        why = backend.unavailable_reason()
        if why:
            return why
        if device is not None and device in backend.interpreted_device_types and device not in backend.device_types:
            return "the Triton interpreter is for tests only: never auto-selected"
        return self.untrusted_reason()

    def untrusted_reason(self) -> str | None:
        """Why ``auto`` never takes this row on any device (kernels that never ran on a GPU), or None."""
        if BACKENDS[self.backend].trusted is None and self.verified is None:
            return UNVERIFIED
        return None

    @property
    def status(self) -> str:
        """Trust status for ``fastlm info``."""
        trusted = BACKENDS[self.backend].trusted
        if trusted is not None:
            return trusted
        return f"verified on GPU: {self.verified}" if self.verified else "compiled, unverified"


@functools.lru_cache(maxsize=None)
def _compiled_kernel_missing(name: str, dispatch_key: str) -> str | None:
    """A ``fastlm._C`` built from older sources may lack a kernel: say so instead of crashing."""
    if not hasattr(_ext.kernels(), name) or not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"fastlm_C::{name}", dispatch_key):
        return f"fastlm._C has no {dispatch_key} kernel fastlm_C::{name} (rebuild the extension)"
    return None


_TABLES: dict[str, dict[str, Implementation]] = {}
_COMPOSITES: dict[str, tuple[str, str]] = {}
_DECISIONS: dict[tuple, Implementation | tuple[str, list[str]]] = {}
_MAX_DECISIONS = 4096
_NO_BACKEND = "no backend can serve this input"


def register(*impls: Implementation) -> None:
    """Add implementation rows (one per backend) to their ops' tables."""
    for impl in impls:
        if impl.backend not in BACKENDS:
            raise ValueError(f"unknown backend {impl.backend!r}")
        _TABLES.setdefault(impl.op, {})[impl.backend] = impl
    _DECISIONS.clear()


def register_composite(op: str, via: str, how: str) -> None:
    """Declare ``op`` as served by another op's backends (``how``: one line for ``fastlm info``)."""
    _COMPOSITES[op] = (via, how)


def table(op: str) -> dict[str, Implementation]:
    """The registered implementations of ``op``, by backend name."""
    if op not in _TABLES:
        importlib.import_module("fastlm.ops")  # op modules register on import
    return _TABLES[op]


def ops() -> list[str]:
    """Every op with its own implementation table."""
    importlib.import_module("fastlm.ops")
    return sorted(_TABLES)


def composites() -> dict[str, tuple[str, str]]:
    """Ops served through another op's backends: ``{op: (via, how)}``."""
    importlib.import_module("fastlm.ops")
    return dict(_COMPOSITES)


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


def _decide(op: str, problem: Problem, backend: str | None) -> Implementation | tuple[str, list[str]]:
    """The row that serves ``problem``, or (what failed, the reasons) when none can."""
    wanted = requested_backend(backend)
    rows = table(op)
    if wanted != "auto":
        impl = rows.get(wanted)
        if impl is None:
            return f"backend {wanted!r} has no kernel for this op (it has: {', '.join(rows)})", []
        reasons = impl.unsupported_reasons(problem)
        return (f"backend {wanted!r} cannot serve this input", reasons) if reasons else impl
    report = []
    for name, impl in ((n, rows[n]) for n in BACKENDS if n in rows):
        reasons = impl.unsupported_reasons(problem)
        if not reasons:
            excluded = impl.auto_exclusion(problem.device)
            if excluded is None:
                return impl
            reasons = [excluded]
        report.append(f"{name}: {'; '.join(reasons)}")
    return _NO_BACKEND, report


def select(op: str, problem: Problem, backend: str | None = "auto", **inputs) -> Implementation:
    """The implementation that serves this call (see the module docstring).

    ``inputs`` (the call's tensors and flags, by name) only go into the message of the
    :class:`BackendError` raised when nothing can serve the call.
    """
    key = (op, problem, backend, os.environ.get("FASTLM_BACKEND"), os.environ.get("TRITON_INTERPRET"))
    decision = _DECISIONS.get(key)
    if decision is None:
        decision = _decide(op, problem, backend)
        if len(_DECISIONS) >= _MAX_DECISIONS:
            _DECISIONS.clear()
        _DECISIONS[key] = decision
    if isinstance(decision, Implementation):
        return decision
    raise BackendError(_refusal(op, problem, *decision, inputs))


def _describe(name: str, value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{name} {tuple(value.shape)} {_dtype_name(value.dtype)} on {value.device}"
    return f"{name}={value!r}"


def _refusal(op: str, problem: Problem, what: str, reasons: list[str], inputs: dict) -> str:
    """The BackendError message: what failed, the reasons, and the input."""
    if what == _NO_BACKEND:  # one line per backend
        text = f"fastlm.{op}: {what}:\n  " + "\n  ".join(reasons)
    else:
        text = f"fastlm.{op}: {what}" + (": " + "; ".join(reasons) if reasons else "")
    described = [_describe(name, value) for name, value in inputs.items()]
    if not described:
        described = [f"{_dtype_name(problem.dtype)} on {problem.device}"]
    needs = f"; features needed: {', '.join(sorted(problem.features))}" if problem.features else ""
    return f"{text}\n  input: {', '.join(described)}{needs}"
