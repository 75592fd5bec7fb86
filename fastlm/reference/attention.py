"""Attention in plain PyTorch: the ground truth and the fallback on every device.

Kernel-level contract (every backend of ``fastlm::attention`` implements exactly this)::

    attention_forward(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                      max_seqlen_q, max_seqlen_k, causal, window, dropout_p, scale, seed) -> (out, lse)
    attention_backward(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                       max_seqlen_q, max_seqlen_k, causal, window, dropout_p, scale, seed) -> (dq, dk, dv)

* Padded mode (``cu_seqlens_q is None``): q ``(B, Hq, Sq, D)``, k/v ``(B, Hk, Sk, D)``, any
  strides with last-dim stride 1; ``key_padding_mask`` ``(B, Sk)`` bool (True = attend) or
  None; ``max_seqlen_*`` ignored.  lse ``(B, Hq, Sq)``.
* Packed mode: q ``(Tq, Hq, D)``, k/v ``(Tk, Hk, D)``; sequence i is rows
  ``cu_seqlens[i]:cu_seqlens[i+1]`` (int32, length N+1); ``key_padding_mask`` None.
  lse ``(Hq, Tq)``.
* ``causal``: 0 none; 1 top-left (query i sees keys j <= i, as SDPA ``is_causal``); 2
  bottom-right (query i sees keys j <= i + Lk - Lq, as flash-attn / a KV cache), per
  sequence.  In padded mode the causal mask and the key padding mask are both applied.
* ``window``: 0 none; ``w >= 1`` a sliding window (local attention).  With the query at
  position ``p_i = i + Lk - Lq`` for bottom-right causal and ``p_i = i`` otherwise, key j is
  visible iff ``|p_i - j| < w`` (causal 0) or ``p_i - w < j <= p_i`` (causal 1 or 2):
  flash-attn's ``window_size=(w - 1, w - 1)`` (resp. ``(w - 1, 0)``), which is what
  transformers' flash path does with the ``sliding_window=w`` its attention modules pass,
  and what its sdpa/eager masks give (ModernBERT: ``|q - kv| <= config.sliding_window``
  with ``w = config.sliding_window + 1``; Mistral: ``kv > q - w``).  In padded mode the
  positions are the padded row's indices (as transformers' masks count them).
* Grouped-query: query head h reads kv head ``h // (Hq // Hk)``; dk/dv sum over the group.
* Dropout zeroes probabilities with probability ``dropout_p`` and scales the rest by
  ``1 / (1 - dropout_p)``; the mask is a function of ``seed`` (and the shapes) only, so
  the backward regenerates it.  ``seed`` is ignored when ``dropout_p == 0``.
* A query row with no visible key: out 0, lse -inf, and zero gradients (not NaN).
* out/dq are ``empty_like(q)`` (q's strides), dk/dv ``empty_like(k/v)``; lse is float32
  natural-log logsumexp of the scaled scores.

Numerics: inputs are upcast to float32 (float64 stays float64) and every product and
sum is taken in that precision.  Memory: padded mode materialises the full
``(B, Hq, Sq, Sk)`` score tensor; packed mode loops over sequences, so it holds one
sequence's ``(Hq, Lq, Lk)`` scores at a time (reading ``cu_seqlens`` costs one host sync
on a GPU: this is the fallback, not a fast path).  The backward recomputes the softmax
from q and k in the compute precision rather than trusting the float32 ``lse``, so it
stays exact for float64 gradcheck.
"""

import torch

from fastlm.ops._common import acc_dtype


def _visible(lq: int, lk: int, causal: int, window: int, device) -> torch.Tensor | None:
    """(lq, lk) bool: which keys each query may see under ``causal`` and ``window`` (None: all)."""
    if causal == 0 and window == 0:
        return None
    offset = lk - lq if causal == 2 else 0
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    d = i + offset - j  # query position minus key position
    visible = d >= 0 if causal else torch.ones_like(d, dtype=torch.bool)
    if window:
        visible = visible & (d < window)
        if causal == 0:
            visible = visible & (d > -window)
    return visible


def _allowed(key_padding_mask, lq: int, lk: int, causal: int, window: int, device) -> torch.Tensor | None:
    """Bool mask broadcastable to (N, H, lq, lk), or None when every key is visible."""
    allowed = _visible(lq, lk, causal, window, device)
    if key_padding_mask is not None:
        keys = key_padding_mask[:, None, None, :]
        allowed = keys if allowed is None else keys & allowed
    return allowed


def _dropout_keep(shape, dropout_p: float, gen: torch.Generator | None, device) -> torch.Tensor | None:
    """Bool keep-mask drawn from ``gen``: forward and backward draw the same sequence."""
    if dropout_p == 0.0:
        return None
    return torch.rand(shape, generator=gen, device=device, dtype=torch.float32) >= dropout_p


def _generator(seed: int, dropout_p: float, device) -> torch.Generator | None:
    if dropout_p == 0.0:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, Hk, S, D) -> (N, Hk * groups, S, D): query head h reads kv head h // groups."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _reduce_groups(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, Hk * groups, S, D) -> (N, Hk, S, D): sum the gradients of a kv head's group."""
    return t if groups == 1 else t.unflatten(1, (-1, groups)).sum(2)


def _probs(q, k, allowed, scale):
    """Softmax probabilities (N, H, Sq, Sk) and lse (N, H, Sq) in the compute dtype.

    q, k are already upcast and k is already expanded to q's heads.  A row with no
    allowed key gets probabilities 0 and lse -inf (its max is replaced by 0 so the
    subtraction never forms -inf - -inf).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - finite_lse[..., None])
    return probs, lse


def _forward_block(q, k, v, allowed, scale, dropout_p, gen):
    """One batch of padded attention; q (N,Hq,Sq,D), k/v (N,Hk,Sk,D), any float dtype.

    Returns out (N, Hq, Sq, D) and lse (N, Hq, Sq) in the compute dtype.
    """
    cdt = acc_dtype(q.dtype)
    groups = q.shape[1] // k.shape[1]
    kc = _expand_kv(k.to(cdt), groups)
    vc = _expand_kv(v.to(cdt), groups)
    probs, lse = _probs(q.to(cdt), kc, allowed, scale)
    keep = _dropout_keep(probs.shape, dropout_p, gen, probs.device)
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    return torch.matmul(probs, vc), lse


def _backward_block(dout, q, k, v, allowed, scale, dropout_p, gen):
    """Gradients of one padded batch (same shapes as :func:`_forward_block`).

    With P the softmax, M the keep mask and Pd = P*M/(1-p): out = Pd V, so
    dV = Pd^T dO, dP = (dO V^T) * M/(1-p), dS = P * (dP - rowsum(P * dP)),
    dQ = scale * dS K, dK = scale * dS^T Q.  Rows with no visible key have P = 0,
    hence zero gradients.
    """
    cdt = acc_dtype(q.dtype)
    groups = q.shape[1] // k.shape[1]
    qc, doc = q.to(cdt), dout.to(cdt)
    kc = _expand_kv(k.to(cdt), groups)
    vc = _expand_kv(v.to(cdt), groups)
    probs, _ = _probs(qc, kc, allowed, scale)
    dprobs = torch.matmul(doc, vc.transpose(-1, -2))
    keep = _dropout_keep(probs.shape, dropout_p, gen, probs.device)
    if keep is None:
        dv = torch.matmul(probs.transpose(-1, -2), doc)
    else:
        dv = torch.matmul((probs * keep / (1.0 - dropout_p)).transpose(-1, -2), doc)
        dprobs = dprobs * keep / (1.0 - dropout_p)
    dscores = probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True))
    dq = torch.matmul(dscores, kc) * scale
    dk = torch.matmul(dscores.transpose(-1, -2), qc) * scale
    return dq, _reduce_groups(dk, groups), _reduce_groups(dv, groups)


def _sequences(cu_seqlens_q, cu_seqlens_k):
    """(q_start, q_end, k_start, k_end) per packed sequence (one host read of cu_seqlens)."""
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    return [(cq[i], cq[i + 1], ck[i], ck[i + 1]) for i in range(len(cq) - 1)]


def _unpack(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Packed rows (T, H, D)[start:end] as a batch of one, (1, H, L, D) (a view)."""
    return t[start:end].transpose(0, 1).unsqueeze(0)


def attention_forward(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                      max_seqlen_q, max_seqlen_k, causal, window, dropout_p, scale, seed):
    """Attention output and float32 logsumexp (see the module docstring for the contract)."""
    gen = _generator(seed, dropout_p, q.device)
    out = torch.empty_like(q)
    if cu_seqlens_q is None:
        allowed = _allowed(key_padding_mask, q.shape[2], k.shape[2], causal, window, q.device)
        o, lse = _forward_block(q, k, v, allowed, scale, dropout_p, gen)
        out.copy_(o)
        return out, lse.to(torch.float32).contiguous()
    # Packed: tokens outside every sequence (possible only with inconsistent cu_seqlens
    # on a GPU, where the values are not checked) stay 0 / -inf rather than garbage.
    out.zero_()
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for qs, qe, ks, ke in _sequences(cu_seqlens_q, cu_seqlens_k):
        if qe == qs or ke == ks:
            continue  # no queries, or no keys (rows stay 0 / -inf); the backward skips alike
        allowed = _allowed(None, qe - qs, ke - ks, causal, window, q.device)
        o, l = _forward_block(_unpack(q, qs, qe), _unpack(k, ks, ke), _unpack(v, ks, ke),
                              allowed, scale, dropout_p, gen)
        out[qs:qe] = o[0].transpose(0, 1)
        lse[:, qs:qe] = l[0]
    return out, lse


def attention_backward(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                       max_seqlen_q, max_seqlen_k, causal, window, dropout_p, scale, seed):
    """Gradients (dq, dk, dv) of :func:`attention_forward` (``out`` and ``lse`` are unused:
    the reference recomputes the softmax in the compute precision)."""
    gen = _generator(seed, dropout_p, q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if cu_seqlens_q is None:
        allowed = _allowed(key_padding_mask, q.shape[2], k.shape[2], causal, window, q.device)
        for grad, g in zip((dq, dk, dv), _backward_block(dout, q, k, v, allowed, scale, dropout_p, gen)):
            grad.copy_(g)
        return dq, dk, dv
    for grad in (dq, dk, dv):
        grad.zero_()
    for qs, qe, ks, ke in _sequences(cu_seqlens_q, cu_seqlens_k):
        if qe == qs or ke == ks:
            continue  # no queries, or no keys: every gradient of this sequence is 0
        allowed = _allowed(None, qe - qs, ke - ks, causal, window, q.device)
        g = _backward_block(_unpack(dout, qs, qe), _unpack(q, qs, qe), _unpack(k, ks, ke),
                            _unpack(v, ks, ke), allowed, scale, dropout_p, gen)
        dq[qs:qe] = g[0][0].transpose(0, 1)
        dk[ks:ke] = g[1][0].transpose(0, 1)
        dv[ks:ke] = g[2][0].transpose(0, 1)
    return dq, dk, dv
