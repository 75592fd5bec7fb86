"""What every op module shares: argument checks, numerics helpers, and the op template.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind,
wrong value) naming the argument and what was expected.  They read only shapes,
dtypes and devices, so they cost no device synchronisation and trace under
``torch.compile``.

The op template
---------------
Each op is one file, ``fastlm/ops/<op>.py``, laid out the same way (copy one to add an
op; ``fastlm/registry.py`` says how its backends are found):

1. ``FEATURES``: the optional features a call may need (``frozenset`` of names, e.g.
   ``{"dropout", "window"}``), and one ``registry.register(Implementation(...), ...)``
   call with a row per backend declaring its limits (dtypes, ``head_dims``,
   ``max_length``, the subset of ``FEATURES`` it supports).
2. ``_select(...)``: builds the :class:`~fastlm.registry.Problem` from facts that the
   forward and the backward both know (so both pick the same backend) and calls
   ``registry.select("<op>", problem, backend, **named_inputs)``.
3. The registered ops, named alike in every file: ``_<op>_op = custom_op("fastlm::<op>")``
   and ``_<op>_backward_op = custom_op("fastlm::<op>_backward")``, each calling
   ``_select(...)`` then ``impl.function("forward" | "backward")(...)``; their fakes
   ``_<op>_fake`` / ``_<op>_backward_fake`` registered with ``handle.register_fake``;
   ``_setup_context`` and ``_backward`` registered with
   ``_<op>_op.register_autograd(_backward, setup_context=_setup_context)``; the backward
   calls ``_<op>_backward_op``.
4. The public function last: checks its arguments with the helpers below, turns the
   backend name into ``registry.check_backend_name(backend)``, draws the dropout seed
   with :func:`dropout_seed` (an int64 CPU tensor, or None) and calls the handle
   ``_<op>_op(...)``.  The op hands the kernels ``seed_value(seed)``, a Python int.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every kernel accumulates in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels index the last dim with unit stride; other strides pass through.  Copies
    only the rare tensor that lacks it (e.g. an expanded gradient)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def dropout_seed(dropout_p: float) -> torch.Tensor | None:
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


def seed_value(seed: torch.Tensor | None) -> int:
    """The kernels' dropout seed: the int in :func:`dropout_seed`'s tensor (0 without dropout).
    The tensor lives on the CPU, so reading it never synchronises a GPU."""
    return 0 if seed is None else int(seed.item())
