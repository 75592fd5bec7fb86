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


@pytest.fixture
def torch_tier(monkeypatch):
    """PyTorch's fused GPU kernels available (the torch tier), as on a GPU; decisions afresh."""
    import dataclasses

    monkeypatch.setitem(registry.BACKENDS, "torch", dataclasses.replace(registry.BACKENDS["torch"], probe=lambda: None))
    registry._probe.cache_clear()
    monkeypatch.setattr(registry, "_DECISIONS", {})
    yield
    registry._probe.cache_clear()


@pytest.mark.parametrize("kind, model_type, op, expected", [
    ("encoder", "bert", "attention", "torch"),        # unpadded: packed, no mask -> flash varlen
    ("encoder", "modernbert", "attention", "torch"),  # packed with its local layers' window -> flash varlen
    ("decoder", "llama", "attention", "torch"),       # padding mask + causal -> memory-efficient
    ("decoder", "mistral", "attention", "torch"),     # no window in this config: as llama
    ("decoder", "mistral-window", "attention", "reference"),  # padding + causal window: neither PyTorch kernel
    # DeBERTa's attention is its own op, which no PyTorch kernel serves; its Triton kernels are unverified
    ("encoder", "deberta-v2", "disentangled_attention", "reference"),
])
def test_on_cuda_the_torch_tier_keeps_the_fused_path(torch_tier, kind, model_type, op, expected):
    """What the rule decides for a GPU when PyTorch's kernels are available (the torch tier):
    the fused path stays wherever that tier serves the model's attention and loss."""
    from fastlm.patching import tiers

    model = encoder(model_type) if kind == "encoder" else decoder(model_type)
    fastlm.patch(model)
    ops = tiers._decide(model, "cuda", torch.bfloat16)
    assert ops == {op: expected, "linear_cross_entropy": "torch"}


def test_deberta_on_cuda_hands_attention_back_and_keeps_the_masked_lm_head(torch_tier):
    """On a GPU (decided with stand-in tensors, applied to the model here) DeBERTa's attention and
    unpadding go back to transformers (reference only: slower than its own), with one warning;
    the sparse masked-LM head stays, its loss on the torch tier; back on the CPU fastlm's
    kernels serve again."""
    from fastlm.patching import tiers

    model = encoder("deberta-v2", "ForMaskedLM").train()
    report = fastlm.patch(model)
    where = ("cuda", torch.bfloat16)
    with pytest.warns(UserWarning, match=r"on cuda/bfloat16 .*attention \(transformers' 'eager'; unpadding off\)"):
        tiers._apply(model, where, tiers._decide(model, *where), warn=True)
    assert _states(report) == {"attention": "handed back", "unpad": "handed back", "head": "patched"}
    assert ("on cuda/bfloat16: disentangled_attention -> transformers 'eager', linear_cross_entropy -> torch"
            in str(report)), str(report)
    assert model.deberta.encoder._fastlm_fused is False
    ids, mask = padded_batch([9, 4, 9, 6])
    out, said = _forward(model, input_ids=ids, attention_mask=mask, labels=mlm_labels(ids, mask))
    assert said == [] and out.logits is None and model.deberta.encoder._fastlm_fused is True
    assert _states(report)["attention"] == "patched" and "on cpu/float32: disentangled_attention -> cpu" in str(report)


def test_deberta_hands_attention_back_where_only_the_reference_serves(reference_only):
    """On CPU without the C++ kernels DeBERTa runs transformers' own encoder (bit for bit, no
    unpadding), one warning; the sparse masked-LM head stays."""
    ref, new = twins(encoder("deberta-v2", "ForMaskedLM").train())
    report = fastlm.patch(new)
    ids, mask = padded_batch([9, 4, 9, 6])
    labels = mlm_labels(ids, mask)
    out, said = _forward(new, input_ids=ids, attention_mask=mask, labels=labels)
    assert len(said) == 1 and "attention (transformers' 'eager'; unpadding off)" in said[0]
    assert _states(report) == {"attention": "handed back", "unpad": "handed back", "head": "patched"}
    assert "on cpu/float32: disentangled_attention -> transformers 'eager'" in str(report)
    assert out.logits is None
    assert_close_rel(out.loss.detach(), ref(input_ids=ids, attention_mask=mask, labels=labels).loss.detach(), 1e-5,
                     "loss")
    new.eval()
    with torch.no_grad():
        a = ref.deberta(input_ids=ids, attention_mask=mask).last_hidden_state
        b = new.deberta(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(a, b)
