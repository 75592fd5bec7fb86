"""CPU emulations of PyTorch's fused attention kernels, for testing fastlm/aten/attention.py
without a GPU.  Each follows its kernel's documented semantics and argument checks, from
float64 arithmetic (the truth of _attention_targets.py for the forward):

* flash (``_flash_attention_forward/_backward``): fp16/bf16 only; q/k/v ``(B, S, H, D)``
  or packed ``(T, H, D)`` with ``cum_seq_q/k``; causal and windows ``(left, right)``
  aligned to the last key (bottom-right); grouped-query heads; a row with no visible key
  gives 0 and lse +inf; lse ``(B, H, Sq)`` / ``(H, T)``; dropout from a Philox
  ``rng_state = (seed, offset)`` drawn from the default generator, handed back.
* memory-efficient (``_efficient_attention_forward/_backward``): fp16/bf16/fp32; equal
  head counts; an additive bias ``(B, H, Sq, Sk)`` (any strides, last dim contiguous,
  others aligned); ``custom_mask_type`` 0/1/2 (none, top-left, bottom-right); packed as a
  batch of one with ``cu_seqlens``; no window; a row with no visible key gives NaN and
  lse -inf (the worst a kernel may do); lse ``(B or N, H, round_up(rows, 32))`` padded
  with +inf (then garbage, NaN here); dropout seed/offset returned as CPU scalars, which
  its backward reads on the host.

The backwards use the lse and out they are handed, as the kernels do (``exp(s - lse)``),
so a wrong conversion (an lse of -inf for an empty row) shows up as NaN.

"The default generator": the CPU one here.  A call draws (seed, offset): seed is the
generator's initial seed; offset 0 when the generator is freshly seeded, else a counter;
the call then advances the generator.  So the mask follows fastlm's seed only when the
mapping seeds the generator, and the backward reproduces it only from the right state.
"""
from __future__ import annotations

import math
import types

import torch

from _attention_truth import expected_attention

F64 = torch.float64
INF = float("inf")


# ------------------------------------------------------------------------------ randomness
def _draw_philox():
    gen = torch.default_generator
    seed = gen.initial_seed()
    fresh = torch.Generator().manual_seed(seed).get_state()
    offset = 0 if torch.equal(gen.get_state(), fresh) else int(torch.randint(1, 2**30, (1,), generator=gen)) * 4
    torch.rand(1, generator=gen)  # the kernel advanced the generator's offset
    return seed, offset


def _keep(seed: int, offset: int, shape, p: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + offset) % 2**63)
    return torch.rand(shape, generator=gen, dtype=F64) >= p


# ----------------------------------------------------------------------------- sequences
def _spans(cum_q, cum_k, batch: int, sq: int, sk: int):
    """(index, query rows, key rows) per sequence: packed from cum_seq, padded per batch."""
    if cum_q is None:
        return [(b, slice(0, sq), slice(0, sk)) for b in range(batch)]
    cq, ck = cum_q.tolist(), cum_k.tolist()
    return [(n, slice(cq[n], cq[n + 1]), slice(ck[n], ck[n + 1])) for n in range(len(cq) - 1)]


def _flash_visible(lq, lk, is_causal, left, right):
    i = torch.arange(lq)[:, None] + (lk - lq)  # bottom-right: the last query sits on the last key
    j = torch.arange(lk)[None, :]
    right = 0 if is_causal else right
    vis = torch.ones(lq, lk, dtype=torch.bool)
    if left is not None and left >= 0:
        vis &= j >= i - left
    if right is not None and right >= 0:
        vis &= j <= i + right
    return vis


def _efficient_visible(lq, lk, mask_type):
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    if mask_type == 0:
        return torch.ones(lq, lk, dtype=torch.bool)
    return j <= i + ((lk - lq) if mask_type == 2 else 0)


def _heads_first(t):  # (L, H, D) -> (1, H, L, D) float64
    return t.transpose(0, 1)[None].to(F64)


def _scores(q, k, scale, bias=None):
    """(H, Lq, Lk) float64 scores of one sequence, k/v heads expanded to q's."""
    groups = q.shape[1] // k.shape[1]
    s = torch.einsum("qhd,khd->hqk", q.to(F64), k.to(F64).repeat_interleave(groups, 1)) * scale
    return s if bias is None else s + bias.to(F64)


def _lse(s, vis):
    return torch.logsumexp(s.masked_fill(~vis, -INF), -1)  # -inf where nothing is visible


def _backward(dout, q, k, v, out, lse, vis, scale, keep, p, bias=None):
    """Gradients of one sequence from the given out and lse, as the kernels compute them."""
    groups = q.shape[1] // k.shape[1]
    kc, vc = (t.to(F64).repeat_interleave(groups, 1) for t in (k, v))
    s = _scores(q, k, scale, bias).masked_fill(~vis, -INF)
    probs = torch.exp(s - lse.to(F64)[:, :, None])  # lse -inf on an empty row: -inf - -inf = NaN
    drop = keep / (1.0 - p) if keep is not None else 1.0
    do = dout.to(F64)
    dp = torch.einsum("qhd,khd->hqk", do, vc) * drop
    delta = (do * out.to(F64)).sum(-1).t()[:, :, None]  # (H, Lq, 1)
    ds = probs * (dp - delta)
    dq = torch.einsum("hqk,khd->qhd", ds, kc) * scale
    dk = torch.einsum("hqk,qhd->khd", ds, q.to(F64)) * scale
    dv = torch.einsum("hqk,qhd->khd", probs * drop, do)
    sum_groups = lambda t: t.unflatten(1, (-1, groups)).sum(2)  # noqa: E731
    return dq, sum_groups(dk), sum_groups(dv)


# ---------------------------------------------------------------------------------- flash
def _flash_checks(query, key, value, cum_q):
    assert query.dtype in (torch.float16, torch.bfloat16), "FlashAttention only support fp16 and bf16 data type"
    assert key.dtype == query.dtype == value.dtype
    assert query.stride(-1) == key.stride(-1) == value.stride(-1) == 1, "contiguous last dimension"
    d = query.shape[-1]
    assert d % 8 == 0 and d <= 256, "head_size must be a multiple of 8, at most 256"
    assert query.shape[-2] % key.shape[-2] == 0
    assert query.dim() == (3 if cum_q is not None else 4)
    if cum_q is not None:
        assert cum_q.dtype == torch.int32 and cum_q.is_contiguous()


def _flash_sequences(query, key, cum_q, cum_k):
    """Per sequence: (index, q rows (L, H, D), k rows), padded (B, S, H, D) or packed."""
    if cum_q is None:
        return [(b, (b, rq), (b, rk)) for b, rq, rk in _spans(None, None, *query.shape[:2], key.shape[1])]
    return [(n, (rq,), (rk,)) for n, rq, rk in _spans(cum_q, cum_k, 0, 0, 0)]


def flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask,
                  *, scale=None, window_size_left=None, window_size_right=None, **unused):
    _flash_checks(query, key, value, cum_seq_q)
    left, right = (-1 if w is None else w for w in (window_size_left, window_size_right))
    if cum_seq_q is not None and max_q == 1 and query.shape[1] > key.shape[1] and left < 0 and right < 0 \
            and dropout_p == 0:  # flash then reshapes q to (batch, kv_heads, groups, D)
        assert query.shape[0] == len(cum_seq_q) - 1, "shape is invalid for input (one query per sequence)"
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    seed, offset = _draw_philox() if dropout_p > 0 else (0, 0)
    out = torch.empty_like(query)
    packed = cum_seq_q is not None
    lse = torch.empty((query.shape[1], query.shape[0]) if packed else (query.shape[0], query.shape[2], query.shape[1]),
                      dtype=torch.float32)
    n_seq = len(cum_seq_q) - 1 if packed else query.shape[0]
    keep_all = _keep(seed, offset, (n_seq, query.shape[-2], max_q, max_k), dropout_p) if dropout_p > 0 else None
    for n, iq, ik in _flash_sequences(query, key, cum_seq_q, cum_seq_k):
        q, k, v = query[iq], key[ik], value[ik]
        vis = _flash_visible(q.shape[0], k.shape[0], is_causal, window_size_left, window_size_right)
        keep = None if keep_all is None else keep_all[n, :, :q.shape[0], :k.shape[0]]
        o = expected_attention(_heads_first(q), _heads_first(k), _heads_first(v), vis, scale,
                               None if keep is None else keep[None], dropout_p)
        out[iq] = o[0].transpose(0, 1).to(out.dtype)
        row_lse = _lse(_scores(q, k, scale), vis).masked_fill(~vis.any(-1), INF)  # flash: +inf, nothing visible
        if packed:
            lse[:, iq[0]] = row_lse.float()
        else:
            lse[n] = row_lse.float()
    rng_state = torch.tensor([seed, offset], dtype=torch.int64).view(torch.uint64)
    return out, lse, rng_state, torch.empty((), dtype=torch.uint64), torch.empty(0, dtype=query.dtype)


def flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                   is_causal, rng_state, unused, *, scale=None, window_size_left=None, window_size_right=None):
    _flash_checks(query, key, value, cum_seq_q)
    assert out.dtype == grad_out.dtype == query.dtype and grad_out.shape == out.shape == query.shape
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    packed = cum_seq_q is not None
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    dk.zero_(), dv.zero_()  # keys of no sequence stay 0 (there are none in a consistent call)
    seed, offset = rng_state.view(torch.int64).tolist()
    n_seq = len(cum_seq_q) - 1 if packed else query.shape[0]
    keep_all = _keep(seed, offset, (n_seq, query.shape[-2], max_q, max_k), dropout_p) if dropout_p > 0 else None
    for n, iq, ik in _flash_sequences(query, key, cum_seq_q, cum_seq_k):
        q, k, v = query[iq], key[ik], value[ik]
        vis = _flash_visible(q.shape[0], k.shape[0], is_causal, window_size_left, window_size_right)
        lse = logsumexp[:, iq[0]] if packed else logsumexp[n]
        keep = None if keep_all is None else keep_all[n, :, :q.shape[0], :k.shape[0]]
        g = _backward(grad_out[iq], q, k, v, out[iq], lse, vis, scale, keep, dropout_p)
        dq[iq], dk[ik], dv[ik] = (t.to(query.dtype) for t in g)
    return dq, dk, dv


# ------------------------------------------------------------------------ memory-efficient
def _alignment(dtype):
    return 4 if dtype == torch.float32 else 8


def _efficient_checks(query, key, value, bias, cu_q):
    assert query.dim() == key.dim() == value.dim() == 4
    assert query.dtype in (torch.float16, torch.bfloat16, torch.float32) and key.dtype == query.dtype == value.dtype
    assert query.shape[2] == key.shape[2] == value.shape[2], "equal head counts (expand k/v for grouped-query)"
    assert query.stride(-1) == key.stride(-1) == value.stride(-1) == 1, "contiguous last dimension"
    if cu_q is not None:
        assert bias is None, "cu seqlen + bias not supported"
        assert query.shape[0] == 1, "cu_seqlen only supports batch_size=1"
        assert cu_q.dtype == torch.int32 and cu_q.is_contiguous()
    if bias is not None:
        b, h, m, n = bias.shape
        assert bias.dtype == query.dtype, "invalid dtype for bias - should match query's dtype"
        assert (b, h, m, n) == (query.shape[0], query.shape[2], query.shape[1], key.shape[1])
        assert bias.stride(3) == 1, "attn_bias: last dimension must be contiguous"
        align = _alignment(bias.dtype)
        for size, stride in zip(bias.shape[:3], bias.stride()[:3]):
            assert size <= 1 or stride % align == 0, "attn_bias is not correctly aligned"


def _efficient_sequences(query, key, cu_q, cu_k):
    if cu_q is None:
        return [(b, (b, rq), (b, rk)) for b, rq, rk in _spans(None, None, *query.shape[:2], key.shape[1])]
    return [(n, (0, rq), (0, rk)) for n, rq, rk in _spans(cu_q, cu_k, 0, 0, 0)]


def efficient_forward(query, key, value, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                      custom_mask_type, compute_log_sumexp=False, *, scale=None, seqlen_k=None, window_size=None):
    _efficient_checks(query, key, value, bias, cu_seqlens_q)
    assert window_size is None
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    packed = cu_seqlens_q is not None
    rows = max_seqlen_q if packed else query.shape[1]
    n_seq = len(cu_seqlens_q) - 1 if packed else query.shape[0]
    out = torch.empty(query.shape[:3] + value.shape[3:], dtype=query.dtype)  # (B, M, H, Kv), contiguous
    lse = torch.full((n_seq, query.shape[2], math.ceil(rows / 32) * 32), float("nan"))
    seed, offset = _draw_philox() if dropout_p > 0 else (0, 0)
    cols = max_seqlen_k if packed else key.shape[1]
    keep_all = _keep(seed, offset, (n_seq, query.shape[2], rows, cols), dropout_p) if dropout_p > 0 else None
    for n, iq, ik in _efficient_sequences(query, key, cu_seqlens_q, cu_seqlens_k):
        q, k, v = query[iq], key[ik], value[ik]
        lq, lk = q.shape[0], k.shape[0]
        vis = _efficient_visible(lq, lk, custom_mask_type).expand(q.shape[1], lq, lk)
        b = None if bias is None else bias[n]  # (H, Lq, Lk)
        s = _scores(q, k, scale, b)
        vis = vis & (s > -INF)  # a -inf bias hides a key
        keep = None if keep_all is None else keep_all[n, :, :lq, :lk]
        o = expected_attention(_heads_first(q), _heads_first(k), _heads_first(v), vis[None], scale,
                               None if keep is None else keep[None], dropout_p) if b is None else None
        if o is None:  # with a bias the scores are not scale * q k^T: softmax them here
            probs = torch.softmax(s.masked_fill(~vis, -INF), -1).nan_to_num(0.0)
            if keep is not None:
                probs = probs * keep / (1.0 - dropout_p)
            o = torch.einsum("hqk,khd->hqd", probs, v.to(F64))[None]
        o = o[0].transpose(0, 1)
        o[~vis.any(-1).t()] = float("nan")  # nothing visible: what a kernel dividing by 0 writes
        out[iq] = o.to(out.dtype)
        lse[n, :, :lq] = _lse(s, vis).float()
        lse[n, :, lq:math.ceil(lq / 32) * 32] = INF
    seeds = (torch.tensor(seed), torch.tensor(offset)) if dropout_p > 0 else (torch.empty(()), torch.empty(()))
    return out, lse, *seeds, max_seqlen_q, max_seqlen_k


def efficient_backward(grad_out_, query, key, value, bias, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                       max_seqlen_k, logsumexp, dropout_p, philox_seed, philox_offset, custom_mask_type,
                       bias_requires_grad, *, scale=None, num_splits_key=None, window_size=None,
                       shared_storage_dqdkdv=False):
    _efficient_checks(query, key, value, bias, cu_seqlens_q)
    assert grad_out_.shape == out.shape == query.shape[:3] + value.shape[3:]
    b, m, h, kv = out.shape  # out is read with rows h * kv apart, whatever its strides (o_strideM)
    assert m == 1 or out.stride()[1:] == (h * kv, kv, 1), "out must be laid out (B, M, H, Kv)"
    packed = cu_seqlens_q is not None
    if packed:
        assert 0 < max_seqlen_q <= query.shape[1] and 0 < max_seqlen_k <= key.shape[1]
    if dropout_p > 0:
        assert philox_seed.device.type == "cpu" and philox_offset.device.type == "cpu", "read on the host"
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    rows = max_seqlen_q if packed else query.shape[1]
    cols = max_seqlen_k if packed else key.shape[1]
    n_seq = len(cu_seqlens_q) - 1 if packed else query.shape[0]
    keep_all = (_keep(int(philox_seed), int(philox_offset), (n_seq, query.shape[2], rows, cols), dropout_p)
                if dropout_p > 0 else None)
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype) for t in (query, key, value))
    for n, iq, ik in _efficient_sequences(query, key, cu_seqlens_q, cu_seqlens_k):
        q, k, v = query[iq], key[ik], value[ik]
        lq, lk = q.shape[0], k.shape[0]
        vis = _efficient_visible(lq, lk, custom_mask_type).expand(q.shape[1], lq, lk)
        b = None if bias is None else bias[n]
        vis = vis & (_scores(q, k, scale, b) > -INF)
        keep = None if keep_all is None else keep_all[n, :, :lq, :lk]
        g = _backward(grad_out_[iq], q, k, v, out[iq], logsumexp[n, :, :lq], vis, scale, keep, dropout_p, b)
        dq[iq], dk[ik], dv[ik] = (t.to(query.dtype) for t in g)
    return dq, dk, dv, torch.empty(0)


EMULATION = types.SimpleNamespace(
    _flash_attention_forward=flash_forward, _flash_attention_backward=flash_backward,
    _efficient_attention_forward=efficient_forward, _efficient_attention_backward=efficient_backward)
