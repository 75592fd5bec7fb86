"""Cross-entropy kernels in plain PyTorch: the ground truth and the fallback on every device.

Kernel-level contract (shared by every backend of ``fastlm::cross_entropy``):

``cross_entropy_forward(logits, labels, ignore_index, label_smoothing, z_loss, with_grad)
-> (loss_rows, grad_rows)``

* ``logits`` ``(N, V)`` with contiguous rows, ``labels`` ``(N,)`` int64.
* ``loss_rows`` ``(N,)`` in the accumulation dtype (float32; float64 for float64 logits):
  for a labelled row ``lse - (1 - eps) * x[y] - eps * mean(x) + z_loss * lse**2`` with
  ``lse = logsumexp(x)`` (PyTorch's label smoothing); 0 for a row whose label is
  ``ignore_index``.  Every backend evaluates it as ``log(s) - (1 - eps) * (x[y] - m)
  - eps * mean(x - m) + z_loss * (m + log(s))**2`` with ``m = max(x)`` and
  ``s = sum(exp(x - m))``, never subtracting the rounded ``lse`` from a logit (large
  logits keep their precision).  A -inf logit with ``eps > 0`` makes the loss +inf
  (its gradient stays finite), a row of only -inf logits NaN, as in PyTorch.
* ``grad_rows`` ``(N, V)`` in the logits' dtype: d loss_rows[i] / d logits[i], i.e.
  ``softmax(x) * (1 + 2 z_loss lse) - eps / V - (1 - eps) * onehot(y)``, with
  ``softmax(x) = exp(x - m) / s``; zeros for ignored rows; an empty tensor when ``with_grad`` is False.
* A label outside ``[0, V)`` that is not ``ignore_index`` yields NaN in its loss and
  gradient row (the op layer raises ValueError for CPU tensors before calling a kernel;
  on a GPU the NaN is the device-side flag, see ``fastlm.ops.cross_entropy``).

``cross_entropy_backward(grad_rows, scale) -> grad_logits``: ``grad_rows * scale[:, None]``
computed in fp32, returned in ``grad_rows``' dtype; ``scale`` ``(N,)`` float32 holds
``grad_output`` already divided by the reduction's normaliser.
"""
from __future__ import annotations

import torch

from fastlm.ops._common import acc_dtype


def cross_entropy_forward(logits, labels, ignore_index: int, label_smoothing: float, z_loss: float,
                          with_grad: bool):
    n, v = logits.shape
    x = logits.to(acc_dtype(logits.dtype))
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < v)
    # NaN marks labelled rows whose label is out of range (0 elsewhere).
    poison = torch.where(valid & ~in_range, float("nan"), 0.0).to(x.dtype)
    safe = torch.where(in_range, labels, 0).unsqueeze(1)
    # Numerics: log_softmax keeps x - max apart from log(sum exp(x - max)), as every
    # backend does.  Forming lse = logsumexp(x) first and then lse - x[y] or
    # exp(x - lse) rounds lse at its own magnitude: fp32 logits near 1e4 would lose
    # about three digits (ulp(1e4) ~ 1e-3) in the loss and the gradient.
    logp = torch.log_softmax(x, dim=1)
    loss = -(1.0 - label_smoothing) * logp.gather(1, safe).squeeze(1)
    if label_smoothing > 0.0:  # skipped at 0 so that -inf logits do not turn 0 * -inf into NaN
        loss = loss - label_smoothing * logp.mean(dim=1)
    if z_loss > 0.0:
        lse = torch.logsumexp(x, dim=1)
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss + poison, 0.0)
    if not with_grad:
        return loss, logits.new_empty(0)
    grad = torch.exp(logp)
    if z_loss > 0.0:
        grad = grad * (1.0 + 2.0 * z_loss * lse).unsqueeze(1)
    grad = grad - label_smoothing / v
    grad = grad.scatter_add(1, safe, torch.full_like(loss, -(1.0 - label_smoothing)).unsqueeze(1))
    grad = torch.where(valid.unsqueeze(1), grad + poison.unsqueeze(1), 0.0)
    return loss, grad.to(logits.dtype)


def cross_entropy_backward(grad_rows, scale):
    acc = acc_dtype(grad_rows.dtype)
    return (grad_rows.to(acc) * scale.to(acc).unsqueeze(1)).to(grad_rows.dtype)
