"""Compatibility suite, generation (every patched causal-LM family, plus Mistral with a
sliding window shorter than the prompts): what transformers' generation tests exercise,
patched vs unpatched twins (same weights, fp32): greedy and seeded sampling with dynamic and
static caches on left-padded batches, generation from ``inputs_embeds``, direct forwards
into a ``StaticCache``, assisted decoding (with attentions and hidden states), and
``generate`` with the forward compiled ``fullgraph=True`` (slow).

Sequences must be equal token for token and every step's logits within REL.
"""
import pytest
import torch

from _compat_models import (DECODERS, REL, assert_same_rows, build, cache_kwarg, patched_twins, quiet,
                            returned_cache)
from _patch_models import V, assert_close_rel, padded_batch

GENERATORS = DECODERS + ["mistral-window"]  # window 3: generation crosses it
PROMPTS = [6, 2, 5]  # left-padded, a 2-token prompt among them
NEW_TOKENS = 6


def _generate(model, seed=0, **kw):
    torch.manual_seed(seed)  # sampling draws from torch's generator: the same seed, the same draws
    with torch.no_grad():
        return quiet(model.generate, pad_token_id=1, return_dict_in_generate=True, output_logits=True, **kw)


def _assert_same_generation(got, want, what):
    assert torch.equal(got.sequences, want.sequences), f"{what}: {got.sequences.tolist()} vs {want.sequences.tolist()}"
    assert len(got.logits) == len(want.logits)
    for step, (x, y) in enumerate(zip(got.logits, want.logits)):
        assert_close_rel(x, y, REL, f"{what}: logits of step {step}")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("mode", ["greedy", "sample"])
@pytest.mark.parametrize("family", GENERATORS)
def test_generate_matches(family, mode, cache):
    ref, new = patched_twins(build(family))
    ids, mask = padded_batch(PROMPTS, left=True)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=mode == "sample")
    if cache == "static":
        kw["cache_implementation"] = "static"
    _assert_same_generation(_generate(new, **kw), _generate(ref, **kw), f"{mode}, {cache} cache")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", GENERATORS)
def test_generate_from_inputs_embeds(family, cache):
    ref, new = patched_twins(build(family))
    ids, mask = padded_batch(PROMPTS, left=True)
    embeds = ref.get_input_embeddings()(ids).detach()
    kw = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW_TOKENS)
    if cache == "static":
        kw["cache_implementation"] = "static"
    _assert_same_generation(_generate(new, **kw), _generate(ref, **kw), f"from inputs_embeds, {cache} cache")


@pytest.mark.parametrize("padding", ["no_mask", "full_mask", "left_padded"])
@pytest.mark.parametrize("family", GENERATORS)
def test_static_cache_forward(family, padding):
    """A direct forward into a ``StaticCache`` larger than the prompt (6 tokens, 20 slots),
    then two decode steps: the patched logits are transformers', never attention over the
    empty slots (the cache's valid length counts, not its size)."""
    from transformers import StaticCache

    ref, new = patched_twins(build(family))
    ids = torch.randint(3, V, (2, 6))
    mask = torch.ones_like(ids)
    if padding == "left_padded":
        mask[1, :3] = 0
    steps = [ids, torch.randint(3, V, (2, 1)), torch.randint(3, V, (2, 1))]
    outs = {}
    for name, model in (("ref", ref), ("new", new)):
        cache = StaticCache(config=model.config, max_cache_len=20)
        logits, seen = [], mask
        for i, step in enumerate(steps):
            if i:
                seen = torch.cat([seen, torch.ones_like(step)], 1)
            kw = {} if padding == "no_mask" else dict(attention_mask=seen)
            with torch.no_grad():
                out = quiet(model, input_ids=step, use_cache=True, **{cache_kwarg(model): cache}, **kw)
            cache = returned_cache(out)
            logits.append(out.logits)
        outs[name] = logits
    for i, (x, y) in enumerate(zip(outs["new"], outs["ref"])):
        real = mask if i == 0 else torch.ones(2, 1)
        assert_same_rows(x, y, real, f"static cache, call {i}")


@pytest.mark.parametrize("assistant", ["same", "random"])
@pytest.mark.parametrize("family", GENERATORS)
def test_assisted_decoding(family, assistant):
    """transformers' assisted-decoding tests: greedy with a draft model gives the greedy
    tokens; with attentions and hidden states requested (an eager model, as transformers'
    tests make it), they match the unpatched twin's."""
    ref, new = patched_twins(build(family, "eager"))
    if assistant == "same":
        ref_draft, new_draft = ref, new
    else:
        torch.manual_seed(7)
        ref_draft, new_draft = patched_twins(build(family, "eager"))
    ids, mask = padded_batch([5])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
              output_attentions=True, output_hidden_states=True)
    got = _generate(new, assistant_model=new_draft, **kw)
    want = _generate(ref, assistant_model=ref_draft, **kw)
    _assert_same_generation(got, want, "assisted")
    greedy = _generate(new, **kw)
    assert torch.equal(got.sequences, greedy.sequences), "assisted decoding changed the greedy tokens"
    for what in ("attentions", "hidden_states"):
        x_steps, y_steps = getattr(got, what), getattr(want, what)
        assert x_steps and len(x_steps) == len(y_steps), f"{what}: {len(x_steps or ())} steps vs {len(y_steps)}"
        for step, (xs, ys) in enumerate(zip(x_steps, y_steps)):
            assert len(xs) == len(ys) > 0, f"{what} of step {step}: {len(xs)} layers vs {len(ys)}"
            for x, y in zip(xs, ys):
                assert x.shape == y.shape, f"{what} of step {step}: {tuple(x.shape)} vs {tuple(y.shape)}"
                assert_close_rel(x, y, REL, f"{what} of step {step}")


# ------------------------------------------------------------------------ compiled
def _compile_config(backend):
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode=None if backend != "inductor" else
                           "default")
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    return config


@pytest.mark.slow
@pytest.mark.parametrize("family, backend", [(f, "aot_eager") for f in GENERATORS] + [("llama", "inductor")])
def test_generate_compiled_fullgraph(family, backend):
    """transformers' ``test_generate_compile_model_forward_fullgraph``: ``generate`` with a
    static cache and the decoding forward compiled with ``fullgraph=True`` (no graph break
    allowed) gives the eager unpatched tokens; a second prompt of the same shape reuses the
    graph (``fail_on_recompile``).  ``aot_eager`` traces exactly what inductor would receive
    (dynamo graph, fake tensors, AOT autograd) at a fraction of the compile time; one family
    goes through inductor."""
    torch._dynamo.reset()
    ref, new = patched_twins(build(family))
    kw = dict(max_new_tokens=4, do_sample=False, cache_implementation="static")
    for i in range(2):
        ids, mask = padded_batch(PROMPTS, left=True)
        want = _generate(ref, input_ids=ids, attention_mask=mask, **kw)
        if i == 0:
            got = _generate(new, input_ids=ids, attention_mask=mask, compile_config=_compile_config(backend), **kw)
        else:
            with torch.compiler.set_stance("fail_on_recompile"):
                got = _generate(new, input_ids=ids, attention_mask=mask, compile_config=_compile_config(backend),
                                **kw)
        _assert_same_generation(got, want, f"compiled generate, prompt {i}")
