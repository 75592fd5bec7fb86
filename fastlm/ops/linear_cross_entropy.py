"""``fastlm.ops.linear_cross_entropy``: ``cross_entropy(hidden @ weight.T + bias, labels)``
without the ``(tokens, vocab)`` logits.

Sparse prediction: rows whose label is ``ignore_index`` are dropped before the matmul
(a masked-LM batch labels ~15% of its tokens, so ~85% of the head's work disappears).
The remaining rows go through the backend's chunk loop (``chunk_rows`` rows at a time:
chunk logits -> fused cross-entropy kernel), so at most one ``(chunk_rows, vocab)``
block of logits and one of gradient exist at a time.  The backward recomputes each
chunk's logits; :mod:`fastlm.reference.linear_cross_entropy` explains that choice and
holds the shared chunk loop.

Synchronisation: dropping rows needs their count on the host, so on a GPU the op makes
exactly one host synchronisation per forward and one per backward (``nonzero``).
"""
from __future__ import annotations

import os

import torch

from fastlm import registry
from fastlm.ops._common import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor
from fastlm.ops.cross_entropy import (acc_dtype, check_loss_args, maybe_check_labels, reduce_rows,
                                      row_scale)
from fastlm.registry import Implementation, Problem

_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A chunk's logits block is kept near this size (fp32 bytes): with its gradient block
# that is 2 x 16 MiB beside the fp32 weight gradient (94 MB for 30,522 x 768).
CHUNK_BYTES = 16 * 2**20

registry.register(
    Implementation("linear_cross_entropy", "reference", "fastlm.reference.linear_cross_entropy", FLOAT_DTYPES),
    Implementation("linear_cross_entropy", "cpu", "fastlm_C", _FAST_DTYPES),
    Implementation("linear_cross_entropy", "triton", "fastlm.kernels.cross_entropy", _FAST_DTYPES),
    Implementation("linear_cross_entropy", "cuda", "fastlm_C", _FAST_DTYPES),
)


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk: ``FASTLM_LCE_CHUNK_ROWS`` if set, else what fits :data:`CHUNK_BYTES`."""
    env = os.environ.get("FASTLM_LCE_CHUNK_ROWS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"FASTLM_LCE_CHUNK_ROWS must be a positive integer, got {env!r}")
        return int(env)
    return max(1, CHUNK_BYTES // (4 * vocab))


def _select(hidden, weight, backend: str):
    problem = Problem.of(hidden.device, hidden.dtype, vocab=weight.shape[0], hidden=weight.shape[1])
    return registry.select("linear_cross_entropy", problem, backend)


def _labelled_rows(hidden, labels, ignore_index: int):
    """Indices of the labelled rows (one host sync on a GPU) and those rows' data."""
    idx = (labels != ignore_index).nonzero().squeeze(1)
    if idx.numel() == labels.numel():  # nothing to drop: avoid copying hidden
        return idx, hidden, labels
    return idx, hidden.index_select(0, idx), labels.index_select(0, idx)


@torch.library.custom_op("fastlm::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          labels: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                          reduction: str, chunk_rows: int, backend: str) -> torch.Tensor:
    impl = _select(hidden, weight, backend)
    maybe_check_labels(labels, weight.shape[0], ignore_index)
    idx, h, y = _labelled_rows(hidden, labels, ignore_index)
    acc = acc_dtype(hidden.dtype)
    if idx.numel() == 0:
        rows = hidden.new_zeros(0, dtype=acc)
    else:
        rows = impl.function("forward")(h, weight, bias, y, ignore_index, label_smoothing, z_loss, chunk_rows)
    if reduction == "none":
        if idx.numel() != labels.numel():
            rows = hidden.new_zeros(labels.shape[0], dtype=acc).index_copy_(0, idx, rows)
        return rows.to(hidden.dtype)
    return reduce_rows(rows, idx.numel(), reduction).to(hidden.dtype)


@_linear_cross_entropy.register_fake
def _(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, reduction, chunk_rows, backend):
    return hidden.new_empty(labels.shape if reduction == "none" else ())


@torch.library.custom_op("fastlm::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                   bias: torch.Tensor | None, labels: torch.Tensor, ignore_index: int,
                                   label_smoothing: float, z_loss: float, reduction: str, chunk_rows: int,
                                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _select(hidden, weight, backend)
    idx, h, y = _labelled_rows(hidden, labels, ignore_index)
    if idx.numel() == 0:
        grad_bias = torch.zeros_like(bias) if bias is not None else hidden.new_empty(0)
        return torch.zeros_like(hidden), torch.zeros_like(weight), grad_bias
    if reduction == "none":
        grad_loss = grad_loss.index_select(0, idx)
    scale = row_scale(grad_loss, idx.numel(), idx.numel(), reduction, acc_dtype(hidden.dtype))
    grad_h, grad_w, grad_b = impl.function("backward")(h, weight, bias, y, scale, ignore_index, label_smoothing,
                                                       z_loss, chunk_rows)
    if idx.numel() != labels.numel():
        grad_h = torch.zeros_like(hidden).index_copy_(0, idx, grad_h)
    return grad_h, grad_w, grad_b


@_linear_cross_entropy_backward.register_fake
def _(grad_loss, hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, reduction, chunk_rows,
      backend):
    grad_bias = torch.empty_like(bias) if bias is not None else hidden.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), grad_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, *args = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, bias if bias is not None else hidden.new_empty(0), labels)
    ctx.args = args


def _backward(ctx, grad_loss):
    hidden, weight, bias, labels = ctx.saved_tensors
    grad_h, grad_w, grad_b = _linear_cross_entropy_backward(grad_loss, hidden, weight,
                                                            bias if ctx.has_bias else None, labels, *ctx.args)
    return (grad_h, grad_w, grad_b if ctx.has_bias else None) + (None,) * 7


_linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: str = "mean", z_loss: float = 0.0,
                         chunk_size: int | None = None, backend: str = "auto"):
    """``cross_entropy(hidden @ weight.T + bias, labels)`` without materialising the logits.

    Args:
        hidden: ``(N, H)`` or ``(..., H)`` float16/bfloat16/float32/float64.
        weight: ``(V, H)``, same dtype (e.g. a decoder tied to the input embeddings: the
            gradients from both uses add up through autograd).
        labels: ``(N,)`` / ``(...)`` int64 matching ``hidden.shape[:-1]``; rows equal to
            ``ignore_index`` are dropped before the matmul and get zero gradient.
        bias: ``(V,)`` or None, same dtype.
        ignore_index, label_smoothing, reduction, z_loss: as :func:`fastlm.ops.cross_entropy`
            (same semantics, same exception: all rows ignored under ``"mean"`` -> 0.0).
        chunk_size: rows of logits computed at once (memory bound: ``chunk_size * V``
            logits plus as many gradients); default ``FASTLM_LCE_CHUNK_ROWS`` or ~16 MiB
            of fp32 logits.

    Returns the loss in ``hidden``'s dtype (shape of ``labels`` for ``"none"``).
    Gradients flow to ``hidden``, ``weight`` and ``bias``; the weight and bias gradients
    are accumulated in fp32 across chunks.  Out-of-range labels: ValueError for CPU
    tensors; on a GPU the loss is NaN (see :func:`fastlm.ops.cross_entropy`).  On a GPU
    the forward and the backward each make one host synchronisation (counting the
    labelled rows).
    """
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
    label_smoothing, z_loss = check_loss_args(labels, ignore_index, label_smoothing, z_loss, reduction)
    check_same_dtype(hidden=hidden, weight=weight, bias=bias)
    check_same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (vocab, hidden.shape[-1] = {hidden.shape[-1]}), "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (vocab size 0)")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must have shape (vocab,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if chunk_size is None:
        chunk_size = default_chunk_rows(weight.shape[0])
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    backend = registry.check_backend_name(backend)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    flat_labels = labels.reshape(-1).contiguous()
    loss = _linear_cross_entropy(flat_hidden, weight.contiguous(), None if bias is None else bias.contiguous(),
                                 flat_labels, ignore_index, label_smoothing, z_loss, reduction, chunk_size, backend)
    return loss.reshape(labels.shape) if reduction == "none" else loss
