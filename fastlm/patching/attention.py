"""The ``"fastlm"`` attention implementation for transformers' attention interface.

Registered lazily (first :func:`fastlm.patch` call) under the name ``"fastlm"`` in both
``transformers.AttentionInterface`` (the attention function below) and
``transformers.AttentionMaskInterface`` (:func:`fastlm.patching.masks.fastlm_mask`).  The
mask registration is not optional: for a name missing from the mask interface
transformers skips mask creation and hands the attention function ``attention_mask=None``,
silently dropping the padding.

Attention function, per call:

* ``cu_seq_lens_q/k`` + ``max_length_q/k`` keyword arguments (packed batch of shape
  ``(1, total_tokens, ...)``, as produced by :mod:`fastlm.patching.unpad` or
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``): ``fastlm.ops.varlen_attention``.
* 2D padding mask or None: ``fastlm.ops.attention`` with ``key_padding_mask``; causal
  models use bottom-right alignment (query i of the last ``q_len`` positions sees keys up
  to its own position), which is top-left when ``q_len == kv_len`` and right for a dynamic
  KV cache; left padding is just masked keys.  Grouped-query k/v go in unexpanded.
* in both, a ``sliding_window`` w shorter than the sequences becomes the kernels'
  ``window=w``: flash-attn's ``window_size=(w - 1, w - 1)`` (``(w - 1, 0)`` causal), i.e.
  what transformers' flash path does with it and what its sdpa/eager masks encode.
* a query that sees no key (the padding positions of a left-padded causal batch): the
  fused kernels give zeros, which is transformers' sdpa result (PyTorch's SDPA) but not
  its eager one, where every key is masked by the same finite minimum and the row
  averages ``v`` over all keys.  A model patched from ``"eager"`` gets that average, so
  the loss on the first real token (predicted from the last padding position) is the
  unpatched model's.
* a 4D mask (custom, or built by the mask builder for patterns beyond padding, static
  caches included): transformers' sdpa when the model was patched from ``"sdpa"``, else
  the softmax path below.
* the attention probabilities wanted (``output_attentions`` per call, through the config,
  or collected by transformers' output-capturing hooks, as GPT-2 does), or a sliding window
  that an explicitly requested backend cannot serve: ``q @ k^T`` -> ``fastlm.ops.softmax``
  (scale, mask, dropout in one pass) -> ``@ v``, returning the probabilities (eager's
  additive minimum as the mask for a model patched from ``"eager"``, so they are eager's);
  one warning per reason per process.
* softcapping or attention sinks (``softcap``/``s_aux``): not served; raises, since no
  patched architecture has them.

Dropout is ``dropout`` as the model passes it (transformers already passes 0.0 in eval).
"""
from __future__ import annotations

import warnings

import torch

from fastlm.patching.masks import dense_mask, empty_rows, fastlm_mask, tracing

NAME = "fastlm"
ORIGINAL = "_fastlm_attn_implementation"  # set on the model and on every module by fastlm.patch
_WARNED: set = set()
_registered = False


def _warn_once(reason: str) -> None:
    if reason not in _WARNED and not tracing():
        _WARNED.add(reason)
        warnings.warn(f"fastlm attention: {reason}; this call uses the softmax path "
                      "(q @ k^T -> fastlm.ops.softmax -> @ v), slower but exact", stacklevel=3)


def backend_of(module) -> str:
    """The ``backend=`` given to :func:`fastlm.patch` (stored on every module when not ``"auto"``)."""
    return getattr(module, "_fastlm_backend", "auto")


def _as_int(x) -> int:
    return int(x)  # max_length_* may arrive as a 0-d tensor (one host read per layer then)


def _collecting_attentions() -> bool | None:
    """Whether transformers' output-capturing hooks are collecting attention weights in this
    call (None: this transformers has no such collector)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return None
    collected = _active_collector.get()
    return collected is not None and any(key.endswith("attentions") for key in collected)


def attentions_wanted(module, kwargs) -> bool:
    """The caller wants this layer's attention probabilities: ``output_attentions`` per call,
    else transformers' collector (config flag, or models such as GPT-2 that pop the
    per-call flag and collect with hooks), else the config flag."""
    flag = kwargs.get("output_attentions")
    if flag is not None:
        return bool(flag)
    collecting = _collecting_attentions()
    if collecting is not None:
        return collecting
    return bool(getattr(getattr(module, "config", None), "output_attentions", False))


def fastlm_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None,
                             softcap: float | None = None, is_causal: bool | None = None,
                             s_aux=None, **kwargs):
    """transformers attention-interface function: q ``(B, Hq, Sq, D)``, k/v ``(B, Hk, Sk, D)``
    -> ``(attn_output (B, Sq, Hq, D), attn_weights or None)``."""
    # (from the submodules: once fastlm.ops.attention is imported, the package attribute
    # ``fastlm.ops.attention`` is that submodule, not the function)
    from fastlm.ops.attention import attention, varlen_attention

    if softcap is not None or s_aux is not None:
        raise NotImplementedError("fastlm attention does not serve logit softcapping or attention sinks; "
                                  "fastlm.patch does not switch such models to it")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    causal_mode = "bottom_right" if causal else False
    backend = backend_of(module)
    original = getattr(module, ORIGINAL, None)
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
    if packed:
        segments = (cu_q, cu_k)
    elif mask is not None and (mask.dim() != 2 or mask.shape[-1] != seq_k):
        if mask.dim() == 2:  # a padding mask shorter than the keys: the keys beyond it are masked
            mask = torch.nn.functional.pad(mask.to(torch.bool), (0, seq_k - mask.shape[-1]))
            mask = dense_mask(mask, query.shape[0], seq_q, seq_k, causal, window, query.device)
        if original == "sdpa" and not attentions_wanted(module, kwargs):
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                          is_causal=False, **kwargs)
        return _softmax_path(module, query, k, v, mask, None, causal, window, dropout, scaling, backend,
                             original, "a 4D attention mask (custom, or a pattern beyond padding + causal)")

    if attentions_wanted(module, kwargs):
        return _softmax_path(module, query, k, v, mask, segments if packed else None, causal, sliding_window,
                             dropout, scaling, backend, original, "attention probabilities are wanted")
    if window is not None and not _window_served(query.device, query.dtype, query.shape[1], k.shape[1],
                                                 query.shape[-1], packed, causal_mode, dropout > 0, backend):
        return _softmax_path(module, query, k, v, mask, segments if packed else None, causal, sliding_window,
                             dropout, scaling, backend, original, f"backend {backend!r} has no sliding window")
    if packed:
        out = varlen_attention(
            query[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
            cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k,
            causal=causal_mode, window=window, dropout_p=dropout, scale=scaling, backend=backend)
        return out.unsqueeze(0), None
    out = attention(query, k, v, key_padding_mask=mask, causal=causal_mode, window=window,
                    dropout_p=dropout, scale=scaling, backend=backend)
    if original == "eager" and (mask is not None or (causal and seq_q > seq_k)):
        out = _eager_empty_rows(out, query, k, v, mask, causal, window, dropout, scaling, backend)
    return out.transpose(1, 2), None


_WINDOW_SERVED: dict = {}


@torch.compiler.assume_constant_result  # traced graphs take the answer as a constant
def _window_served(device, dtype, heads_q, heads_k, head_dim, packed, causal, dropout, backend) -> bool:
    """Whether ``backend`` serves a sliding window for such a call (``fastlm.ops.attention.serves``
    on stand-in tensors: the answer depends on these facts only, so it is asked once)."""
    from fastlm.ops.attention import serves

    key = (device, dtype, heads_q, heads_k, head_dim, packed, causal, dropout, backend)
    if key not in _WINDOW_SERVED:
        q = torch.empty((1, heads_q, 1, head_dim), dtype=dtype, device=device)
        k = torch.empty((1, heads_k, 1, head_dim), dtype=dtype, device=device)
        _WINDOW_SERVED[key] = serves(q, k, packed=packed, causal=causal, window=1,
                                     dropout_p=0.5 if dropout else 0.0, backend=backend)
    return _WINDOW_SERVED[key]


def _eager_empty_rows(out, q, k, v, padding, causal: bool, window, dropout, scale, backend):
    """Rows that see no key get eager's value and gradient.  Eager adds the same finite
    minimum to every score of such a row, which absorbs them (fp32 / bf16): uniform weights
    over all ``Sk`` keys, the mean of ``v``, while autograd still differentiates the scores
    (the softmax Jacobian at the uniform point).  ``[q - q.detach(), q] . [k, k - k.detach()]``
    is zero (uniform weights) with the scores' gradient, ``d/dq = k``, ``d/dk = q``, so one
    unmasked fused call over those concatenated heads gives exactly that; without autograd
    the mean suffices.  (fp16 weights: eager's minimum does not absorb the scores; see the
    README's list.)"""
    from fastlm.ops.attention import attention

    batch, heads, seq_q, _ = out.shape
    if padding is None:
        padding = torch.ones(batch, v.shape[2], dtype=torch.bool, device=v.device)
    empty = empty_rows(padding, seq_q, causal, window)  # (B, Sq)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        rows = attention(torch.cat([q - q.detach(), q], -1), torch.cat([k, k - k.detach()], -1),
                         torch.cat([v, torch.zeros_like(v)], -1),  # (the op wants one head_dim)
                         dropout_p=dropout, scale=scale, backend=backend)[..., :v.shape[-1]]
    else:
        rows = v.mean(dim=2, keepdim=True).repeat_interleave(heads // v.shape[1], dim=1)  # (B, Hq, 1, D)
    return torch.where(empty[:, None, :, None], rows, out)


def _softmax_path(module, query, k, v, mask, segments, causal, window, dropout, scaling, backend, original,
                  reason):
    """``q @ k^T -> fastlm.ops.softmax -> @ v`` with a dense mask; returns the probabilities too."""
    from fastlm.ops.softmax import softmax

    _warn_once(reason)
    seq_q, seq_k = query.shape[2], k.shape[2]
    if segments is not None:  # packed: block-diagonal mask over the sequences
        mask = dense_mask(None, 1, seq_q, seq_k, causal, window, query.device, segments=segments)
    elif mask is None or mask.dim() != 4:
        mask = dense_mask(mask, query.shape[0], seq_q, seq_k, causal, window, query.device)
    groups = query.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if mask.dtype == torch.bool and original == "eager":  # eager's additive mask: rows with no key average
        mask = torch.zeros((), dtype=query.dtype, device=mask.device).masked_fill(~mask, torch.finfo(query.dtype).min)
    elif mask.dtype != torch.bool:
        mask = mask.to(query.dtype)
    probs = softmax(query @ k.transpose(-1, -2), scale=scale, mask=mask, dropout_p=dropout, backend=backend)
    return (probs @ v).transpose(1, 2), probs


def ensure_registered() -> None:
    """Register ``"fastlm"`` in transformers' attention and mask interfaces (additive, idempotent)."""
    global _registered
    if _registered:
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: F401
    except ImportError as exc:  # pragma: no cover - guarded for older/newer transformers
        raise ImportError(f"fastlm.patch needs transformers >= 5.17 with AttentionInterface and "
                          f"AttentionMaskInterface ({exc})") from exc
    AttentionInterface.register(NAME, fastlm_attention_forward)
    AttentionMaskInterface.register(NAME, fastlm_mask)
    _registered = True
