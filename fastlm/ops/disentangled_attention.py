"""DeBERTa-v2/v3 disentangled attention: padded (``disentangled_attention``) and packed
(``varlen_disentangled_attention``).

Both public functions go through one registered op family, ``fastlm::disentangled_attention``
and ``fastlm::disentangled_attention_backward``, whose arguments are the kernel-level contract
of :mod:`fastlm.reference.disentangled_attention` plus the requested backend.

Relative positions: the ``(L, L)`` relative-position matrix transformers builds never exists.
Kernels compute each pair's distance ``d = i - j`` from the two positions (restarting at every
sequence in packed mode) and map it to its row of the positional tables through
``rel_slots``, a ``2 L - 1`` entry table built here once per call by :func:`relative_slots`
with transformers' own log-bucket formula and float32 operations, so the buckets are
bit-identical to transformers' on every device.

What a call tells the backends (:class:`fastlm.registry.Problem`): ``head_dim``, ``length``
(the longest sequence) and the features it needs, from :data:`FEATURES`: ``padding`` (a key
padding mask), ``packed`` (cu_seqlens), ``dropout``, ``c2p`` / ``p2c`` (a positional table).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastlm import registry
from fastlm.ops import _common
from fastlm.ops.attention import _check_cu_seqlens, _check_key_padding_mask
from fastlm.registry import Implementation, Problem, Sizes

FEATURES = frozenset({"padding", "packed", "dropout", "c2p", "p2c"})

registry.register(
    Implementation("disentangled_attention", "reference", "fastlm.reference.disentangled_attention",
                   _common.FLOAT_DTYPES, features=FEATURES),
    Implementation("disentangled_attention", "cpu", "fastlm_C", (torch.float32, torch.bfloat16, torch.float16),
                   head_dims=Sizes(1, 256), features=FEATURES),
    Implementation("disentangled_attention", "triton", "fastlm.kernels.disentangled_attention",
                   (torch.float16, torch.bfloat16, torch.float32), head_dims=Sizes(16, 128), features=FEATURES),
)


def problem(q: Tensor, *, padding: bool, packed: bool, c2p: bool, p2c: bool, dropout_p: float,
            max_seqlen: int) -> Problem:
    """What a call on ``q`` needs from a backend."""
    features = [name for name, needed in (("padding", padding), ("packed", packed), ("dropout", dropout_p > 0.0),
                                          ("c2p", c2p), ("p2c", p2c)) if needed]
    return Problem.of(q.device, q.dtype, head_dim=q.shape[-1], length=max_seqlen, features=features)


def _select(q: Tensor, pos_key: Optional[Tensor], pos_query: Optional[Tensor], key_padding_mask: Optional[Tensor],
            cu_seqlens: Optional[Tensor], max_seqlen: int, dropout_p: float, backend: str) -> Implementation:
    packed = cu_seqlens is not None
    prob = problem(q, padding=key_padding_mask is not None, packed=packed, c2p=pos_key is not None,
                   p2c=pos_query is not None, dropout_p=dropout_p, max_seqlen=max_seqlen if packed else q.shape[2])
    return registry.select("disentangled_attention", prob, backend, q=q, pos_key=pos_key, pos_query=pos_query,
                           key_padding_mask=key_padding_mask, dropout_p=dropout_p)


# ------------------------------------------------------------------- relative positions
def log_bucket(distance: Tensor, position_buckets: int, max_relative_positions: int) -> Tensor:
    """transformers' ``make_log_bucket_position``: distances within ``position_buckets // 2``
    keep their value, longer ones are bucketed logarithmically (odd in ``distance``).  The
    same float operations in the same dtype (the default one, float32), so the buckets are
    exactly transformers' (a ceil of a rounded logarithm: a different formula could differ
    at a bucket edge)."""
    mid = position_buckets // 2
    sign = torch.sign(distance)
    inside = (distance < mid) & (distance > -mid)
    magnitude = torch.where(inside, torch.tensor(mid - 1).type_as(distance), distance.abs())
    ratio = torch.log(torch.tensor((max_relative_positions - 1) / mid))
    logs = torch.ceil(torch.log(magnitude / mid) / ratio * (mid - 1)) + mid
    return torch.where(magnitude <= mid, distance.type_as(logs), logs * sign)


def relative_slots(length: int, slots: int, position_buckets: int, max_relative_positions: int,
                   device) -> Tensor:
    """int32 ``(2 * length - 1,)``: the positional-table row of distance ``d = i - j``
    (``-length < d < length``) at index ``d + length - 1``, i.e. transformers'
    ``clamp(bucket(d) + slots // 2, 0, slots - 1)``; ``bucket(d) = d`` unless
    ``position_buckets > 0`` (then :func:`log_bucket`)."""
    distance = torch.arange(1 - length, length, device=device)
    if position_buckets > 0:
        distance = log_bucket(distance, position_buckets, max_relative_positions).long()
    span = slots // 2
    return torch.clamp(distance + span, 0, slots - 1).to(torch.int32)


# ------------------------------------------------------------------- registered ops
@torch.library.custom_op("fastlm::disentangled_attention", mutates_args=())
def _disentangled_attention_op(q: Tensor, k: Tensor, v: Tensor, pos_key: Optional[Tensor],
                               pos_query: Optional[Tensor], rel_slots: Tensor, key_padding_mask: Optional[Tensor],
                               cu_seqlens: Optional[Tensor], max_seqlen: int, dropout_p: float, scale: float,
                               seed: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    impl = _select(q, pos_key, pos_query, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, backend)
    return impl.function("forward")(q, k, v, pos_key, pos_query, rel_slots, key_padding_mask, cu_seqlens,
                                    max_seqlen, dropout_p, scale, _common.seed_value(seed))


@_disentangled_attention_op.register_fake
def _disentangled_attention_fake(q, k, v, pos_key, pos_query, rel_slots, key_padding_mask, cu_seqlens, max_seqlen,
                                 dropout_p, scale, seed, backend):
    lse_shape = q.shape[:3] if cu_seqlens is None else (q.shape[1], q.shape[0])
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("fastlm::disentangled_attention_backward", mutates_args=())
def _disentangled_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, pos_key: Optional[Tensor],
                                        pos_query: Optional[Tensor], rel_slots: Tensor, out: Tensor, lse: Tensor,
                                        key_padding_mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
                                        max_seqlen: int, dropout_p: float, scale: float, seed: Optional[Tensor],
                                        backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = _select(q, pos_key, pos_query, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, backend)
    return impl.function("backward")(dout, q, k, v, pos_key, pos_query, rel_slots, out, lse, key_padding_mask,
                                     cu_seqlens, max_seqlen, dropout_p, scale, _common.seed_value(seed))


def _like_table(t: Optional[Tensor], q: Tensor) -> Tensor:
    return torch.empty_like(t) if t is not None else q.new_empty((0,))


@_disentangled_attention_backward_op.register_fake
def _disentangled_attention_backward_fake(dout, q, k, v, pos_key, pos_query, rel_slots, out, lse, key_padding_mask,
                                          cu_seqlens, max_seqlen, dropout_p, scale, seed, backend):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), _like_table(pos_key, q),
            _like_table(pos_query, q))


def _setup_context(ctx, inputs, output):
    q, k, v, pos_key, pos_query, rel_slots, mask, cu, max_seqlen, dropout_p, scale, seed, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, pos_key, pos_query, rel_slots, out, lse, mask, cu, seed)
    ctx.scalars = (max_seqlen, dropout_p, scale)
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, pos_key, pos_query, rel_slots, out, lse, mask, cu, seed = ctx.saved_tensors
    max_seqlen, dropout_p, scale = ctx.scalars
    dq, dk, dv, dpk, dpq = _disentangled_attention_backward_op(
        _common.last_dim_contiguous(dout), q, k, v, pos_key, pos_query, rel_slots, out, lse, mask, cu, max_seqlen,
        dropout_p, scale, seed, ctx.backend)
    return (dq, dk, dv, dpk if pos_key is not None else None, dpq if pos_query is not None else None) + (None,) * 8


_disentangled_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ argument checks
def _check_inputs(q, k, v, pos_key, pos_query, ndim: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _common.check_tensor(name, t, dtypes=_common.FLOAT_DTYPES, ndim=ndim)
        if t.numel() == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)} {layout}")
    if not q.shape == k.shape == v.shape:
        raise ValueError(f"q, k and v must have the same shape {layout} (self-attention), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
    tables = {n: t for n, t in (("pos_key", pos_key), ("pos_query", pos_query)) if t is not None}
    for name, t in tables.items():
        _common.check_tensor(name, t, dtypes=_common.FLOAT_DTYPES, ndim=3)
        heads, dim = (q.shape[1], q.shape[-1])
        if t.shape[0] != heads or t.shape[2] != dim or t.shape[1] < 2 or t.shape[1] % 2:
            raise ValueError(f"{name} must have shape (heads, 2 * span, head_dim) = ({heads}, R, {dim}) with R "
                             f"even and >= 2, got {tuple(t.shape)}")
    if len(tables) == 2 and pos_key.shape != pos_query.shape:
        raise ValueError(f"pos_key and pos_query must have the same shape, got {tuple(pos_key.shape)} and "
                         f"{tuple(pos_query.shape)}")
    _common.check_same_dtype(q=q, k=k, v=v, **tables)
    _common.check_same_device(q=q, k=k, v=v, **tables)


def _check_buckets(position_buckets, max_relative_positions) -> None:
    for name, value in (("position_buckets", position_buckets), ("max_relative_positions", max_relative_positions)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if position_buckets > 0 and max_relative_positions <= position_buckets // 2 + 1:
        raise ValueError(f"max_relative_positions ({max_relative_positions}) must exceed position_buckets // 2 + 1 "
                         f"({position_buckets // 2 + 1}) when position_buckets > 0 (log buckets)")


def _resolve_scale(scale, head_dim: int, terms: int) -> float:
    if scale is None:  # DeBERTa: 1 / sqrt(head_dim * (1 + number of positional terms))
        return 1.0 / math.sqrt(head_dim * (1 + terms))
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _prepare(q, k, v, pos_key, pos_query, length, position_buckets, max_relative_positions, scale, dropout_p):
    """Checked, kernel-ready (q, k, v, pos_key, pos_query, rel_slots, dropout_p, scale)."""
    _check_buckets(position_buckets, max_relative_positions)
    dropout_p = _common.check_probability("dropout_p", dropout_p)
    tables = [t for t in (pos_key, pos_query) if t is not None]
    scale = _resolve_scale(scale, q.shape[-1], len(tables))
    if tables:
        rel_slots = relative_slots(length, tables[0].shape[1], position_buckets, max_relative_positions, q.device)
    else:
        rel_slots = torch.empty(0, dtype=torch.int32, device=q.device)
    q, k, v = (_common.last_dim_contiguous(t) for t in (q, k, v))
    pos_key, pos_query = (None if t is None else _common.last_dim_contiguous(t) for t in (pos_key, pos_query))
    return q, k, v, pos_key, pos_query, rel_slots, dropout_p, scale


# ------------------------------------------------------------------- public functions
def disentangled_attention(q: Tensor, k: Tensor, v: Tensor, pos_key: Optional[Tensor] = None,
                           pos_query: Optional[Tensor] = None, *, key_padding_mask: Optional[Tensor] = None,
                           position_buckets: int = -1, max_relative_positions: int = -1,
                           scale: Optional[float] = None, dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """DeBERTa-v2/v3 self-attention over padded batches (transformers' ``DisentangledSelfAttention``
    after its projections).

    Args:
        q, k, v: ``(batch, heads, seq, head_dim)``, the same shape; any strides with a
            contiguous last dim.
        pos_key: ``(heads, R, head_dim)``, the relative embeddings through the key projection
            (``pos_key_proj``, or ``key_proj`` with ``share_att_key``), one batch element of
            transformers' ``pos_key_layer``: enables the content-to-position term (``c2p``),
            ``q_i . pos_key[slot(i - j)]``.  None: no c2p.
        pos_query: the same through the query projection: enables position-to-content
            (``p2c``), ``k_j . pos_query[slot(i - j)]``.  None: no p2c.  ``p2p`` does not exist
            here (transformers ignores it too).
        key_padding_mask: ``(batch, seq)`` bool, True = attend (an integer 0/1 mask counts
            nonzero as True); positions are the padded row's indices, as in transformers.
        position_buckets, max_relative_positions: the config's; ``slot(d)`` is
            ``clamp(bucket(d) + R / 2, 0, R - 1)`` with transformers' log buckets when
            ``position_buckets > 0``, ``bucket(d) = d`` otherwise.
        scale: score scale; default ``1 / sqrt(head_dim * (1 + number of positional terms))``
            (DeBERTa's ``scale_factor``).
        dropout_p: dropout on the attention probabilities, seeded from torch's CPU generator.
        backend: ``"auto"`` or one of ``fastlm.registry.BACKENDS``.

    Returns:
        ``(batch, heads, seq, head_dim)`` in q's dtype; a query with no visible key gives zeros
        (transformers' eager softmax of ``finfo.min`` rows would spread it uniformly instead).
    """
    backend = registry.check_backend_name(backend)
    _check_inputs(q, k, v, pos_key, pos_query, 4, "(batch, heads, seq, head_dim)")
    key_padding_mask = _check_key_padding_mask(key_padding_mask, q, k)
    q, k, v, pos_key, pos_query, rel_slots, dropout_p, scale = _prepare(
        q, k, v, pos_key, pos_query, q.shape[2], position_buckets, max_relative_positions, scale, dropout_p)
    out, _ = _disentangled_attention_op(q, k, v, pos_key, pos_query, rel_slots, key_padding_mask, None, 0, dropout_p,
                                        scale, _common.dropout_seed(dropout_p), backend)
    return out


def varlen_disentangled_attention(q: Tensor, k: Tensor, v: Tensor, pos_key: Optional[Tensor],
                                  pos_query: Optional[Tensor], cu_seqlens: Tensor, max_seqlen: int, *,
                                  position_buckets: int = -1, max_relative_positions: int = -1,
                                  scale: Optional[float] = None, dropout_p: float = 0.0,
                                  backend: str = "auto") -> Tensor:
    """DeBERTa attention over packed sequences (no padding anywhere).

    Args:
        q, k, v: ``(total_tokens, heads, head_dim)``; sequence n is rows
            ``cu_seqlens[n]:cu_seqlens[n+1]`` and its positions start at 0.
        pos_key, pos_query: ``(heads, R, head_dim)`` or None, as :func:`disentangled_attention`.
        cu_seqlens: int32 ``(batch + 1,)`` on q's device, starting at 0, non-decreasing, ending
            at total_tokens (checked on CPU only: on a GPU that would cost a host sync).
        max_seqlen: python int >= every sequence's length.
        position_buckets, max_relative_positions, scale, dropout_p, backend: as
            :func:`disentangled_attention`.

    Returns:
        ``(total_tokens, heads, head_dim)`` in q's dtype.
    """
    backend = registry.check_backend_name(backend)
    _check_inputs(q, k, v, pos_key, pos_query, 3, "(total_tokens, heads, head_dim)")
    cu_seqlens = _check_cu_seqlens("cu_seqlens", cu_seqlens, q.shape[0], max_seqlen, "max_seqlen", q)
    if max_seqlen < 1:
        raise ValueError(f"max_seqlen must be >= 1 (the longest sequence), got {max_seqlen}")
    q, k, v, pos_key, pos_query, rel_slots, dropout_p, scale = _prepare(
        q, k, v, pos_key, pos_query, max_seqlen, position_buckets, max_relative_positions, scale, dropout_p)
    out, _ = _disentangled_attention_op(q, k, v, pos_key, pos_query, rel_slots, None, cu_seqlens, max_seqlen,
                                        dropout_p, scale, _common.dropout_seed(dropout_p), backend)
    return out
