"""The ``"fastlm"`` attention implementation for transformers' attention interface.

Registered lazily (first :func:`fastlm.patch` call) under the name ``"fastlm"`` in both
``transformers.AttentionInterface`` (the attention function) and
``transformers.AttentionMaskInterface`` (the mask builder).  The mask registration is
not optional: for a name missing from the mask interface transformers skips mask
creation and hands the attention function ``attention_mask=None``, silently dropping
the padding.

Mask builder: for the plain causal / bidirectional patterns, and for the sliding-window
patterns (ModernBERT's local layers; Mistral / Qwen2 causal windows, without a KV cache),
it returns what the flash implementations get, the 2D ``(batch, kv_len)`` bool padding
mask or None (no padding), so the fused kernel reads B x S booleans instead of a
B x S x S mask; the window then comes from the ``sliding_window`` argument the attention
module passes (as with flash).  Any other pattern (chunked, packed-sequence detection from
``position_ids``, custom ``and``/``or`` mask functions, a window with a cache offset) gets
SDPA's 4D bool mask, which the attention function serves through the softmax path:
slower, never wrong.

Attention function, per call:

* ``cu_seq_lens_q/k`` + ``max_length_q/k`` keyword arguments (packed batch of shape
  ``(1, total_tokens, ...)``, as produced by :mod:`fastlm.patching.unpad` or
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``): ``fastlm.ops.varlen_attention``.
* 2D padding mask or None: ``fastlm.ops.attention`` with ``key_padding_mask``; causal
  models use bottom-right alignment (query i of the last ``q_len`` positions sees keys up
  to its own position), which is top-left when ``q_len == kv_len`` and right for a KV cache;
  left padding is just masked keys.  Grouped-query k/v go in unexpanded.
* in both, a ``sliding_window`` w shorter than the sequences becomes the kernels'
  ``window=w``: flash-attn's ``window_size=(w - 1, w - 1)`` (``(w - 1, 0)`` causal), i.e.
  what transformers' flash path does with it and what its sdpa/eager masks encode.
* a 4D mask (custom or built above), ``output_attentions=True``, or a sliding window
  that an explicitly requested backend cannot serve: ``q @ k^T`` -> ``fastlm.ops.softmax``
  (scale, mask, dropout in one pass) -> ``@ v``, returning the probabilities; one warning
  per reason per process.
* softcapping or attention sinks (``softcap``/``s_aux``): not served; raises, since no
  patched architecture has them.

Dropout is ``dropout`` as the model passes it (transformers already passes 0.0 in eval).
"""
from __future__ import annotations

import warnings

import torch

NAME = "fastlm"
_WARNED: set = set()
_registered = False


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"fastlm attention: {reason}; this call uses the softmax path "
                      "(q @ k^T -> fastlm.ops.softmax -> @ v), slower but exact", stacklevel=3)


def backend_of(module) -> str:
    """The ``backend=`` given to :func:`fastlm.patch` (stored on every module when not ``"auto"``)."""
    return getattr(module, "_fastlm_backend", "auto")


def _as_int(x) -> int:
    return int(x)  # max_length_* may arrive as a 0-d tensor (one host read per layer then)


def fastlm_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None,
                             softcap: float | None = None, is_causal: bool | None = None,
                             s_aux=None, **kwargs):
    """transformers attention-interface function: q ``(B, Hq, Sq, D)``, k/v ``(B, Hk, Sk, D)``
    -> ``(attn_output (B, Sq, Hq, D), attn_weights or None)``."""
    # (from the submodules: once fastlm.ops.attention is imported, the package attribute
    # ``fastlm.ops.attention`` is that submodule, not the function)
    from fastlm.ops.attention import attention, serves, varlen_attention
    from fastlm.ops.softmax import softmax

    if softcap is not None or s_aux is not None:
        raise NotImplementedError("fastlm attention does not serve logit softcapping or attention sinks; "
                                  "fastlm.patch does not switch such models to it")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    causal_mode = "bottom_right" if causal else False
    backend = backend_of(module)
    k, v = key.to(query.dtype), value.to(query.dtype)
    seq_q, seq_k = query.shape[2], k.shape[2]

    cu_q = kwargs.get("cu_seq_lens_q")
    packed = cu_q is not None
    if packed:
        if query.shape[0] != 1:
            raise ValueError(f"packed attention (cu_seq_lens_q given) needs batch size 1, got {query.shape[0]}")
        cu_k = kwargs.get("cu_seq_lens_k", cu_q)
        max_q = _as_int(kwargs["max_length_q"])
        max_k = _as_int(kwargs.get("max_length_k", max_q))
    # A window cuts only when some query-key distance reaches it (distances < max(len_q, len_k));
    # one that does not is dropped, as transformers' flash path drops it.
    longest = max(max_q, max_k) if packed else max(seq_q, seq_k)
    window = sliding_window if sliding_window is not None and sliding_window < longest else None

    mask = attention_mask
    reason = None
    if kwargs.get("output_attentions", False):
        reason = "output_attentions=True needs the attention probabilities"
    elif not packed and mask is not None and mask.dim() == 4:
        reason = "a 4D attention mask (custom, or a pattern beyond padding + causal)"
    elif window is not None and not serves(query, k, packed=packed, causal=causal_mode, window=window,
                                           dropout_p=dropout, backend=backend):
        reason = f"backend {backend!r} has no sliding window"
    if reason is None and packed:
        out = varlen_attention(
            query[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
            cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k,
            causal=causal_mode, window=window, dropout_p=dropout, scale=scaling, backend=backend)
        return out.unsqueeze(0), None
    if reason is None:
        out = attention(query, k, v, key_padding_mask=mask, causal=causal_mode, window=window,
                        dropout_p=dropout, scale=scaling, backend=backend)
        return out.transpose(1, 2), None

    _warn_once(reason)
    if packed:  # block-diagonal mask over the sequences
        mask = _dense_mask(None, 1, seq_q, seq_k, causal, sliding_window, query.device, segments=(cu_q, cu_k))
    elif mask is None or mask.dim() != 4:
        mask = _dense_mask(mask, query.shape[0], seq_q, seq_k, causal, sliding_window, query.device)
    groups = query.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if mask.dtype != torch.bool:
        mask = mask.to(query.dtype)
    probs = softmax(query @ k.transpose(-1, -2), scale=scale, mask=mask, dropout_p=dropout, backend=backend)
    return (probs @ v).transpose(1, 2), probs


def _dense_mask(padding, batch, seq_q, seq_k, causal, window, device, segments=None):
    """Bool ``(B or 1, 1, Sq, Sk)`` mask, True = attend: padding & bottom-right causal & window.

    ``segments=(cu_seqlens_q, cu_seqlens_k)``: a packed batch; positions count from each
    sequence's start and only same-sequence pairs attend.
    """
    q_pos = torch.arange(seq_k - seq_q, seq_k, device=device)[:, None]
    k_pos = torch.arange(seq_k, device=device)[None, :]
    keep = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    if segments is not None:
        cu_q, cu_k = (c.to(device=device, dtype=torch.long) for c in segments)
        seg_q = torch.searchsorted(cu_q[1:], torch.arange(seq_q, device=device), right=True)
        seg_k = torch.searchsorted(cu_k[1:], torch.arange(seq_k, device=device), right=True)
        keep = seg_q[:, None] == seg_k[None, :]
        # bottom-right alignment within each sequence: offset by (len_k - len_q) per sequence
        len_q, len_k = cu_q.diff(), cu_k.diff()
        q_pos = (torch.arange(seq_q, device=device) - cu_q[seg_q] + (len_k - len_q)[seg_q])[:, None]
        k_pos = (torch.arange(seq_k, device=device) - cu_k[seg_k])[None, :]
    if causal:
        keep = keep & (k_pos <= q_pos)
    if window is not None:
        keep = keep & (q_pos - k_pos < window) if causal else keep & ((q_pos - k_pos).abs() < window)
    keep = keep[None, None]
    if padding is not None:
        keep = keep & padding.to(torch.bool)[:, None, None, :]
    return keep


def _is_bidirectional_window(mask_function, q_offset, kv_offset, kwargs) -> bool:
    """Whether ``mask_function`` is transformers' plain bidirectional sliding-window pattern,
    ``|q - kv| <= local_size`` (``create_bidirectional_sliding_window_mask`` without extra
    and/or functions, which would set ``use_vmap``).  Its closure is built anew per call, so
    it is recognised by value: on a probe grid wider than the band, in both directions.
    Batch-dependent patterns (packed-sequence remaps, chunks, blocks) exist only on top of
    causal ones, which are never symmetric bands, so they fail the probe.

    The window the fused kernel applies is the attention module's ``sliding_window``, as
    with transformers' flash path: ModernBERT passes ``local_size + 1`` (its comment says
    so), and ``|q - kv| < local_size + 1`` is this band exactly (tests/test_patch.py checks
    the model against sdpa)."""
    window = kwargs.get("local_size")
    if window is None or kwargs.get("use_vmap", False) or not isinstance(window, int):
        return False
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0):
        return False
    idx = torch.arange(2 * window + 3)
    zero = torch.zeros((), dtype=torch.long)
    try:
        got = mask_function(zero, zero, idx[:, None], idx[None, :])
    except Exception:  # noqa: BLE001 - not an index-based pattern: not this one
        return False
    want = (idx[:, None] - idx[None, :]).abs() <= window
    return isinstance(got, torch.Tensor) and torch.equal(torch.broadcast_to(got, want.shape), want)


def _is_causal_window(mask_function, q_offset, kv_offset, kwargs) -> bool:
    """Whether ``mask_function`` is transformers' plain causal sliding-window pattern,
    ``q - local_size < kv <= q`` (``create_sliding_window_causal_mask``).  transformers keeps
    ``allow_is_causal_skip`` True only when nothing was put on top of the pattern it names
    with ``local_size`` (no packed-sequence remap, block overlay or custom and/or function:
    each sets it False), and the only such patterns are this one and the chunked one
    (``local_size`` = chunk size), told apart here at a few probe points.  The window can be
    thousands of keys (Mistral: 4096), so points, not a grid."""
    window = kwargs.get("local_size")
    if (not isinstance(window, int) or isinstance(window, bool) or window < 1
            or kwargs.get("allow_is_causal_skip") is not True or kwargs.get("use_vmap", False)):
        return False
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0):
        return False
    # queries around the window's edges, each with keys just inside and outside its band
    rows = torch.tensor([0, 1, window - 1, window, window + 1, 2 * window, 2 * window + 1])
    cols = rows[:, None] + torch.tensor([-window - 1, -window, -window + 1, -1, 0, 1])
    q, kv = torch.broadcast_tensors(rows[:, None], cols)
    keep = kv >= 0
    q, kv = q[keep], kv[keep]
    want = (kv <= q) & (kv > q - window)
    zero = torch.zeros_like(q)
    try:
        got = mask_function(zero, zero, q, kv)
    except Exception:  # noqa: BLE001 - not an index-based pattern: not this one
        return False
    return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.equal(got.to(torch.bool), want)


def fastlm_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                attention_mask=None, **kwargs):
    """transformers mask-interface function (see module docstring)."""
    from transformers import masking_utils as mu

    plain = (getattr(mu, "causal_mask_function", None), getattr(mu, "bidirectional_mask_function", None))
    if mask_function is None:
        mask_function = mu.causal_mask_function
    if (mask_function in plain or _is_bidirectional_window(mask_function, q_offset, kv_offset, kwargs)
            or _is_causal_window(mask_function, q_offset, kv_offset, kwargs)):
        return mu.flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                                       mask_function, attention_mask, **kwargs)
    return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)


def ensure_registered() -> None:
    """Register ``"fastlm"`` in transformers' attention and mask interfaces (additive, idempotent)."""
    global _registered
    if _registered:
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask, sdpa_mask  # noqa: F401
    except ImportError as exc:  # pragma: no cover - guarded for older/newer transformers
        raise ImportError(f"fastlm.patch needs transformers >= 5.17 with AttentionInterface and "
                          f"AttentionMaskInterface ({exc})") from exc
    AttentionInterface.register(NAME, fastlm_attention_forward)
    AttentionMaskInterface.register(NAME, fastlm_mask)
    _registered = True
