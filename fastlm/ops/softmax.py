"""``fastlm.ops.softmax``: fused scale -> mask -> softmax -> dropout, forward and backward.

One pass over the scores instead of four (scale, add/fill mask, softmax, dropout),
and one fused backward pass.  The registered ops are ``fastlm::softmax`` and
``fastlm::softmax_backward``; each call picks its backend with
:func:`fastlm.registry.select`.  The kernel-level contract every backend implements
is documented in :mod:`fastlm.reference.softmax`: the op turns any call into it by
moving ``dim`` last (at most one copy of ``x``) and viewing the mask as a 4-D
broadcast view with explicit strides (never expanded in memory).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fastlm import registry
from fastlm.ops import _common
from fastlm.registry import Implementation, Problem

FEATURES = frozenset({"dropout"})
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

registry.register(
    Implementation("softmax", "reference", "fastlm.reference.softmax", _common.FLOAT_DTYPES, features=FEATURES),
    Implementation("softmax", "cpu", "fastlm_C", _KERNEL_DTYPES, features=FEATURES),
    Implementation("softmax", "triton", "fastlm.kernels.softmax", _KERNEL_DTYPES, features=FEATURES),
    Implementation("softmax", "cuda", "fastlm_C", _KERNEL_DTYPES, features=FEATURES),
)


def _select(x: torch.Tensor, dim: int, dropout_p: float, backend: str) -> Implementation:
    # Only facts the backward also knows, so forward and backward pick the same backend
    # (their dropout streams differ between backends).
    problem = Problem.of(x.device, x.dtype, length=x.shape[dim], features=("dropout",) if dropout_p > 0 else ())
    return registry.select("softmax", problem, backend, x=x, dim=dim, dropout_p=dropout_p)


# ----------------------------------------------------------------------- canonical form
def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` as a contiguous (R, N) matrix with ``dim`` last: at most one copy."""
    return t.movedim(dim, -1).contiguous().view(-1, t.shape[dim])


def _unrows(rows: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`_rows`: a (non-copying) view with ``like``'s shape."""
    return rows.view(like.movedim(dim, -1).shape).movedim(-1, dim)


def _empty_rows_like(x: torch.Tensor, dim: int) -> torch.Tensor:
    """An uninitialised tensor shaped like ``x`` with the strides :func:`_unrows` gives
    (also when a dimension is 0, which no (R, N) view can express)."""
    return x.new_empty(x.movedim(dim, -1).shape).movedim(-1, dim)


def _mask_view(mask: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    """The mask as a (D0, D1, D2, N) stride view over the (R, N) rows, R = D0*D1*D2.

    Broadcast dims keep stride 0; leading dims are merged where their strides allow
    (size-1 dims dropped, (B, 1, 1, N)-style masks collapse to one dim).  Only a mask
    needing more than three leading dims after merging (x of 5+ dims with an
    interleaved broadcast pattern) is materialised.
    """
    m = mask.expand(shape).movedim(dim, -1)
    lead: list[tuple[int, int]] = []
    for size, stride in zip(m.shape[:-1], m.stride()[:-1]):
        if size == 1:
            continue
        if lead and lead[-1][1] == stride * size:
            lead[-1] = (lead[-1][0] * size, stride)
        else:
            lead.append((size, stride))
    if len(lead) > 3:
        m = m.contiguous()
        lead = [(m.numel() // m.shape[-1], m.stride(-2))]
    lead = [(1, 0)] * (3 - len(lead)) + lead
    return m.as_strided([s for s, _ in lead] + [m.shape[-1]], [st for _, st in lead] + [m.stride(-1)])


# ------------------------------------------------------------------------ registered ops
@torch.library.custom_op("fastlm::softmax", mutates_args=())
def _softmax_op(x: torch.Tensor, mask: Optional[torch.Tensor], scale: float, dim: int, dropout_p: float,
                seed: Optional[torch.Tensor], backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _select(x, dim, dropout_p, backend)
    if x.numel() == 0:
        return _softmax_fake(x, mask, scale, dim, dropout_p, seed, backend)
    m = None if mask is None else _mask_view(mask, x.shape, dim)
    out, probs = impl.function("forward")(_rows(x, dim), m, scale, dropout_p, _common.seed_value(seed))
    return _unrows(out, x, dim), (_unrows(probs, x, dim) if dropout_p > 0 else probs)


@_softmax_op.register_fake
def _softmax_fake(x, mask, scale, dim, dropout_p, seed, backend):
    probs = _empty_rows_like(x, dim) if dropout_p > 0 else x.new_empty((0,))
    return _empty_rows_like(x, dim), probs


@torch.library.custom_op("fastlm::softmax_backward", mutates_args=())
def _softmax_backward_op(grad: torch.Tensor, y: torch.Tensor, scale: float, dim: int, dropout_p: float,
                         seed: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """``scale * dz`` where dz is the gradient w.r.t. the masked, scaled scores."""
    impl = _select(y, dim, dropout_p, backend)
    if y.numel() == 0:
        return _empty_rows_like(y, dim)
    dx = impl.function("backward")(_rows(grad, dim), _rows(y, dim), scale, dropout_p, _common.seed_value(seed))
    return _unrows(dx, y, dim)


@_softmax_backward_op.register_fake
def _softmax_backward_fake(grad, y, scale, dim, dropout_p, seed, backend):
    return _empty_rows_like(y, dim)


def _setup_context(ctx, inputs, output):
    x, mask, scale, dim, dropout_p, seed, backend = inputs
    out, probs = output
    ctx.save_for_backward(probs if dropout_p > 0 else out, seed)
    ctx.mark_non_differentiable(probs)
    ctx.scale, ctx.dim, ctx.dropout_p, ctx.backend = scale, dim, dropout_p, backend
    ctx.mask_shape = None if mask is None else mask.shape


def _backward(ctx, grad_out, grad_probs):
    y, seed = ctx.saved_tensors
    need_x, need_mask = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx = dmask = None
    if need_mask:
        # The additive mask's gradient is dz itself, summed over its broadcast dims.
        dz = _softmax_backward_op(grad_out, y, 1.0, ctx.dim, ctx.dropout_p, seed, ctx.backend)
        dmask = dz.sum_to_size(ctx.mask_shape)
        dx = dz * ctx.scale if need_x else None
    elif need_x:
        dx = _softmax_backward_op(grad_out, y, ctx.scale, ctx.dim, ctx.dropout_p, seed, ctx.backend)
    return dx, dmask, None, None, None, None, None


_softmax_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------- public function
def softmax(x: torch.Tensor, *, scale: float = 1.0, mask: Optional[torch.Tensor] = None, dim: int = -1,
            dropout_p: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """``dropout(softmax(x * scale + mask, dim), dropout_p)`` in one pass.

    Args:
        x: any shape, float16 / bfloat16 / float32 / float64 (float64 runs on the
           reference backend); accumulation is in float32 (float64 for float64).
        scale: multiplies ``x`` before the mask is applied.
        mask: broadcastable to ``x``.  ``bool``: True = keep, False = excluded (-inf);
           or additive with ``x``'s dtype, added after scaling (an additive mask that
           requires grad gets its gradient, e.g. a learned position bias).
        dim: the softmax dimension (any; ``x`` is copied at most once).
        dropout_p: dropout on the probabilities (kept values scaled by 1/(1-p)),
           applied whenever > 0; the seed comes from torch's CPU generator, so runs
           are reproducible under ``torch.manual_seed``.
        backend: "auto", "reference", "cpu", "triton" or "cuda" (see ``fastlm info``).

    Returns ``x``'s shape and dtype (empty when ``x`` is, e.g. a softmax over a dimension
    of size 0, as ``F.softmax``).  A row whose entries are all -inf after masking (e.g.
    fully masked) gives zeros and zero gradients, where ``F.softmax`` gives NaN.
    """
    _common.check_tensor("x", x, dtypes=_common.FLOAT_DTYPES, min_ndim=1)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite python float, got {scale!r}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}] for x of shape {tuple(x.shape)}, got {dim}")
    if mask is not None:
        _common.check_tensor("mask", mask)
        if mask.dtype not in (torch.bool, x.dtype):
            raise TypeError(f"mask must be bool (True = keep) or additive with x's dtype "
                            f"{str(x.dtype).replace('torch.', '')}, got {str(mask.dtype).replace('torch.', '')}")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but x is on {x.device}: they must share a device")
        try:
            broadcast = torch.broadcast_shapes(mask.shape, x.shape)
        except RuntimeError:
            broadcast = None
        if broadcast != x.shape:
            raise ValueError(f"mask of shape {tuple(mask.shape)} must broadcast to x's shape {tuple(x.shape)}")
    dropout_p = _common.check_probability("dropout_p", dropout_p)
    backend = registry.check_backend_name(backend)
    out, _ = _softmax_op(x, mask, float(scale), dim % x.dim(), dropout_p, _common.dropout_seed(dropout_p), backend)
    return out
