"""fastlm.patch on the paths transformers' own model tests exercise (tiny random models, CPU):
attentions requested per call or by config, left-padded causal training, static caches, the
window recogniser's cost.  Tolerances as tests/test_patch.py."""
import warnings

import pytest
import torch

import fastlm

from _patch_models import (LENGTHS, REL, V, assert_close_rel, assert_twins_train_alike, decoder, encoder,  # noqa: E402
                           padded_batch, twins)


# --------------------------------------------------- what transformers' own model tests exercise
def _eager_twins(make, model_type, *args):
    """(unpatched, patched) twins of a model built with eager attention, as transformers' tests
    build models whose attentions they read."""
    model = make(model_type, *args)
    model.set_attn_implementation("eager")
    ref, new = twins(model)
    fastlm.patch(new)
    return ref, new


@pytest.mark.parametrize("model_type", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("how", ["call", "config"])
def test_attentions_requested_per_call_or_by_config_are_eager_s(model_type, how):
    """output_attentions per call or through the config (GPT-2 pops the per-call flag and
    collects with hooks): the patched model returns eager's probabilities, hidden states
    included, and both keep gradients (transformers' test_retain_grad_hidden_states_attentions)."""
    make = encoder if model_type == "bert" else decoder
    model = make(model_type, *(["Model"] if make is encoder else []))
    model.set_attn_implementation("eager")
    if how == "config":
        model.config.output_attentions = model.config.output_hidden_states = True
    ref, new = twins(model.train())
    fastlm.patch(new)
    ids, mask = padded_batch([7, 4, 7], left=model_type != "bert")
    kw = dict(output_attentions=True, output_hidden_states=True) if how == "call" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = ref(input_ids=ids, attention_mask=mask, **kw), new(input_ids=ids, attention_mask=mask, **kw)
    assert len(b.attentions) == len(a.attentions) == 2
    for x, y in zip(b.attentions, a.attentions):  # every row, padding rows included: eager's
        assert_close_rel(x, y, REL, "attention probabilities")
    for x, y in zip(b.hidden_states, a.hidden_states):
        assert_close_rel(x, y, REL, "hidden states")
    b.hidden_states[0].retain_grad()
    b.attentions[0].retain_grad()
    b[0].flatten()[0].backward()
    assert b.hidden_states[0].grad is not None and b.attentions[0].grad is not None


@pytest.mark.parametrize("model_type", ["llama", "mistral-window", "qwen3", "gpt2"])
def test_left_padded_causal_training_on_a_model_patched_from_eager(model_type):
    """The label of a left-padded row's first real token is predicted from the last padding
    position, whose query sees no key: eager averages v over every key there (all scores get
    the same finite minimum), so the patched model must too; eval logits match everywhere."""
    ref, new = _eager_twins(decoder, model_type)
    ids, mask = padded_batch(LENGTHS, left=True)
    labels = ids.masked_fill(mask == 0, -100)
    assert_twins_train_alike(ref.train(), new.train(), REL, input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        a, b = (m.eval()(input_ids=ids, attention_mask=mask).logits for m in (ref, new))
    assert_close_rel(b, a, REL, "logits, padding positions included")


@pytest.mark.parametrize("model_type", ["llama", "mistral-window", "gpt2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "left_padded"])
def test_static_cache_prefill_and_decode_match(model_type, impl, padded):
    """A static cache holds max_cache_len slots of which only the first few are filled: queries
    must not see the empty ones (with or without an attention mask)."""
    from transformers import StaticCache

    model = decoder(model_type).eval()
    model.set_attn_implementation(impl)
    ref, new = twins(model)
    fastlm.patch(new)
    ids, mask = padded_batch([6, 4], left=True) if padded else padded_batch([6, 6])
    nxt = torch.randint(3, V, (2, 1))
    logits = []
    for m in (ref, new):
        cache = StaticCache(config=m.config, max_cache_len=20)
        with torch.no_grad():
            first = m(input_ids=ids, attention_mask=mask if padded else None, past_key_values=cache, use_cache=True)
            full = torch.cat([mask, torch.ones_like(nxt)], 1)
            second = m(input_ids=nxt, attention_mask=full if padded else None, past_key_values=cache, use_cache=True)
        logits.append((first.logits, second.logits))
    assert_close_rel(logits[1][0], logits[0][0], REL, "prefill logits")
    assert_close_rel(logits[1][1], logits[0][1], REL, "decode-step logits")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=1,
              cache_implementation="static")
    assert torch.equal(new.generate(**kw), ref.generate(**kw))


def test_window_recognition_costs_the_same_whatever_the_window():
    """Mistral's default window is 4096: recognising the pattern must not evaluate the mask
    function on a grid the window's size (it took ~0.5 s per forward)."""
    from types import SimpleNamespace

    from transformers import masking_utils as mu

    from fastlm.patching.masks import fastlm_mask

    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[1, :3] = False
    evaluated = []

    def recording(inner):
        def mask_function(b, h, q, kv):
            evaluated.append(torch.broadcast_shapes(q.shape, kv.shape).numel())
            return inner(b, h, q, kv)
        return mask_function

    for window, skip, inner in ((4096, True, mu.sliding_window_causal_mask_function(4096)),
                                (4096, False, mu.sliding_window_bidirectional_mask_function(4096))):
        evaluated.clear()
        mask = fastlm_mask(batch_size=2, q_length=9, kv_length=9, mask_function=recording(inner),
                           attention_mask=padding, local_size=window, allow_is_causal_skip=skip, use_vmap=False,
                           config=SimpleNamespace(sliding_window=window))
        assert torch.equal(mask, padding)  # recognised: the kernel applies the window
        assert sum(evaluated) <= 100, evaluated
