"""Masks for the ``"fastlm"`` attention implementation: the mask builder registered in
transformers' ``AttentionMaskInterface``, and the dense masks of the exact fallbacks.

Mask builder (:func:`fastlm_mask`), per mask transformers asks for:

* the patterns the fused kernels serve from a padding mask: plain causal or bidirectional,
  transformers' causal sliding window (Mistral / Qwen2) and bidirectional sliding window
  (ModernBERT's local layers), when the keys are exactly the last ``kv_length`` positions
  ending at the last query (no cache, or a dynamic cache) and, for windows, no cache
  offset.  It returns what transformers' flash implementations get: the 2D
  ``(batch, kv_length)`` bool padding mask, or None when nothing is padded; the window
  comes from the ``sliding_window`` argument the attention module passes (as with flash).
* anything else (chunked attention, packed-sequence detection from ``position_ids``,
  custom ``and``/``or`` functions, a window over a cache, and a STATIC cache, whose
  ``kv_length`` is its capacity while only the first ``q_offset + q_length`` slots hold
  tokens): transformers' own sdpa 4D bool mask, never skipped (``allow_is_causal_skip``
  off, so None always means "no padding" to the attention function), which the attention
  function hands to sdpa or serves through its exact softmax path.

Recognition costs O(1) whatever the window (Mistral's default window is 4096 keys): the
pattern named by ``local_size`` must be the config's own ``sliding_window`` (what
transformers' sliding-window mask creators pass), and the mask function is probed at a
few points around the band's edges, not on a grid.  Under ``torch.compile`` /
``torch.export`` the probe (which reads tensor values) is skipped: the config check alone
decides, and no data-dependent ``.all()`` is taken.
"""
from __future__ import annotations

import torch


def tracing() -> bool:
    """Inside ``torch.compile`` / ``torch.export`` tracing: no host reads of tensor values."""
    return torch.compiler.is_compiling()


def _probe(mask_function, q: torch.Tensor, kv: torch.Tensor, want: torch.Tensor) -> bool:
    zero = torch.zeros_like(q)
    try:
        got = mask_function(zero, zero, q, kv)
    except Exception:  # noqa: BLE001 - not an index-based pattern: not this one
        return False
    return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.equal(got.to(torch.bool), want)


def _named_window(kwargs, q_offset, kv_offset) -> int | None:
    """The window ``local_size`` names, if it is the model's own ``sliding_window`` with no
    cache offset and no function put on top (``use_vmap`` marks custom and/or functions)."""
    window, config = kwargs.get("local_size"), kwargs.get("config")
    if (not isinstance(window, int) or isinstance(window, bool) or window < 1 or kwargs.get("use_vmap", False)
            or getattr(config, "sliding_window", None) != window):
        return None
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0):
        return None
    return window


def _edge_points(window: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Query/key index pairs around a band's edges (in both directions when ``symmetric``)."""
    rows = torch.tensor([0, 1, window - 1, window, window + 1, 2 * window, 2 * window + 1])
    offsets = [-window - 1, -window, -window + 1, -1, 0, 1]
    if symmetric:
        offsets += [window - 1, window, window + 1]
    q, kv = torch.broadcast_tensors(rows[:, None], rows[:, None] + torch.tensor(offsets))
    keep = kv >= 0
    return q[keep], kv[keep]


def is_bidirectional_window(mask_function, q_offset, kv_offset, kwargs) -> bool:
    """transformers' plain bidirectional sliding window, ``|q - kv| <= local_size``
    (``create_bidirectional_sliding_window_mask``).  The fused kernel applies the attention
    module's ``sliding_window``: ModernBERT passes ``local_size + 1``, and
    ``|q - kv| < local_size + 1`` is this band exactly (tests/test_patch.py checks the model
    against sdpa)."""
    window = _named_window(kwargs, q_offset, kv_offset)
    if window is None or kwargs.get("allow_is_causal_skip") is not False:  # (the creator passes False)
        return False
    if tracing():
        return True
    q, kv = _edge_points(window, symmetric=True)
    return _probe(mask_function, q, kv, (q - kv).abs() <= window)


def is_causal_window(mask_function, q_offset, kv_offset, kwargs) -> bool:
    """transformers' plain causal sliding window, ``q - local_size < kv <= q``
    (``create_sliding_window_causal_mask``).  transformers keeps ``allow_is_causal_skip``
    True only when nothing was put on top of the pattern (a packed-sequence remap, block
    overlay or custom and/or function each sets it False); the chunked pattern names its
    chunk size, not ``config.sliding_window``, and the probe tells them apart as well."""
    window = _named_window(kwargs, q_offset, kv_offset)
    if window is None or kwargs.get("allow_is_causal_skip") is not True:
        return False
    if tracing():
        return True
    q, kv = _edge_points(window, symmetric=False)
    return _probe(mask_function, q, kv, (kv <= q) & (kv > q - window))


def _keys_end_at_last_query(q_length, kv_length, q_offset, kv_offset) -> bool:
    """No cache or a dynamic one: the keys are the ``kv_length`` positions ending at the last
    query, so the kernels' bottom-right causal alignment is exact.  A static cache passes
    its offset as a tensor and ``kv_length`` = its capacity: not so."""
    return (isinstance(q_offset, int) and isinstance(kv_offset, int)
            and q_offset + q_length == kv_offset + kv_length)


def fastlm_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                attention_mask=None, **kwargs):
    """transformers mask-interface function (see the module docstring)."""
    from transformers import masking_utils as mu

    plain = (getattr(mu, "causal_mask_function", None), getattr(mu, "bidirectional_mask_function", None))
    if mask_function is None:
        mask_function = mu.causal_mask_function
    if (_keys_end_at_last_query(q_length, kv_length, q_offset, kv_offset)
            and (mask_function in plain or is_bidirectional_window(mask_function, q_offset, kv_offset, kwargs)
                 or is_causal_window(mask_function, q_offset, kv_offset, kwargs))):
        if attention_mask is None:
            return None
        padding = attention_mask[:, -kv_length:].to(torch.bool)
        # nothing padded: None (one host read, skipped under tracing, where the mask is kept)
        return None if not tracing() and padding.shape[1] == kv_length and bool(padding.all()) else padding
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)


def dense_mask(padding, batch, seq_q, seq_k, causal, window, device, segments=None):
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


def empty_rows(padding, seq_q: int, causal: bool, window) -> torch.Tensor:
    """``(B, Sq)`` bool: the queries that see no key under ``padding`` ``(B, Sk)`` (True =
    real), bottom-right causal alignment and ``window`` (as :func:`dense_mask`), from running
    counts of real keys: O(B x Sk), no ``(Sq, Sk)`` mask."""
    seq_k = padding.shape[1]
    counts = torch.nn.functional.pad(padding.to(torch.int32).cumsum(1, dtype=torch.int32), (1, 0))  # (B, Sk + 1)
    pos = torch.arange(seq_k - seq_q, seq_k, device=padding.device)
    hi = pos + 1 if causal else torch.full_like(pos, seq_k)  # keys [lo, hi) are visible
    lo = torch.zeros_like(pos)
    if window is not None:
        lo = (pos - window + 1).clamp(min=0)
        if not causal:
            hi = (pos + window).clamp(max=seq_k)
    hi, lo = hi.clamp(0, seq_k), lo.clamp(0, seq_k)
    index = lambda i: i.expand(padding.shape[0], seq_q)  # noqa: E731
    return (counts.gather(1, index(hi)) - counts.gather(1, index(lo))) <= 0
