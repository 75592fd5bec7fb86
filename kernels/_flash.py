"""Building blocks of the flash-attention kernels (kernels/attention.py), in the manner of
the Triton tutorial's fused attention: which (sequence, head, block) a program owns, tile
loads, the visibility mask (padding, both causal alignments, sliding window), dropout
bits, the fp32-accumulating products, and the masked score / probability tiles that the
forward and both backward kernels share.  Any kernel with the same layouts (padded
``(B, H, S, D)`` or packed ``(T, H, D)`` with cu_seqlens) can reuse them.
"""
import triton
import triton.language as tl

from ._common import narrow

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # kernels may only read constexpr globals
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def seq_bounds(CU, off_b, seqlen, IS_VARLEN: tl.constexpr):
    """(first token, length) of sequence ``off_b``: from ``cu_seqlens`` or the padded length."""
    if IS_VARLEN:
        start = tl.load(CU + off_b).to(tl.int64)
        end = tl.load(CU + off_b + 1).to(tl.int64)
        return start, end - start
    else:
        return 0, seqlen


@triton.jit
def program(CU_Q, CU_K, seqlen_q, seqlen_k, max_seqlen, num_heads, IS_VARLEN: tl.constexpr, BLOCK: tl.constexpr):
    """Which block of which (sequence, head) this program owns, from the one-dimensional
    grid ``cdiv(max_seqlen, BLOCK) x sequences x heads`` (block fastest, so the programs of
    one head run side by side and share its K/V in L2), with the bounds of that sequence:
    ``(block, off_b, off_h, q_start, len_q, k_start, len_k)``."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(max_seqlen, BLOCK)
    block = pid % blocks
    off_bh = pid // blocks
    off_b = (off_bh // num_heads).to(tl.int64)
    off_h = (off_bh % num_heads).to(tl.int64)
    q_start, len_q = seq_bounds(CU_Q, off_b, seqlen_q, IS_VARLEN)
    k_start, len_k = seq_bounds(CU_K, off_b, seqlen_k, IS_VARLEN)
    return block, off_b, off_h, q_start, len_q, k_start, len_k


@triton.jit
def load_rows(base, rows, stride, offs_d, rows_ok, d_ok):
    """A (rows x BLOCK_D) tile of a (.., rows, head_dim) operand; masked lanes read 0."""
    return tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=rows_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def shift(len_q, len_k, CAUSAL: tl.constexpr):
    """Key position of query 0: ``Lk - Lq`` for bottom-right causal, else 0."""
    if CAUSAL == 2:
        return len_k - len_q
    else:
        return 0


@triton.jit
def visible(qi, kj, len_q, len_k, kpm, stride_mn, window, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
             HAS_WINDOW: tl.constexpr):
    """Which (query ``qi``, key ``kj``) pairs attend; ``qi``/``kj`` broadcast to the tile."""
    vis = (qi < len_q) & (kj < len_k)
    if HAS_MASK:
        vis = vis & (tl.load(kpm + kj * stride_mn, mask=kj < len_k, other=0) != 0)
    dist = qi + shift(len_q, len_k, CAUSAL) - kj  # query position - key position
    if CAUSAL != 0:
        vis = vis & (dist >= 0)
    if HAS_WINDOW:
        vis = vis & (dist < window)
        if CAUSAL == 0:
            vis = vis & (dist > -window)
    return vis


@triton.jit
def dropout_keep(seed, row, key, dropout_p):
    """Keep-bits for (lse row ``row``, key index ``key`` in the layout), broadcast to a
    tile: Philox-4x32 with the 64-bit seed as key and (key, row) as two of its 32-bit
    counters, so no 64-bit index arithmetic is spent per element.  Identical in forward
    and backward."""
    key = key.to(tl.int32) + row.to(tl.int32) * 0  # both counters at tile shape
    row = row.to(tl.int32) + key * 0
    bits, _, _, _ = tl.philox(seed, key, row, 0, 0)
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def mma(a, b, DOT_PRECISION: tl.constexpr):
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
def lowp(x, dtype: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 -> the operands' ``dtype``, to nearest even as a GPU rounds; the interpreter's
    bf16 cast (DOT_PRECISION "widen") truncates, so it is rounded by hand there only."""
    if DOT_PRECISION == "widen":
        return narrow(x, dtype)
    else:
        return x.to(dtype)


@triton.jit
def masked_scores(a, b, qi, kj, len_q, len_k, kpm, stride_mn, window, qk_scale, HAS_MASK: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The score tile ``qk_scale * (a @ b)`` (log2 domain), -inf where query ``qi`` does
    not see key ``kj``: queries x keys (``a`` = Q, ``b`` = K^T), or keys x queries in the
    dK/dV kernel (``a`` = K, ``b`` = Q^T, ``qi``/``kj`` broadcast the other way)."""
    s = mma(a, b, DOT_PRECISION) * qk_scale
    vis = visible(qi, kj, len_q, len_k, kpm, stride_mn, window, HAS_MASK, CAUSAL, HAS_WINDOW)
    return tl.where(vis, s, float("-inf"))


@triton.jit
def accumulate(s, v, m_i, l_i, acc, seed, row, key, dropout_p, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile of the forward's online softmax: the masked score tile ``s`` (log2
    domain, queries x keys) and its ``v`` tile update the running max ``m_i``, the running sum
    ``l_i`` of exp2(s - m_i) (before dropout: the normaliser counts every key) and the fp32
    accumulator ``acc`` of P @ V (P rounded to V's dtype first, as every flash kernel does;
    dropped probabilities are zeroed, keep bits from ``row`` / ``key``).  Returns the three."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing visible yet keeps m = -inf; subtract 0 instead so that
    # exp2(-inf - -inf) never makes a NaN: p and alpha are then exactly 0.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(dropout_keep(seed, row, key, dropout_p), p, 0.0)
    acc = acc * alpha[:, None] + mma(lowp(p, v.dtype, DOT_PRECISION), v, DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def store_output(o_ptrs, LSE, lse_row, acc, m_i, l_i, row_ok, d_ok, dropout_p, DROPOUT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """The forward's epilogue: ``out = acc / l`` (and / (1 - p) with dropout) into the
    (rows x BLOCK_D) pointer tile ``o_ptrs``, natural-log lse at ``LSE + lse_row``; a row that
    saw no key gets out = 0 (its acc is 0) and lse = -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out_scale = 1.0 / l_safe
    if DROPOUT:
        out_scale = out_scale / (1.0 - dropout_p)
    tl.store(o_ptrs, lowp(acc * out_scale[:, None], o_ptrs.dtype.element_ty, DOT_PRECISION),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + lse_row, tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2), mask=row_ok)


@triton.jit
def probs_and_dp(s, c, d, lse, row, key, dropout_p, seed, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The backward's tiles from a masked score tile ``s`` (log2 domain, -inf where not
    visible; :func:`masked_scores`, oriented queries x keys or keys x queries): P =
    exp2(s - lse) (the forward's normalised probabilities, fp32), dP = Z * (c @ d) (``c @ d``
    = dO V^T, oriented like ``s``; Z = keep / (1 - p) the forward's dropout factor, 1 without
    dropout) and P * Z (what multiplied V in the forward).  ``lse`` (log2 domain, +inf for
    rows that see nothing), ``row`` and ``key`` (the dropout counters) broadcast to the tile."""
    p = tl.exp2(s - lse)
    dp = mma(c, d, DOT_PRECISION)
    if DROPOUT:
        keep = dropout_keep(seed, row, key, dropout_p)
        inv_keep = 1.0 / (1.0 - dropout_p)
        return p, tl.where(keep, dp * inv_keep, 0.0), tl.where(keep, p * inv_keep, 0.0)
    else:
        return p, dp, p


@triton.jit
def key_range(kpm, stride_mn, start_m, len_q, len_k, window, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
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
    first_pos = start_m * BLOCK_M + shift(len_q, len_k, CAUSAL)  # key positions of the block's
    last_pos = first_pos + BLOCK_M - 1                             # first and last query
    if CAUSAL != 0:
        hi = tl.minimum(hi, last_pos + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N)
        if CAUSAL == 0:
            hi = tl.minimum(hi, last_pos + window)
    return lo, hi


@triton.jit
def row_stats(LSE, lse_row, row_ok):
    """log2-domain lse of a block of query rows.  Rows with no visible key (lse = -inf)
    and rows past the sequence get lse = +inf, so exp2(s - lse) = 0."""
    lse = tl.load(LSE + lse_row, mask=row_ok, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
