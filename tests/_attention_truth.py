"""The float64 truth of every attention test, and the inputs those tests build.

One convention, the public API's (``fastlm.ops.attention``): padded ``q`` ``(B, Hq, Sq, D)``,
``k``/``v`` ``(B, Hk, Sk, D)`` (query head h reads kv head ``h // (Hq // Hk)``); ``causal``
False, True (top-left, SDPA's ``is_causal``) or ``"bottom_right"``; ``key_padding_mask``
``(B, Sk)`` bool, True = attend; ``window`` w: query i at position ``p = i`` (``i + Sk - Sq``
bottom-right) sees key j iff ``|p - j| < w``, and only ``j <= p`` when causal; ``keep`` a
bool dropout keep-mask broadcastable to ``(B, Hq, Sq, Sk)`` (kept probabilities scaled by
``1 / (1 - dropout_p)``).  Packed sequences: ``q`` ``(Tq, Hq, D)``, ``k``/``v`` ``(Tk, Hk, D)``
and int32 ``cu_seqlens``; each sequence is a batch of one, its ``keep`` ``(Hq, Lq, Lk)``.
Kernel-level calls take ``causal`` as an int: :data:`CAUSAL_CODE`.

Written from the definition, independently of fastlm's code.  Imported by name
(pytest's ``pythonpath`` has tests/).
"""
import math

import torch

CAUSAL_CODE = {False: 0, True: 1, "bottom_right": 2}


# ---------------------------------------------------------------------------- the truth
def visible(sq, sk, *, causal=False, key_padding_mask=None, window=None, device="cpu"):
    """(B or 1, 1, sq, sk) bool: which key each query sees."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    pos = i + (sk - sq) if causal == "bottom_right" else i  # the query's key position
    vis = j <= pos if causal else torch.ones(sq, sk, dtype=torch.bool, device=device)
    if window is not None:
        vis = vis & ((pos - j).abs() < window)
    vis = vis[None, None]
    if key_padding_mask is not None:
        vis = vis & key_padding_mask[:, None, None, :]
    return vis


def attention_math(q, k, v, *, cu_seqlens=None, key_padding_mask=None, causal=False, window=None, scale=None,
                   keep=None, dropout_p=0.0, visible_keys=None):
    """softmax(scale * q k^T, over the visible keys) v in the inputs' own dtype with plain
    PyTorch ops (differentiable): float64 inputs make it the truth, 16-bit ones the eager
    yardstick of the low-precision budget.  Returns ``(out, lse)``; a row with no visible
    key gives out 0, lse -inf and zero gradients.  ``cu_seqlens`` = (cu_q, cu_k): packed
    inputs, lse ``(Hq, Tq)``.  ``visible_keys``: an explicit bool mask broadcastable to the
    scores, used instead of the one ``causal``/``window``/``key_padding_mask`` describe (tests
    that state a vendor kernel's own masking rule)."""
    if cu_seqlens is not None:
        return _per_sequence(q, k, v, cu_seqlens, keep, causal=causal, window=window, scale=scale,
                             dropout_p=dropout_p)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if visible_keys is None:
        visible_keys = visible(q.shape[2], k.shape[2], causal=causal, key_padding_mask=key_padding_mask,
                               window=window, device=q.device)
    return softmax_times_v(s, v, visible_keys, keep, dropout_p)


def softmax_times_v(s, v, visible_keys=None, keep=None, dropout_p=0.0):
    """softmax of the scores ``s`` ``(B, H, Lq, Lk)`` over the visible keys (a bool mask
    broadcastable to ``s``; None: all), dropout by ``keep``, times ``v`` ``(B, H, Lk, D)``, in
    s's dtype: ``(out, lse)``; a row with no visible key gives out 0, lse -inf and zero
    gradients.  The attention truths (this module's, DeBERTa's) end here."""
    vis = torch.ones_like(s, dtype=torch.bool) if visible_keys is None else visible_keys.expand(s.shape)
    seen = vis.any(-1, keepdim=True)
    s = torch.where(vis, s, float("-inf"))
    p = torch.softmax(torch.where(seen, s, 0.0), -1) * seen  # an empty row: 0, not NaN
    lse = torch.logsumexp(s, -1)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    return p @ v, lse


def _per_sequence(q, k, v, cu_seqlens, keep, **kw):
    outs, lses = [], []
    for n, (rq, rk) in enumerate(spans(*cu_seqlens)):
        one = [t.transpose(0, 1)[None] for t in (q[rq], k[rk], v[rk])]  # (1, H, L, D)
        out, lse = attention_math(*one, keep=None if keep is None else keep[n][None], **kw)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def forward_backward(q, k, v, dout=None, *, dtype=torch.float64, **kw):
    """:func:`attention_math` on detached copies of q, k, v in ``dtype`` (None: their own):
    ``(out, lse, (dq, dk, dv) or None)``, gradients of ``<out, dout>`` in that dtype."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out, lse = attention_math(*leaves, **kw)
    grads = None if dout is None else torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out.detach(), lse.detach(), grads


def truth(q, k, v, dout=None, **kw):
    """The float64 truth: ``(out, lse, grads or None)``."""
    return forward_backward(q, k, v, dout, dtype=torch.float64, **kw)


def expected_attention(q, k, v, visible_keys, scale=None, keep=None, dropout_p=0.0):
    """The float64 output (differentiable) under an explicit visibility mask: :func:`attention_math`."""
    return attention_math(q.double(), k.double(), v.double(), visible_keys=visible_keys, scale=scale, keep=keep,
                          dropout_p=dropout_p)[0]


def eager(q, k, v, dout, **kw):
    """Plain PyTorch attention in the inputs' dtype: ``(out, grads)``."""
    out, _, grads = forward_backward(q, k, v, dout, dtype=None, **kw)
    return out, grads


# ------------------------------------------------------------------------------- inputs
def make_qkv(b, hq, hk, sq, sk, d, *, dtype=torch.float32, hf=False, requires_grad=True, device="cpu"):
    """Random q, k, v; ``hf``: (B, H, S, D) views of (B, S, H, D) storage, as Hugging Face passes them."""
    def one(h, s):
        t = torch.randn(b, s, h, d, device=device).transpose(1, 2) if hf else torch.randn(b, h, s, d, device=device)
        return t.to(dtype).requires_grad_(requires_grad)
    return one(hq, sq), one(hk, sk), one(hk, sk)


def padding_mask(b, sk, kind, *, lengths=None, device="cpu"):
    """(b, sk) bool key padding mask, None for kind None.  ``"right"`` / ``"left"``: lengths
    ``lengths`` (default sk, sk - 3, sk - 6, ..., at least 1) padded on that side;
    ``"holes"``: each key kept with probability 0.6; ``"empty_row"``: holes, and batch 1
    sees no key at all."""
    if kind is None:
        return None
    if kind in ("holes", "empty_row"):
        mask = torch.rand(b, sk, device=device) > 0.4
        if kind == "empty_row":
            mask[1] = False
        return mask
    lengths = torch.tensor([max(sk - 3 * i, 1) for i in range(b)] if lengths is None else lengths, device=device)
    pos = torch.arange(sk, device=device)[None, :]
    return pos < lengths[:, None] if kind == "right" else pos >= (sk - lengths)[:, None]


def cu_seqlens(lengths, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def pack(lengths_q, lengths_k, hq, hk, d, *, dtype=torch.float32, requires_grad=True, device="cpu"):
    """Random packed q, k, v, their cu_seqlens and max lengths."""
    def one(lengths, h):
        return torch.randn(sum(lengths), h, d, device=device).to(dtype).requires_grad_(requires_grad)
    return (one(lengths_q, hq), one(lengths_k, hk), one(lengths_k, hk), cu_seqlens(lengths_q, device),
            cu_seqlens(lengths_k, device), max(lengths_q), max(lengths_k))


def spans(cu_q, cu_k):
    """(query rows, key rows) of each packed sequence."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(slice(cq[n], cq[n + 1]), slice(ck[n], ck[n + 1])) for n in range(len(cq) - 1)]


def identity_values(b, hk, sk, d, device="cpu"):
    """v = the identity, (b, hk, sk, d) with sk <= d: with it, attention returns its own
    (dropped, rescaled) probabilities in out[..., :sk], so a kernel's dropout mask can be
    read back (every visible probability is > 0)."""
    assert sk <= d
    return torch.eye(sk, d, device=device).expand(b, hk, sk, d)
