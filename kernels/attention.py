"""Triton flash attention (the ``triton`` backend of ``fastlm.ops.attention`` and
``fastlm.ops.varlen_attention``): exact attention with an online softmax, never an
``Lq x Lk`` matrix in memory.

Two layouts share every kernel (``IS_VARLEN``):

* padded: ``q`` ``(B, Hq, Sq, D)``, ``k``/``v`` ``(B, Hk, Sk, D)``, any strides with a
  unit last-dim stride (Hugging Face passes transposed views of ``(B, S, H, D)``);
  ``key_padding_mask`` ``(B, Sk)`` bool, True = attend, any pattern (left or right
  padding); ``lse`` is ``(B, Hq, Sq)``.
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

Numerics: scores, the running max/sum and the accumulator are fp32; ``log2(e)`` is
folded into the scale so the softmax runs on ``exp2``; P is rounded to the input dtype
before the P @ V product (as every flash kernel does).  fp32 dot products are split
into three TF32 tensor-core products ("tf32x3"): close to fp32 accuracy, never plain
TF32.  (The interpreter computes them in plain fp32 numpy.)

Status: tested under ``TRITON_INTERPRET=1`` (tests/test_attention_triton.py) and compiled
ahead of time for sm_80 / sm_90; never run on a GPU ("compiled, unverified").
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastlm.ops._common import last_dim_contiguous
from fastlm.registry import triton_interpreted

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # kernels may only read constexpr globals
_LN2 = tl.constexpr(0.6931471805599453)


# ------------------------------------------------------------------------- autotuning
# A few deliberate configs per kernel.  The autotune key is (head-dim block, masking
# features, a power-of-two bucket of the longest query / key sequence) plus the tensor
# dtypes, which triton adds itself: a new sequence length re-uses its bucket's choice.
# The interpreter runs one fixed, small config (benchmarking configs there would take
# minutes and mean nothing).
def _configs(gpu: list[tuple[int, int, int, int]], interpreted: tuple[int, int]) -> list[triton.Config]:
    if triton_interpreted():
        bm, bn = interpreted
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in gpu]


def _pruner(acc_rows: str, max_acc_regs: int) -> dict:
    """Config pruning for one kernel, by head dim and dtype: operand tiles of at most
    32 KiB (128 x 128 fp16; fp32 counts double, as tf32x3 stages split copies of its
    operands) so the K/V pipeline fits in shared memory, and at most
    ``max_acc_regs`` fp32 registers per thread for each ``acc_rows x BLOCK_D``
    accumulator.  The limits come from ptxas register / spill reports of sm_90 builds
    (64 for the forward, whose only other resident tile is Q; 32 for the backward
    kernels, which keep two more input tiles resident; halved with dropout, whose
    Philox rounds need registers of their own).  If nothing fits, the config with the
    smallest tiles, then the fewest accumulator registers, is kept."""
    def prune(configs, named_args, **kwargs):
        block_d = kwargs["BLOCK_D"]
        limit = max_acc_regs // 2 if kwargs["DROPOUT"] else max_acc_regs
        size = named_args["Q"].element_size()
        row_bytes = block_d * (2 * size if size == 4 else size)

        def acc_regs(c):
            return c.kwargs[acc_rows] * block_d / (32 * c.num_warps)

        fits = [c for c in configs
                if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) * row_bytes <= 32768 and acc_regs(c) <= limit]
        return fits or [min(configs, key=lambda c: (max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]), acc_regs(c)))]

    return {"early_config_prune": prune}


_KEY = ["Q_BUCKET", "K_BUCKET", "BLOCK_D", "CAUSAL", "HAS_WINDOW", "HAS_MASK", "DROPOUT", "IS_VARLEN"]
# (BLOCK_M, BLOCK_N, num_warps, num_stages); the interpreter's (BLOCK_M, BLOCK_N)
_FWD = _configs([(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 64, 8, 3),
                 (64, 32, 4, 2), (32, 32, 4, 2)], (32, 16))
_DKDV = _configs([(64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2),
                  (32, 64, 4, 2), (32, 32, 4, 2), (32, 32, 8, 2)], (16, 32))
_DQ = _configs([(64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2),
                (32, 32, 4, 2), (32, 32, 8, 2)], (32, 16))


def _bucket(n: int) -> int:
    """Autotune-key bucket of a sequence length: powers of two from 64 to 16384."""
    return min(max(triton.next_power_of_2(max(int(n), 1)), 64), 16384)


def _delta_block_m(block_d: int) -> int:
    """Rows per program of the memory-bound delta kernel: two fp32 tiles of at most
    8192 elements (64 registers a thread at 4 warps)."""
    return 32 if triton_interpreted() else min(64, 8192 // block_d)


# ---------------------------------------------------------------------- shared helpers
@triton.jit
def _seq_bounds(CU, off_b, seqlen, IS_VARLEN: tl.constexpr):
    """(first token, length) of sequence ``off_b``: from ``cu_seqlens`` or the padded length."""
    if IS_VARLEN:
        start = tl.load(CU + off_b).to(tl.int64)
        end = tl.load(CU + off_b + 1).to(tl.int64)
        return start, end - start
    else:
        return 0, seqlen


@triton.jit
def _query_block(CU_Q, CU_K, seqlen_q, seqlen_k, num_heads, group, stride_lb, stride_lh,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """The prologue of a query-block program (grid: query blocks x sequences * query heads):
    ``(start_m, off_b, off_h, off_hk, q_start, len_q, k_start, len_k, offs_m, offs_d,
    row_ok, d_ok, lse_row)``; ``lse_row`` indexes lse / delta and is the dropout row id.
    The caller returns at once when ``start_m * BLOCK_M >= len_q`` (a block past the end
    of a shorter sequence)."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // num_heads).to(tl.int64)
    off_h = (off_bh % num_heads).to(tl.int64)
    q_start, len_q = _seq_bounds(CU_Q, off_b, seqlen_q, IS_VARLEN)
    k_start, len_k = _seq_bounds(CU_K, off_b, seqlen_k, IS_VARLEN)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < len_q
    d_ok = offs_d < HEAD_DIM  # head dims that are not powers of two: masked lanes read 0
    lse_row = off_b * stride_lb + off_h * stride_lh + q_start + offs_m
    return start_m, off_b, off_h, off_h // group, q_start, len_q, k_start, len_k, offs_m, offs_d, row_ok, d_ok, lse_row


@triton.jit
def _shift(len_q, len_k, CAUSAL: tl.constexpr):
    """Key position of query 0: ``Lk - Lq`` for bottom-right causal, else 0."""
    if CAUSAL == 2:
        return len_k - len_q
    else:
        return 0


@triton.jit
def _visible(qi, kj, len_q, len_k, kpm, stride_mn, window, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
             HAS_WINDOW: tl.constexpr):
    """Which (query ``qi``, key ``kj``) pairs attend; ``qi``/``kj`` broadcast to the tile."""
    vis = (qi < len_q) & (kj < len_k)
    if HAS_MASK:
        vis = vis & (tl.load(kpm + kj * stride_mn, mask=kj < len_k, other=0) != 0)
    dist = qi + _shift(len_q, len_k, CAUSAL) - kj  # query position - key position
    if CAUSAL != 0:
        vis = vis & (dist >= 0)
    if HAS_WINDOW:
        vis = vis & (dist < window)
        if CAUSAL == 0:
            vis = vis & (dist > -window)
    return vis


@triton.jit
def _dropout_keep(seed, row, key, dropout_p):
    """Keep-bits for (lse row ``row``, key index ``key`` in the layout), broadcast to a
    tile: Philox-4x32 with the 64-bit seed as key and (key, row) as two of its 32-bit
    counters, so no 64-bit index arithmetic is spent per element.  Identical in forward
    and backward."""
    key = key.to(tl.int32) + row.to(tl.int32) * 0  # both counters at tile shape
    row = row.to(tl.int32) + key * 0
    bits, _, _, _ = tl.philox(seed, key, row, 0, 0)
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _mma(a, b, DOT_PRECISION: tl.constexpr):
    """``a @ b`` accumulated in fp32.  DOT_PRECISION: "tf32" for fp16/bf16 inputs (no
    effect there), "tf32x3" for fp32 inputs (three TF32 tensor-core products: fp32-level
    accuracy, where "ieee" would fall back to slow FMA loops), or "widen": only under the
    interpreter with bf16 inputs, whose tl.dot would multiply the raw uint16 bit
    patterns (triton stores bf16 as uint16 there); widening bf16 -> fp32 is exact, so
    the product equals a bf16 MMA with fp32 accumulation."""
    if DOT_PRECISION == "widen":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _key_range(kpm, stride_mn, start_m, len_q, len_k, window, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``[lo, hi)``: the keys any query of block ``start_m`` can see, ``lo`` a multiple of
    ``BLOCK_N``.  With a padding mask, a scan of the mask row (``len_k`` bytes, against
    ``len_k * D * 4`` bytes of K and V) trims the padded keys at both ends, so padded
    batches skip their padding's matmuls (a row with no key at all gets lo >= hi).  The
    causal limit and the sliding window (keys within ``window`` of the block's first and
    last query positions) cut the range further: local attention costs O(window) per row."""
    lo = 0
    hi = len_k
    if HAS_MASK:
        first = tl.full([], 0, tl.int32) + len_k
        last = tl.full([], -1, tl.int32)
        for start in range(0, len_k, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            keep = tl.load(kpm + j * stride_mn, mask=j < len_k, other=0) != 0
            first = tl.minimum(first, tl.min(tl.where(keep, j, len_k), 0))
            last = tl.maximum(last, tl.max(tl.where(keep, j, -1), 0))
        lo = (first // BLOCK_N) * BLOCK_N
        hi = last + 1
    first_pos = start_m * BLOCK_M + _shift(len_q, len_k, CAUSAL)  # key positions of the block's
    last_pos = first_pos + BLOCK_M - 1                             # first and last query
    if CAUSAL != 0:
        hi = tl.minimum(hi, last_pos + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N)
        if CAUSAL == 0:
            hi = tl.minimum(hi, last_pos + window)
    return lo, hi


# ----------------------------------------------------------------------------- forward
@triton.autotune(configs=_FWD, key=_KEY, prune_configs_by=_pruner("BLOCK_M", 64))
@triton.jit(do_not_specialize=["seed"])
def _attn_fwd(
    Q, K, V, O, LSE, KPM, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh, stride_mb, stride_mn,
    seqlen_q, seqlen_k, num_heads, group, window,
    qk_scale, dropout_p, seed, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: BLOCK_M queries of one (sequence, head).  Q is read once, K and V once
    # per query block; O and the log-sum-exp are written once.
    start_m, off_b, off_h, off_hk, q_start, len_q, k_start, len_k, offs_m, offs_d, row_ok, d_ok, lse_row = \
        _query_block(CU_Q, CU_K, seqlen_q, seqlen_k, num_heads, group, stride_lb, stride_lh,
                     HEAD_DIM, BLOCK_D, IS_VARLEN, BLOCK_M)
    if start_m * BLOCK_M >= len_q:
        return
    offs_n = tl.arange(0, BLOCK_N)

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + (q_start + offs_m)[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn
    v_base = V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn
    kpm = KPM + off_b * stride_mb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 domain
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i), before dropout
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(kpm, stride_mn, start_m, len_q, len_k, window, HAS_MASK, CAUSAL, HAS_WINDOW,
                        BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        kj = start_n + offs_n
        kv_ok = kj < len_k
        kt = tl.load(k_base + kj[None, :] * stride_kn + offs_d[:, None], mask=kv_ok[None, :] & d_ok[:, None], other=0.0)
        s = _mma(q, kt, DOT_PRECISION) * qk_scale
        vis = _visible(offs_m[:, None], kj[None, :], len_q, len_k, kpm, stride_mn, window, HAS_MASK, CAUSAL,
                       HAS_WINDOW)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; subtract 0 instead so that
        # exp2(-inf - -inf) never makes a NaN: p and alpha are then exactly 0.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # the normaliser counts every key; only the product with V is dropped
            p = tl.where(_dropout_keep(seed, lse_row[:, None], k_start + kj[None, :], dropout_p), p, 0.0)
        v = tl.load(v_base + kj[:, None] * stride_vn + offs_d[None, :], mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # no visible key: out = 0 (acc is 0), lse = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out_scale = 1.0 / l_safe
    if DROPOUT:
        out_scale = out_scale / (1.0 - dropout_p)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + (q_start + offs_m)[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, (acc * out_scale[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2)
    tl.store(LSE + lse_row, lse, mask=row_ok)


# ---------------------------------------------------------------------------- backward
# Backward = three launches:
#   1. delta = rowsum(dO * O) per query row (fp32, laid out like lse);
#   2. one program per (key block, sequence, kv head) accumulates dK and dV in registers
#      over every query block of every query head in its GQA group: no atomics, dK/dV
#      written once, and the group sum happens in fp32;
#   3. one program per (query block, sequence, query head) accumulates dQ over its keys.
# Splitting dQ off costs two extra matmuls per tile (S and dP are recomputed) compared
# with fp32 atomic adds into a dQ buffer, but it is deterministic, needs no fp32 dQ
# scratch (Tq*Hq*D*4 bytes) nor a cast pass, and lets autotuning re-run kernels safely.
@triton.jit
def _attn_bwd_delta(
    O, DO, DELTA, CU_Q,
    stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm, stride_lb, stride_lh,
    seqlen_q, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // num_heads).to(tl.int64)
    off_h = (off_bh % num_heads).to(tl.int64)
    q_start, len_q = _seq_bounds(CU_Q, off_b, seqlen_q, IS_VARLEN)
    if start_m * BLOCK_M >= len_q:
        return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < len_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = (q_start + offs_m)[:, None]
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + rows * stride_om + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_db + off_h * stride_dh + rows * stride_dm + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_b * stride_lb + off_h * stride_lh + q_start + offs_m, delta, mask=offs_m < len_q)


@triton.jit
def _load_row_stats(LSE, DELTA, lse_row, row_ok):
    """log2-domain lse and delta of a block of query rows.  Rows with no visible key
    (lse = -inf) and rows past the sequence get lse = +inf, so exp2(s - lse) = 0."""
    lse = tl.load(LSE + lse_row, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    delta = tl.load(DELTA + lse_row, mask=row_ok, other=0.0)
    return lse, delta


@triton.autotune(configs=_DKDV, key=_KEY, prune_configs_by=_pruner("BLOCK_N", 32))
@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, KPM, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dm,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh, stride_mb, stride_mn,
    seqlen_q, seqlen_k, num_kv_heads, group, window,
    qk_scale, sm_scale, dropout_p, seed, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Tiles are computed transposed (keys x queries) so that dV += P^T dO and
    # dK += dS^T Q need no transposed operand in registers.
    start_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // num_kv_heads).to(tl.int64)
    off_hk = (off_bh % num_kv_heads).to(tl.int64)
    q_start, len_q = _seq_bounds(CU_Q, off_b, seqlen_q, IS_VARLEN)
    k_start, len_k = _seq_bounds(CU_K, off_b, seqlen_k, IS_VARLEN)
    if start_n * BLOCK_N >= len_k:
        return

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (offs_n < len_k)[:, None] & d_ok[None, :]
    rows_k = (k_start + offs_n)[:, None]
    k_ptrs = K + off_b * stride_kb + off_hk * stride_kh + rows_k * stride_kn + offs_d[None, :]
    v_ptrs = V + off_b * stride_vb + off_hk * stride_vh + rows_k * stride_vn + offs_d[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    kpm = KPM + off_b * stride_mb
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # The queries that can see a key of this block: [lo, q_end), lo a multiple of BLOCK_M.
    # Query i sits at key position i + shift: causal needs i + shift >= first key, the
    # window i + shift > first key - window and i + shift < last key + window.
    shift = _shift(len_q, len_k, CAUSAL)
    lo = 0
    if CAUSAL != 0:
        lo = (tl.maximum(start_n * BLOCK_N - shift, 0) // BLOCK_M) * BLOCK_M
    elif HAS_WINDOW:
        lo = (tl.maximum(start_n * BLOCK_N - shift - window + 1, 0) // BLOCK_M) * BLOCK_M
    q_end = len_q
    if HAS_WINDOW:
        q_end = tl.minimum(q_end, (start_n + 1) * BLOCK_N - 1 - shift + window)
    if HAS_MASK:  # a key block that is all padding: zero gradients, skip the loop
        pad = tl.load(kpm + offs_n * stride_mn, mask=offs_n < len_k, other=0)
        q_end = tl.where(tl.max(pad.to(tl.int32), 0) > 0, q_end, 0)
    for g in range(0, group):
        off_h = off_hk * group + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh + q_start * stride_qm
        do_base = DO + off_b * stride_db + off_h * stride_dh + q_start * stride_dm
        for start_m in range(lo, q_end, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < len_q
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dm + offs_d[None, :], mask=q_mask, other=0.0)
            lse_row = off_b * stride_lb + off_h * stride_lh + q_start + offs_m
            lse, delta = _load_row_stats(LSE, DELTA, lse_row, row_ok)

            st = _mma(k, tl.trans(q), DOT_PRECISION) * qk_scale
            vis = _visible(offs_m[None, :], offs_n[:, None], len_q, len_k, kpm, stride_mn, window, HAS_MASK, CAUSAL,
                           HAS_WINDOW)
            st = tl.where(vis, st, float("-inf"))
            pt = tl.exp2(st - lse[None, :])  # P^T, normalised by the forward's lse
            dpt = _mma(v, tl.trans(do), DOT_PRECISION)  # d(P after dropout)^T
            if DROPOUT:
                keep = _dropout_keep(seed, lse_row[None, :], k_start + offs_n[:, None], dropout_p)
                inv_keep = 1.0 / (1.0 - dropout_p)
                dv += _mma(tl.where(keep, pt * inv_keep, 0.0).to(do.dtype), do, DOT_PRECISION)
                dpt = tl.where(keep, dpt * inv_keep, 0.0)
            else:
                dv += _mma(pt.to(do.dtype), do, DOT_PRECISION)
            # dS = P * (dP - delta); delta = rowsum(dO * O) equals rowsum(P * dP) with dropout too.
            dst = pt * (dpt - delta[None, :])
            dk += _mma(dst.to(q.dtype), q, DOT_PRECISION)

    dk = dk * sm_scale
    dk_ptrs = DK + off_b * stride_dkb + off_hk * stride_dkh + rows_k * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + off_b * stride_dvb + off_hk * stride_dvh + rows_k * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_DQ, key=_KEY, prune_configs_by=_pruner("BLOCK_M", 32))
@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, KPM, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dm,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh, stride_mb, stride_mn,
    seqlen_q, seqlen_k, num_heads, group, window,
    qk_scale, sm_scale, dropout_p, seed, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m, off_b, off_h, off_hk, q_start, len_q, k_start, len_k, offs_m, offs_d, row_ok, d_ok, lse_row = \
        _query_block(CU_Q, CU_K, seqlen_q, seqlen_k, num_heads, group, stride_lb, stride_lh,
                     HEAD_DIM, BLOCK_D, IS_VARLEN, BLOCK_M)
    if start_m * BLOCK_M >= len_q:
        return
    offs_n = tl.arange(0, BLOCK_N)
    q_mask = row_ok[:, None] & d_ok[None, :]
    rows = (q_start + offs_m)[:, None]
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
    do_ptrs = DO + off_b * stride_db + off_h * stride_dh + rows * stride_dm + offs_d[None, :]
    do = tl.load(do_ptrs, mask=q_mask, other=0.0)
    lse, delta = _load_row_stats(LSE, DELTA, lse_row, row_ok)
    k_base = K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn
    v_base = V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn
    kpm = KPM + off_b * stride_mb

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(kpm, stride_mn, start_m, len_q, len_k, window, HAS_MASK, CAUSAL, HAS_WINDOW,
                        BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        kj = start_n + offs_n
        kv_mask = (kj < len_k)[:, None] & d_ok[None, :]
        k = tl.load(k_base + kj[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + kj[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _mma(q, tl.trans(k), DOT_PRECISION) * qk_scale
        vis = _visible(offs_m[:, None], kj[None, :], len_q, len_k, kpm, stride_mn, window, HAS_MASK, CAUSAL,
                       HAS_WINDOW)
        s = tl.where(vis, s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = _mma(do, tl.trans(v), DOT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, lse_row[:, None], k_start + kj[None, :], dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq += _mma(ds.to(k.dtype), k, DOT_PRECISION)

    dq = dq * sm_scale
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + rows * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=q_mask)


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

    def grid(self, blocks_of: int, heads: int, block_key: str):
        return lambda meta: (triton.cdiv(blocks_of, meta[block_key]), self.batch * heads)

    def scalars(self, heads: int, *, backward: bool):
        qk_scale = self.scale * LOG2E
        scales = (qk_scale, self.scale) if backward else (qk_scale,)
        return (self.seqlen_q, self.seqlen_k, heads, self.group, self.window,
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
        *lay.scalars(lay.heads, backward=False), **lay.meta,
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
    delta = torch.empty_like(lse)
    delta_rows = _delta_block_m(lay.meta["BLOCK_D"])
    _attn_bwd_delta[(triton.cdiv(lay.max_q, delta_rows), lay.batch * lay.heads)](
        out, dout, delta, lay.cu_q, *_bhm(out, lay.packed), *_bhm(dout, lay.packed), *lay.lse_strides,
        lay.seqlen_q, lay.heads,
        HEAD_DIM=lay.head_dim, BLOCK_D=lay.meta["BLOCK_D"], IS_VARLEN=lay.packed, BLOCK_M=delta_rows,
    )
    shared = (*lay.lse_strides, *lay.kpm_strides)
    _attn_bwd_dkdv[lay.grid(lay.max_k, lay.kv_heads, "BLOCK_N")](
        q, k, v, dout, dk, dv, lse, delta, lay.kpm, lay.cu_q, lay.cu_k,
        *_bhm(q, lay.packed), *_bhm(k, lay.packed), *_bhm(v, lay.packed), *_bhm(dout, lay.packed),
        *_bhm(dk, lay.packed), *_bhm(dv, lay.packed), *shared,
        *lay.scalars(lay.kv_heads, backward=True), **lay.meta,
    )
    _attn_bwd_dq[lay.grid(lay.max_q, lay.heads, "BLOCK_M")](
        q, k, v, dout, dq, lse, delta, lay.kpm, lay.cu_q, lay.cu_k,
        *_bhm(q, lay.packed), *_bhm(k, lay.packed), *_bhm(v, lay.packed), *_bhm(dout, lay.packed),
        *_bhm(dq, lay.packed), *shared,
        *lay.scalars(lay.heads, backward=True), **lay.meta,
    )
    return dq, dk, dv
