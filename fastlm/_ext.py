"""Lazy, guarded loading of the compiled extension ``fastlm._C``.

Nothing is loaded at ``import fastlm``.  The first op that needs a C++ or CUDA
kernel calls :func:`load`; a missing or ABI-broken ``_C`` warns once, the reason is
kept for ``fastlm info`` and the error messages of explicit backend requests, and
every op keeps working through the Triton and reference backends.
"""
from __future__ import annotations

import threading
import warnings

_lock = threading.Lock()
_module = None
_error: str | None = None
_tried = False


def load():
    """Return the loaded ``fastlm._C`` module, or None if it cannot be loaded."""
    global _module, _error, _tried
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                import torch  # noqa: F401  (the extension links against libtorch)
                from fastlm import _C

                _module = _C
            except Exception as exc:  # ImportError, OSError (undefined symbol, ABI), ...
                _error = f"{type(exc).__name__}: {exc}".strip()
                warnings.warn(
                    f"fastlm: compiled extension fastlm._C could not be loaded ({_error}); "
                    "the 'cpu' and 'cuda' backends are unavailable, Triton and reference still work.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _tried = True
    return _module


def unavailable_reason() -> str | None:
    """Why ``fastlm._C`` is unusable, or None when it loaded."""
    load()
    return None if _module is not None else f"compiled extension fastlm._C not loaded ({_error})"


def with_cuda() -> bool:
    """True when ``fastlm._C`` was compiled with its CUDA kernels."""
    mod = load()
    return bool(mod is not None and getattr(mod, "WITH_CUDA", 0))


def kernels():
    """The C++ kernels' namespace, ``torch.ops.fastlm_C`` (CPU and CUDA share schemas)."""
    import torch

    load()
    return torch.ops.fastlm_C
