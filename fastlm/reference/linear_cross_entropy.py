"""Linear + cross-entropy in chunks of rows: the reference kernels and the chunk loop
that the Triton backend shares (the C++ backends run the same loop in
``csrc/cpu/linear_cross_entropy.cpp``).

Kernel-level contract (every backend of ``fastlm::linear_cross_entropy``):

``linear_cross_entropy_forward(hidden, weight, bias, labels, ignore_index, label_smoothing,
z_loss, chunk_rows) -> loss_rows``

* ``hidden`` ``(M, H)`` contiguous, ``weight`` ``(V, H)``, ``bias`` ``(V,)`` or None,
  ``labels`` ``(M,)`` int64 (the op has already dropped the ignored rows, but a kernel
  treats an ``ignore_index`` label like :mod:`fastlm.reference.cross_entropy` does).
* ``loss_rows`` ``(M,)`` float32 (float64 for float64 inputs): the cross-entropy rows of
  ``hidden @ weight.T + bias``, computed ``chunk_rows`` rows at a time so at most one
  ``(chunk_rows, V)`` block of logits exists.

``linear_cross_entropy_backward(hidden, weight, bias, labels, scale, ignore_index,
label_smoothing, z_loss, chunk_rows) -> (grad_hidden, grad_weight, grad_bias)``

* ``scale`` ``(M,)`` float32/float64: d loss / d loss_rows (grad_output over the
  reduction's normaliser).
* ``grad_hidden`` ``(M, H)``, ``grad_weight`` ``(V, H)`` accumulated over chunks in fp32
  and returned in the weight's dtype, ``grad_bias`` ``(V,)`` (an empty tensor without bias).

Memory/time choice: the backward RECOMPUTES each chunk's logits rather than the forward
saving gradients.  Saving them (as Liger's fused linear-CE does) keeps an fp32
``(V, H)`` weight gradient alive from forward to backward and needs a second one when
backward scales it by grad_output out of place (a custom op may not scale its saved
input in place): 2 x 94 MB for BERT's 30,522 x 768 head.  Recomputing costs one more
``(chunk, H) x (H, V)`` matmul per chunk (4 matmuls instead of 3, +33% head FLOPs) and
holds only one weight gradient, during backward.  Peak extra memory is then the fp32
weight gradient plus two ``(chunk_rows, V)`` blocks (logits/gradient) per chunk.
"""
from __future__ import annotations

import torch

from fastlm.reference.cross_entropy import cross_entropy_backward, cross_entropy_forward


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(h, weight, bias):
    return torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())


def chunked_forward(ce_forward, hidden, weight, bias, labels, ignore_index: int, label_smoothing: float,
                    z_loss: float, chunk_rows: int):
    """The forward chunk loop, with ``ce_forward`` (a backend's cross_entropy_forward)."""
    m = hidden.shape[0]
    loss = torch.empty(m, dtype=_acc_dtype(hidden.dtype), device=hidden.device)
    for start in range(0, m, chunk_rows):
        end = min(start + chunk_rows, m)
        logits = _chunk_logits(hidden[start:end], weight, bias)
        rows, _ = ce_forward(logits, labels[start:end], ignore_index, label_smoothing, z_loss, False)
        loss[start:end] = rows
    return loss


def chunked_backward(ce_forward, ce_backward, hidden, weight, bias, labels, scale, ignore_index: int,
                     label_smoothing: float, z_loss: float, chunk_rows: int):
    """The backward chunk loop: recompute a chunk's logits, its fused CE gradient, then
    the three matmul/sum gradients; the weight and bias gradients accumulate in fp32."""
    m = hidden.shape[0]
    acc = _acc_dtype(weight.dtype)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if bias is not None else None
    for start in range(0, m, chunk_rows):
        end = min(start + chunk_rows, m)
        h = hidden[start:end]
        logits = _chunk_logits(h, weight, bias)
        _, g = ce_forward(logits, labels[start:end], ignore_index, label_smoothing, z_loss, True)
        del logits  # at most two (chunk, V) blocks alive at once
        g = ce_backward(g, scale[start:end])
        torch.mm(g, weight, out=grad_hidden[start:end])
        if g.dtype == acc:
            grad_weight.addmm_(g.t(), h)
        else:  # bf16/fp16: the GEMM accumulates in fp32 within a chunk, grad_weight across chunks
            grad_weight += torch.mm(g.t(), h)
        if grad_bias is not None:
            grad_bias += g.sum(0, dtype=acc)
    grad_bias = grad_bias.to(bias.dtype) if bias is not None else hidden.new_empty(0)
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias


def linear_cross_entropy_forward(hidden, weight, bias, labels, ignore_index: int, label_smoothing: float,
                                 z_loss: float, chunk_rows: int):
    return chunked_forward(cross_entropy_forward, hidden, weight, bias, labels, ignore_index, label_smoothing,
                           z_loss, chunk_rows)


def linear_cross_entropy_backward(hidden, weight, bias, labels, scale, ignore_index: int, label_smoothing: float,
                                  z_loss: float, chunk_rows: int):
    return chunked_backward(cross_entropy_forward, cross_entropy_backward, hidden, weight, bias, labels, scale,
                            ignore_index, label_smoothing, z_loss, chunk_rows)
