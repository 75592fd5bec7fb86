"""Argument checks and helpers shared by every op's public function.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind,
wrong value) naming the argument and what was expected.  They read only shapes,
dtypes and devices, so they cost no device synchronisation and trace under
``torch.compile``.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(name: str, t, *, dtypes=None, ndim=None, min_ndim=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({', '.join(_dt(d) for d in dtypes)}), got {_dt(t.dtype)}")
    if ndim is not None and t.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def check_same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: all inputs must share a device")


def check_same_dtype(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {_dt(t.dtype)} but {first_name} has {_dt(first.dtype)}: they must match")


def check_probability(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__}")
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return float(p)


def dropout_seed(dropout_p: float, device=None) -> torch.Tensor | None:
    """A fresh seed for a dropout call, drawn from torch's default CPU generator.

    Drawing on the CPU generator keeps runs reproducible under ``torch.manual_seed``
    and costs no device synchronisation.  The seed is an int64 CPU tensor so it can
    pass through a ``torch.library`` op (and ``torch.compile``) unchanged; kernels
    derive every dropout bit from (seed, element index), so the backward pass
    regenerates exactly the forward's mask.
    """
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)
