"""``fastlm.ops.cross_entropy``: fused softmax cross-entropy over materialised logits.

The op ``fastlm::cross_entropy`` runs one kernel that makes a single sweep over each
row: an online log-sum-exp gives the loss, and the same kernel writes the gradient of
each row's loss into a buffer shaped like the logits.  Backward
(``fastlm::cross_entropy_backward``) only scales that buffer by ``grad_output``.
DRAM traffic: forward reads the logits once and writes the gradient once (the second
sweep over a row that computes its gradient is served from cache); backward reads and
writes the gradient once.  The forward skips the gradient when the logits do not
require one.
"""
from __future__ import annotations

import os

import torch

from fastlm import registry
from fastlm.ops import _common
from fastlm.ops._common import acc_dtype
from fastlm.registry import Implementation, Problem

FEATURES = frozenset()  # label smoothing and z-loss are served by every backend
REDUCTIONS = ("mean", "sum", "none")
_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

registry.register(
    Implementation("cross_entropy", "reference", "fastlm.reference.cross_entropy", _common.FLOAT_DTYPES),
    Implementation("cross_entropy", "cpu", "fastlm_C", _FAST_DTYPES),
    Implementation("cross_entropy", "triton", "fastlm.kernels.cross_entropy", _FAST_DTYPES),
    Implementation("cross_entropy", "cuda", "fastlm_C", _FAST_DTYPES),
)


def problem(device: torch.device, dtype: torch.dtype, vocab: int) -> Problem:
    """What a call on ``(N, vocab)`` logits needs from a backend (linear_cross_entropy asks too)."""
    return Problem.of(device, dtype, length=vocab)


def _select(logits: torch.Tensor, backend: str) -> Implementation:
    return registry.select("cross_entropy", problem(logits.device, logits.dtype, logits.shape[-1]), backend,
                           logits=logits)


# ----------------------------------------------------------- shared with linear_cross_entropy
def check_loss_args(labels, ignore_index, label_smoothing, z_loss, reduction) -> tuple[float, float]:
    """Validate the loss arguments common to both cross-entropy ops."""
    _common.check_tensor("labels", labels)
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be an int64 tensor of class indices, got dtype {str(labels.dtype).replace('torch.', '')}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    for name, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not float(z_loss) >= 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return float(label_smoothing), float(z_loss)


def check_labels_in_range(labels, vocab: int, ignore_index: int) -> None:
    """Raise ValueError for a label outside ``[0, vocab)`` that is not ``ignore_index``.

    Called inside the ops (so it never breaks a torch.compile graph) for CPU tensors
    only, where it costs no device synchronisation.  On a GPU the kernels instead write
    NaN into the loss (and gradient) of such a row: the reduced loss becomes NaN, which
    the training loop sees at the synchronisation it already makes when it reads the
    loss.  ``FASTLM_CHECK_LABELS=1`` opts GPU calls into this synchronous check too.
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"labels[{i}] = {int(labels[i])} (flattened index)")


def maybe_check_labels(labels, vocab: int, ignore_index: int) -> None:
    if labels.device.type == "cpu" or os.environ.get("FASTLM_CHECK_LABELS", "0") not in ("", "0"):
        check_labels_in_range(labels, vocab, ignore_index)


def _normaliser(count, dtype):
    """max(count, 1) for an int or a 0-d tensor: 'mean' over zero labelled rows is 0, not NaN."""
    return count.clamp(min=1).to(dtype) if isinstance(count, torch.Tensor) else float(max(count, 1))


def reduce_rows(rows, count, reduction: str):
    """Per-row losses -> the requested reduction ('mean' divides by ``count`` labelled rows)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / _normaliser(count, rows.dtype)


def row_scale(grad_loss, count, n_rows: int, reduction: str, dtype: torch.dtype):
    """d(reduced loss)/d(loss_rows) times grad_output, one value per row: ``(n_rows,)`` contiguous."""
    g = grad_loss.to(dtype)
    if reduction == "none":
        return g.contiguous()
    if reduction == "mean":
        g = g / _normaliser(count, dtype)
    return g.expand(n_rows).contiguous()


# ------------------------------------------------------------------------ registered ops
@torch.library.custom_op("fastlm::cross_entropy", mutates_args=())
def _cross_entropy_op(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, label_smoothing: float,
                   z_loss: float, reduction: str, with_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _select(logits, backend)
    n, v = logits.shape
    maybe_check_labels(labels, v, ignore_index)
    if n == 0:
        rows = logits.new_zeros(0, dtype=acc_dtype(logits.dtype))
        grad = logits.new_zeros(logits.shape) if with_grad else logits.new_empty(0)
    else:
        rows, grad = impl.function("forward")(logits, labels, ignore_index, label_smoothing, z_loss, with_grad)
    # Reduced in the accumulation dtype; only the result is rounded to the logits' dtype.
    return reduce_rows(rows, (labels != ignore_index).sum(), reduction).to(logits.dtype), grad


@_cross_entropy_op.register_fake
def _cross_entropy_fake(logits, labels, ignore_index, label_smoothing, z_loss, reduction, with_grad, backend):
    loss = logits.new_empty(labels.shape if reduction == "none" else ())
    return loss, (torch.empty_like(logits) if with_grad else logits.new_empty(0))


@torch.library.custom_op("fastlm::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(grad_loss: torch.Tensor, grad_rows: torch.Tensor, labels: torch.Tensor,
                            ignore_index: int, reduction: str, backend: str) -> torch.Tensor:
    impl = _select(grad_rows, backend)
    if grad_rows.shape[0] == 0:
        return torch.zeros_like(grad_rows)
    scale = row_scale(grad_loss, (labels != ignore_index).sum(), labels.shape[0], reduction,
                      acc_dtype(grad_rows.dtype))
    return impl.function("backward")(grad_rows, scale)


@_cross_entropy_backward_op.register_fake
def _cross_entropy_backward_fake(grad_loss, grad_rows, labels, ignore_index, reduction, backend):
    return torch.empty_like(grad_rows)


def _setup_context(ctx, inputs, output):
    _, labels, ignore_index, _, _, reduction, with_grad, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], labels)
    ctx.args = (ignore_index, reduction, with_grad, backend)


def _backward(ctx, grad_loss, _unused):
    grad_rows, labels = ctx.saved_tensors
    ignore_index, reduction, with_grad, backend = ctx.args
    if not with_grad:
        raise RuntimeError("fastlm.ops.cross_entropy: the forward ran without gradient (logits did not require grad)")
    grad = _cross_entropy_backward_op(grad_loss, grad_rows, labels, ignore_index, reduction, backend)
    return grad, None, None, None, None, None, None, None


_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------- public function
def cross_entropy(logits, labels, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                  reduction: str = "mean", z_loss: float = 0.0, backend: str = "auto"):
    """Softmax cross-entropy, ``F.cross_entropy(logits, labels, ...)`` with class-index labels.

    Args:
        logits: ``(N, V)`` or ``(..., V)`` float16/bfloat16/float32/float64 (the class
            dimension is LAST, unlike ``F.cross_entropy`` on >2-D inputs).
        labels: ``(N,)`` or ``(...)`` int64, matching ``logits.shape[:-1]``; each in
            ``[0, V)`` or equal to ``ignore_index`` (the row is then skipped: zero loss,
            zero gradient).
        label_smoothing: as in PyTorch: the target mixes ``1 - eps`` of the label with
            ``eps / V`` of every class; ignored rows contribute nothing.
        reduction: ``"mean"`` (over rows whose label is not ignored), ``"sum"`` or
            ``"none"`` (shape of ``labels``).
        z_loss: adds ``z_loss * logsumexp(row)**2`` to every labelled row's loss
            (PaLM's auxiliary loss that keeps the log-normaliser near 0); 0 disables it.

    Returns the loss in the logits' dtype, as ``F.cross_entropy`` does: the rows and their
    reduction are computed in float32 (float64 for float64 logits) and only the result is
    rounded to the logits' dtype.  (:func:`fastlm.ops.linear_cross_entropy` returns float32.)

    Differences from PyTorch: when every label is ``ignore_index`` the ``"mean"`` loss is
    0.0 with zero gradients (PyTorch gives NaN).

    Out-of-range labels: for CPU tensors a ValueError is raised.  On a GPU, checking
    would cost a host synchronisation per call, so the kernels flag such a row on the
    device instead: its loss (and gradient row) is NaN, so the reduced loss is NaN and
    the training loop sees it at the sync it already makes when it reads the loss.  Set
    ``FASTLM_CHECK_LABELS=1`` to get the ValueError on GPU too, at the cost of one sync.
    """
    _common.check_tensor("logits", logits, dtypes=_common.FLOAT_DTYPES, min_ndim=1)
    label_smoothing, z_loss = check_loss_args(labels, ignore_index, label_smoothing, z_loss, reduction)
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError("logits must have at least one class (last dimension is 0)")
    _common.check_same_device(logits=logits, labels=labels)
    backend = registry.check_backend_name(backend)
    v = logits.shape[-1]
    flat_logits = logits.reshape(-1, v).contiguous()
    flat_labels = labels.reshape(-1).contiguous()
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = _cross_entropy_op(flat_logits, flat_labels, ignore_index, label_smoothing, z_loss, reduction,
                             with_grad, backend)
    return loss.reshape(labels.shape) if reduction == "none" else loss
