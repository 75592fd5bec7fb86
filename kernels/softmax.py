"""Triton kernels for the fused scale -> mask -> softmax -> dropout (forward and backward).

Implements the kernel-level contract of :mod:`fastlm.reference.softmax`:
``softmax_forward(x, mask, scale, dropout_p, seed) -> (out, probs)`` and
``softmax_backward(grad, y, scale, dropout_p, seed) -> dx`` on (R, N) row matrices.

* Rows up to ``MAX_ROW_BLOCK`` elements stay in registers: one read of x (and the
  mask), one write of out (plus probs with dropout); several short rows share a
  program so small rows still fill the machine.
* Longer rows (to 1M and beyond) use the online variant in two launches, each row
  split into segments so that even one row occupies many programs (rows x segments ~
  ``SEGMENT_PROGRAMS``): sweep 1 reads a segment in ``ONLINE_BLOCK`` chunks keeping a
  per-lane running max and rescaled sum, and stores the segment's (max, sum) (8 bytes);
  sweep 2 combines the row's segment stats and writes the normalised values (x read
  twice, written once).  The backward splits the same way (partial sums of g * y).
* The mask is read through its broadcast strides (stride 0 over batch / heads /
  queries), so it is never expanded; row r's mask row is at
  (r // (D1*D2)) * s0 + (r // D2 % D1) * s1 + (r % D2) * s2.
* Dropout keeps element (r, c) when ``tl.rand(seed, r * N + c) >= p`` (Philox), so
  the backward regenerates the forward's mask from the seed alone.
* Backward: dx = scale * y * (g - sum(g * y)), g = grad * keep / (1 - p), fused the
  same two ways.

GPU status: compiled, unverified (never run on a GPU); tested on CPU under
TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROW_BLOCK = 16384  # longest row (power of two) kept in registers
ONLINE_BLOCK = 4096  # chunk of the online variant
SEGMENT_PROGRAMS = 512  # long rows: split into segments until rows x segments reaches this

_MASK_NONE, _MASK_BOOL, _MASK_ADD = 0, 1, 2


@triton.jit
def _mask_base(rows, D1, D2, s0, s1, s2):
    inner = D1 * D2
    rem = rows % inner
    return (rows // inner) * s0 + (rem // D2) * s1 + (rem % D2) * s2


@triton.jit
def _scores(x_ptr, m_ptr, rows, cols, valid, N, scale, D1, D2, s0, s1, s2, s3, MASK_KIND: tl.constexpr):
    """x * scale (+ mask) in fp32, -inf outside the row."""
    z = tl.load(x_ptr + rows * N + cols, mask=valid, other=0.0).to(tl.float32) * scale
    if MASK_KIND != 0:
        m_off = _mask_base(rows, D1, D2, s0, s1, s2) + cols * s3
        if MASK_KIND == 1:
            keep = tl.load(m_ptr + m_off, mask=valid, other=0)
            z = tl.where(keep != 0, z, float("-inf"))
        else:
            z += tl.load(m_ptr + m_off, mask=valid, other=0.0).to(tl.float32)
    return tl.where(valid, z, float("-inf"))


@triton.jit
def _fwd_rows(x_ptr, out_ptr, probs_ptr, m_ptr, R, N, scale, p, seed, D1, D2, s0, s1, s2, s3,
              ROWS: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr):
    rows = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    valid = (rows < R) & (cols < N)
    z = _scores(x_ptr, m_ptr, rows, cols, valid, N, scale, D1, D2, s0, s1, s2, s3, MASK_KIND)
    mx = tl.max(z, axis=1)[:, None]
    # An all -inf (fully masked) row: shift by 0 so exp gives zeros, and divide by 1.
    e = tl.exp(z - tl.where(mx == float("-inf"), 0.0, mx))
    total = tl.sum(e, axis=1)[:, None]
    y = e / tl.where(total == 0.0, 1.0, total)
    offs = rows * N + cols
    if DROPOUT:
        tl.store(probs_ptr + offs, y.to(probs_ptr.dtype.element_ty), mask=valid)
        y = tl.where(tl.rand(seed, offs) >= p, y / (1.0 - p), 0.0)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _segment(N, SEG):
    """Columns [begin, end) of this program's segment of its row (program axis 1)."""
    begin = tl.program_id(1).to(tl.int64) * SEG
    return begin, tl.minimum(begin + SEG, N)


@triton.jit
def _fwd_segment_stats(x_ptr, m_ptr, stats_ptr, N, SEG, S, scale, D1, D2, s0, s1, s2, s3,
                       BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr):
    """Sweep 1 of a long row: (max, sum of exp(z - max)) of one segment into stats[row, seg]."""
    row = tl.program_id(0).to(tl.int64)
    begin, end = _segment(N, SEG)
    lanes = tl.arange(0, BLOCK_N)
    m_run = tl.full([BLOCK_N], float("-inf"), tl.float32)  # per-lane running max
    l_run = tl.zeros([BLOCK_N], tl.float32)  # per-lane sum of exp(z - m_run)
    for start in range(begin, end, BLOCK_N):
        cols = start + lanes
        z = _scores(x_ptr, m_ptr, row, cols, cols < end, N, scale, D1, D2, s0, s1, s2, s3, MASK_KIND)
        m_new = tl.maximum(m_run, z)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_run = l_run * tl.exp(m_run - m_safe) + tl.exp(z - m_safe)
        m_run = m_new
    mx = tl.max(m_run, axis=0)
    total = tl.sum(l_run * tl.exp(m_run - tl.where(mx == float("-inf"), 0.0, mx)), axis=0)
    slot = stats_ptr + (row * S + tl.program_id(1)) * 2
    tl.store(slot, mx)
    tl.store(slot + 1, total)


@triton.jit
def _fwd_segment_write(x_ptr, out_ptr, probs_ptr, m_ptr, stats_ptr, N, SEG, S, scale, p, seed,
                       D1, D2, s0, s1, s2, s3, BLOCK_N: tl.constexpr, S_BLOCK: tl.constexpr,
                       MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr):
    """Sweep 2: combine the row's segment stats (an all -inf segment has max -inf, sum 0),
    then normalise, drop out and write this segment."""
    row = tl.program_id(0).to(tl.int64)
    begin, end = _segment(N, SEG)
    k = tl.arange(0, S_BLOCK)
    seg_max = tl.load(stats_ptr + (row * S + k) * 2, mask=k < S, other=float("-inf"))
    seg_sum = tl.load(stats_ptr + (row * S + k) * 2 + 1, mask=k < S, other=0.0)
    mx = tl.max(seg_max, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.sum(seg_sum * tl.exp(seg_max - mx), axis=0)
    inv = 1.0 / tl.where(total == 0.0, 1.0, total)
    lanes = tl.arange(0, BLOCK_N)
    for start in range(begin, end, BLOCK_N):
        cols = start + lanes
        valid = cols < end
        z = _scores(x_ptr, m_ptr, row, cols, valid, N, scale, D1, D2, s0, s1, s2, s3, MASK_KIND)
        y = tl.exp(z - mx) * inv
        offs = row * N + cols
        if DROPOUT:
            tl.store(probs_ptr + offs, y.to(probs_ptr.dtype.element_ty), mask=valid)
            y = tl.where(tl.rand(seed, offs) >= p, y / (1.0 - p), 0.0)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _grad_times_keep(g_ptr, offs, valid, p, seed, DROPOUT: tl.constexpr):
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if DROPOUT:
        g = tl.where(tl.rand(seed, offs) >= p, g / (1.0 - p), 0.0)
    return g


@triton.jit
def _bwd_rows(g_ptr, y_ptr, dx_ptr, R, N, scale, p, seed,
              ROWS: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr):
    rows = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    valid = (rows < R) & (cols < N)
    offs = rows * N + cols
    g = _grad_times_keep(g_ptr, offs, valid, p, seed, DROPOUT)
    y = tl.load(y_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    dot = tl.sum(g * y, axis=1)[:, None]
    tl.store(dx_ptr + offs, (scale * y * (g - dot)).to(dx_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _bwd_segment_dot(g_ptr, y_ptr, dots_ptr, N, SEG, S, p, seed, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr):
    """Backward sweep 1 of a long row: this segment's part of sum(g * y) into dots[row, seg]."""
    row = tl.program_id(0).to(tl.int64)
    begin, end = _segment(N, SEG)
    lanes = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for start in range(begin, end, BLOCK_N):
        cols = start + lanes
        valid = cols < end
        offs = row * N + cols
        g = _grad_times_keep(g_ptr, offs, valid, p, seed, DROPOUT)
        acc += g * tl.load(y_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(dots_ptr + row * S + tl.program_id(1), tl.sum(acc, axis=0))


@triton.jit
def _bwd_segment_write(g_ptr, y_ptr, dx_ptr, dots_ptr, N, SEG, S, scale, p, seed,
                       BLOCK_N: tl.constexpr, S_BLOCK: tl.constexpr, DROPOUT: tl.constexpr):
    """Backward sweep 2: dx = scale * y * (g - dot) over this segment."""
    row = tl.program_id(0).to(tl.int64)
    begin, end = _segment(N, SEG)
    k = tl.arange(0, S_BLOCK)
    dot = tl.sum(tl.load(dots_ptr + row * S + k, mask=k < S, other=0.0), axis=0)
    lanes = tl.arange(0, BLOCK_N)
    for start in range(begin, end, BLOCK_N):
        cols = start + lanes
        valid = cols < end
        offs = row * N + cols
        g = _grad_times_keep(g_ptr, offs, valid, p, seed, DROPOUT)
        y = tl.load(y_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, (scale * y * (g - dot)).to(dx_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------- launchers
def _row_launch(n: int) -> tuple[int, int, int]:
    """(BLOCK_N, rows per program, num_warps) for the register-resident kernels."""
    block = triton.next_power_of_2(n)
    rows = max(1, min(16, 2048 // block))
    warps = min(16, max(1, block * rows // 512))
    return block, rows, warps


def _segments(rows: int, n: int) -> tuple[int, int, int]:
    """(segment length, segments per row, their power-of-two block) for a long row: enough
    programs (rows x segments ~ SEGMENT_PROGRAMS) to fill a GPU even for a single row,
    each segment a whole number of ONLINE_BLOCK chunks."""
    chunks = triton.cdiv(n, ONLINE_BLOCK)
    per_row = max(1, min(chunks, SEGMENT_PROGRAMS // max(rows, 1)))
    seg = triton.cdiv(chunks, per_row) * ONLINE_BLOCK
    count = triton.cdiv(n, seg)
    return seg, count, triton.next_power_of_2(count)


def softmax_forward(x, mask, scale: float, dropout_p: float, seed):
    R, N = x.shape
    out = torch.empty_like(x)
    dropout = dropout_p > 0
    probs = torch.empty_like(x) if dropout else x.new_empty((0,))
    if mask is None:
        kind, m, mask_args = _MASK_NONE, x, (1, 1, 0, 0, 0, 0)
    else:
        kind = _MASK_BOOL if mask.dtype == torch.bool else _MASK_ADD
        m, mask_args = mask, (mask.shape[1], mask.shape[2], *mask.stride())
    common = (float(scale), float(dropout_p), seed, *mask_args)
    probs_arg = probs if dropout else out
    if triton.next_power_of_2(N) <= MAX_ROW_BLOCK:
        block, rows, warps = _row_launch(N)
        _fwd_rows[(triton.cdiv(R, rows),)](x, out, probs_arg, m, R, N, *common, ROWS=rows, BLOCK_N=block,
                                          MASK_KIND=kind, DROPOUT=dropout, num_warps=warps)
    else:
        seg, count, s_block = _segments(R, N)
        stats = torch.empty((R, count, 2), device=x.device, dtype=torch.float32)
        _fwd_segment_stats[(R, count)](x, m, stats, N, seg, count, float(scale), *mask_args,
                                       BLOCK_N=ONLINE_BLOCK, MASK_KIND=kind, num_warps=8)
        _fwd_segment_write[(R, count)](x, out, probs_arg, m, stats, N, seg, count, *common, BLOCK_N=ONLINE_BLOCK,
                                       S_BLOCK=s_block, MASK_KIND=kind, DROPOUT=dropout, num_warps=8)
    return out, probs


def softmax_backward(grad, y, scale: float, dropout_p: float, seed):
    R, N = y.shape
    dx = torch.empty_like(y)
    dropout = dropout_p > 0
    common = (float(scale), float(dropout_p), seed)
    if triton.next_power_of_2(N) <= MAX_ROW_BLOCK:
        block, rows, warps = _row_launch(N)
        _bwd_rows[(triton.cdiv(R, rows),)](grad, y, dx, R, N, *common, ROWS=rows, BLOCK_N=block,
                                          DROPOUT=dropout, num_warps=warps)
    else:
        seg, count, s_block = _segments(R, N)
        dots = torch.empty((R, count), device=y.device, dtype=torch.float32)
        _bwd_segment_dot[(R, count)](grad, y, dots, N, seg, count, *common[1:], BLOCK_N=ONLINE_BLOCK,
                                     DROPOUT=dropout, num_warps=8)
        _bwd_segment_write[(R, count)](grad, y, dx, dots, N, seg, count, *common, BLOCK_N=ONLINE_BLOCK,
                                       S_BLOCK=s_block, DROPOUT=dropout, num_warps=8)
    return dx
