"""Sparse masked-LM prediction: the head and the loss only on labelled positions.

transformers' ``*ForMaskedLM.forward`` runs the prediction head (transform H -> H, then
the decoder H -> V, V = 30,522 for BERT) on EVERY position and then a separate
cross-entropy, although only ~15% of positions carry a label: for 16 x 256 tokens that
is 125M logits (500 MB fp32) plus their gradient.  The replacement forward, used when the
model is training AND ``labels`` are given:

* runs the (unpadded) body, takes the rows whose label is not -100 (one host read: their
  count), runs the head transform on those rows only, and computes the loss with
  ``fastlm.ops.linear_cross_entropy`` (decoder matmul + CE fused, logits never stored);
* returns ``logits=None`` (as ModernBERT's ``sparse_prediction`` and Liger do); the loss is
  the same mean over labelled positions, or for families whose loss is transformers'
  ``ForMaskedLMLoss`` (ModernBERT) and a Trainer that passes ``num_items_in_batch``, the
  sum divided by it.  A batch with no labelled position gives 0.0 (transformers gives NaN).

In eval mode, or without labels, the original forward runs (full logits, same loss).
The decoder weight is tied to the word embeddings: the fused op returns its gradient
into the same parameter.  Under autocast the head's activations are low precision; the
decoder weight is cast to their dtype exactly as autocast's ``linear`` would, the loss
accumulates in fp32.
"""
from __future__ import annotations

import torch

from fastlm.patching import binding
from fastlm.patching.attention import backend_of
from fastlm.patching.masks import tracing

IGNORE_INDEX = -100


def labelled_rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden (..., H)``, ``labels (...)`` -> the labelled rows ``(N, H)`` and their labels ``(N,)``."""
    labels = labels.reshape(-1).to(hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if tracing():  # N is data: a traced graph keeps every row (the loss op drops ignored ones inside)
        return hidden, labels
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # host sync: N decides every shape after it
    return hidden.index_select(0, rows), labels.index_select(0, rows)


def linear_loss(hidden: torch.Tensor, decoder: torch.nn.Linear, labels: torch.Tensor, backend: str,
                num_items=None) -> torch.Tensor:
    """``fastlm.ops.linear_cross_entropy(hidden, decoder.weight, labels, bias=decoder.bias)``:
    the mean over labelled rows, or with ``num_items`` (the Trainer's ``num_items_in_batch``,
    an int or a tensor, under gradient accumulation) the sum divided by it, as transformers'
    losses do."""
    from fastlm.ops.linear_cross_entropy import linear_cross_entropy

    weight, bias = decoder.weight, decoder.bias
    if weight.dtype != hidden.dtype:  # autocast: the head ran in low precision
        weight = weight.to(hidden.dtype)
        bias = bias.to(hidden.dtype) if bias is not None else None
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=IGNORE_INDEX,
                                reduction="mean" if num_items is None else "sum", backend=backend)
    # transformers upcasts low-precision logits, so its losses are fp32 (or fp64)
    loss = loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if isinstance(num_items, torch.Tensor) else num_items)
    return loss


def split_head_call(model, args, kwargs):
    """A head forward's call: ``(original forward, named arguments, labels, return_dict)``, the
    named arguments without ``labels`` / ``return_dict`` (the body is called with them)."""
    original = binding.original(model, "forward")
    named = binding.split_call(binding.signature(original), args, kwargs)
    labels = named.pop("labels", None)
    return_dict = named.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    return original, named, labels, return_dict


def head_output(output_cls, loss, base_outputs, return_dict: bool):
    """``output_cls(loss=loss, logits=None, <every other field the body returned that it has>)``,
    as a tuple when ``return_dict`` is False."""
    fields = getattr(output_cls, "__dataclass_fields__", {})
    extra = {k: v for k, v in base_outputs.items()
             if k in fields and k not in ("loss", "logits", "last_hidden_state")}
    out = output_cls(loss=loss, logits=None, **extra)
    return out if return_dict else out.to_tuple()


def patch_masked_lm(model) -> None:
    """Bind the sparse forward on a ``*ForMaskedLM`` instance (its family's
    :class:`~fastlm.patching.architectures.MaskedLMHead` is looked up per call)."""
    binding.bind(model, "forward", _masked_lm_forward)


def _masked_lm_forward(self, *args, **kwargs):
    from transformers.modeling_outputs import MaskedLMOutput

    from fastlm.patching.architectures import family_of

    original, named, labels, return_dict = split_head_call(self, args, kwargs)
    if labels is None or not self.training:
        return original(*args, **kwargs)
    spec = family_of(self).masked_lm
    num_items = named.pop("num_items_in_batch", None) if spec.num_items else None
    body = getattr(self, spec.body)(**named, return_dict=True)
    hidden, targets = labelled_rows(body[0], labels)
    loss = linear_loss(spec.transform(self, hidden), spec.decoder(self), targets, backend_of(self), num_items)
    return head_output(MaskedLMOutput, loss, body, return_dict)
