"""The table: which model families get which mechanisms, and where their parts live.

A family is matched by ``config.model_type``; the task (masked LM, causal LM, or a body
with an untouched head) by the model class name.  Adding a family is adding a row:

* ``encoder``: attribute of the base model (``model.base_model``) holding the layer stack
  to run unpadded, or None (decoders: their padding is served by the fused attention's
  key-padding mask, and rotary/cache code expects padded positions);
* ``packed_body``: instead of an encoder module, the base model itself runs on the packed
  real tokens (it accepts a flattened batch with ``position_ids`` and ``cu_seq_lens_*``;
  see :mod:`fastlm.patching.unpad`): ModernBERT, whose rotary positions and
  sliding-window (local) layers live in the base model's forward;
* ``masked_lm``: how to run the MLM head on selected rows (transform, decoder, and
  whether the family's loss honours the Trainer's ``num_items_in_batch``);
* ``causal_lm``: the ``lm_head`` of a ``*ForCausalLM`` / ``*LMHeadModel`` (plain linear);
* ``patcher``: a module whose ``patch(target, backend, report, attention=, unpad=)`` replaces
  the attention-interface and unpadding mechanisms for a family whose attention does not go
  through transformers' interface, and whose ``ATTENTION_TIER``
  (:class:`fastlm.patching.tiers.AttentionTier`) says which op the never-slower rule judges
  and how its layers are handed back to transformers (DeBERTa-v2/v3:
  :mod:`fastlm.patching.deberta`).

Families not listed (or listed features a model lacks) are left as they were, with one
warning naming them.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch.nn.functional as F


@dataclass(frozen=True)
class MaskedLMHead:
    body: str                                  # attribute of the *ForMaskedLM holding the base model
    transform: Callable                        # (model, rows (N, H)) -> (N, E): the head before the decoder
    decoder: Callable                          # model -> nn.Linear (E -> V), weight usually tied
    num_items: bool = False                    # loss = sum / num_items_in_batch when given (ForMaskedLMLoss)


@dataclass(frozen=True)
class CausalLMHead:
    body: str
    head: Callable                             # model -> nn.Linear (H -> V)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple
    encoder: str | None = None
    masked_lm: MaskedLMHead | None = None
    causal_lm: CausalLMHead | None = None
    packed_body: bool = False
    patcher: str | None = None


def _roberta_transform(m, h):
    head = m.lm_head
    return head.layer_norm(F.gelu(head.dense(h)))


def _albert_transform(m, h):
    head = m.predictions
    return head.LayerNorm(head.activation(head.dense(h)))


_ROBERTA_MLM = MaskedLMHead("roberta", _roberta_transform, lambda m: m.lm_head.decoder)


def _deberta_transform(m, h):
    if m.legacy:
        return m.cls.predictions.transform(h)
    head = m.lm_predictions.lm_head
    return head.LayerNorm(head.transform_act_fn(head.dense(h)))


def _deberta_decoder(m):
    if m.legacy:
        return m.cls.predictions.decoder
    # the non-legacy head multiplies by the word embeddings and adds its own bias
    return SimpleNamespace(weight=m.deberta.embeddings.word_embeddings.weight, bias=m.lm_predictions.lm_head.bias)

FAMILIES = (
    Family("BERT", ("bert",), "encoder",
           MaskedLMHead("bert", lambda m, h: m.cls.predictions.transform(h), lambda m: m.cls.predictions.decoder)),
    Family("RoBERTa", ("roberta",), "encoder", _ROBERTA_MLM),
    Family("XLM-RoBERTa", ("xlm-roberta",), "encoder", _ROBERTA_MLM),
    Family("CamemBERT", ("camembert",), "encoder", _ROBERTA_MLM),
    Family("ELECTRA", ("electra",), "encoder",
           MaskedLMHead("electra", lambda m, h: m.generator_predictions(h), lambda m: m.generator_lm_head)),
    Family("DistilBERT", ("distilbert",), "transformer",
           MaskedLMHead("distilbert", lambda m, h: m.vocab_layer_norm(m.activation(m.vocab_transform(h))),
                        lambda m: m.vocab_projector)),
    Family("ALBERT", ("albert",), "encoder",
           MaskedLMHead("albert", _albert_transform, lambda m: m.predictions.decoder)),
    Family("ModernBERT", ("modernbert",), packed_body=True,
           masked_lm=MaskedLMHead("model", lambda m, h: m.head(h), lambda m: m.decoder, num_items=True)),
    Family("DeBERTa-v2", ("deberta-v2",), masked_lm=MaskedLMHead("deberta", _deberta_transform, _deberta_decoder),
           patcher="fastlm.patching.deberta"),
    Family("Llama", ("llama",), causal_lm=CausalLMHead("model", lambda m: m.lm_head)),
    Family("Mistral", ("mistral",), causal_lm=CausalLMHead("model", lambda m: m.lm_head)),
    Family("Qwen2", ("qwen2",), causal_lm=CausalLMHead("model", lambda m: m.lm_head)),
    Family("Qwen3", ("qwen3",), causal_lm=CausalLMHead("model", lambda m: m.lm_head)),
    Family("GPT-2", ("gpt2",), causal_lm=CausalLMHead("transformer", lambda m: m.lm_head)),
)

_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}

MASKED_LM_SUFFIXES = ("ForMaskedLM",)
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# Heads that only read the (re-padded) body output: an unpadded body serves them unchanged.
BODY_SUFFIXES = ("Model", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                 "ForMultipleChoice")


def family_of(model) -> Family | None:
    return _BY_TYPE.get(getattr(model.config, "model_type", None))


def task_of(model) -> str:
    """'masked_lm', 'causal_lm', 'body' (head untouched) or 'other' (head left as transformers has it)."""
    name = type(model).__name__
    if name.endswith(MASKED_LM_SUFFIXES):
        return "masked_lm"
    if name.endswith(CAUSAL_LM_SUFFIXES):
        return "causal_lm"
    if name.endswith(BODY_SUFFIXES):
        return "body"
    return "other"
