"""Triton cross-entropy kernels (compiled, unverified: never run on a GPU; tested on CPU
under ``TRITON_INTERPRET=1``).

Same contract as :mod:`fastlm.reference.cross_entropy` (read it for the formulas):
``cross_entropy_forward(logits, labels, ignore_index, label_smoothing, z_loss, with_grad)``
and ``cross_entropy_backward(grad_rows, scale)`` (``fastlm.ops.linear_cross_entropy`` calls
them on each chunk of logits).

One program per row.  Rows of up to ``_ONE_BLOCK_MAX`` classes are loaded once into
registers: read once, gradient written once.  Longer rows make two sweeps: the first
keeps an online log-sum-exp (running max ``m`` and ``s = sum exp(x - m)``, rescaled when
the max grows), ``t = sum(x - m)`` (label smoothing) and ``x[label]``; the second
re-reads the row, which was just read by this program and is still in L2, and writes
the gradient.  DRAM traffic is one read of the logits and one write of the gradient.
All arithmetic is fp32 whatever the logits' dtype.

Numerics: ``x - m`` is never mixed with ``log(s)``: the loss is ``log(s) - (1 - eps)
(x[y] - m) - eps t / V + z lse^2`` and the gradient ``exp(x - m) (1 + 2 z lse) / s``, as
PyTorch's log_softmax.  Subtracting the rounded ``lse = m + log(s)`` from the logits
would lose ulp(lse) (~1e-3 for fp32 logits near 1e4).  When the running max grows, ``t``
is shifted by (elements so far) * (old - new max): all its terms stay <= 0, so it sums
without cancellation.  The float arguments are cast to fp32 in the kernel: the
interpreter hands a Python float over as is and types a subnormal one fp64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_ONE_BLOCK_MAX = 8192  # classes held in registers at once (fp32: 32 KiB per program)
_BLOCK = 4096  # sweep width for longer rows


@triton.jit
def _narrow(x, dtype: tl.constexpr):
    """fp32 -> ``dtype``, rounding to nearest even.  For bf16 the rounding is done by hand
    first: a no-op on a GPU (whose cast rounds the same way), and right under
    TRITON_INTERPRET=1, whose fp32 -> bf16 cast truncates (twice the error)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _cross_entropy_forward_kernel(X, Y, LOSS, G, stride_x, stride_g, V, ignore_index, eps, z_loss,
                                  WITH_GRAD: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    eps = tl.cast(eps, tl.float32)
    z_loss = tl.cast(z_loss, tl.float32)
    y = tl.load(Y + row)
    x_row = X + row * stride_x
    g_row = G + row * stride_g
    cols = tl.arange(0, BLOCK)
    if y == ignore_index:
        tl.store(LOSS + row, 0.0)
        if WITH_GRAD:
            for start in range(0, V, BLOCK):
                tl.store(g_row + start + cols, tl.zeros([BLOCK], G.dtype.element_ty),
                         mask=start + cols < V)
    else:
        # NaN flags a label outside [0, V) (the device-side flag of the op's docstring).
        poison = tl.where((y < 0) | (y >= V), float("nan"), 0.0)
        if ONE_BLOCK:
            mask = cols < V
            x = tl.load(x_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
            m = tl.max(x, 0)
            # m_safe avoids (-inf) - (-inf) in a row of only -inf logits
            m_safe = tl.where(m == -float("inf"), 0.0, m)
            e = tl.exp(x - m_safe)
            s = tl.sum(e, 0)
            t = tl.sum(tl.where(mask, x - m_safe, 0.0), 0)
            xy = tl.sum(tl.where(cols == y, x, 0.0), 0)
        else:
            m_safe = 0.0
            m = -float("inf")
            s = 0.0
            t = 0.0
            xy = 0.0
            for start in range(0, V, BLOCK):
                mask = start + cols < V
                x = tl.load(x_row + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, 0))
                # m_safe avoids (-inf) - (-inf) while every logit so far is -inf
                m_new_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
                s = s * tl.exp(m - m_new_safe) + tl.sum(tl.exp(x - m_new_safe), 0)
                t += tl.where(m_new_safe != m_safe, start * (m_safe - m_new_safe), 0.0)
                t += tl.sum(tl.where(mask, x - m_new_safe, 0.0), 0)
                m = m_new
                m_safe = m_new_safe
                xy += tl.sum(tl.where(start + cols == y, x, 0.0), 0)
        log_s = tl.log(s)
        lse = m_safe + log_s  # only in the z-loss terms, whose scale is lse itself
        loss = log_s - (1.0 - eps) * (xy - m_safe) + z_loss * lse * lse
        # eps == 0 must not turn 0 * (-inf) into NaN when a logit is -inf
        loss -= tl.where(eps > 0.0, eps * t / V, 0.0)
        tl.store(LOSS + row, loss + poison)
        if WITH_GRAD:
            p_scale = (1.0 + 2.0 * z_loss * lse) / s
            if ONE_BLOCK:
                g = e * p_scale - eps / V - tl.where(cols == y, 1.0 - eps, 0.0) + poison
                tl.store(g_row + cols, _narrow(g, G.dtype.element_ty), mask=mask)
            else:
                for start in range(0, V, BLOCK):
                    mask = start + cols < V
                    x = tl.load(x_row + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
                    g = (tl.exp(x - m_safe) * p_scale - eps / V
                         - tl.where(start + cols == y, 1.0 - eps, 0.0) + poison)
                    tl.store(g_row + start + cols, _narrow(g, G.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(G, S, OUT, stride_g, stride_o, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    scale = tl.load(S + row)
    g = tl.load(G + row * stride_g + cols, mask=mask).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, _narrow(g * scale, OUT.dtype.element_ty), mask=mask)


def cross_entropy_forward(logits, labels, ignore_index: int, label_smoothing: float, z_loss: float,
                          with_grad: bool):
    n, v = logits.shape
    assert logits.stride(1) == 1 and labels.is_contiguous()
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    grad = torch.empty_like(logits) if with_grad else logits.new_empty(0)
    one_block = v <= _ONE_BLOCK_MAX
    block = triton.next_power_of_2(v) if one_block else _BLOCK
    _cross_entropy_forward_kernel[(n,)](
        logits, labels, loss, grad, logits.stride(0), grad.stride(0) if with_grad else 0, v,
        ignore_index, label_smoothing, z_loss,
        WITH_GRAD=with_grad, ONE_BLOCK=one_block, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return loss, grad


def cross_entropy_backward(grad_rows, scale):
    n, v = grad_rows.shape
    out = torch.empty_like(grad_rows)
    block = min(triton.next_power_of_2(v), 4096)
    _scale_rows_kernel[(n, triton.cdiv(v, block))](grad_rows, scale, out, grad_rows.stride(0), out.stride(0), v,
                                                   BLOCK=block, num_warps=4)
    return out
