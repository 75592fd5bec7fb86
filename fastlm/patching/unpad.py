"""Unpadded encoders: remove padding once after the embeddings, re-pad once at the end.

The encoder stack (``BertEncoder``, DistilBERT's ``Transformer``, ...) receives the
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
   real tokens, which no loss or head should read).

Any mask holes work (left/right padding, or arbitrary), since bidirectional attention
over a sequence's real tokens does not depend on where they sat.  The encoder runs the
original way (padded) for a call that needs per-layer outputs in padded layout
(``output_hidden_states`` / ``output_attentions``), cross-attention, a cache, a decoder
config, a 4D mask or an already packed batch; the base-model wrapper decides the first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.patching import binding


class Packing:
    """Where the real tokens of a padded ``(B, S)`` batch go in the packed ``(T,)`` layout."""

    __slots__ = ("indices", "cu_seqlens", "max_seqlen", "batch", "seqlen")

    def __init__(self, mask: torch.Tensor):
        self.batch, self.seqlen = mask.shape
        mask = mask.to(torch.bool)
        seqlens = mask.sum(dim=1, dtype=torch.int32)
        self.indices = mask.reshape(-1).nonzero().squeeze(1)       # host sync #1 (size of T)
        self.cu_seqlens = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
        self.max_seqlen = int(seqlens.max()) if self.batch else 0  # host sync #2, once per forward

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


def patch_encoder(base_model, encoder) -> None:
    """Bind the unpadding forward on ``encoder`` and the per-call gate on ``base_model``."""
    config = base_model.config
    binding.set_attr(encoder, "_fastlm_unpad_enabled", True)

    def make_encoder_forward(original):
        def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
            if not _can_unpad(self, config, hidden_states, attention_mask, args, kwargs):
                return original(hidden_states, attention_mask, *args, **kwargs)
            packing = Packing(attention_mask)
            out = original(packing.unpad(hidden_states), None, *args, **kwargs, **packing.attention_kwargs())
            if isinstance(out, tuple):
                return (packing.repad(out[0]), *out[1:])
            out.last_hidden_state = packing.repad(out.last_hidden_state)
            return out
        return forward

    def make_base_forward(original):
        def forward(self, *args, **kwargs):
            wants_layers = any(kwargs.get(flag, getattr(config, flag, False))
                               for flag in ("output_hidden_states", "output_attentions"))
            if not wants_layers:
                return original(*args, **kwargs)
            encoder._fastlm_unpad_enabled = False  # per-layer outputs are wanted in padded layout
            try:
                return original(*args, **kwargs)
            finally:
                encoder._fastlm_unpad_enabled = True
        return forward

    binding.bind(encoder, "forward", make_encoder_forward)
    binding.bind(base_model, "forward", make_base_forward)


def _can_unpad(encoder, config, hidden_states, attention_mask, args, kwargs) -> bool:
    return (encoder._fastlm_unpad_enabled
            and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
            and attention_mask.shape == hidden_states.shape[:2]
            and not getattr(config, "is_decoder", False)
            and all(a is None for a in args)
            and all(kwargs.get(name) is None for name in _BLOCKING_KWARGS))
