"""Cross-entropy in float64 from its definition: the truth of the CE and linear-CE tests."""
import torch

IGNORE = -100


def ce64(logits, labels, *, ignore_index=IGNORE, label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    """Cross-entropy in float64 from its definition (class dim last); differentiable."""
    x = logits.double().reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    v = x.shape[1]
    labelled = y != ignore_index
    lse = torch.log(torch.exp(x - x.max(1, keepdim=True).values).sum(1)) + x.max(1).values
    picked = x[torch.arange(len(y)), torch.where(labelled, y, 0)]
    rows = (1 - label_smoothing) * (lse - picked)
    if label_smoothing:
        rows = rows + label_smoothing * (lse - x.sum(1) / v)
    if z_loss:
        rows = rows + z_loss * lse**2
    rows = torch.where(labelled, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(labels.shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / labelled.sum().clamp(min=1)


def lce64(hidden, weight, labels, bias=None, **kw):
    """Dense float64 logits ``hidden @ weight.T + bias``, then :func:`ce64`; differentiable."""
    logits = hidden.double() @ weight.double().t()
    return ce64(logits if bias is None else logits + bias.double(), labels, **kw)
