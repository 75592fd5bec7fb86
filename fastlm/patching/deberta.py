"""DeBERTa-v2/v3 (``model_type`` "deberta-v2"): fused disentangled attention on unpadded tokens.

transformers' ``DisentangledSelfAttention`` does not go through the attention interface: it
builds an ``(L, L)`` relative-position matrix once per forward, then per layer the scores
``q k^T`` plus the content-to-position and position-to-content terms gathered from
``q pos_key^T`` and ``k pos_query^T``, each a ``(B, H, L, L)`` tensor (with the ``(B, H, L, 2 span)``
products before the gathers, a mask fill, softmax and dropout on top).  This module binds,
per instance:

* on every ``DisentangledSelfAttention``: a forward that, when the encoder hands it a
  :class:`Batch` instead of a mask, projects q/k/v and the (dropped-out) relative embeddings
  exactly as transformers does and calls ``fastlm.ops.varlen_disentangled_attention`` (packed)
  or ``fastlm.ops.disentangled_attention`` (padded, key padding mask); any other call (a
  tensor mask: transformers' own encoder, ``z_steps``) runs the original;
* on the ``DebertaV2Encoder``: a forward that removes the padding once (the embeddings are
  already masked), computes the layer-normed relative embeddings once, runs every layer on
  the packed ``(1, T, hidden)`` tokens and re-pads once (padded positions of
  ``last_hidden_state`` are zeros).  Relative positions are distances within a row, so
  packing keeps them as long as each row's real tokens are contiguous; a mask with holes,
  ``unpad=False``, or a call that wants per-layer outputs runs the layers padded (same
  fused op, the padded row's positions, per-layer outputs in padded layout);
* on the ``DebertaV2Model``: the gate that tells the encoder whether per-layer outputs are
  wanted (``output_hidden_states``, ``z_steps > 1``).

transformers' own path, with one warning per reason, serves what the fused path does not:
``output_attentions``, a 3D/4D mask, ``query_states`` / ``relative_pos`` given, and LEFT
padding (a row whose first token is padding: the pooler of the classification heads reads
position 0, whose transformers output, a uniform average over every position, the fused
op does not reproduce).  Refused at patch time, with the reason in the report:
``pos_att_type`` with ``p2p`` and a convolution layer (``conv_kernel_size > 0``, which mixes
neighbouring padded positions).  The masked-LM head is the shared sparse one
(:mod:`fastlm.patching.mlm_head`, table row in :mod:`fastlm.patching.architectures`).
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch

from fastlm.patching import binding
from fastlm.patching.report import NOT_APPLICABLE, PATCHED, UNSUPPORTED
from fastlm.patching.unpad import Packing

_WARNED: set = set()


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"fastlm DeBERTa: {reason}; this call runs transformers' own attention", stacklevel=4)


@dataclass(frozen=True)
class Batch:
    """Handed to the layers in place of the attention mask: how the tokens are laid out.

    Packed: ``cu_seqlens`` (int32, (B + 1,)) and ``max_seqlen``, hidden states ``(1, T, E)``.
    Padded: ``key_padding_mask`` (bool, (B, L)), hidden states ``(B, L, E)``."""

    cu_seqlens: torch.Tensor | None
    max_seqlen: int
    key_padding_mask: torch.Tensor | None
    backend: str


# ------------------------------------------------------------------------ patch time
def refusal(config) -> str | None:
    """Why this config cannot be served by the fused path at all, or None."""
    types = set(config.pos_att_type or [])
    if types - {"c2p", "p2c"}:
        return (f"pos_att_type {sorted(types)}: only 'c2p' and 'p2c' are served ('p2p', position-to-position, "
                "is not; transformers' DebertaV2 ignores it)")
    if getattr(config, "conv_kernel_size", 0) > 0:
        return "conv_kernel_size > 0: the convolution layer mixes neighbouring padded positions"
    return None


def patch(target, backend: str, report, *, attention: bool, unpad: bool) -> None:
    """Bind the fused attention, the unpadding encoder and the base-model gate (see module docstring)."""
    base = target.base_model
    why = refusal(target.config)
    if not attention:
        report.add("attention", NOT_APPLICABLE, "attention=False")
        report.add("unpad", UNSUPPORTED if unpad else NOT_APPLICABLE,
                   "needs attention=True (the fused disentangled attention)" if unpad else "unpad=False")
        return
    if why:
        report.add("attention", UNSUPPORTED, why)
        report.add("unpad", UNSUPPORTED, "needs the fused attention")
        return
    for layer in base.encoder.layer:
        binding.bind(layer.attention.self, "forward", _attention_forward(backend))
    binding.set_attr(base.encoder, "_fastlm_unpad", unpad)
    binding.set_attr(base.encoder, "_fastlm_layers_wanted", False)
    binding.bind(base.encoder, "forward", _encoder_forward(backend))
    binding.bind(base, "forward", _base_forward)
    report.add("attention", PATCHED, "fused disentangled attention in every layer "
                                     "(fastlm.ops.varlen_disentangled_attention; transformers' own path for "
                                     "left padding, output_attentions, 3D/4D masks)")
    report.add("unpad", PATCHED if unpad else NOT_APPLICABLE,
               f"{type(base.encoder).__name__} runs on packed tokens (padding removed once, relative embeddings "
               "normalised once per forward)" if unpad else "unpad=False: the fused attention runs padded")


# ------------------------------------------------------------------------- attention
def _positional_tables(module, rel_embeddings, heads: int, dim: int):
    """(pos_key, pos_query), each (heads, 2 span, dim) or None, projected as transformers does."""
    if not module.relative_attention:
        return None, None
    rel = module.pos_dropout(rel_embeddings)[: module.pos_ebd_size * 2]
    tables = []
    for kind, shared, own in (("c2p", module.key_proj, "pos_key_proj"), ("p2c", module.query_proj, "pos_query_proj")):
        if kind not in module.pos_att_type:
            tables.append(None)
            continue
        proj = shared if module.share_att_key else getattr(module, own)
        tables.append(proj(rel).view(rel.shape[0], heads, dim).transpose(0, 1))
    return tables


def _scale(dim: int, pos_att_type) -> float:
    """transformers' 1 / sqrt(dim * scale_factor), the square root taken in float32 as it does (so
    float64 models match it exactly); the factor counts the configured positional terms, even
    without relative attention."""
    factor = 1 + sum(t in pos_att_type for t in ("c2p", "p2c"))
    return 1.0 / torch.sqrt(torch.tensor(dim, dtype=torch.float32) * factor).item()


def _attention_forward(backend: str):
    from fastlm.ops.disentangled_attention import disentangled_attention, varlen_disentangled_attention

    def make(original):
        def forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None,
                    relative_pos=None, rel_embeddings=None):
            if not isinstance(attention_mask, Batch):
                return original(hidden_states, attention_mask, output_attentions, query_states, relative_pos,
                                rel_embeddings)
            heads, dim = self.num_attention_heads, self.attention_head_size
            q, k, v = (proj(hidden_states).unflatten(-1, (heads, dim))
                       for proj in (self.query_proj, self.key_proj, self.value_proj))
            pos_key, pos_query = _positional_tables(self, rel_embeddings, heads, dim)
            scale = _scale(dim, self.pos_att_type)
            kwargs = dict(scale=scale, dropout_p=self.dropout.p if self.training else 0.0, backend=backend)
            if self.relative_attention:
                kwargs.update(position_buckets=self.position_buckets, max_relative_positions=self.max_relative_positions)
            if attention_mask.cu_seqlens is not None:  # (1, T, H, D) -> (T, H, D) views (no copy back)
                out = varlen_disentangled_attention(q.squeeze(0), k.squeeze(0), v.squeeze(0), pos_key, pos_query,
                                                    attention_mask.cu_seqlens, attention_mask.max_seqlen,
                                                    **kwargs).unsqueeze(0)
            else:  # (B, L, H, D) -> (B, H, L, D) views
                out = disentangled_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), pos_key,
                                             pos_query, key_padding_mask=attention_mask.key_padding_mask,
                                             **kwargs).transpose(1, 2)
            return out.flatten(-2), None
        return forward
    return make


# --------------------------------------------------------------------------- encoder
def _fallback_reason(attention_mask, output_attentions, query_states, relative_pos) -> str | None:
    if output_attentions:
        return "output_attentions=True (the fused kernel keeps no probabilities)"
    if query_states is not None or relative_pos is not None:
        return "query_states / relative_pos given"
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return "a 3D/4D attention mask"
    return None


def _encoder_forward(backend: str):
    from transformers.modeling_outputs import BaseModelOutput

    def make(original):
        def forward(self, hidden_states, attention_mask, output_hidden_states=True, output_attentions=False,
                    query_states=None, relative_pos=None, return_dict=True):
            def transformers_path():
                return original(hidden_states, attention_mask, output_hidden_states, output_attentions,
                                query_states, relative_pos, return_dict)

            reason = _fallback_reason(attention_mask, output_attentions, query_states, relative_pos)
            packing = None if reason else Packing(attention_mask)
            if packing is not None and not packing.first_real:
                reason = "left padding (the pooler reads position 0, a padding token)"
            if reason:
                _warn_once(reason)
                return transformers_path()
            layers_wanted = self._fastlm_layers_wanted
            packed = self._fastlm_unpad and packing.contiguous and not layers_wanted
            if packed:
                batch = Batch(packing.cu_seqlens, packing.max_seqlen, None, backend)
                states = packing.unpad(hidden_states)
            else:
                batch = Batch(None, 0, attention_mask.to(torch.bool), backend)
                states = hidden_states
            rel_embeddings = self.get_rel_embedding()
            all_states = [hidden_states]
            for layer in self.layer:
                states = layer(states, batch, query_states=None, relative_pos=None, rel_embeddings=rel_embeddings,
                               output_attentions=False)[0]
                if layers_wanted:
                    all_states.append(states)
            last = packing.repad(states) if packed else states
            # the base model reads encoder_outputs[1][-1]: every layer when wanted, else the last one
            hidden = tuple(all_states) if layers_wanted else (last,)
            if not return_dict:
                return last, hidden
            return BaseModelOutput(last_hidden_state=last, hidden_states=hidden, attentions=None)
        return forward
    return make


def _base_forward(original):
    signature = inspect.signature(original)

    def forward(self, *args, **kwargs):
        wanted = binding.split_call(signature, args, kwargs).get("output_hidden_states")
        if wanted is None:
            wanted = self.config.output_hidden_states
        encoder = self.encoder
        encoder._fastlm_layers_wanted = bool(wanted) or self.z_steps > 1
        try:
            return original(*args, **kwargs)
        finally:
            encoder._fastlm_layers_wanted = False
    return forward
