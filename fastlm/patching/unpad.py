"""Unpadded encoders: remove padding once, run every layer on packed tokens, re-pad once.

Two mechanisms, chosen by the family's row in :mod:`fastlm.patching.architectures`.

**Encoder module** (``Family.encoder``: BERT, RoBERTa, DistilBERT, ALBERT, ...).  The
encoder stack (``BertEncoder``, DistilBERT's ``Transformer``, ...) receives the
embeddings ``(B, S, H)`` and, with the ``"fastlm"`` mask builder, the 2D bool padding
mask ``(B, S)``.  Its replacement forward

1. computes, once per forward, the flat indices of real tokens, ``cu_seqlens`` (int32,
   ``(B + 1,)``) and ``max_seqlen`` (one host read, instead of one per layer as the
   built-in flash path does);
2. gathers the real tokens into ``(1, T, H)`` and runs the ORIGINAL encoder forward on
   them with ``attention_mask=None`` and the ``cu_seq_lens_q/k`` / ``max_length_q/k``
   keyword arguments, which every layer passes down to the attention function
   (:mod:`fastlm.patching.attention`, varlen kernel).  Every linear layer, layer norm and
   activation now runs on T instead of B x S rows: the saving is the padding share;
3. scatters ``last_hidden_state`` back to ``(B, S, H)``; padded positions are ZEROS (with
   transformers' own implementations they hold values computed from attending to the
   real tokens, which no loss or token-level head should read).

Right padding and mask holes work, since bidirectional attention over a sequence's real
tokens does not depend on where they sat.  LEFT padding (some row starts with padding)
runs the original way (padded, fused attention with the key-padding mask): poolers and
sequence-classification heads read position 0, which is then a padding token whose
output transformers computes (meaningless, but the unpatched model trains on it, so the
patched one must give the same).  The encoder also runs padded for a call that needs
per-layer outputs in padded layout (``output_hidden_states`` / ``output_attentions``),
cross-attention, a cache, a decoder config, a 4D mask or an already packed batch; the
base-model wrapper decides the first.

**Packed body** (``Family.packed_body``: ModernBERT).  Its base model has no encoder
module (``embeddings`` -> ``layers`` -> ``final_norm`` inside one forward that also computes
the rotary tables from ``position_ids``), but it takes a packed batch as it is: ids
``(1, T)``, ``position_ids`` ``(1, T)`` and the flash keyword arguments, as
``DataCollatorWithFlattening`` makes them.  So the base model's forward is wrapped, not
copied: the real tokens' ids (or embeddings, which are per token) and their ORIGINAL
position ids (``arange(S)`` over the padded row, or the caller's) are gathered, the
original forward runs on them with no mask (a ``{layer type: None}`` mapping: nothing to
build) and ``cu_seq_lens_*``, and ``last_hidden_state`` is re-padded with zeros.  Rotary
angles are those of the padded run exactly; sliding-window layers run the varlen kernel
with the window, whose distances in the packed row equal the padded row's as long as
each row's real tokens are contiguous.  Left padding (``classifier_pooling="cls"`` reads
position 0), a mask with holes, or a call wanting per-layer outputs, runs the original
forward (padded, fused attention).  Heads read the re-padded output: zeros at padded
positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.patching import binding
from fastlm.patching.masks import tracing


def _layout(mask: torch.Tensor) -> torch.Tensor:
    """int32 ``(3,)`` facts of a bool ``(B, S)`` padding mask: the longest sequence, how many rows'
    real tokens are not one run (holes: packing would change their distances), how many rows
    start with padding (left padding: position 0 is a pad token)."""
    batch, seqlen = mask.shape
    if batch == 0 or seqlen == 0:
        return torch.zeros(3, dtype=torch.int32, device=mask.device)
    seqlens = mask.sum(dim=1, dtype=torch.int32)
    pos = torch.arange(seqlen, device=mask.device)
    span = torch.where(mask, pos, -1).amax(1) - torch.where(mask, pos, seqlen).amin(1) + 1
    holes = ((span != seqlens) & (seqlens > 0)).sum(dtype=torch.int32)
    left = (~mask[:, 0]).sum(dtype=torch.int32)
    return torch.stack([seqlens.max(), holes, left])


class Packing:
    """Where the real tokens of a padded ``(B, S)`` batch go in the packed ``(T,)`` layout."""

    __slots__ = ("indices", "cu_seqlens", "max_seqlen", "contiguous", "first_real", "batch", "seqlen")

    def __init__(self, mask: torch.Tensor):
        self.batch, self.seqlen = mask.shape
        mask = mask.to(torch.bool)
        seqlens = mask.sum(dim=1, dtype=torch.int32)
        self.indices = mask.reshape(-1).nonzero().squeeze(1)       # host sync #1 (size of T)
        self.cu_seqlens = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
        facts = _layout(mask).tolist()                              # host sync #2, once per forward
        self.max_seqlen, self.contiguous, self.first_real = facts[0], facts[1] == 0, facts[2] == 0

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, S, ...)`` -> ``(1, T, ...)`` (index_select: the backward is a scatter-add)."""
        return x.reshape(self.batch * self.seqlen, *x.shape[2:]).index_select(0, self.indices).unsqueeze(0)

    def repad(self, x: torch.Tensor) -> torch.Tensor:
        """``(1, T, ...)`` -> ``(B, S, ...)`` with zeros at padded positions."""
        x = x.squeeze(0)
        out = x.new_zeros(self.batch * self.seqlen, *x.shape[1:]).index_copy(0, self.indices, x)
        return out.view(self.batch, self.seqlen, *x.shape[1:])

    def attention_kwargs(self) -> dict:
        return dict(cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                    max_length_q=self.max_seqlen, max_length_k=self.max_seqlen)


_BLOCKING_KWARGS = ("encoder_hidden_states", "cache", "past_key_values", "cu_seq_lens_q")


def _wants_layers(config, kwargs) -> bool:
    """The call asks for per-layer outputs, which callers expect in padded layout."""
    return any(kwargs.get(flag, getattr(config, flag, False)) for flag in ("output_hidden_states", "output_attentions"))


def _serves_packed(config) -> bool:
    """Packed tokens need an attention that reads ``cu_seq_lens_*``: fastlm's.  After
    ``set_attn_implementation("sdpa" | "eager")`` on a patched model the layers would
    attend across the packed sequences, so the model runs padded (as transformers has it)."""
    from fastlm.patching.attention import NAME

    return config._attn_implementation == NAME


def zeros_where_unpadded(hidden: torch.Tensor, mask: torch.Tensor, needs_contiguous: bool) -> torch.Tensor:
    """``hidden`` ``(B, S, H)`` with zeros at the padded positions of ``mask`` ``(B, S)`` if the
    untraced patched model would unpad this batch (no left padding, and with
    ``needs_contiguous`` no holes), else unchanged: decided on the device, no host read.

    Under ``torch.compile`` / ``torch.export`` tracing the model runs padded (the packed
    length is data: ``nonzero``, and a whole-model graph cannot break there); this makes its
    outputs the untraced patched model's."""
    mask = mask.to(torch.bool)
    facts = _layout(mask)
    unpads = (facts[2] == 0) & ((facts[1] == 0) if needs_contiguous else True)
    return torch.where(unpads & ~mask[..., None], torch.zeros((), dtype=hidden.dtype, device=hidden.device), hidden)


def _traced_as_unpadded(out, mask: torch.Tensor, needs_contiguous: bool):
    """A traced (padded) run's output with :func:`zeros_where_unpadded` applied to its last hidden state."""
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    hidden = zeros_where_unpadded(hidden, mask, needs_contiguous)
    if isinstance(out, tuple):
        return (hidden, *out[1:])
    out.last_hidden_state = hidden
    return out


def patch_encoder(base_model, encoder_name: str) -> None:
    """Bind the unpadding forward on ``base_model.<encoder_name>`` and the per-call gate on ``base_model``."""
    encoder = getattr(base_model, encoder_name)
    binding.set_attr(encoder, "_fastlm_unpad_enabled", True)
    binding.set_attr(encoder, "_fastlm_config", base_model.config)  # (DistilBERT's stack has no .config)
    binding.set_attr(base_model, "_fastlm_encoder", encoder_name)
    binding.bind(encoder, "forward", _encoder_forward)
    binding.bind(base_model, "forward", _encoder_base_forward)


def _encoder_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    original = binding.original(self, "forward")
    if not _can_unpad(self, hidden_states, attention_mask, args, kwargs):
        return original(hidden_states, attention_mask, *args, **kwargs)
    if tracing():
        return _traced_as_unpadded(original(hidden_states, attention_mask, *args, **kwargs), attention_mask, False)
    packing = Packing(attention_mask)
    if not packing.first_real:  # left padding: see the module docstring
        return original(hidden_states, attention_mask, *args, **kwargs)
    out = original(packing.unpad(hidden_states), None, *args, **kwargs, **packing.attention_kwargs())
    if isinstance(out, tuple):
        return (packing.repad(out[0]), *out[1:])
    out.last_hidden_state = packing.repad(out.last_hidden_state)
    return out


def _encoder_base_forward(self, *args, **kwargs):
    original = binding.original(self, "forward")
    if not _wants_layers(self.config, kwargs):
        return original(*args, **kwargs)
    encoder = getattr(self, self._fastlm_encoder)
    encoder._fastlm_unpad_enabled = False  # per-layer outputs are wanted in padded layout
    try:
        return original(*args, **kwargs)
    finally:
        encoder._fastlm_unpad_enabled = True


def _can_unpad(encoder, hidden_states, attention_mask, args, kwargs) -> bool:
    config = encoder._fastlm_config
    return (encoder._fastlm_unpad_enabled
            and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
            and attention_mask.shape == hidden_states.shape[:2]
            and not getattr(config, "is_decoder", False)
            and _serves_packed(config)
            and all(a is None for a in args)
            and all(kwargs.get(name) is None for name in _BLOCKING_KWARGS))


def patch_packed_body(base_model) -> None:
    """Bind the packing forward on a base model that takes packed batches (see module docstring)."""
    binding.bind(base_model, "forward", _packed_body_forward)


def _packed_body_forward(self, *args, **kwargs):
    config = self.config
    original = binding.original(self, "forward")
    named = binding.split_call(binding.signature(original), args, kwargs)
    mask = named.pop("attention_mask", None)
    ids, embeds = named.pop("input_ids", None), named.pop("inputs_embeds", None)
    tokens = ids if ids is not None else embeds
    if (_wants_layers(config, named) or not _serves_packed(config) or not isinstance(mask, torch.Tensor)
            or mask.dim() != 2 or tokens is None or mask.shape != tokens.shape[:2]
            or named.get("cu_seq_lens_q") is not None):
        return original(*args, **kwargs)
    if tracing():
        return _traced_as_unpadded(original(*args, **kwargs), mask, True)
    packing = Packing(mask)
    if not (packing.contiguous and packing.first_real):  # window distances / position 0: run padded
        return original(*args, **kwargs)
    positions = named.pop("position_ids", None)
    if positions is None:  # the model's own default: arange over the padded row
        positions = torch.arange(mask.shape[1], device=mask.device)[None]
    no_masks = {kind: None for kind in set(config.layer_types)}  # transformers uses a mapping as given
    out = original(input_ids=None if ids is None else packing.unpad(ids),
                   inputs_embeds=None if embeds is None else packing.unpad(embeds),
                   position_ids=packing.unpad(positions.expand(mask.shape)), attention_mask=no_masks,
                   **named, **packing.attention_kwargs())
    if isinstance(out, tuple):
        return (packing.repad(out[0]), *out[1:])
    out.last_hidden_state = packing.repad(out.last_hidden_state)
    return out
