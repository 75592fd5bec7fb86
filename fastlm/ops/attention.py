"""Scaled dot-product attention: padded (``attention``) and packed (``varlen_attention``).

Both public functions go through one registered op family, ``fastlm::attention`` and
``fastlm::attention_backward``, whose arguments are the kernel-level contract of
:mod:`fastlm.reference.attention` plus the requested backend.  The backend is chosen per
call inside the op (:func:`fastlm.registry.select`), so tracing never sees it.

What a call tells the backends (:class:`fastlm.registry.Problem`): ``head_dim``, ``length``
(the longest query or key sequence) and the features it needs, from :data:`FEATURES`:
``padding`` (a key padding mask), ``packed`` (cu_seqlens), ``causal`` (top-left),
``bottom_right`` (causal aligned to the last key), ``window``, ``dropout``, ``gqa``
(fewer kv heads than query heads).
"""
import math
from typing import Optional

import torch
from torch import Tensor

from fastlm import registry
from fastlm.ops import _common
from fastlm.registry import Implementation, Problem, Sizes

FEATURES = frozenset({"padding", "packed", "causal", "bottom_right", "window", "dropout", "gqa"})
_CAUSAL_CODES = {False: 0, True: 1, "bottom_right": 2}
_CAUSAL_FEATURES = {0: (), 1: ("causal",), 2: ("bottom_right",)}

registry.register(
    Implementation("attention", "reference", "fastlm.reference.attention", _common.FLOAT_DTYPES, features=FEATURES),
    Implementation("attention", "cpu", "fastlm_C", (torch.float32, torch.bfloat16, torch.float16),
                   head_dims=Sizes(1, 256), features=FEATURES),
    Implementation("attention", "triton", "fastlm.kernels.attention", (torch.float16, torch.bfloat16, torch.float32),
                   head_dims=Sizes(16, 256), features=FEATURES),
    Implementation("attention", "cuda", "fastlm_C", (torch.float16, torch.bfloat16), head_dims=Sizes.of(64, 128),
                   features=FEATURES - {"window"}),
)


def problem(q: Tensor, k: Tensor, *, padding: bool, packed: bool, causal: int, window: int, dropout_p: float,
            max_seqlen: int) -> Problem:
    """What a call on ``q``/``k`` needs from a backend (kernel-level ``causal``/``window`` codes)."""
    features = [name for name, needed in (("padding", padding), ("packed", packed), ("window", window > 0),
                                          ("dropout", dropout_p > 0.0), ("gqa", q.shape[1] != k.shape[1]))
                if needed]
    return Problem.of(q.device, q.dtype, head_dim=q.shape[-1], length=max_seqlen,
                      features=(*features, *_CAUSAL_FEATURES[causal]))


def _select(q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
            max_seqlen_q: int, max_seqlen_k: int, causal: int, window: int, dropout_p: float,
            backend: str) -> Implementation:
    packed = cu_seqlens_q is not None
    longest = max(max_seqlen_q, max_seqlen_k) if packed else max(q.shape[2], k.shape[2])
    prob = problem(q, k, padding=key_padding_mask is not None, packed=packed, causal=causal, window=window,
                   dropout_p=dropout_p, max_seqlen=longest)
    return registry.select("attention", prob, backend, q=q, k=k, key_padding_mask=key_padding_mask,
                           causal=causal, window=window, dropout_p=dropout_p)


# ------------------------------------------------------------------- registered ops
@torch.library.custom_op("fastlm::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                  cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                  max_seqlen_q: int, max_seqlen_k: int, causal: int, window: int, dropout_p: float,
                  scale: float, seed: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    impl = _select(q, k, key_padding_mask, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal, window, dropout_p,
                   backend)
    return impl.function("forward")(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k, causal, window, dropout_p, scale,
                                    _common.seed_value(seed))


@_attention_op.register_fake
def _attention_fake(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    causal, window, dropout_p, scale, seed, backend):
    lse_shape = q.shape[:3] if cu_seqlens_q is None else (q.shape[1], q.shape[0])
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("fastlm::attention_backward", mutates_args=())
def _attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           key_padding_mask: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                           cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
                           causal: int, window: int, dropout_p: float, scale: float, seed: Optional[Tensor],
                           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    impl = _select(q, k, key_padding_mask, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal, window, dropout_p,
                   backend)
    return impl.function("backward")(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                     max_seqlen_q, max_seqlen_k, causal, window, dropout_p, scale,
                                     _common.seed_value(seed))


@_attention_backward_op.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, causal, window, dropout_p, scale, seed, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, cu_q, cu_k, max_q, max_k, causal, window, dropout_p, scale, seed, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, cu_q, cu_k, seed)
    ctx.scalars = (max_q, max_k, causal, window, dropout_p, scale)
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, mask, cu_q, cu_k, seed = ctx.saved_tensors
    max_q, max_k, causal, window, dropout_p, scale = ctx.scalars
    dq, dk, dv = _attention_backward_op(_common.last_dim_contiguous(dout), q, k, v, out, lse, mask, cu_q, cu_k,
                                        max_q, max_k, causal, window, dropout_p, scale, seed, ctx.backend)
    return (dq, dk, dv) + (None,) * 11


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ argument checks
def _check_qkv(q, k, v, ndim: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _common.check_tensor(name, t, dtypes=_common.FLOAT_DTYPES, ndim=ndim)
        if t.numel() == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)} {layout}")
    _common.check_same_dtype(q=q, k=k, v=v)
    _common.check_same_device(q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape {layout}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k/v must have the same head_dim (last dim), got {q.shape[-1]} and {k.shape[-1]}")
    hq, hk = q.shape[1], k.shape[1]  # heads are dim 1 both padded and packed
    if hq % hk != 0:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number of "
                         f"key/value heads ({hk}) in q and k/v {layout}")


def _causal_code(causal) -> int:
    for value, code in _CAUSAL_CODES.items():
        if causal is value or (isinstance(causal, str) and causal == value):
            return code
    raise ValueError(f"causal must be False, True or 'bottom_right', got {causal!r}")


def _window_code(window) -> int:
    """The kernel-level window: 0 for None, else the window (an int >= 1)."""
    if window is None:
        return 0
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int or None, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be >= 1 (or None for no window), got {window}")
    return window


def _resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _check_key_padding_mask(mask, q: Tensor, k: Tensor) -> Optional[Tensor]:
    if mask is None:
        return None
    _common.check_tensor("key_padding_mask", mask, dtypes=(torch.bool, *_INTEGER_MASKS), ndim=2)
    expected = (q.shape[0], k.shape[2])
    if tuple(mask.shape) != expected:
        raise ValueError(f"key_padding_mask must have shape (batch, seq_k) = {expected}, got {tuple(mask.shape)}")
    _common.check_same_device(q=q, key_padding_mask=mask)
    return mask.contiguous() if mask.dtype == torch.bool else mask != 0  # a tokenizer's 0/1 attention_mask


# Integer masks (a tokenizer's attention_mask is int64 0/1) mean nonzero = attend; float ones
# are refused: additive (0 / -inf) or keep (1 / 0)? Ambiguous, so the caller converts.
_INTEGER_MASKS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_cu_seqlens(name: str, cu: Tensor, total: int, max_seqlen, max_name: str, q: Tensor) -> Tensor:
    _common.check_tensor(name, cu, dtypes=(torch.int32,), ndim=1)
    if cu.shape[0] < 2:
        raise ValueError(f"{name} must have length batch + 1 >= 2, got length {cu.shape[0]}")
    _common.check_same_device(q=q, **{name: cu})
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{max_name} must be a python int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"{max_name} must be >= 0, got {max_seqlen}")
    # Value checks read the tensor: done on CPU only.  On a GPU they would cost a host
    # sync per call, so there cu_seqlens must be right (start at 0, non-decreasing, end at
    # the token count, lengths <= max_seqlen) and is not checked; nor under torch.compile.
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():
        values = cu.tolist()
        if values[0] != 0:
            raise ValueError(f"{name} must start at 0, got {values[0]}")
        lengths = [b - a for a, b in zip(values, values[1:])]
        if min(lengths) < 0:
            raise ValueError(f"{name} must be non-decreasing, got {values}")
        if values[-1] != total:
            raise ValueError(f"{name}[-1] must equal the number of packed tokens ({total}), got {values[-1]}")
        if max(lengths) > max_seqlen:
            raise ValueError(f"{max_name} ({max_seqlen}) is smaller than the longest sequence in {name} "
                             f"({max(lengths)})")
    return cu.contiguous()


# ------------------------------------------------------------------- public functions
def attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None,
              causal=False, window: Optional[int] = None, dropout_p: float = 0.0,
              scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    """Attention over padded batches, as ``F.scaled_dot_product_attention``.

    Args:
        q: ``(batch, heads_q, seq_q, head_dim)``.
        k, v: ``(batch, heads_kv, seq_k, head_dim)``; ``heads_q % heads_kv == 0``
            (grouped-query / multi-query: query head h reads kv head ``h // (heads_q // heads_kv)``).
            Any strides (e.g. transposed views of ``(batch, seq, heads, head_dim)``) are
            taken without a copy as long as the last dim is contiguous.
        key_padding_mask: ``(batch, seq_k)`` bool, True = attend (left or right padding); an
            integer 0/1 mask (a tokenizer's ``attention_mask``) is taken as ``mask != 0``.
        causal: False; True = top-left aligned (query i sees keys j <= i, exactly SDPA's
            ``is_causal`` also when seq_q != seq_k); ``"bottom_right"`` = aligned to the last
            key (query i sees j <= i + seq_k - seq_q), as a KV cache needs.  Combined with
            ``key_padding_mask``, both masks apply.
        window: None, or a sliding window (local attention) ``w >= 1``.  Query i sits at
            position ``p_i = i`` (``i + seq_k - seq_q`` with ``"bottom_right"``); key j is
            visible iff ``|p_i - j| < w`` without causal, ``p_i - w < j <= p_i`` with it
            (flash-attn's ``window_size=(w-1, w-1)`` / ``(w-1, 0)``; transformers passes
            ``w`` as ``sliding_window``).  Positions are indices of the padded row, so the
            window ANDs with ``key_padding_mask`` as transformers' masks do.
        dropout_p: dropout on the attention probabilities (kept ones scaled by 1/(1-p)),
            seeded from torch's CPU generator, so ``torch.manual_seed`` reproduces a run.
        scale: score scale; default ``1 / sqrt(head_dim)``.
        backend: ``"auto"`` or one of ``fastlm.registry.BACKENDS``.

    Returns:
        ``(batch, heads_q, seq_q, head_dim)`` in q's dtype.  Unlike SDPA, a query row with
        no visible key gives zeros and zero gradients (not NaN).
    """
    backend = registry.check_backend_name(backend)
    _check_qkv(q, k, v, 4, "(batch, heads, seq, head_dim)")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k/v must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    key_padding_mask = _check_key_padding_mask(key_padding_mask, q, k)
    causal = _causal_code(causal)
    window = _window_code(window)
    dropout_p = _common.check_probability("dropout_p", dropout_p)
    scale = _resolve_scale(scale, q.shape[-1])
    q, k, v = (_common.last_dim_contiguous(t) for t in (q, k, v))
    out, _ = _attention_op(q, k, v, key_padding_mask, None, None, 0, 0, causal, window, dropout_p, scale,
                           _common.dropout_seed(dropout_p), backend)
    return out


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal=False, window: Optional[int] = None,
                     dropout_p: float = 0.0, scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    """Attention over packed variable-length sequences (no padding anywhere).

    Args:
        q: ``(total_q, heads_q, head_dim)``: sequence i is rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``.
        k, v: ``(total_k, heads_kv, head_dim)``, ``heads_q % heads_kv == 0``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` on q's device, starting at 0,
            non-decreasing, ending at total_q / total_k.  Checked on CPU; on a GPU the
            values are not checked (that would cost a host sync per call).
        max_seqlen_q, max_seqlen_k: python ints >= every sequence's length.
        causal, window, dropout_p, scale, backend: as :func:`attention`, per sequence
            (bottom_right aligns each sequence's last query with its last key; window
            positions count from each sequence's first token).

    Returns:
        ``(total_q, heads_q, head_dim)`` in q's dtype; a query with no visible key (an empty
        key sequence, or bottom-right causal with more queries than keys) gives zeros.
    """
    backend = registry.check_backend_name(backend)
    _check_qkv(q, k, v, 3, "(total_tokens, heads, head_dim)")
    cu_seqlens_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q", q)
    cu_seqlens_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k", q)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
                         f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    causal = _causal_code(causal)
    window = _window_code(window)
    dropout_p = _common.check_probability("dropout_p", dropout_p)
    scale = _resolve_scale(scale, q.shape[-1])
    q, k, v = (_common.last_dim_contiguous(t) for t in (q, k, v))
    out, _ = _attention_op(q, k, v, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                           window, dropout_p, scale, _common.dropout_seed(dropout_p), backend)
    return out


def serves(q: Tensor, k: Tensor, *, packed: bool = False, causal=False, window: Optional[int] = None,
           dropout_p: float = 0.0, backend: str = "auto") -> bool:
    """Whether ``backend`` (``"auto"`` or a name, as :func:`attention` takes it) can serve a call
    on tensors like ``q``/``k`` (padded ``(B, H, S, D)`` or packed ``(T, H, D)``) with these
    features (dtype, head dim, window, ...).  Sequence lengths are bounded by the tensors'."""
    seq = -2 if q.dim() == 4 else 0
    prob = problem(q, k, padding=False, packed=packed, causal=_causal_code(causal), window=_window_code(window),
                   dropout_p=dropout_p, max_seqlen=max(q.shape[seq], k.shape[seq]))
    try:
        registry.select("attention", prob, backend)
    except registry.BackendError:
        return False
    return True
