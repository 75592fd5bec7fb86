"""Triton flash attention (the ``triton`` backend of ``fastlm.ops.attention`` and
``fastlm.ops.varlen_attention``): exact attention with an online softmax, never an
``Lq x Lk`` matrix in memory.

Two layouts share every kernel (``IS_VARLEN``):

* padded: ``q`` ``(B, Hq, Sq, D)``, ``k``/``v`` ``(B, Hk, Sk, D)``, any strides with a
  unit last-dim stride (Hugging Face passes transposed views of ``(B, S, H, D)``; expanded
  keys with a sequence stride of 0 are read as they are); ``key_padding_mask`` ``(B, Sk)``
  bool, True = attend, any pattern (left or right padding); ``lse`` is ``(B, Hq, Sq)``.
* packed: ``q`` ``(Tq, Hq, D)``, ``k``/``v`` ``(Tk, Hk, D)``, sequence ``n`` owns tokens
  ``cu_seqlens[n]:cu_seqlens[n+1]``; ``max_seqlen_*`` only size the grid (programs past a
  sequence's end exit at once), so nothing is read back to the host; ``lse`` is ``(Hq, Tq)``.

Masking, per sequence of ``Lq`` queries and ``Lk`` keys: ``causal`` 0 = none,
1 = top-left (query ``i`` sees keys ``j <= i``, as SDPA's ``is_causal``), 2 = bottom-right
(``j <= i + Lk - Lq``, what a KV cache needs); ``window`` ``w > 0`` = sliding window: with
query ``i`` at position ``p = i`` (``i + Lk - Lq`` for bottom-right), key ``j`` is visible iff
``|p - j| < w`` (non-causal) or ``p - w < j <= p`` (causal), and key blocks wholly outside
every row's window are never loaded; all ANDed with the key padding mask.  A query row
that sees no key gets ``out = 0``, ``lse = -inf`` and zero gradients.

Grouped-query attention: query head ``h`` reads kv head ``h // (Hq // Hk)``.

Dropout acts on the normalised probabilities (kept ones scaled by ``1 / (1 - p)``).  Its
bits come from Philox-4x32 keyed by the 64-bit seed, with counters (key index in the
layout, row index of lse): a pure function of (batch or sequence, head, query, key),
so the backward kernels regenerate the forward's mask exactly, whatever their block
sizes.

Grids are one-dimensional: (blocks of one sequence) x sequences x heads on axis 0, which
takes 2^31 - 1 programs (axes 1 and 2 stop at 65,535, which batch x heads passes easily).

Numerics: scores, the running max/sum and the accumulator are fp32; ``log2(e)`` is
folded into the scale so the softmax runs on ``exp2``; P is rounded to the input dtype
before the P @ V product (as every flash kernel does).  fp32 dot products are split
into three TF32 tensor-core products ("tf32x3"): close to fp32 accuracy, never plain
TF32.  (The interpreter computes them in plain fp32 numpy.)

Status: tested under ``TRITON_INTERPRET=1`` (tests/test_attention_triton.py) and compiled
ahead of time for sm_90 (tests/test_triton_compile.py); never run on a GPU ("compiled,
unverified").
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastlm.ops._common import last_dim_contiguous
from fastlm.registry import triton_interpreted

from ._common import pruner
from ._flash import (LOG2E, accumulate, key_range, load_rows, lowp, masked_scores, mma, probs_and_dp, program,
                     row_stats, shift, store_output)


# ------------------------------------------------------------------------- autotuning
# A few deliberate configs per kernel.  The autotune key is (head-dim block, masking
# features, a power-of-two bucket of the longest query / key sequence) plus the tensor
# dtypes, which triton adds itself: a new sequence length re-uses its bucket's choice.
# The interpreter runs one fixed, small config (benchmarking configs there would take
# minutes and mean nothing).  Each list ends with 16 x 16 tiles, the only ones fp32 with
# head dim 256 fits in an A100's shared memory.  (BLOCK_M, BLOCK_N, num_warps, num_stages):
GPU_CONFIGS = {
    "fwd": [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 64, 8, 3), (64, 32, 4, 2),
            (32, 32, 4, 2), (16, 16, 2, 1)],
    "dkdv": [(64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2),
             (32, 32, 4, 2), (32, 32, 8, 2), (16, 16, 2, 1)],
    "dq": [(64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2),
           (32, 32, 8, 2), (16, 16, 2, 1)],
}
_INTERPRETED = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}


def configs(kernel: str, interpreted: bool) -> list[triton.Config]:
    if interpreted:
        bm, bn = _INTERPRETED[kernel]
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in GPU_CONFIGS[kernel]]


def _operand_bytes(meta: dict, element_size: int) -> int:
    """Shared-memory bytes of one operand row (BLOCK_D elements): fp32 operands count
    twice, as tf32x3 keeps split copies of them."""
    return meta["BLOCK_D"] * (2 * element_size if element_size == 4 else element_size)


def shared_bytes(kernel: str, config: triton.Config, meta: dict, element_size: int) -> int:
    """Upper bound of one program's shared memory: the tiles its loop streams, one copy per
    pipeline stage (K and V in the forward and dQ kernels, Q and dO in the dK/dV kernel),
    the tiles it keeps resident, and the score-sized tiles that change layout on their way
    into a second product (P, dS), plus 4 KiB for the small layout conversions (row
    statistics, transposes) that tiny tiles make visible.  tests/test_triton_compile.py
    checks it against the compiler's own figure for every config."""
    bm, bn, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    row = _operand_bytes(meta, element_size)
    score = bm * bn * max(element_size, 2)
    streamed, resident = {"fwd": (2 * bn, bm), "dq": (2 * bn, 2 * bm), "dkdv": (2 * bm, 2 * bn)}[kernel]
    return row * (stages * streamed + resident) + (2 if kernel == "dkdv" else 1) * score + 4096


def _pruner(kernel: str, acc_rows: str, max_acc_regs: int, fp32_tiles: int = 0) -> dict:
    """Config pruning for one kernel (see kernels/_common.py): configs must fit the device's
    shared memory (:func:`shared_bytes`, plus ``fp32_tiles`` fp32 BLOCK_M x BLOCK_N tiles that
    a kernel built on these adds: the disentangled kernels' gathered and scattered tiles change
    layout through shared memory); preferred are those with at most ``max_acc_regs`` fp32
    registers per thread for each ``acc_rows x BLOCK_D`` accumulator.  The register limits come from
    ptxas register / spill reports of sm_90 builds (64 for the forward, whose only other
    resident tile is Q; 32 for the backward kernels, which keep two more input tiles
    resident; halved with dropout, whose Philox rounds need registers of their own)."""
    def size(config, named_args, meta):
        tiles = fp32_tiles * config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] * 4
        return shared_bytes(kernel, config, meta, named_args["Q"].element_size()) + tiles

    def within_registers(config, named_args, meta):
        limit = max_acc_regs // 2 if meta["DROPOUT"] else max_acc_regs
        return config.kwargs[acc_rows] * meta["BLOCK_D"] / (32 * config.num_warps) <= limit

    return pruner(size, within_registers)


_KEY = ["Q_BUCKET", "K_BUCKET", "BLOCK_D", "CAUSAL", "HAS_WINDOW", "HAS_MASK", "DROPOUT", "IS_VARLEN"]


def _bucket(n: int) -> int:
    """Autotune-key bucket of a sequence length: powers of two from 64 to 16384."""
    return min(max(triton.next_power_of_2(max(int(n), 1)), 64), 16384)


# ----------------------------------------------------------------------------- forward
@triton.autotune(configs=configs("fwd", triton_interpreted()), key=_KEY, prune_configs_by=_pruner("fwd", "BLOCK_M", 64))
@triton.jit(do_not_specialize=["seed"])
def _attn_fwd(
    Q, K, V, O, LSE, KPM, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh, stride_mb, stride_mn,
    seqlen_q, seqlen_k, max_seqlen_q, num_heads, group, window,
    qk_scale, dropout_p, seed, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: BLOCK_M queries of one (sequence, head).  Q is read once, K and V once
    # per query block; O and the log-sum-exp are written once.
    start_m, off_b, off_h, q_start, len_q, k_start, len_k = program(
        CU_Q, CU_K, seqlen_q, seqlen_k, max_seqlen_q, num_heads, IS_VARLEN, BLOCK_M)
    if start_m * BLOCK_M >= len_q:
        return
    off_hk = off_h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < len_q
    d_ok = offs_d < HEAD_DIM  # head dims that are not powers of two: masked lanes read 0
    lse_row = off_b * stride_lb + off_h * stride_lh + q_start + offs_m  # also the dropout row id

    q = load_rows(Q + off_b * stride_qb + off_h * stride_qh, q_start + offs_m, stride_qm, offs_d, row_ok, d_ok)
    k_base = K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn
    v_base = V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn
    kpm = KPM + off_b * stride_mb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 domain
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i), before dropout
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = key_range(kpm, stride_mn, start_m, len_q, len_k, window, HAS_MASK, CAUSAL, HAS_WINDOW,
                        BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        kj = start_n + offs_n
        k = load_rows(k_base, kj, stride_kn, offs_d, kj < len_k, d_ok)
        s = masked_scores(q, tl.trans(k), offs_m[:, None], kj[None, :], len_q, len_k, kpm, stride_mn, window,
                           qk_scale, HAS_MASK, CAUSAL, HAS_WINDOW, DOT_PRECISION)
        v = load_rows(v_base, kj, stride_vn, offs_d, kj < len_k, d_ok)
        m_i, l_i, acc = accumulate(s, v, m_i, l_i, acc, seed, lse_row[:, None], k_start + kj[None, :], dropout_p,
                                   DROPOUT, DOT_PRECISION)

    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + (q_start + offs_m)[:, None] * stride_om + offs_d[None, :]
    store_output(o_ptrs, LSE, lse_row, acc, m_i, l_i, row_ok, d_ok, dropout_p, DROPOUT, DOT_PRECISION)


# ---------------------------------------------------------------------------- backward
# Backward = two launches:
#   1. one program per (query block, sequence, query head): delta_i = sum_j P_ij dP_ij
#      (see below), stored laid out like lse, then dQ accumulated over the block's keys;
#   2. one program per (key block, sequence, kv head) accumulates dK and dV in registers
#      over every query block of every query head in its GQA group: no atomics, dK/dV
#      written once, and the group sum happens in fp32.
# Splitting dQ off costs two extra matmuls per tile (S and dP are recomputed) compared
# with fp32 atomic adds into a dQ buffer, but it is deterministic, needs no fp32 dQ
# scratch (Tq*Hq*D*4 bytes) nor a cast pass, and lets autotuning re-run kernels safely.
#
# delta = rowsum(dO * O) is exact enough from an fp32 O.  From a 16-bit O it is not: O's
# rounding (2^-11 relative in fp16) enters every dS_ij = P_ij (dP_ij - delta_i) and, when a
# query sees one or two keys or its softmax is peaked (dP_ij close to delta_i), dominates
# dQ/dK (up to hundreds of times plain PyTorch's own error, per problem).  So for 16-bit
# inputs the dQ program first sweeps its keys once computing delta = sum_j P_ij dP_ij
# from the fp32 P and dP tiles (two more matmuls per tile, +2/7 of the backward's) rather
# than having the forward save an fp32 O: that would add 4 bytes per output element to
# what every layer holds for its backward (and to the forward's and backward's HBM
# traffic), for a kernel that is compute-bound anyway.  Its P is the unrounded fp32 one;
# the forward's accumulator is no better, since P is rounded to 16 bits before P @ V.
@triton.autotune(configs=configs("dq", triton_interpreted()), key=_KEY, prune_configs_by=_pruner("dq", "BLOCK_M", 32))
@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dq(
    Q, K, V, O, DO, DQ, LSE, DELTA, KPM, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh, stride_mb, stride_mn,
    seqlen_q, seqlen_k, max_seqlen_q, num_heads, group, window,
    qk_scale, sm_scale, dropout_p, seed, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m, off_b, off_h, q_start, len_q, k_start, len_k = program(
        CU_Q, CU_K, seqlen_q, seqlen_k, max_seqlen_q, num_heads, IS_VARLEN, BLOCK_M)
    if start_m * BLOCK_M >= len_q:
        return
    off_hk = off_h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < len_q
    d_ok = offs_d < HEAD_DIM
    rows = q_start + offs_m
    lse_row = off_b * stride_lb + off_h * stride_lh + rows
    q = load_rows(Q + off_b * stride_qb + off_h * stride_qh, rows, stride_qm, offs_d, row_ok, d_ok)
    do = load_rows(DO + off_b * stride_db + off_h * stride_dh, rows, stride_dm, offs_d, row_ok, d_ok)
    lse = row_stats(LSE, lse_row, row_ok)
    k_base = K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn
    v_base = V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn
    kpm = KPM + off_b * stride_mb
    lo, hi = key_range(kpm, stride_mn, start_m, len_q, len_k, window, HAS_MASK, CAUSAL, HAS_WINDOW,
                        BLOCK_M, BLOCK_N)

    if DOT_PRECISION == "tf32x3":  # fp32 inputs: O is exact enough (see above)
        o = load_rows(O + off_b * stride_ob + off_h * stride_oh, rows, stride_om, offs_d, row_ok, d_ok)
        delta = tl.sum(o * do, 1)
    else:
        delta = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            kj = start_n + offs_n
            k = load_rows(k_base, kj, stride_kn, offs_d, kj < len_k, d_ok)
            v = load_rows(v_base, kj, stride_vn, offs_d, kj < len_k, d_ok)
            p, dp, _ = probs_and_dp(
                masked_scores(q, tl.trans(k), offs_m[:, None], kj[None, :], len_q, len_k, kpm, stride_mn, window,
                              qk_scale, HAS_MASK, CAUSAL, HAS_WINDOW, DOT_PRECISION),
                do, tl.trans(v), lse[:, None], lse_row[:, None], k_start + kj[None, :], dropout_p, seed, DROPOUT,
                DOT_PRECISION)
            delta += tl.sum(p * dp, 1)
    tl.store(DELTA + lse_row, delta, mask=row_ok)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        kj = start_n + offs_n
        k = load_rows(k_base, kj, stride_kn, offs_d, kj < len_k, d_ok)
        v = load_rows(v_base, kj, stride_vn, offs_d, kj < len_k, d_ok)
        p, dp, _ = probs_and_dp(
            masked_scores(q, tl.trans(k), offs_m[:, None], kj[None, :], len_q, len_k, kpm, stride_mn, window,
                          qk_scale, HAS_MASK, CAUSAL, HAS_WINDOW, DOT_PRECISION),
            do, tl.trans(v), lse[:, None], lse_row[:, None], k_start + kj[None, :], dropout_p, seed, DROPOUT,
            DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += mma(lowp(ds, k.dtype, DOT_PRECISION), k, DOT_PRECISION)

    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, lowp(dq * sm_scale, DQ.dtype.element_ty, DOT_PRECISION), mask=row_ok[:, None] & d_ok[None, :])


@triton.autotune(configs=configs("dkdv", triton_interpreted()), key=_KEY,
                 prune_configs_by=_pruner("dkdv", "BLOCK_N", 32))
@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, KPM, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dm,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh, stride_mb, stride_mn,
    seqlen_q, seqlen_k, max_seqlen_k, num_kv_heads, group, window,
    qk_scale, sm_scale, dropout_p, seed, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Tiles are computed transposed (keys x queries) so that dV += (P Z)^T dO and
    # dK += dS^T Q need no transposed operand in registers.
    start_n, off_b, off_hk, q_start, len_q, k_start, len_k = program(
        CU_Q, CU_K, seqlen_q, seqlen_k, max_seqlen_k, num_kv_heads, IS_VARLEN, BLOCK_N)
    if start_n * BLOCK_N >= len_k:
        return
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < len_k
    d_ok = offs_d < HEAD_DIM
    rows_k = k_start + offs_n
    k = load_rows(K + off_b * stride_kb + off_hk * stride_kh, rows_k, stride_kn, offs_d, key_ok, d_ok)
    v = load_rows(V + off_b * stride_vb + off_hk * stride_vh, rows_k, stride_vn, offs_d, key_ok, d_ok)
    kpm = KPM + off_b * stride_mb
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # The queries that can see a key of this block: [lo, q_end), lo a multiple of BLOCK_M.
    # Query i sits at key position i + pos0: causal needs i + pos0 >= first key, the
    # window i + pos0 > first key - window and i + pos0 < last key + window.
    pos0 = shift(len_q, len_k, CAUSAL)  # key position of query 0
    lo = 0
    if CAUSAL != 0:
        lo = (tl.maximum(start_n * BLOCK_N - pos0, 0) // BLOCK_M) * BLOCK_M
    elif HAS_WINDOW:
        lo = (tl.maximum(start_n * BLOCK_N - pos0 - window + 1, 0) // BLOCK_M) * BLOCK_M
    q_end = len_q
    if HAS_WINDOW:
        q_end = tl.minimum(q_end, (start_n + 1) * BLOCK_N - 1 - pos0 + window)
    if HAS_MASK:  # a key block that is all padding: zero gradients, skip the loop
        pad = tl.load(kpm + offs_n * stride_mn, mask=key_ok, other=0)
        q_end = tl.where(tl.max(pad.to(tl.int32), 0) > 0, q_end, 0)
    for g in range(0, group):
        off_h = off_hk * group + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_db + off_h * stride_dh
        for start_m in range(lo, q_end, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < len_q
            q = load_rows(q_base, q_start + offs_m, stride_qm, offs_d, row_ok, d_ok)
            do = load_rows(do_base, q_start + offs_m, stride_dm, offs_d, row_ok, d_ok)
            lse_row = off_b * stride_lb + off_h * stride_lh + q_start + offs_m
            lse = row_stats(LSE, lse_row, row_ok)
            delta = tl.load(DELTA + lse_row, mask=row_ok, other=0.0)
            pt, dpt, pzt = probs_and_dp(
                masked_scores(k, tl.trans(q), offs_m[None, :], offs_n[:, None], len_q, len_k, kpm, stride_mn,
                              window, qk_scale, HAS_MASK, CAUSAL, HAS_WINDOW, DOT_PRECISION),
                v, tl.trans(do), lse[None, :], lse_row[None, :], k_start + offs_n[:, None], dropout_p, seed,
                DROPOUT, DOT_PRECISION)
            dv += mma(lowp(pzt, do.dtype, DOT_PRECISION), do, DOT_PRECISION)
            dst = pt * (dpt - delta[None, :])  # dS = P * (dP - delta)
            dk += mma(lowp(dst, q.dtype, DOT_PRECISION), q, DOT_PRECISION)

    dk_ptrs = DK + off_b * stride_dkb + off_hk * stride_dkh + rows_k[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + off_b * stride_dvb + off_hk * stride_dvh + rows_k[:, None] * stride_dvn + offs_d[None, :]
    kv_mask = key_ok[:, None] & d_ok[None, :]
    tl.store(dk_ptrs, lowp(dk * sm_scale, DK.dtype.element_ty, DOT_PRECISION), mask=kv_mask)
    tl.store(dv_ptrs, lowp(dv, DV.dtype.element_ty, DOT_PRECISION), mask=kv_mask)


# ----------------------------------------------------------------------- host wrappers
def _bhm(t: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides: padded ``(B, H, S, D)`` or packed ``(T, H, D)``."""
    return (0, t.stride(1), t.stride(0)) if packed else (t.stride(0), t.stride(1), t.stride(2))


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "tf32x3"
    return "widen" if dtype == torch.bfloat16 and triton_interpreted() else "tf32"


class _Layout:
    """Everything the three kernels share about one call: sequence counts, strides of
    the lse / delta / dropout-row space, the key padding mask, compile-time features."""

    def __init__(self, q, k, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 causal, window, dropout_p, scale, seed):
        self.packed = cu_seqlens_q is not None
        if self.packed:
            tq, hq, d = q.shape
            self.batch = cu_seqlens_q.shape[0] - 1
            self.seqlen_q, self.seqlen_k = 0, 0
            self.max_q, self.max_k = int(max_seqlen_q), int(max_seqlen_k)
            self.lse_shape, self.lse_strides = (hq, tq), (0, tq)
            self.cu_q, self.cu_k = cu_seqlens_q, cu_seqlens_k
        else:
            self.batch, hq, sq, d = q.shape
            sk = k.shape[2]
            self.seqlen_q, self.seqlen_k = sq, sk
            self.max_q, self.max_k = sq, sk
            self.lse_shape, self.lse_strides = (self.batch, hq, sq), (hq * sq, sq)
            self.cu_q = self.cu_k = q  # never read when not IS_VARLEN
        self.heads = hq
        self.kv_heads = k.shape[-2] if self.packed else k.shape[1]
        self.group = hq // self.kv_heads
        self.head_dim = d
        if key_padding_mask is not None:
            self.kpm = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
            self.kpm_strides = (self.kpm.stride(0), self.kpm.stride(1))
        else:
            self.kpm, self.kpm_strides = q, (0, 0)  # never read when not HAS_MASK
        self.scale = float(scale)
        self.window = int(window)
        self.dropout_p = float(dropout_p)
        self.seed = int(seed) if dropout_p > 0 else 0
        if self.dropout_p > 0 and math.prod(self.lse_shape) >= 2**31:
            raise ValueError("triton attention dropout: heads x query rows must be < 2**31 (32-bit Philox counters), "
                             f"got {math.prod(self.lse_shape)}")
        self.buckets = (_bucket(self.max_q), _bucket(self.max_k))
        self.meta = dict(
            HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), CAUSAL=int(causal), HAS_WINDOW=self.window > 0,
            HAS_MASK=key_padding_mask is not None, DROPOUT=self.dropout_p > 0.0, IS_VARLEN=self.packed,
            DOT_PRECISION=_dot_precision(q.dtype),
        )

    def grid(self, max_len: int, heads: int, block_key: str):
        """The one-dimensional grid of :func:`program`."""
        def grid(meta):
            programs = triton.cdiv(max_len, meta[block_key]) * self.batch * heads
            if programs >= 2**31:
                raise ValueError(f"triton attention: {programs} programs exceed the grid's 2**31 - 1")
            return (programs,)
        return grid

    def scalars(self, max_len: int, heads: int, *, backward: bool):
        qk_scale = self.scale * LOG2E
        scales = (qk_scale, self.scale) if backward else (qk_scale,)
        return (self.seqlen_q, self.seqlen_k, max_len, heads, self.group, self.window,
                *scales, self.dropout_p, self.seed, *self.buckets)


def attention_forward(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      causal, window, dropout_p, scale, seed):
    """Flash attention forward; returns ``(out, lse)``: ``out`` like ``q`` (same strides),
    ``lse`` fp32 natural-log ``(B, Hq, Sq)`` padded or ``(Hq, Tq)`` packed (-inf for a
    row that sees no key).  See the module docstring for layouts and masking."""
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    lay = _Layout(q, k, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  causal, window, dropout_p, scale, seed)
    out = torch.empty_like(q)
    lse = torch.empty(lay.lse_shape, dtype=torch.float32, device=q.device)
    if q.numel() == 0 or lay.batch == 0 or lay.max_q == 0:
        return out, lse.fill_(float("-inf"))
    _attn_fwd[lay.grid(lay.max_q, lay.heads, "BLOCK_M")](
        q, k, v, out, lse, lay.kpm, lay.cu_q, lay.cu_k,
        *_bhm(q, lay.packed), *_bhm(k, lay.packed), *_bhm(v, lay.packed), *_bhm(out, lay.packed),
        *lay.lse_strides, *lay.kpm_strides,
        *lay.scalars(lay.max_q, lay.heads, backward=False), **lay.meta,
    )
    return out, lse


def attention_backward(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                       max_seqlen_q, max_seqlen_k, causal, window, dropout_p, scale, seed):
    """Gradients ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v`` from the forward's ``out``
    and ``lse``; dropout is regenerated from ``seed``.  dK/dV sum over the query heads of
    each GQA group in fp32."""
    dout, q, k, v, out = (last_dim_contiguous(t) for t in (dout, q, k, v, out))
    lay = _Layout(q, k, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  causal, window, dropout_p, scale, seed)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0 or lay.batch == 0 or lay.max_q == 0 or lay.max_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    delta = torch.empty_like(lse)  # written by the dQ kernel, read by the dK/dV kernel
    shared = (*lay.lse_strides, *lay.kpm_strides)
    _attn_bwd_dq[lay.grid(lay.max_q, lay.heads, "BLOCK_M")](
        q, k, v, out, dout, dq, lse, delta, lay.kpm, lay.cu_q, lay.cu_k,
        *_bhm(q, lay.packed), *_bhm(k, lay.packed), *_bhm(v, lay.packed), *_bhm(out, lay.packed),
        *_bhm(dout, lay.packed), *_bhm(dq, lay.packed), *shared,
        *lay.scalars(lay.max_q, lay.heads, backward=True), **lay.meta,
    )
    _attn_bwd_dkdv[lay.grid(lay.max_k, lay.kv_heads, "BLOCK_N")](
        q, k, v, dout, dk, dv, lse, delta, lay.kpm, lay.cu_q, lay.cu_k,
        *_bhm(q, lay.packed), *_bhm(k, lay.packed), *_bhm(v, lay.packed), *_bhm(dout, lay.packed),
        *_bhm(dk, lay.packed), *_bhm(dv, lay.packed), *shared,
        *lay.scalars(lay.max_k, lay.kv_heads, backward=True), **lay.meta,
    )
    return dq, dk, dv
