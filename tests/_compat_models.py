"""Families, patched/unpatched twins and output comparisons for the compatibility suite
(tests/test_compat_*.py) and the model fuzzer (tests/test_fuzz_models.py).  Not a test module.

The models are _patch_models' tiny random configs (fp32, dropout off); a "twin" pair is the
unpatched model and a deep copy of it (taken BEFORE patching) that is then patched, so both
hold the same weights.
"""
from __future__ import annotations

import copy
import inspect
import warnings

import torch

import fastlm
from _patch_models import DECODER_CONFIGS, ENCODER_CONFIGS, assert_close_rel, decoder, encoder

ENCODERS = list(ENCODER_CONFIGS)
DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]
FAMILIES = ENCODERS + DECODERS
# Relative bound of every patched-vs-unpatched comparison: a few fp32 ulps through 2-3 layers (as tests/test_patch.py)
REL = 1e-5
# 11 tokens, right padding, a length-1 row and a full row
LENGTHS = [11, 1, 7, 11, 4]


def build(family: str, impl: str = "sdpa", head: str = "ForMaskedLM", **overrides):
    """The family's tiny model in eval mode with attention implementation ``impl``:
    ``*ForCausalLM`` / ``GPT2LMHeadModel`` for decoders, ``<prefix><head>`` for encoders.
    ``overrides``: config fields that replace _patch_models' (per-layer lists such as
    ``layer_types`` are derived again from the new config)."""
    model = decoder(family) if family in DECODER_CONFIGS else encoder(family, head)
    if overrides:
        fields = {k: v for k, v in model.config.to_dict().items() if k != "layer_types"}
        model = type(model)(type(model.config).from_dict({**fields, **overrides}))
    if impl != "sdpa":
        model.set_attn_implementation(impl)
    return model.eval()


def patched_twins(model, **patch_kw):
    """(``model`` unpatched, a deep copy of it patched): same weights, same mode."""
    new = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # softmax-path notices: not what these tests judge
        fastlm.patch(new, **patch_kw)
    return model, new


def main_output(out) -> torch.Tensor:
    """The tensor a model call is judged by: logits (LM heads) or ``last_hidden_state``."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def assert_same_rows(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, what: str,
                     rel: float = REL) -> None:
    """``actual`` and ``expected`` ``(B, S, ...)`` agree within ``rel`` on the positions where
    ``mask`` ``(B, S)`` is nonzero (padded positions differ by design: see the README)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    keep = mask.to(torch.bool)
    assert_close_rel(actual[keep].detach(), expected[keep].detach(), rel, what)


def left_padded(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The right-padded batch ``ids``, ``mask`` ``(B, S)`` with each row's real tokens moved to the end."""
    lengths = mask.sum(1)
    shift = (ids.shape[1] - lengths)[:, None]
    cols = (torch.arange(ids.shape[1])[None, :] - shift) % ids.shape[1]
    return ids.gather(1, cols), mask.gather(1, cols)


def perturb_(model, seed: int = 1234) -> None:
    """Add the same small noise to every parameter of ``model`` (deterministic in ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def cache_kwarg(model) -> str:
    """The forward's name of the KV-cache argument: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (older)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(out):
    """The cache a decoder call returned, whichever name this transformers gives it."""
    return getattr(out, "cache", None) if hasattr(out, "cache") else out.past_key_values


def quiet(fn, *args, **kwargs):
    """Call ``fn`` with warnings silenced (transformers' config notices, the softmax-path notice)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)
