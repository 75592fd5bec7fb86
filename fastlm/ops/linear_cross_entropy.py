"""``fastlm.ops.linear_cross_entropy``: ``cross_entropy(hidden @ weight.T + bias, labels)``
without the ``(tokens, vocab)`` logits: one chunk loop over the cross-entropy backends.

Sparse prediction: rows whose label is ``ignore_index`` are dropped before the matmul
(a masked-LM batch labels ~15% of its tokens, so ~85% of the head's work disappears).
The remaining rows go ``chunk_rows`` at a time through: chunk logits (one matmul), then
the fused kernel of the ``cross_entropy`` backend that :func:`fastlm.registry.select`
picks for such logits (same device, dtype and vocab).  So this op runs on every
cross-entropy backend, with that backend's trust status, and has no kernels of its own.

Memory: at most one ``(chunk_rows, V)`` block of logits and one of their gradient exist
at a time (``chunk_rows`` from :func:`chunk_rows`: ~16 MiB of fp32 logits on a CPU).  The
backward RECOMPUTES each chunk's logits rather than the forward saving gradients.
Saving them (as Liger's fused linear-CE does) keeps an fp32 ``(V, H)`` weight gradient
alive from forward to backward and needs a second one when the backward scales it by
``grad_output`` out of place (a custom op may not scale its saved input in place):
2 x 94 MB for BERT's 30,522 x 768 head.  Recomputing costs one more ``(chunk, H) x (H, V)``
matmul per chunk (4 matmuls instead of 3, +33% head FLOPs) and holds one weight
gradient, during the backward only; for an fp32 (fp64) weight the chunks accumulate
straight into the returned gradient.  Bias and low-precision weight gradients
accumulate in fp32 across chunks and are rounded once.

Synchronisation: dropping rows needs their count on the host, so on a GPU the op makes
exactly one host synchronisation per forward and one per backward (``nonzero``).
"""
from __future__ import annotations

import os

import torch

from fastlm import registry
from fastlm.ops import _common
from fastlm.ops._common import acc_dtype
from fastlm.ops.cross_entropy import check_loss_args, maybe_check_labels, problem, reduce_rows, row_scale
from fastlm.registry import Implementation

registry.register_composite("linear_cross_entropy", via="cross_entropy",
                            how="chunked matmul, then the cross_entropy kernels on each chunk of logits")

# Bytes of fp32 logits per chunk, by device type (devices without an entry use the CPU's).
# A chunk's logits block and its gradient block sit beside the weight gradient (94 MB
# in fp32 for 30,522 x 768): 2 x 16 MiB on a CPU.
CHUNK_BYTES = {"cpu": 16 * 2**20}


def chunk_rows(device_type: str, vocab: int) -> int:
    """Rows per chunk: ``FASTLM_LCE_CHUNK_ROWS`` if set, else what fits the device's
    :data:`CHUNK_BYTES` of fp32 logits."""
    env = os.environ.get("FASTLM_LCE_CHUNK_ROWS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"FASTLM_LCE_CHUNK_ROWS must be a positive integer, got {env!r}")
        return int(env)
    return max(1, CHUNK_BYTES.get(device_type, CHUNK_BYTES["cpu"]) // (4 * vocab))


def _select(hidden: torch.Tensor, weight: torch.Tensor, backend: str) -> Implementation:
    """The cross_entropy backend for this call's chunk logits."""
    return registry.select("cross_entropy", problem(hidden.device, hidden.dtype, weight.shape[0]), backend,
                           hidden=hidden, weight=weight)


def _labelled_rows(hidden, labels, ignore_index: int):
    """Indices of the labelled rows (one host sync on a GPU) and those rows' data."""
    idx = (labels != ignore_index).nonzero().squeeze(1)
    if idx.numel() == labels.numel():  # nothing to drop: avoid copying hidden
        return idx, hidden, labels
    return idx, hidden.index_select(0, idx), labels.index_select(0, idx)


def _chunks(rows: int, size: int):
    return ((start, min(start + size, rows)) for start in range(0, rows, size))


def _logits(h, weight, bias):
    return torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())


# ------------------------------------------------------------------------ registered ops
@torch.library.custom_op("fastlm::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             labels: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                             reduction: str, chunk_rows: int, backend: str) -> torch.Tensor:
    ce_forward = _select(hidden, weight, backend).function("forward")
    maybe_check_labels(labels, weight.shape[0], ignore_index)
    idx, h, y = _labelled_rows(hidden, labels, ignore_index)
    acc = acc_dtype(hidden.dtype)
    rows = hidden.new_empty(idx.numel(), dtype=acc)
    for start, end in _chunks(idx.numel(), chunk_rows):
        chunk_loss, _ = ce_forward(_logits(h[start:end], weight, bias), y[start:end], ignore_index,
                                   label_smoothing, z_loss, False)
        rows[start:end] = chunk_loss
    if reduction == "none":
        if idx.numel() != labels.numel():
            rows = hidden.new_zeros(labels.shape[0], dtype=acc).index_copy_(0, idx, rows)
        return rows
    return reduce_rows(rows, idx.numel(), reduction)


@_linear_cross_entropy_op.register_fake
def _linear_cross_entropy_fake(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, reduction,
                               chunk_rows, backend):
    return hidden.new_empty(labels.shape if reduction == "none" else (), dtype=acc_dtype(hidden.dtype))


@torch.library.custom_op("fastlm::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                      bias: torch.Tensor | None, labels: torch.Tensor, ignore_index: int,
                                      label_smoothing: float, z_loss: float, reduction: str, chunk_rows: int,
                                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _select(hidden, weight, backend)
    ce_forward, ce_backward = impl.function("forward"), impl.function("backward")
    idx, h, y = _labelled_rows(hidden, labels, ignore_index)
    if idx.numel() == 0:
        grad_bias = torch.zeros_like(bias) if bias is not None else hidden.new_empty(0)
        return torch.zeros_like(hidden), torch.zeros_like(weight), grad_bias
    acc = acc_dtype(weight.dtype)
    if reduction == "none":
        grad_loss = grad_loss.index_select(0, idx)
    scale = row_scale(grad_loss, idx.numel(), idx.numel(), reduction, acc)
    grad_h = torch.empty_like(h)
    grad_w = weight.new_zeros(weight.shape, dtype=acc)  # for an fp32 weight: the returned gradient
    grad_b = weight.new_zeros(weight.shape[0], dtype=acc) if bias is not None else None
    for start, end in _chunks(idx.numel(), chunk_rows):
        hc = h[start:end]
        # The logits die inside this line: one (chunk, V) block beside its gradient.
        _, g = ce_forward(_logits(hc, weight, bias), y[start:end], ignore_index, label_smoothing, z_loss, True)
        g = ce_backward(g, scale[start:end])
        torch.mm(g, weight, out=grad_h[start:end])
        if g.dtype == acc:
            grad_w.addmm_(g.t(), hc)
        else:  # bf16/fp16: the GEMM accumulates in fp32 within a chunk, grad_w across chunks
            grad_w += torch.mm(g.t(), hc)
        if grad_b is not None:
            grad_b += g.sum(0, dtype=acc)
        del g  # else it would live on beside the next chunk's logits and gradient
    if idx.numel() != labels.numel():
        grad_h = torch.zeros_like(hidden).index_copy_(0, idx, grad_h)
    grad_b = grad_b.to(bias.dtype) if bias is not None else hidden.new_empty(0)
    return grad_h, grad_w.to(weight.dtype), grad_b


@_linear_cross_entropy_backward_op.register_fake
def _linear_cross_entropy_backward_fake(grad_loss, hidden, weight, bias, labels, ignore_index, label_smoothing,
                                        z_loss, reduction, chunk_rows, backend):
    grad_bias = torch.empty_like(bias) if bias is not None else hidden.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), grad_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, *args = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, bias if bias is not None else hidden.new_empty(0), labels)
    ctx.args = args


def _backward(ctx, grad_loss):
    hidden, weight, bias, labels = ctx.saved_tensors
    grad_h, grad_w, grad_b = _linear_cross_entropy_backward_op(grad_loss, hidden, weight,
                                                               bias if ctx.has_bias else None, labels, *ctx.args)
    return (grad_h, grad_w, grad_b if ctx.has_bias else None) + (None,) * 7


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------- public function
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
            logits plus as many gradients); default ``FASTLM_LCE_CHUNK_ROWS`` or
            :func:`chunk_rows` (~16 MiB of fp32 logits on a CPU).
        backend: the ``cross_entropy`` backend that runs each chunk ("auto", "reference",
            "cpu", "triton" or "cuda"; see ``fastlm info``).

    Returns the loss in float32 (float64 for float64 inputs; shape of ``labels`` for
    ``"none"``): the logits of each chunk are those of a ``hidden.dtype`` matmul, as a
    dense head's, but the loss is reduced and returned without rounding to bf16/fp16,
    as transformers' losses (which upcast the logits) are.  Gradients flow to ``hidden``,
    ``weight`` and ``bias`` in their dtypes; the weight and bias gradients are
    accumulated in fp32 across chunks.  Out-of-range labels: ValueError for CPU tensors;
    on a GPU the loss is NaN (see :func:`fastlm.ops.cross_entropy`).  On a GPU the
    forward and the backward each make one host synchronisation (counting the labelled
    rows).
    """
    _common.check_tensor("hidden", hidden, dtypes=_common.FLOAT_DTYPES, min_ndim=1)
    _common.check_tensor("weight", weight, dtypes=_common.FLOAT_DTYPES, ndim=2)
    if bias is not None:
        _common.check_tensor("bias", bias, dtypes=_common.FLOAT_DTYPES, ndim=1)
    label_smoothing, z_loss = check_loss_args(labels, ignore_index, label_smoothing, z_loss, reduction)
    _common.check_same_dtype(hidden=hidden, weight=weight, bias=bias)
    _common.check_same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
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
        chunk_size = chunk_rows(hidden.device.type, weight.shape[0])
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    backend = registry.check_backend_name(backend)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    flat_labels = labels.reshape(-1).contiguous()
    loss = _linear_cross_entropy_op(flat_hidden, weight.contiguous(), None if bias is None else bias.contiguous(),
                                    flat_labels, ignore_index, label_smoothing, z_loss, reduction, chunk_size,
                                    backend)
    return loss.reshape(labels.shape) if reduction == "none" else loss
