"""Cross-entropy on PyTorch's fused log-softmax (the ``torch`` backend).

Contract: :mod:`fastlm.reference.cross_entropy` (same functions, arguments and results).

Numerics: ``log_softmax(x, dtype=float32)`` is one fused kernel that reads bf16/fp16
logits and writes fp32 ``(x - max) - log(sum(exp(x - max)))``: the loss is formed from
it without subtracting a rounded lse from a logit (the contract's rule), and the
gradient ``softmax * rowscale - eps / V`` is rounded to the logits' dtype once, except
its label column, formed in fp32 from the gathered log-probability and written after.

Memory traffic per logit, bf16 (a fused kernel reads 2 and writes 2 bytes): log-softmax
reads 2, writes 4; ``exp_`` in place reads and writes 4; one ``addcmul`` reads 4 and
writes the 2-byte gradient: 20 bytes, ~5x the fused kernels' 4, with an fp32
``(N, V)`` temporary.  (The reference kernels move ~50 and hold several such temporaries;
linear_cross_entropy bounds N per chunk.)  Label smoothing reads the log-probabilities
once more (their mean); z-loss twice (two row maxima).  No host synchronisation.
"""
from __future__ import annotations

import torch


def cross_entropy_forward(logits, labels, ignore_index: int, label_smoothing: float, z_loss: float,
                          with_grad: bool):
    n, v = logits.shape
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < v)
    # NaN marks labelled rows whose label is out of range (0 elsewhere): their loss and gradient.
    poison = torch.where(valid & ~in_range, float("nan"), 0.0)
    safe = torch.where(in_range, labels, 0).unsqueeze(1)
    logp = torch.log_softmax(logits, dim=1, dtype=torch.float32)
    picked = logp.gather(1, safe).squeeze(1)
    loss = -(1.0 - label_smoothing) * picked
    if label_smoothing > 0.0:  # skipped at 0 so that -inf logits do not turn 0 * -inf into NaN
        loss = loss - label_smoothing * logp.mean(dim=1)
    if z_loss > 0.0:
        # lse = max(x) - max(logp): log_softmax is monotone, its row maximum is -log(sum exp(x - max)).
        lse = logits.amax(dim=1).float() - logp.amax(dim=1)
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss + poison, 0.0)
    if not with_grad:
        return loss, logits.new_empty(0)
    # d loss / d x = softmax * rowscale - eps / V - (1 - eps) * onehot(label), rowscale = 1 + 2 z lse;
    # ignored rows get rowscale = shift = 0.
    rowscale = valid.float() if z_loss == 0.0 else torch.where(valid, 1.0 + 2.0 * z_loss * lse, 0.0)
    rowscale = (rowscale + poison).unsqueeze(1)
    shift = torch.where(valid, -label_smoothing / v, 0.0).unsqueeze(1)
    probs = logp.exp_()  # logp is not needed any more: reuse its memory
    grad = torch.addcmul(shift, probs, rowscale, out=torch.empty_like(logits))  # one rounding to the logits' dtype
    label_grad = picked.exp().unsqueeze(1) * rowscale + shift - (1.0 - label_smoothing) * valid.unsqueeze(1)
    grad.scatter_(1, safe, label_grad.to(grad.dtype))
    return loss, grad


def cross_entropy_backward(grad_rows, scale):
    """``grad_rows * scale[:, None]``: fp32 products (the fp32 ``scale`` promotes them),
    rounded once into a tensor of ``grad_rows``' dtype."""
    return torch.mul(grad_rows, scale.unsqueeze(1), out=torch.empty_like(grad_rows))
