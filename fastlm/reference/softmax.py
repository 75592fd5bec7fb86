"""Fused scale-mask-softmax-dropout in pure PyTorch: the ground truth and the fallback
on every device (fp32 accumulation; float64 stays float64).

Kernel-level contract, shared by every backend (``fastlm.reference.softmax``,
``fastlm.kernels.softmax``, ``torch.ops.fastlm_C`` on CPU and CUDA).  The op
(:mod:`fastlm.ops.softmax`) canonicalises every call to it:

``softmax_forward(x, mask, scale, dropout_p, seed) -> (out, probs)``
    x:     (R, N) contiguous; softmax over each of the R rows of length N.
    mask:  None, or a 4-D view (D0, D1, D2, N) with D0 * D1 * D2 == R and arbitrary
           strides (stride 0 where the user's mask broadcasts: it is never expanded
           in memory).  Row r reads mask[r // (D1*D2), (r // D2) % D1, r % D2, :].
           bool: True = keep (False -> -inf); otherwise x.dtype, added after scaling.
    scale: python float, applied to x before the mask.
    dropout_p, seed: dropout probability in [0, 1) and a python int (ignored when
           dropout_p == 0).  Every backend derives the dropout bits from (seed, row,
           column) alone, so the backward regenerates the mask.
    out:   (R, N) x.dtype, dropout(softmax(x * scale + mask)), kept values / (1 - p).
    probs: the pre-dropout probabilities (R, N) when dropout_p > 0 (the backward needs
           them); otherwise an empty (0,) tensor (out itself is then the probabilities:
           a custom op may not return an alias).
    A row whose entries are all -inf after masking gives zeros (not NaN, unlike
    F.softmax) and, in the backward, zero gradients.

``softmax_backward(grad, y, scale, dropout_p, seed) -> dx``
    grad, y: (R, N) contiguous, y the pre-dropout probabilities.
    dx = scale * y * (g - sum(g * y)) with g = grad * keep / (1 - p), per row.
"""
from __future__ import annotations

import torch

from fastlm.ops._common import acc_dtype

def _keep(shape, device, dropout_p: float, seed: int) -> torch.Tensor:
    """The dropout keep-mask for this seed: a generator seeded with it regenerates it exactly."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= dropout_p


def softmax_forward(x, mask, scale: float, dropout_p: float, seed):
    cdt = acc_dtype(x.dtype)
    rows = x.shape[0]
    z = x.to(cdt) * scale
    if mask is not None:
        # Work on the 4-D view so the broadcast (stride-0) mask is never materialised.
        z = z.view(mask.shape)
        z = z.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else z + mask.to(cdt)
        z = z.reshape(rows, -1)
    zmax = z.amax(dim=-1, keepdim=True)
    # A row that is all -inf has max -inf: shift by 0 instead so exp gives zeros, not NaN.
    zmax = torch.where(zmax == float("-inf"), torch.zeros_like(zmax), zmax)
    e = torch.exp(z - zmax)
    total = e.sum(dim=-1, keepdim=True)
    # total >= 1 whenever the row has a finite maximum; 0 only for all -inf rows.
    y = e / torch.where(total == 0, torch.ones_like(total), total)
    if dropout_p == 0.0:
        return y.to(x.dtype), x.new_empty((0,))
    keep = _keep(x.shape, x.device, dropout_p, seed)
    out = torch.where(keep, y * (1.0 / (1.0 - dropout_p)), torch.zeros_like(y))
    return out.to(x.dtype), y.to(x.dtype)


def softmax_backward(grad, y, scale: float, dropout_p: float, seed):
    cdt = acc_dtype(y.dtype)
    g = grad.to(cdt)
    yf = y.to(cdt)
    if dropout_p > 0.0:
        keep = _keep(y.shape, y.device, dropout_p, seed)
        g = torch.where(keep, g * (1.0 / (1.0 - dropout_p)), torch.zeros_like(g))
    dz = yf * (g - (g * yf).sum(dim=-1, keepdim=True))
    return (dz * scale).to(y.dtype)
