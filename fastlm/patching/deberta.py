"""DeBERTa-v2/v3 (``model_type`` "deberta-v2"): fused disentangled attention on unpadded tokens.

transformers' ``DisentangledSelfAttention`` does not go through the attention interface: it
builds an ``(L, L)`` relative-position matrix once per forward, then per layer the scores
``q k^T`` plus the content-to-position and position-to-content terms gathered from
``q pos_key^T`` and ``k pos_query^T``, each a ``(B, H, L, L)`` tensor (with the ``(B, H, L, 2 span)``
products before the gathers, a mask fill, softmax and dropout on top).  This module binds,
per instance (:mod:`fastlm.patching.binding`: module-level functions, state in the
instances' ``__dict__``, so copies and pickles of a patched model compute with their own
weights):

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

Padded runs give a padding QUERY transformers' value: its mask is ``mask_i * mask_j``, so such
a row's scores are all ``finfo.min``, its softmax uniform and its output the mean of ``v``
over every position (gradient to ``v`` only; the fused op alone would attend to the real
keys; under dropout that mean is transformers' dropped-out row in expectation).  Per-layer
outputs are then transformers' at every position.

transformers' own path, with one warning per reason, serves what the fused path does not:
``output_attentions``, a 3D/4D mask, ``query_states`` / ``relative_pos`` given, and LEFT
padding (the pooler of the classification heads reads position 0, a padding token).  Refused
at patch time, with the reason in the report: ``pos_att_type`` with ``p2p`` and a convolution
layer (``conv_kernel_size > 0``, which mixes neighbouring padded positions).  The masked-LM
head is the shared sparse one (:mod:`fastlm.patching.mlm_head`, table row in
:mod:`fastlm.patching.architectures`).

Never slower (:data:`ATTENTION_TIER`, :mod:`fastlm.patching.tiers`): with ``backend="auto"``, on
a device/dtype where ``auto`` would pick the ``reference`` for ``disentangled_attention`` (a
GPU while the Triton kernels are unverified; float64), the encoder runs transformers' own
forward (no unpadding), quietly; ``set_attn_implementation`` with anything but ``"fastlm"``
does the same (DeBERTa has one implementation, which its config keeps naming).  Under
``torch.compile`` / ``torch.export`` tracing the layers run padded (packing is
data-dependent) and the padded positions are zeroed where the untraced model would unpad.
"""
from __future__ import annotations

import math
import struct
import warnings
from typing import NamedTuple

import torch

from fastlm.patching import binding, tiers
from fastlm.patching.attention import ORIGINAL, backend_of
from fastlm.patching.masks import tracing
from fastlm.patching.report import NOT_APPLICABLE, PATCHED, UNSUPPORTED
from fastlm.patching.unpad import Packing, zeros_where_unpadded

FUSED = "_fastlm_fused"                  # encoder: fastlm's attention serves (False: handed back)
UNPAD = "_fastlm_unpad"                  # encoder: patch(unpad=...)
LAYERS_WANTED = "_fastlm_layers_wanted"  # encoder: this call wants every layer's output (set by the base model)
_WARNED: set = set()


def _warn_once(reason: str) -> None:
    if reason not in _WARNED and not tracing():
        _WARNED.add(reason)
        warnings.warn(f"fastlm DeBERTa: {reason}; this call runs transformers' own attention", stacklevel=4)


class Batch(NamedTuple):
    """Handed to the layers in place of the attention mask: how the tokens are laid out.

    Packed: ``cu_seqlens`` (int32, (B + 1,)) and ``max_seqlen``, hidden states ``(1, T, E)``.
    Padded: ``key_padding_mask`` (bool, (B, L)), hidden states ``(B, L, E)``."""

    cu_seqlens: torch.Tensor | None
    max_seqlen: int
    key_padding_mask: torch.Tensor | None


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
    """Bind the fused attention, the unpadding encoder and the base-model gate (see module docstring).
    (``backend`` reaches the layers as every module's ``_fastlm_backend``, set by :func:`fastlm.patch`.)"""
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
        binding.bind(layer.attention.self, "forward", _attention_forward)
    for name, value in ((FUSED, True), (UNPAD, unpad), (LAYERS_WANTED, False)):
        binding.set_attr(base.encoder, name, value)
    binding.bind(base.encoder, "forward", _encoder_forward)
    binding.bind(base, "forward", _base_forward)
    # what serves attention when fastlm's is handed back (tiers, set_attn_implementation): DeBERTa's own
    binding.set_attr(target, ORIGINAL, target.config._attn_implementation)
    report.add("attention", PATCHED, "fused disentangled attention in every layer "
                                     "(fastlm.ops.varlen_disentangled_attention; transformers' own path for "
                                     "left padding, output_attentions, 3D/4D masks)")
    report.add("unpad", PATCHED if unpad else NOT_APPLICABLE,
               f"{type(base.encoder).__name__} runs on packed tokens (padding removed once, relative embeddings "
               "normalised once per forward; padded under torch.compile / torch.export tracing)"
               if unpad else "unpad=False: the fused attention runs padded")


# ------------------------------------------------------------------------ tiers
def _attention_problem(model, device: str, dtype: torch.dtype):
    """``disentangled_attention``'s problem for this model's layers on ``device``/``dtype``
    (a shape-only stand-in query: nothing is allocated on the device)."""
    from fastlm.ops.disentangled_attention import problem

    config, encoder = model.config, model.base_model.encoder
    layer = encoder.layer[0].attention.self
    q = torch.empty((1, layer.num_attention_heads, 1, layer.attention_head_size), dtype=dtype, device="meta")
    terms = set(layer.pos_att_type) if layer.relative_attention else set()
    unpadded = encoder.__dict__.get(UNPAD, False)
    return problem(q, padding=not unpadded, packed=unpadded, c2p="c2p" in terms, p2c="p2c" in terms,
                   dropout_p=0.0, max_seqlen=config.max_position_embeddings)._replace(device=device)


def _serve(model, implementation: str | None) -> None:
    """``None``: the fused layers serve; else transformers' own forward (its one implementation)."""
    model.base_model.encoder.__dict__[FUSED] = implementation is None


ATTENTION_TIER = tiers.AttentionTier("disentangled_attention", _attention_problem, _serve)


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


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _scale(dim: int, pos_att_type) -> float:
    """transformers' 1 / sqrt(dim * scale_factor), its square root taken in float32 (so float64
    models match it exactly; the float64 root of an integer rounded once to float32 is float32's
    correctly rounded root), computed without a tensor (nothing to trace); the factor counts the
    configured positional terms, even without relative attention."""
    factor = 1 + sum(t in pos_att_type for t in ("c2p", "p2c"))
    return 1.0 / _float32(math.sqrt(dim * factor))


def _attention_forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None,
                       relative_pos=None, rel_embeddings=None):
    """``DisentangledSelfAttention.forward``: fused when the encoder hands a :class:`Batch`."""
    from fastlm.ops.disentangled_attention import disentangled_attention, varlen_disentangled_attention

    if not isinstance(attention_mask, Batch):
        return binding.original(self, "forward")(hidden_states, attention_mask, output_attentions, query_states,
                                                 relative_pos, rel_embeddings)
    heads, dim = self.num_attention_heads, self.attention_head_size
    q, k, v = (proj(hidden_states).unflatten(-1, (heads, dim))
               for proj in (self.query_proj, self.key_proj, self.value_proj))
    pos_key, pos_query = _positional_tables(self, rel_embeddings, heads, dim)
    kwargs = dict(scale=_scale(dim, self.pos_att_type), dropout_p=self.dropout.p if self.training else 0.0,
                  backend=backend_of(self))
    if self.relative_attention:
        kwargs.update(position_buckets=self.position_buckets, max_relative_positions=self.max_relative_positions)
    if attention_mask.cu_seqlens is not None:  # (1, T, H, D) -> (T, H, D) views (no copy back)
        out = varlen_disentangled_attention(q.squeeze(0), k.squeeze(0), v.squeeze(0), pos_key, pos_query,
                                            attention_mask.cu_seqlens, attention_mask.max_seqlen,
                                            **kwargs).unsqueeze(0)
        return out.flatten(-2), None
    # (B, L, H, D) -> (B, H, L, D) views; padding queries: transformers' uniform row (module docstring)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    valid = attention_mask.key_padding_mask
    out = disentangled_attention(q, k, v, pos_key, pos_query, key_padding_mask=valid, **kwargs)
    out = torch.where(valid[:, None, :, None], out, v.mean(dim=2, keepdim=True))
    return out.transpose(1, 2).flatten(-2), None


# --------------------------------------------------------------------------- encoder
def _fallback_reason(attention_mask, output_attentions, query_states, relative_pos) -> str | None:
    if output_attentions:
        return "output_attentions=True (the fused kernel keeps no probabilities)"
    if query_states is not None or relative_pos is not None:
        return "query_states / relative_pos given"
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return "a 3D/4D attention mask"
    return None


def _encoder_forward(self, hidden_states, attention_mask, output_hidden_states=True, output_attentions=False,
                     query_states=None, relative_pos=None, return_dict=True):
    """``DebertaV2Encoder.forward``: every layer fused, on packed tokens where it can (module docstring)."""
    from transformers.modeling_outputs import BaseModelOutput

    call = (hidden_states, attention_mask, output_hidden_states, output_attentions, query_states, relative_pos,
            return_dict)
    if not self.__dict__[FUSED]:  # handed back (never-slower rule, set_attn_implementation): quietly
        return binding.original(self, "forward")(*call)
    traced = tracing()
    reason = _fallback_reason(attention_mask, output_attentions, query_states, relative_pos)
    packing = None if reason or traced else Packing(attention_mask)
    if packing is not None and not packing.first_real:
        reason = "left padding (the pooler reads position 0, a padding token)"
    if reason:
        _warn_once(reason)
        return binding.original(self, "forward")(*call)
    layers_wanted, unpad = self.__dict__[LAYERS_WANTED], self.__dict__[UNPAD]
    mask = attention_mask.to(torch.bool)
    packed = packing is not None and unpad and packing.contiguous and not layers_wanted
    if packed:
        batch, states = Batch(packing.cu_seqlens, packing.max_seqlen, None), packing.unpad(hidden_states)
    else:
        batch, states = Batch(None, 0, mask), hidden_states
    rel_embeddings = self.get_rel_embedding()
    all_states = [hidden_states]
    for layer in self.layer:
        states = layer(states, batch, query_states=None, relative_pos=None, rel_embeddings=rel_embeddings,
                       output_attentions=False)[0]
        if layers_wanted:
            all_states.append(states)
    if packed:
        last = packing.repad(states)
    elif traced and unpad and not layers_wanted:  # what the untraced model gives: zeros where it unpads
        last = zeros_where_unpadded(states, mask, needs_contiguous=True)
    else:
        last = states
    # the base model reads encoder_outputs[1][-1]: every layer when wanted, else the last one
    hidden = tuple(all_states) if layers_wanted else (last,)
    if not return_dict:
        return last, hidden
    return BaseModelOutput(last_hidden_state=last, hidden_states=hidden, attentions=None)


def _base_forward(self, *args, **kwargs):
    """``DebertaV2Model.forward``: tells the encoder when every layer's output is wanted
    (``output_hidden_states`` per call or in the config; ``z_steps > 1`` re-runs the last layer
    on the second-to-last's output)."""
    original = binding.original(self, "forward")
    wanted = binding.split_call(binding.signature(original), args, kwargs).get("output_hidden_states")
    if wanted is None:
        wanted = self.config.output_hidden_states
    if not (wanted or self.z_steps > 1):
        return original(*args, **kwargs)
    encoder = self.encoder
    encoder.__dict__[LAYERS_WANTED] = True
    try:
        return original(*args, **kwargs)
    finally:
        encoder.__dict__[LAYERS_WANTED] = False
