"""fastlm.patch never makes a model slower (fastlm/patching/tiers.py): at the first forward on
a device/dtype where fastlm's fastest backend for a feature is the reference, that feature runs
as transformers has it.  On CPU the situation is made by taking the C++ backend away (as on a
GPU today, where fastlm's GPU kernels are unverified), or by float64, which only the reference
serves."""
import warnings

import pytest
import torch

import fastlm
from fastlm import registry

from _patch_models import assert_close_rel, decoder, encoder, mlm_labels, padded_batch, twins  # noqa: E402


@pytest.fixture
def reference_only(monkeypatch):
    """Every backend but the reference unavailable (triton is never auto on CPU); the
    registry's decisions start afresh."""
    probe = registry._probe
    monkeypatch.setattr(registry, "_probe", lambda name: "disabled by the test" if name in ("cpu", "cuda")
                        else probe(name))
    monkeypatch.setattr(registry, "_DECISIONS", {})


def _states(report):
    return {part: status for part, status, _ in report.entries}


def _forward(model, **inputs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(**inputs)
    return out, [str(w.message) for w in caught if "fastlm.patch" in str(w.message)]


def test_masked_lm_hands_attention_and_unpadding_back_and_keeps_the_sparse_head(reference_only):
    ref, new = twins(encoder("bert", "ForMaskedLM").train())
    report = fastlm.patch(new)
    ids, mask = padded_batch([9, 4, 9, 6])
    labels = mlm_labels(ids, mask)
    out, said = _forward(new, input_ids=ids, attention_mask=mask, labels=labels)
    assert len(said) == 1 and "cpu/float32" in said[0] and "attention (transformers' 'sdpa'" in said[0]
    assert new.config._attn_implementation == "sdpa"
    assert _states(report) == {"attention": "handed back", "unpad": "handed back", "head": "patched"}
    assert "on cpu/float32: attention -> transformers 'sdpa', linear_cross_entropy -> reference" in str(report)
    assert out.logits is None  # the sparse head stays: it wins with any backend
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close_rel(out.loss.detach(), want.loss.detach(), 1e-5, "loss")
    new.eval()
    with torch.no_grad():  # the body is transformers' own now: bit for bit
        a = ref.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        b = new.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(a, b)
    _, said = _forward(new, input_ids=ids, attention_mask=mask)
    assert said == []  # one warning per model and device/dtype


def test_causal_lm_hands_attention_and_head_back(reference_only):
    ref, new = twins(decoder("llama").train())
    report = fastlm.patch(new)
    ids, mask = padded_batch([9, 4, 9], left=True)
    labels = ids.masked_fill(mask == 0, -100)
    out, said = _forward(new, input_ids=ids, attention_mask=mask, labels=labels)
    assert len(said) == 1 and "causal-LM head" in said[0]
    assert _states(report)["head"] == _states(report)["attention"] == "handed back"
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(out.logits, want.logits) and torch.equal(out.loss, want.loss)


def test_decided_once_per_device_and_dtype_and_resumed(monkeypatch):
    """No host sync or registry walk per forward: one decision per (device, dtype), cached; a
    dtype only the reference serves (float64) hands back, float32 resumes fastlm's kernels."""
    from fastlm.patching import tiers

    model = decoder("llama").eval()
    report = fastlm.patch(model)
    decided = []
    real = tiers._decide
    monkeypatch.setattr(tiers, "_decide", lambda model, *where: decided.append(where) or real(model, *where))
    ids, mask = padded_batch([7, 5])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            model(input_ids=ids, attention_mask=mask)
        assert decided == [("cpu", torch.float32)]
        model.double()
        model(input_ids=ids, attention_mask=mask)
        assert model.config._attn_implementation == "sdpa" and "cpu/float64" in report.tiers
        model.float()
        model(input_ids=ids, attention_mask=mask)
        assert model.config._attn_implementation == "fastlm"
    assert decided == [("cpu", torch.float32), ("cpu", torch.float64)]  # float32's was cached


def test_explicit_backend_and_user_choice_are_kept(reference_only):
    model = encoder("bert", "Model").eval()
    fastlm.patch(model, backend="reference")  # explicit: fastlm everywhere, as asked
    ids, mask = padded_batch([5, 3])
    with torch.no_grad():
        _, said = _forward(model, input_ids=ids, attention_mask=mask)
    assert said == [] and model.config._attn_implementation == "fastlm"
    other = encoder("bert", "Model").eval()
    fastlm.patch(other)
    other.set_attn_implementation("eager")
    with torch.no_grad():
        _, said = _forward(other, input_ids=ids, attention_mask=mask)
    assert said == [] and other.config._attn_implementation == "eager"  # the user's choice wins
    fastlm.unpatch(other)
    assert not other._forward_pre_hooks and not other._forward_pre_hooks_with_kwargs
