"""Fused causal-LM loss: ``lm_head`` matmul + shifted cross-entropy without stored logits.

Used when the model is training and ``labels`` are given (otherwise the original forward
runs).  Same semantics as transformers' ``ForCausalLMLoss``: labels shifted left by one
(the last position predicts nothing) unless ``shift_labels`` is given, -100 ignored, the
mean over labelled tokens, or, when the Trainer passes ``num_items_in_batch`` (gradient
accumulation), the sum divided by it.  Rows without a label are dropped before the
matmul; ``logits`` is returned as None.  Only heads that are a plain ``nn.Linear``
(no logit soft-capping or scaling) are patched: see :mod:`fastlm.patching.architectures`.
"""
from __future__ import annotations

import torch.nn.functional as F

from fastlm.patching import binding
from fastlm.patching.attention import backend_of
from fastlm.patching.mlm_head import IGNORE_INDEX, head_output, labelled_rows, linear_loss, split_head_call
from fastlm.patching.tiers import HEAD_OFF


def patch_causal_lm(model) -> None:
    """Bind the fused-loss forward on a ``*ForCausalLM`` instance (its family's
    :class:`~fastlm.patching.architectures.CausalLMHead` is looked up per call)."""
    binding.bind(model, "forward", _causal_lm_forward)


def _causal_lm_forward(self, *args, **kwargs):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from fastlm.patching.architectures import family_of

    original, named, labels, return_dict = split_head_call(self, args, kwargs)
    logits_to_keep = named.pop("logits_to_keep", 0)
    if (labels is None or not self.training or not (logits_to_keep is None or logits_to_keep == 0)
            or self.__dict__.get(HEAD_OFF, False)):  # (HEAD_OFF: see fastlm.patching.tiers)
        return original(*args, **kwargs)
    spec = family_of(self).causal_lm
    shift_labels = named.pop("shift_labels", None)
    num_items = named.pop("num_items_in_batch", None)
    body = getattr(self, spec.body)(**named, return_dict=True)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    hidden, targets = labelled_rows(body[0], shift_labels)
    loss = linear_loss(hidden, spec.head(self), targets, backend_of(self), num_items)
    return head_output(CausalLMOutputWithPast, loss, body, return_dict)
