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

Dropout: the keep bits of :mod:`fastlm.kernels.attention` (Philox keyed by the seed, counters
(key index, lse row)), regenerated in the backward.  A query row that sees no key: out 0,
lse -inf, zero gradients.

Status: tested under ``TRITON_INTERPRET=1`` only; never run on a GPU ("unverified").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.kernels.attention import (_FWD, _LN2, LOG2E, _attn_bwd_delta, _bhm, _bucket, _configs, _delta_block_m,
                                      _dropout_keep, _key_range, _Layout, _load_row_stats, _mma, _pruner,
                                      _query_block, _seq_bounds, _visible)
from fastlm.ops._common import last_dim_contiguous

_KEY = ["Q_BUCKET", "BLOCK_D", "HAS_MASK", "DROPOUT", "IS_VARLEN", "HAS_C2P", "HAS_P2C"]
_BWD = _configs([(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)], (16, 16))


# ---------------------------------------------------------------------- positional terms
@triton.jit
def _positional(s, qi, kj, len_q, SLOTS, center, c2p_base, p2c_base, num_slots,
                HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr):
    """``s + C2P[i, t] + P2C[j, t]`` on a tile (``qi``/``kj`` broadcast to it), t = slot(i - j)."""
    ok = (qi < len_q) & (kj < len_q)
    t = tl.load(SLOTS + center + qi - kj, mask=ok, other=0).to(tl.int64)
    if HAS_C2P:
        s += tl.load(c2p_base + qi * num_slots + t, mask=ok, other=0.0).to(tl.float32)
    if HAS_P2C:
        s += tl.load(p2c_base + kj * num_slots + t, mask=ok, other=0.0).to(tl.float32)
    return s, t, ok


@triton.jit
def _product_rows(P, off_b, off_h, start, stride_pb, stride_ph, num_slots):
    """Row 0 of this (sequence, head) in a (.., L, R) positional product or its gradient."""
    return P + off_b * stride_pb + off_h * stride_ph + start * num_slots


# ----------------------------------------------------------------------------- forward
@triton.autotune(configs=_FWD, key=_KEY, prune_configs_by=_pruner("BLOCK_M", 64))
@triton.jit(do_not_specialize=["seed"])
def _dis_fwd(
    Q, K, V, O, LSE, KPM, CU, C2P, P2C, SLOTS,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh, stride_mb, stride_mn, stride_pb, stride_ph,
    seqlen, num_heads, num_slots, center, qk_scale, dropout_p, seed, Q_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: BLOCK_M queries of one (sequence, head); K, V and the gathered
    # positional terms are read once per query block.
    start_m, off_b, off_h, _hk, start, length, _k0, _lk, offs_m, offs_d, row_ok, d_ok, lse_row = \
        _query_block(CU, CU, seqlen, seqlen, num_heads, 1, stride_lb, stride_lh, HEAD_DIM, BLOCK_D, IS_VARLEN,
                     BLOCK_M)
    if start_m * BLOCK_M >= length:
        return
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + (start + offs_m)[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + off_b * stride_kb + off_h * stride_kh + start * stride_kn
    v_base = V + off_b * stride_vb + off_h * stride_vh + start * stride_vn
    c2p_base = _product_rows(C2P, off_b, off_h, start, stride_pb, stride_ph, num_slots)
    p2c_base = _product_rows(P2C, off_b, off_h, start, stride_pb, stride_ph, num_slots)
    kpm = KPM + off_b * stride_mb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 domain
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(kpm, stride_mn, start_m, length, length, 0, HAS_MASK, 0, False, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        kj = start_n + offs_n
        kv_ok = kj < length
        kt = tl.load(k_base + kj[None, :] * stride_kn + offs_d[:, None], mask=kv_ok[None, :] & d_ok[:, None],
                     other=0.0)
        s, _slot, _pair_ok = _positional(_mma(q, kt, DOT_PRECISION), offs_m[:, None], kj[None, :], length, SLOTS,
                                         center, c2p_base, p2c_base, num_slots, HAS_C2P, HAS_P2C)
        s = s * qk_scale
        vis = _visible(offs_m[:, None], kj[None, :], length, length, kpm, stride_mn, 0, HAS_MASK, 0, False)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: exp2 of -inf, not NaN
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, lse_row[:, None], start + kj[None, :], dropout_p), p, 0.0)
        v = tl.load(v_base + kj[:, None] * stride_vn + offs_d[None, :], mask=kv_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out_scale = 1.0 / l_safe
    if DROPOUT:
        out_scale = out_scale / (1.0 - dropout_p)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + (start + offs_m)[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, (acc * out_scale[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + lse_row, tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2), mask=row_ok)


# ---------------------------------------------------------------------------- backward
# Three launches as fastlm.kernels.attention (delta; dK/dV per key block; dQ per query
# block), each scattering its dS tiles into one of the positional gradients: the dK/dV
# programs into dP2C (rows = keys), the dQ programs into dC2P (rows = queries).  dQ and dK
# are written in fp32 so the launcher adds the positional parts before the one rounding.
@triton.autotune(configs=_BWD, key=_KEY, prune_configs_by=_pruner("BLOCK_N", 32), reset_to_zero=["DP2C"])
@triton.jit(do_not_specialize=["seed"])
def _dis_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, KPM, CU, C2P, P2C, SLOTS, DP2C,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dm,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh, stride_mb, stride_mn, stride_pb, stride_ph,
    seqlen, num_heads, num_slots, center, qk_scale, dropout_p, seed, Q_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Tiles are computed transposed (keys x queries).
    start_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // num_heads).to(tl.int64)
    off_h = (off_bh % num_heads).to(tl.int64)
    start, length = _seq_bounds(CU, off_b, seqlen, IS_VARLEN)
    if start_n * BLOCK_N >= length:
        return
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (offs_n < length)[:, None] & d_ok[None, :]
    rows_k = (start + offs_n)[:, None]
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + rows_k * stride_kn + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + rows_k * stride_vn + offs_d[None, :], mask=kv_mask,
                other=0.0)
    kpm = KPM + off_b * stride_mb
    c2p_base = _product_rows(C2P, off_b, off_h, start, stride_pb, stride_ph, num_slots)
    p2c_base = _product_rows(P2C, off_b, off_h, start, stride_pb, stride_ph, num_slots)
    dp2c_base = _product_rows(DP2C, off_b, off_h, start, stride_pb, stride_ph, num_slots)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_end = length
    if HAS_MASK:  # a key block that is all padding: zero gradients, skip the loop
        pad = tl.load(kpm + offs_n * stride_mn, mask=offs_n < length, other=0)
        q_end = tl.where(tl.max(pad.to(tl.int32), 0) > 0, q_end, 0)
    q_base = Q + off_b * stride_qb + off_h * stride_qh + start * stride_qm
    do_base = DO + off_b * stride_db + off_h * stride_dh + start * stride_dm
    for start_m in range(0, q_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < length
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dm + offs_d[None, :], mask=q_mask, other=0.0)
        lse_row = off_b * stride_lb + off_h * stride_lh + start + offs_m
        lse, delta = _load_row_stats(LSE, DELTA, lse_row, row_ok)
        st, t, ok = _positional(_mma(k, tl.trans(q), DOT_PRECISION), offs_m[None, :], offs_n[:, None], length, SLOTS,
                                center, c2p_base, p2c_base, num_slots, HAS_C2P, HAS_P2C)
        st = st * qk_scale
        vis = _visible(offs_m[None, :], offs_n[:, None], length, length, kpm, stride_mn, 0, HAS_MASK, 0, False)
        pt = tl.exp2(tl.where(vis, st, float("-inf")) - lse[None, :])  # P^T, normalised by the forward's lse
        dpt = _mma(v, tl.trans(do), DOT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, lse_row[None, :], start + offs_n[:, None], dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            dv += _mma(tl.where(keep, pt * inv_keep, 0.0).to(do.dtype), do, DOT_PRECISION)
            dpt = tl.where(keep, dpt * inv_keep, 0.0)
        else:
            dv += _mma(pt.to(do.dtype), do, DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])  # dS^T w.r.t. the scaled scores
        dk += _mma(dst.to(q.dtype), q, DOT_PRECISION)
        if HAS_P2C:  # dP2C[j, t] += dS_ij (collisions: several queries share a bucket)
            tl.atomic_add(dp2c_base + offs_n[:, None] * num_slots + t, dst, mask=ok & vis)

    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + rows_k * stride_dkn + offs_d[None, :], dk, mask=kv_mask)
    tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + rows_k * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_BWD, key=_KEY, prune_configs_by=_pruner("BLOCK_M", 32), reset_to_zero=["DC2P"])
@triton.jit(do_not_specialize=["seed"])
def _dis_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, KPM, CU, C2P, P2C, SLOTS, DC2P,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dm,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh, stride_mb, stride_mn, stride_pb, stride_ph,
    seqlen, num_heads, num_slots, center, qk_scale, dropout_p, seed, Q_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m, off_b, off_h, _hk, start, length, _k0, _lk, offs_m, offs_d, row_ok, d_ok, lse_row = \
        _query_block(CU, CU, seqlen, seqlen, num_heads, 1, stride_lb, stride_lh, HEAD_DIM, BLOCK_D, IS_VARLEN,
                     BLOCK_M)
    if start_m * BLOCK_M >= length:
        return
    offs_n = tl.arange(0, BLOCK_N)
    q_mask = row_ok[:, None] & d_ok[None, :]
    rows = (start + offs_m)[:, None]
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + off_b * stride_db + off_h * stride_dh + rows * stride_dm + offs_d[None, :], mask=q_mask,
                 other=0.0)
    lse, delta = _load_row_stats(LSE, DELTA, lse_row, row_ok)
    k_base = K + off_b * stride_kb + off_h * stride_kh + start * stride_kn
    v_base = V + off_b * stride_vb + off_h * stride_vh + start * stride_vn
    kpm = KPM + off_b * stride_mb
    c2p_base = _product_rows(C2P, off_b, off_h, start, stride_pb, stride_ph, num_slots)
    p2c_base = _product_rows(P2C, off_b, off_h, start, stride_pb, stride_ph, num_slots)
    dc2p_base = _product_rows(DC2P, off_b, off_h, start, stride_pb, stride_ph, num_slots)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(kpm, stride_mn, start_m, length, length, 0, HAS_MASK, 0, False, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        kj = start_n + offs_n
        kv_mask = (kj < length)[:, None] & d_ok[None, :]
        k = tl.load(k_base + kj[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + kj[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s, t, ok = _positional(_mma(q, tl.trans(k), DOT_PRECISION), offs_m[:, None], kj[None, :], length, SLOTS,
                               center, c2p_base, p2c_base, num_slots, HAS_C2P, HAS_P2C)
        s = s * qk_scale
        vis = _visible(offs_m[:, None], kj[None, :], length, length, kpm, stride_mn, 0, HAS_MASK, 0, False)
        p = tl.exp2(tl.where(vis, s, float("-inf")) - lse[:, None])
        dp = _mma(do, tl.trans(v), DOT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, lse_row[:, None], start + kj[None, :], dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq += _mma(ds.to(k.dtype), k, DOT_PRECISION)
        if HAS_C2P:  # dC2P[i, t] += dS_ij (collisions: several keys share a bucket)
            tl.atomic_add(dc2p_base + offs_m[:, None] * num_slots + t, ds, mask=ok & vis)

    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + rows * stride_dqm + offs_d[None, :], dq, mask=q_mask)


# ----------------------------------------------------------------------- host wrappers
class _Call:
    """One call's layout (attention's :class:`~fastlm.kernels.attention._Layout` with no causal
    mask nor window) plus the positional tables and the strides of the (.., L, R) products."""

    def __init__(self, q, pos_key, pos_query, rel_slots, key_padding_mask, cu_seqlens, max_seqlen, dropout_p,
                 scale, seed):
        self.lay = _Layout(q, q, key_padding_mask, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0, 0,
                           dropout_p, scale, seed)
        self.tables = (pos_key, pos_query)
        table = pos_key if pos_key is not None else pos_query
        self.num_slots = table.shape[1] if table is not None else 1
        lay = self.lay
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
        return (lay.seqlen_q, lay.heads, self.num_slots, self.center, lay.scale * LOG2E, lay.dropout_p, lay.seed,
                _bucket(lay.max_q))

    def grid(self, block_key: str):
        return lambda meta: (triton.cdiv(self.lay.max_q, meta[block_key]), self.lay.batch * self.lay.heads)


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
    delta = torch.empty_like(lse)
    delta_rows = _delta_block_m(lay.meta["BLOCK_D"])
    _attn_bwd_delta[(triton.cdiv(lay.max_q, delta_rows), lay.batch * lay.heads)](
        out, dout, delta, lay.cu_q, *_bhm(out, lay.packed), *_bhm(dout, lay.packed), *lay.lse_strides,
        lay.seqlen_q, lay.heads,
        HEAD_DIM=lay.head_dim, BLOCK_D=lay.meta["BLOCK_D"], IS_VARLEN=lay.packed, BLOCK_M=delta_rows,
    )
    c2p, p2c = call.products(q, k)
    dc2p, dp2c = (torch.zeros(call.product_shape, dtype=torch.float32, device=q.device) if t is not None else
                  q.new_zeros(1, dtype=torch.float32) for t in call.tables)
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.empty_like(v)
    shared = (*lay.lse_strides, *lay.kpm_strides, *call.product_strides, *call.scalars())
    _dis_bwd_dkdv[call.grid("BLOCK_N")](
        q, k, v, dout, dk, dv, lse, delta, lay.kpm, lay.cu_q, c2p, p2c, call.slots, dp2c,
        *_bhm(q, lay.packed), *_bhm(k, lay.packed), *_bhm(v, lay.packed), *_bhm(dout, lay.packed),
        *_bhm(dk, lay.packed), *_bhm(dv, lay.packed), *shared, **call.meta,
    )
    _dis_bwd_dq[call.grid("BLOCK_M")](
        q, k, v, dout, dq, lse, delta, lay.kpm, lay.cu_q, c2p, p2c, call.slots, dc2p,
        *_bhm(q, lay.packed), *_bhm(k, lay.packed), *_bhm(v, lay.packed), *_bhm(dout, lay.packed),
        *_bhm(dq, lay.packed), *shared, **call.meta,
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
