"""Property-based tests (hypothesis) of patched vs unpatched models: random tiny configs of
every patched family (width, heads, grouped-query, depth, windows), random batches (lengths
1 and odd, padding right, left or with holes), the original implementation sdpa or eager,
``patch`` options, eval outputs or a training step (loss and every gradient).  Same bounds as the compatibility suite.

CI runs a fixed (derandomized) set; ``FASTLM_FUZZ=1`` the big run (tests/_fuzz.py).
"""
import torch
from hypothesis import given
from hypothesis import strategies as st

from _compat_models import (DECODERS, ENCODERS, FAMILIES, REL, assert_same_rows, build, main_output,
                            patched_twins, quiet)
from _fuzz import examples
from _patch_models import V, assert_close_rel, assert_same_grads

# config field names of (width, heads, depth, feed-forward) per family
FIELDS = {"distilbert": ("dim", "n_heads", "n_layers", "hidden_dim"),
          "gpt2": ("n_embd", "n_head", "n_layer", "n_inner")}
DEFAULT_FIELDS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size")


@st.composite
def model_case(draw):
    family = draw(st.sampled_from(FAMILIES))
    heads, head_dim = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([4, 8, 16]))
    width, n_heads, depth, ffn = FIELDS.get(family, DEFAULT_FIELDS)
    config = {width: heads * head_dim, n_heads: heads, depth: draw(st.integers(1, 3)), ffn: draw(st.integers(4, 40))}
    if family in ("electra", "albert"):
        config["embedding_size"] = draw(st.integers(4, 24))
    if family == "modernbert":
        config.update(global_attn_every_n_layers=draw(st.integers(1, 3)), local_attention=2 * draw(st.integers(1, 8)))
    if family in DECODERS and family != "gpt2":
        config["num_key_value_heads"] = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
        config["head_dim"] = head_dim
    if family == "mistral":
        config["sliding_window"] = draw(st.none() | st.integers(1, 14))
    head = draw(st.sampled_from(["ForMaskedLM", "ForSequenceClassification"])) if family in ENCODERS else None
    return dict(family=family, config=config, head=head, impl=draw(st.sampled_from(["sdpa", "eager"])),
                patch=draw(st.sampled_from([{}, {}, {"unpad": False}, {"cross_entropy": False}])),
                lengths=draw(st.lists(st.integers(1, 12), min_size=1, max_size=4)),
                padding=draw(st.sampled_from(["right", "left", "holes"])), train=draw(st.booleans()),
                seed=draw(st.integers(0, 2**32 - 1)))


def _batch(lengths, padding, gen):
    """ids and a 0/1 mask: right or left padding to the longest row, or random holes (at
    least the first token of each row kept)."""
    seq = max(lengths)
    ids = torch.randint(3, V, (len(lengths), seq), generator=gen)
    pos = torch.arange(seq)[None, :]
    n = torch.tensor(lengths)[:, None]
    if padding == "holes":
        mask = (torch.rand(ids.shape, generator=gen) < 0.7) | (pos == 0)
    else:
        mask = (pos >= seq - n) if padding == "left" else (pos < n)
    return ids.masked_fill(~mask, 1), mask.long()


def _labels(c, ids, mask, gen):
    if c["head"] == "ForSequenceClassification":
        return torch.randint(0, 2, (ids.shape[0],), generator=gen)
    if c["family"] in ENCODERS:  # ~30% of the real tokens (possibly none)
        return ids.masked_fill((torch.rand(ids.shape, generator=gen) > 0.3) | (mask == 0), -100)
    return ids.masked_fill(mask == 0, -100)


def _has_targets(c, labels):
    """Whether the loss has any labelled term (causal LMs: after the shift by one)."""
    if c["head"] == "ForSequenceClassification":
        return True
    return bool((labels[:, 1:] if c["family"] in DECODERS else labels).ne(-100).any())


@examples(30)
@given(c=model_case())
def test_patched_model_matches_unpatched(c):
    gen = torch.Generator().manual_seed(c["seed"])
    torch.manual_seed(c["seed"])  # the model's random weights (and mlm_labels' draws)
    kw = dict(head=c["head"]) if c["head"] else {}
    ref, new = patched_twins(build(c["family"], c["impl"], **kw, **c["config"]), **c["patch"])
    ids, mask = _batch(c["lengths"], c["padding"], gen)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if not c["train"]:
        with torch.no_grad():
            a, b = main_output(quiet(ref, **inputs)), main_output(quiet(new, **inputs))
        if a.dim() == 2:  # sequence classification: one row per sequence
            assert_close_rel(b, a, REL, "classification logits")
        else:
            assert_same_rows(b, a, mask, "outputs")
        return
    ref.train(), new.train()
    inputs["labels"] = _labels(c, ids, mask, gen)
    a, b = quiet(ref, **inputs), quiet(new, **inputs)
    if not _has_targets(c, inputs["labels"]):
        assert torch.isnan(a.loss), "transformers' loss without a labelled token"
        if c["patch"].get("cross_entropy", True):  # documented: 0.0 and zero gradients (transformers: NaN)
            b.loss.backward()
            assert b.loss.item() == 0.0
            assert all(p.grad is None or not p.grad.any() for p in new.parameters())
        else:
            assert torch.isnan(b.loss)
        return
    a.loss.backward()
    b.loss.backward()
    assert_close_rel(b.loss.detach(), a.loss.detach(), REL, "training loss")
    # a shared layer (ALBERT) or depth 3 sums more differently-rounded contributions per gradient
    assert_same_grads(ref, new, 3 * REL)
