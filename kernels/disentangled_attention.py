"""Triton DeBERTa disentangled attention (the ``triton`` backend of
``fastlm.ops.disentangled_attention`` / ``varlen_disentangled_attention``): exact, online
softmax, never an ``L x L`` matrix in memory.

Scores (contract: :mod:`fastlm.reference.disentangled_attention`), sequence n, head h:
``s_ij = scale * (q_i.k_j + C2P[i, t] + P2C[j, t])`` with ``t = rel_slots[i - j + Lmax - 1]``,
``C2P = Q pos_key^T`` and ``P2C = K pos_query^T``.  Layouts as :mod:`fastlm.kernels.attention`
(padded ``(B, H, L, D)`` with a key padding mask, or packed ``(T, H, D)`` with ``cu_seqlens``;
positions restart at every sequence).

Memory traffic: the positional products are computed by the launchers with one batched
matmul each, ``(.., L, D) x (H, D, R) -> (.., L, R)`` in the input dtype (R = 2 * span rows, 512
for DeBERTa-v3): for every query/key pair the kernels then read the pair's slot from the
``2 L - 1`` entry table and gather one element of each product (2 loads per score, mostly
from L2: a query block's C2P rows are ``BLOCK_M x R`` contiguous values).  That is
``B H L R`` elements per product instead of transformers' ``B H L L`` gathered copies plus
its score, mask and softmax tensors.  The backward scatters the score gradients into fp32
``dC2P`` / ``dP2C`` of the same shapes with atomic adds (several keys of a row share a log
bucket beyond ``position_buckets / 2``, so the scatter has collisions), and the launcher folds
them back with four matmuls: ``dQ += scale dC2P pos_key``, ``dK += scale dP2C pos_query``,
``dpos_key = scale sum dC2P^T Q``, ``dpos_query = scale sum dP2C^T K``.

Backward: as :mod:`fastlm.kernels.attention`, two launches.  The dQ program first computes
delta_i = sum_j P_ij dP_ij from fp32 tiles (rowsum(dO O) only for fp32 inputs: a 16-bit O's
rounding would dominate dS = P (dP - delta) for peaked rows) and stores it; the dK/dV
program reads it.  dQ and dK are accumulated and written in fp32, so the launcher adds the
positional parts before the one rounding.

Dropout: the keep bits of :mod:`fastlm.kernels.attention` (Philox keyed by the seed, counters
(key index, lse row)), regenerated in the backward.  A query row that sees no key: out 0,
lse -inf, zero gradients.

Status: tested under ``TRITON_INTERPRET=1`` only; never run on a GPU ("unverified").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.ops._common import last_dim_contiguous
from fastlm.registry import triton_interpreted

from ._flash import (LOG2E, accumulate, key_range, load_rows, lowp, masked_scores, mma, probs_and_dp, program,
                     row_stats, store_output)
from .attention import _Layout, _bhm, _bucket, _pruner, configs

# The autotune key: attention's, less causal masks and windows, plus which tables exist.
_KEY = ["Q_BUCKET", "BLOCK_D", "HAS_MASK", "DROPOUT", "IS_VARLEN", "HAS_C2P", "HAS_P2C"]


# ------------------------------------------------------------------------- score tiles
@triton.jit
def _scores(a, b, qi, kj, length, kpm, stride_mn, SLOTS, center, c2p_base, p2c_base, num_slots, qk_scale,
            HAS_MASK: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The score tile ``qk_scale * (a @ b + C2P[i, t] + P2C[j, t])`` (log2 domain), -inf where
    query ``qi`` does not see key ``kj``, oriented as :func:`masked_scores` (queries x keys, or
    keys x queries with ``a`` = K); also the slot ``t = slot(i - j)`` of every pair and where
    the pair is visible (the scatter mask of the backward)."""
    s = masked_scores(a, b, qi, kj, length, length, kpm, stride_mn, 0, qk_scale, HAS_MASK, 0, False, DOT_PRECISION)
    ok = (qi < length) & (kj < length)
    t = tl.load(SLOTS + center + qi - kj, mask=ok, other=0).to(tl.int64)
    if HAS_C2P:
        s += tl.load(c2p_base + qi * num_slots + t, mask=ok, other=0.0).to(tl.float32) * qk_scale
    if HAS_P2C:
        s += tl.load(p2c_base + kj * num_slots + t, mask=ok, other=0.0).to(tl.float32) * qk_scale
    return s, t, ok & (s != float("-inf"))


@triton.jit
def _product_rows(P, off_b, off_h, start, stride_pb, stride_ph, num_slots):
    """Row 0 of this (sequence, head) in a (.., L, R) positional product or its gradient."""
    return P + off_b * stride_pb + off_h * stride_ph + start * num_slots


# ----------------------------------------------------------------------------- forward
@triton.autotune(configs=configs("fwd", triton_interpreted()), key=_KEY,
                 prune_configs_by=_pruner("fwd", "BLOCK_M", 64, 2))
@triton.jit(do_not_specialize=["seed"])
def _dis_fwd(
    Q, K, V, O, LSE, KPM, CU, C2P, P2C, SLOTS,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh, stride_mb, stride_mn, stride_pb, stride_ph,
    seqlen, max_seqlen, num_heads, num_slots, center, qk_scale, dropout_p, seed, Q_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: BLOCK_M queries of one (sequence, head); K, V and the gathered
    # positional terms are read once per query block.
    start_m, off_b, off_h, start, length, _k_start, _len_k = program(
        CU, CU, seqlen, seqlen, max_seqlen, num_heads, IS_VARLEN, BLOCK_M)
    if start_m * BLOCK_M >= length:
        return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < length
    d_ok = offs_d < HEAD_DIM
    lse_row = off_b * stride_lb + off_h * stride_lh + start + offs_m  # also the dropout row id
    q = load_rows(Q + off_b * stride_qb + off_h * stride_qh, start + offs_m, stride_qm, offs_d, row_ok, d_ok)
    k_base = K + off_b * stride_kb + off_h * stride_kh + start * stride_kn
    v_base = V + off_b * stride_vb + off_h * stride_vh + start * stride_vn
    c2p_base = _product_rows(C2P, off_b, off_h, start, stride_pb, stride_ph, num_slots)
    p2c_base = _product_rows(P2C, off_b, off_h, start, stride_pb, stride_ph, num_slots)
    kpm = KPM + off_b * stride_mb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 domain
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i), before dropout
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = key_range(kpm, stride_mn, start_m, length, length, 0, HAS_MASK, 0, False, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        kj = start_n + offs_n
        k = load_rows(k_base, kj, stride_kn, offs_d, kj < length, d_ok)
        s, _t, _vis = _scores(q, tl.trans(k), offs_m[:, None], kj[None, :], length, kpm, stride_mn, SLOTS, center,
                              c2p_base, p2c_base, num_slots, qk_scale, HAS_MASK, HAS_C2P, HAS_P2C, DOT_PRECISION)
        v = load_rows(v_base, kj, stride_vn, offs_d, kj < length, d_ok)
        m_i, l_i, acc = accumulate(s, v, m_i, l_i, acc, seed, lse_row[:, None], start + kj[None, :], dropout_p,
                                   DROPOUT, DOT_PRECISION)

    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + (start + offs_m)[:, None] * stride_om + offs_d[None, :]
    store_output(o_ptrs, LSE, lse_row, acc, m_i, l_i, row_ok, d_ok, dropout_p, DROPOUT, DOT_PRECISION)


# ---------------------------------------------------------------------------- backward
# Two launches as fastlm.kernels.attention (dQ with delta per query block, then dK/dV per
# key block), each scattering its dS tiles into one of the positional gradients: the dQ
# programs into dC2P (rows = queries), the dK/dV programs into dP2C (rows = keys).
@triton.autotune(configs=configs("dq", triton_interpreted()), key=_KEY, prune_configs_by=_pruner("dq", "BLOCK_M", 32, 2),
                 reset_to_zero=["DC2P"])
@triton.jit(do_not_specialize=["seed"])
def _dis_bwd_dq(
    Q, K, V, O, DO, DQ, LSE, DELTA, KPM, CU, C2P, P2C, SLOTS, DC2P,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh, stride_mb, stride_mn, stride_pb, stride_ph,
    seqlen, max_seqlen, num_heads, num_slots, center, qk_scale, dropout_p, seed, Q_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m, off_b, off_h, start, length, _k_start, _len_k = program(
        CU, CU, seqlen, seqlen, max_seqlen, num_heads, IS_VARLEN, BLOCK_M)
    if start_m * BLOCK_M >= length:
        return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < length
    d_ok = offs_d < HEAD_DIM
    rows = start + offs_m
    lse_row = off_b * stride_lb + off_h * stride_lh + rows
    q = load_rows(Q + off_b * stride_qb + off_h * stride_qh, rows, stride_qm, offs_d, row_ok, d_ok)
    do = load_rows(DO + off_b * stride_db + off_h * stride_dh, rows, stride_dm, offs_d, row_ok, d_ok)
    lse = row_stats(LSE, lse_row, row_ok)
    k_base = K + off_b * stride_kb + off_h * stride_kh + start * stride_kn
    v_base = V + off_b * stride_vb + off_h * stride_vh + start * stride_vn
    c2p_base = _product_rows(C2P, off_b, off_h, start, stride_pb, stride_ph, num_slots)
    p2c_base = _product_rows(P2C, off_b, off_h, start, stride_pb, stride_ph, num_slots)
    dc2p_base = _product_rows(DC2P, off_b, off_h, start, stride_pb, stride_ph, num_slots)
    kpm = KPM + off_b * stride_mb
    lo, hi = key_range(kpm, stride_mn, start_m, length, length, 0, HAS_MASK, 0, False, BLOCK_M, BLOCK_N)

    if DOT_PRECISION == "tf32x3":  # fp32 inputs: rowsum(dO O) is exact enough
        o = load_rows(O + off_b * stride_ob + off_h * stride_oh, rows, stride_om, offs_d, row_ok, d_ok)
        delta = tl.sum(o * do, 1)
    else:  # 16-bit: from the fp32 tiles (see the module docstring)
        delta = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            kj = start_n + offs_n
            k = load_rows(k_base, kj, stride_kn, offs_d, kj < length, d_ok)
            v = load_rows(v_base, kj, stride_vn, offs_d, kj < length, d_ok)
            s, _t, _vis = _scores(q, tl.trans(k), offs_m[:, None], kj[None, :], length, kpm, stride_mn, SLOTS,
                                  center, c2p_base, p2c_base, num_slots, qk_scale, HAS_MASK, HAS_C2P, HAS_P2C,
                                  DOT_PRECISION)
            p, dp, _ = probs_and_dp(s, do, tl.trans(v), lse[:, None], lse_row[:, None], start + kj[None, :],
                                    dropout_p, seed, DROPOUT, DOT_PRECISION)
            delta += tl.sum(p * dp, 1)
    tl.store(DELTA + lse_row, delta, mask=row_ok)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        kj = start_n + offs_n
        k = load_rows(k_base, kj, stride_kn, offs_d, kj < length, d_ok)
        v = load_rows(v_base, kj, stride_vn, offs_d, kj < length, d_ok)
        s, t, vis = _scores(q, tl.trans(k), offs_m[:, None], kj[None, :], length, kpm, stride_mn, SLOTS, center,
                            c2p_base, p2c_base, num_slots, qk_scale, HAS_MASK, HAS_C2P, HAS_P2C, DOT_PRECISION)
        p, dp, _ = probs_and_dp(s, do, tl.trans(v), lse[:, None], lse_row[:, None], start + kj[None, :], dropout_p,
                                seed, DROPOUT, DOT_PRECISION)
        ds = p * (dp - delta[:, None])  # w.r.t. the scaled scores
        dq += mma(lowp(ds, k.dtype, DOT_PRECISION), k, DOT_PRECISION)
        if HAS_C2P:  # dC2P[i, t] += dS_ij (collisions: several keys share a log bucket)
            tl.atomic_add(dc2p_base + offs_m[:, None] * num_slots + t, ds, mask=vis)

    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :], dq,
             mask=row_ok[:, None] & d_ok[None, :])


@triton.autotune(configs=configs("dkdv", triton_interpreted()), key=_KEY,
                 prune_configs_by=_pruner("dkdv", "BLOCK_N", 32, 2), reset_to_zero=["DP2C"])
@triton.jit(do_not_specialize=["seed"])
def _dis_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, KPM, CU, C2P, P2C, SLOTS, DP2C,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dm,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh, stride_mb, stride_mn, stride_pb, stride_ph,
    seqlen, max_seqlen, num_heads, num_slots, center, qk_scale, dropout_p, seed, Q_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Tiles are computed transposed (keys x queries).
    start_n, off_b, off_h, start, length, _k_start, _len_k = program(
        CU, CU, seqlen, seqlen, max_seqlen, num_heads, IS_VARLEN, BLOCK_N)
    if start_n * BLOCK_N >= length:
        return
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < length
    d_ok = offs_d < HEAD_DIM
    rows_k = start + offs_n
    k = load_rows(K + off_b * stride_kb + off_h * stride_kh, rows_k, stride_kn, offs_d, key_ok, d_ok)
    v = load_rows(V + off_b * stride_vb + off_h * stride_vh, rows_k, stride_vn, offs_d, key_ok, d_ok)
    kpm = KPM + off_b * stride_mb
    c2p_base = _product_rows(C2P, off_b, off_h, start, stride_pb, stride_ph, num_slots)
    p2c_base = _product_rows(P2C, off_b, off_h, start, stride_pb, stride_ph, num_slots)
    dp2c_base = _product_rows(DP2C, off_b, off_h, start, stride_pb, stride_ph, num_slots)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_end = length
    if HAS_MASK:  # a key block that is all padding: zero gradients, skip the loop
        pad = tl.load(kpm + offs_n * stride_mn, mask=key_ok, other=0)
        q_end = tl.where(tl.max(pad.to(tl.int32), 0) > 0, q_end, 0)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_db + off_h * stride_dh
    for start_m in range(0, q_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < length
        q = load_rows(q_base, start + offs_m, stride_qm, offs_d, row_ok, d_ok)
        do = load_rows(do_base, start + offs_m, stride_dm, offs_d, row_ok, d_ok)
        lse_row = off_b * stride_lb + off_h * stride_lh + start + offs_m
        lse = row_stats(LSE, lse_row, row_ok)
        delta = tl.load(DELTA + lse_row, mask=row_ok, other=0.0)
        st, t, vis = _scores(k, tl.trans(q), offs_m[None, :], offs_n[:, None], length, kpm, stride_mn, SLOTS, center,
                             c2p_base, p2c_base, num_slots, qk_scale, HAS_MASK, HAS_C2P, HAS_P2C, DOT_PRECISION)
        pt, dpt, pzt = probs_and_dp(st, v, tl.trans(do), lse[None, :], lse_row[None, :], start + offs_n[:, None],
                                    dropout_p, seed, DROPOUT, DOT_PRECISION)
        dv += mma(lowp(pzt, do.dtype, DOT_PRECISION), do, DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])  # dS^T w.r.t. the scaled scores
        dk += mma(lowp(dst, q.dtype, DOT_PRECISION), q, DOT_PRECISION)
        if HAS_P2C:  # dP2C[j, t] += dS_ij (collisions: several queries share a log bucket)
            tl.atomic_add(dp2c_base + offs_n[:, None] * num_slots + t, dst, mask=vis)

    kv_mask = key_ok[:, None] & d_ok[None, :]
    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + rows_k[:, None] * stride_dkn + offs_d[None, :], dk,
             mask=kv_mask)
    tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + rows_k[:, None] * stride_dvn + offs_d[None, :],
             lowp(dv, DV.dtype.element_ty, DOT_PRECISION), mask=kv_mask)


# ----------------------------------------------------------------------- host wrappers
class _Call:
    """One call's layout (attention's :class:`~fastlm.kernels.attention._Layout` with no causal
    mask nor window) plus the positional tables and the strides of the (.., L, R) products."""

    def __init__(self, q, pos_key, pos_query, rel_slots, key_padding_mask, cu_seqlens, max_seqlen, dropout_p,
                 scale, seed):
        self.lay = lay = _Layout(q, q, key_padding_mask, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0, 0,
                                 dropout_p, scale, seed)
        self.tables = (pos_key, pos_query)
        table = pos_key if pos_key is not None else pos_query
        self.num_slots = table.shape[1] if table is not None else 1
        # without positional terms the slots are never used: zeros keep every read in bounds
        self.slots = rel_slots if rel_slots.numel() else q.new_zeros(2 * lay.max_q - 1, dtype=torch.int32)
        self.center = lay.max_q - 1
        rows = q.shape[0] if lay.packed else q.shape[2]
        # products: packed (H, T, R), padded (B, H, L, R), both contiguous
        self.product_strides = (0, rows * self.num_slots) if lay.packed else (
            lay.heads * rows * self.num_slots, rows * self.num_slots)
        self.product_shape = (lay.heads, rows, self.num_slots) if lay.packed else (
            lay.batch, lay.heads, rows, self.num_slots)
        self.meta = dict(HEAD_DIM=lay.head_dim, BLOCK_D=lay.meta["BLOCK_D"], HAS_MASK=lay.meta["HAS_MASK"],
                         DROPOUT=lay.meta["DROPOUT"], IS_VARLEN=lay.packed, HAS_C2P=pos_key is not None,
                         HAS_P2C=pos_query is not None, DOT_PRECISION=lay.meta["DOT_PRECISION"])

    def rows(self, t):
        """(.., L, D) view of a (B, H, L, D) or packed (T, H, D) operand: (B, H, L, D) or (H, T, D)."""
        return t.transpose(0, 1) if self.lay.packed else t

    def products(self, q, k):
        """C2P = Q pos_key^T and P2C = K pos_query^T, contiguous (.., L, R) in the input dtype
        (a 1-element placeholder for an absent table: never read)."""
        return [torch.matmul(self.rows(x), t.transpose(-1, -2)).contiguous() if t is not None else
                x.new_zeros(1) for x, t in zip((q, k), self.tables)]

    def scalars(self):
        lay = self.lay
        return (lay.seqlen_q, lay.max_q, lay.heads, self.num_slots, self.center, lay.scale * LOG2E, lay.dropout_p,
                lay.seed, _bucket(lay.max_q))

    def grid(self, block_key: str):
        return self.lay.grid(self.lay.max_q, self.lay.heads, block_key)


def disentangled_attention_forward(q, k, v, pos_key, pos_query, rel_slots, key_padding_mask, cu_seqlens, max_seqlen,
                                   dropout_p, scale, seed):
    """Forward; returns ``(out, lse)`` as :func:`fastlm.kernels.attention.attention_forward`."""
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    call = _Call(q, pos_key, pos_query, rel_slots, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale,
                 seed)
    lay = call.lay
    out = torch.empty_like(q)
    lse = torch.empty(lay.lse_shape, dtype=torch.float32, device=q.device)
    c2p, p2c = call.products(q, k)
    _dis_fwd[call.grid("BLOCK_M")](
        q, k, v, out, lse, lay.kpm, lay.cu_q, c2p, p2c, call.slots,
        *_bhm(q, lay.packed), *_bhm(k, lay.packed), *_bhm(v, lay.packed), *_bhm(out, lay.packed),
        *lay.lse_strides, *lay.kpm_strides, *call.product_strides, *call.scalars(), **call.meta,
    )
    return out, lse


def disentangled_attention_backward(dout, q, k, v, pos_key, pos_query, rel_slots, out, lse, key_padding_mask,
                                    cu_seqlens, max_seqlen, dropout_p, scale, seed):
    """Gradients ``(dq, dk, dv, dpos_key, dpos_query)``; dropout is regenerated from ``seed``."""
    dout, q, k, v, out = (last_dim_contiguous(t) for t in (dout, q, k, v, out))
    call = _Call(q, pos_key, pos_query, rel_slots, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale,
                 seed)
    lay = call.lay
    lse = lse.contiguous()
    delta = torch.empty_like(lse)  # written by the dQ kernel, read by the dK/dV kernel
    c2p, p2c = call.products(q, k)
    dc2p, dp2c = (torch.zeros(call.product_shape, dtype=torch.float32, device=q.device) if t is not None else
                  q.new_zeros(1, dtype=torch.float32) for t in call.tables)
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.empty_like(v)
    shared = (*lay.lse_strides, *lay.kpm_strides, *call.product_strides, *call.scalars())
    _dis_bwd_dq[call.grid("BLOCK_M")](
        q, k, v, out, dout, dq, lse, delta, lay.kpm, lay.cu_q, c2p, p2c, call.slots, dc2p,
        *_bhm(q, lay.packed), *_bhm(k, lay.packed), *_bhm(v, lay.packed), *_bhm(out, lay.packed),
        *_bhm(dout, lay.packed), *_bhm(dq, lay.packed), *shared, **call.meta,
    )
    _dis_bwd_dkdv[call.grid("BLOCK_N")](
        q, k, v, dout, dk, dv, lse, delta, lay.kpm, lay.cu_q, c2p, p2c, call.slots, dp2c,
        *_bhm(q, lay.packed), *_bhm(k, lay.packed), *_bhm(v, lay.packed), *_bhm(dout, lay.packed),
        *_bhm(dk, lay.packed), *_bhm(dv, lay.packed), *shared, **call.meta,
    )
    # fold the slot gradients back: d(scores) = scale dS, so dQ = scale (dS K + dC2P pos_key),
    # dK = scale (dS^T Q + dP2C pos_query), dpos_key = scale dC2P^T Q, dpos_query = scale dP2C^T K
    dtables = []
    for grad, rows, dslots, table in ((dq, q, dc2p, pos_key), (dk, k, dp2c, pos_query)):
        if table is None:
            dtables.append(q.new_empty((0,)))
            continue
        call.rows(grad).add_(torch.matmul(dslots, table.float()))
        per_item = torch.matmul(dslots.transpose(-1, -2), call.rows(rows).float())  # (B, H, R, D) or (H, R, D)
        dtables.append(torch.empty_like(table).copy_((per_item if lay.packed else per_item.sum(0)).mul_(lay.scale)))
    return _scaled_like(q, dq, lay.scale), _scaled_like(k, dk, lay.scale), dv, dtables[0], dtables[1]


def _scaled_like(like, grad32, scale):
    """``scale * grad32`` rounded once into a tensor shaped and strided like ``like``."""
    return torch.empty_like(like).copy_(grad32.mul_(scale))
