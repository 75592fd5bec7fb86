"""Compatibility suite, every patched family (encoders and decoders): what transformers' own
model tests exercise, patched vs unpatched twins (same weights, fp32, dropout off, REL 1e-5).

Generation lives in test_compat_generation.py.  Where fastlm differs from transformers by
design, the README's list ("Compatibility with transformers") says so and the tests below
check that documented difference instead of skipping it.
"""
import copy
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import fastlm
from _compat_models import (DECODERS, ENCODERS, FAMILIES, LENGTHS, REL, assert_same_rows, build, left_padded,
                            main_output, patched_twins, perturb_, quiet)
from _patch_models import ONLY_EAGER, V, assert_close_rel, assert_same_grads, mlm_labels, padded_batch

# ALBERT runs one shared layer 3 times: 3 differently rounded contributions per gradient
REL_GRAD = {"albert": 3e-5}


def _labels(family, ids, mask):
    """Masked-LM labels (encoders) or the causal-LM labels a collator makes (padding ignored)."""
    return mlm_labels(ids, mask) if family in ENCODERS else ids.masked_fill(mask == 0, -100)


def _eval(model, **inputs):
    with torch.no_grad():
        return quiet(model, **inputs)


def _assert_train_alike(ref, new, family, ids, mask, fused_head=True):
    """One training step's loss and every gradient agree; with ``fused_head``, ``logits`` is
    None in the patched model (documented: the fused head never materialises the logits)."""
    ref.train(), new.train()
    labels = _labels(family, ids, mask)
    for m in (ref, new):
        m.zero_grad(set_to_none=True)
    a = quiet(ref, input_ids=ids, attention_mask=mask, labels=labels)
    b = quiet(new, input_ids=ids, attention_mask=mask, labels=labels)
    a.loss.backward()
    b.loss.backward()
    assert a.logits is not None
    if fused_head:
        assert b.logits is None, "documented: logits=None when training with labels"
    assert_close_rel(b.loss.detach(), a.loss.detach(), REL, "training loss")
    assert_same_grads(ref, new, REL_GRAD.get(family, REL))
    ref.eval(), new.eval()


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("family, impl, left", [
    pytest.param(f, impl, left, id=f"{f}-{impl}-{'left' if left else 'right'}_pad")
    for f in FAMILIES for impl in ("sdpa", "eager")
    # encoders run a left-padded batch padded (tests/test_patch.py covers it per head)
    for left in ((False, True) if f in DECODERS else (False,))])
def test_training_step_losses_and_gradients(family, impl, left):
    """The patched model trains the model the unpatched one trains, whatever implementation it
    had (the rule for a query that sees no key is the original implementation's: a left-padded
    causal batch predicts the first real token from the last padding position)."""
    ref, new = patched_twins(build(family, impl))
    ids, mask = padded_batch(LENGTHS, left=left)
    _assert_train_alike(ref, new, family, ids, mask)


def test_masked_lm_without_labelled_tokens_gives_zero_loss():
    """Documented: a batch with no labelled position gives loss 0.0 with zero gradients
    (transformers: NaN, which poisons the weights)."""
    ref, new = patched_twins(build("bert"))
    ids, mask = padded_batch(LENGTHS)
    labels = torch.full_like(ids, -100)
    new.train(), ref.train()
    assert torch.isnan(quiet(ref, input_ids=ids, attention_mask=mask, labels=labels).loss)
    loss = quiet(new, input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in new.parameters())


# ------------------------------------------------------------------- batching, padding
@pytest.mark.parametrize("family", FAMILIES)
def test_batching_and_padding_equivalence(family):
    """transformers' batching equivalence and left-padding compatibility: each row of a padded
    batch gives what that row gives alone, padded right or left, and what the unpatched twin
    gives on the same batch.  Documented: an unpadded encoder returns zeros at padded
    positions of ``last_hidden_state`` (transformers returns values computed from padding)."""
    ref, new = patched_twins(build(family, head="Model"))
    ids, mask = padded_batch(LENGTHS)
    right = _eval(new, input_ids=ids, attention_mask=mask)
    assert_same_rows(main_output(right), main_output(_eval(ref, input_ids=ids, attention_mask=mask)), mask,
                     "right-padded batch vs unpatched")
    for row, n in enumerate(LENGTHS):
        alone = main_output(_eval(new, input_ids=ids[row:row + 1, :n]))
        assert_close_rel(main_output(right)[row, :n], alone[0], REL, f"row {row} batched vs alone")
    if family in ENCODERS:
        hidden = right.last_hidden_state
        assert not hidden[mask == 0].any(), "documented: zeros at padded positions (unpadded encoder)"

    left_ids, left_mask = left_padded(ids, mask)
    kw = dict(input_ids=left_ids, attention_mask=left_mask)
    if family in DECODERS:  # generate's positions for left padding: each row counts from its first real token
        kw["position_ids"] = (left_mask.cumsum(-1) - 1).clamp(min=0)
    left = main_output(_eval(new, **kw))
    assert_same_rows(left, main_output(_eval(ref, **kw)), left_mask, "left-padded batch vs unpatched")
    if family in DECODERS:
        for row, n in enumerate(LENGTHS):
            assert_close_rel(left[row, -n:], main_output(right)[row, :n], REL, f"row {row} left vs right padding")


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_embeds_instead_of_input_ids(family):
    ref, new = patched_twins(build(family))
    ids, mask = padded_batch(LENGTHS)
    embeds = new.get_input_embeddings()(ids).detach()
    by_ids = main_output(_eval(new, input_ids=ids, attention_mask=mask))
    by_embeds = main_output(_eval(new, inputs_embeds=embeds, attention_mask=mask))
    assert_same_rows(by_embeds, by_ids, mask, "inputs_embeds vs input_ids")
    assert_same_rows(by_embeds, main_output(_eval(ref, inputs_embeds=embeds, attention_mask=mask)), mask,
                     "inputs_embeds vs unpatched")


# ---------------------------------------------------------- attentions, hidden states
@pytest.mark.parametrize("how", ["per_call", "config"])
@pytest.mark.parametrize("family", FAMILIES)
def test_attentions_and_hidden_states_with_retain_grad(family, how):
    """transformers' attention/hidden-state output tests and ``retain_grad`` test: requested per
    call or through the config (which transformers allows only on an eager model), the
    patched model returns the eager twin's attention probabilities (GPT-2 collects them with
    hooks) and hidden states, and gradients reach both."""
    model = build(family, "eager")
    kw = {}
    if how == "config":
        model.config.output_attentions = True
        model.config.output_hidden_states = True
    else:
        kw = dict(output_attentions=True, output_hidden_states=True)
    ref, new = patched_twins(model)
    ids, mask = padded_batch(LENGTHS)
    weight = torch.randn(*ids.shape, V)  # a loss over every real position's logits
    outs = []
    for m in (ref, new):
        out = quiet(m, input_ids=ids, attention_mask=mask, **kw)
        assert out.attentions and out.hidden_states, f"{type(m).__name__}: no attentions or hidden states"
        out.hidden_states[0].retain_grad()
        out.attentions[0].retain_grad()
        (main_output(out) * weight * mask[..., None]).sum().backward()
        outs.append(out)
    a, b = outs
    assert len(b.attentions) == len(a.attentions) > 0, f"{len(b.attentions)} attention maps vs {len(a.attentions)}"
    assert len(b.hidden_states) == len(a.hidden_states)
    for i, (x, y) in enumerate(zip(b.attentions, a.attentions)):
        assert x.shape == y.shape
        assert_same_rows(x.transpose(1, 2), y.transpose(1, 2), mask, f"attentions[{i}] (real query rows)")
    for i, (x, y) in enumerate(zip(b.hidden_states, a.hidden_states)):
        assert_same_rows(x, y, mask, f"hidden_states[{i}]")
    for name in ("hidden_states", "attentions"):
        x, y = getattr(b, name)[0], getattr(a, name)[0]
        assert y.grad is not None and x.grad is not None, f"retain_grad: no gradient on {name}[0]"
        if name == "attentions":  # (B, H, Sq, Sk): judge the real query rows
            x, y = x.grad.transpose(1, 2), y.grad.transpose(1, 2)
        else:
            x, y = x.grad, y.grad
        assert_same_rows(x, y, mask, f"gradient of {name}[0]")


# --------------------------------------------------------- set_attn_implementation
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_set_attn_implementation_after_patch(family, impl):
    """transformers' ``test_can_set_attention_dynamically``: switching a patched model's
    implementation gives exactly that implementation (packed tokens must never reach an
    attention that ignores ``cu_seq_lens``), in eval and in training, and the config says
    which implementation runs; switching back to ``"fastlm"`` serves the fused path again.
    (DeBERTa has one implementation, its own, which transformers does not switch and its config
    keeps naming: any other request hands fastlm's attention back to it.)"""
    ref = build(family)
    new = copy.deepcopy(ref)
    report = quiet(fastlm.patch, new)
    patched = list(report.patched)
    quiet(ref.set_attn_implementation, impl)
    quiet(new.set_attn_implementation, impl)
    assert new.config._attn_implementation == ref.config._attn_implementation == (
        "eager" if family in ONLY_EAGER else impl)
    assert "attention" not in report.patched, f"the report still says fastlm serves attention:\n{report}"
    ids, mask = padded_batch(LENGTHS)
    assert_same_rows(main_output(_eval(new, input_ids=ids, attention_mask=mask)),
                     main_output(_eval(ref, input_ids=ids, attention_mask=mask)), mask, f"after switching to {impl}")
    # (whether the fused head stays on with another attention is fastlm's choice: not judged)
    _assert_train_alike(ref, new, family, ids, mask, fused_head=False)
    quiet(new.set_attn_implementation, "fastlm")
    assert report.patched == patched, str(report)
    assert new.config._attn_implementation == ("eager" if family in ONLY_EAGER else "fastlm")
    assert_same_rows(main_output(_eval(new, input_ids=ids, attention_mask=mask)),
                     main_output(_eval(ref, input_ids=ids, attention_mask=mask)), mask, "back to fastlm")


# ------------------------------------------------------------------ copies, pickling
def _deepcopy(model):
    return copy.deepcopy(model)


def _save_load(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", [_deepcopy, _save_load], ids=["deepcopy", "torch.save"])
@pytest.mark.parametrize("family", FAMILIES)
def test_copies_of_a_patched_model(family, how):
    """A copy of a patched model (``copy.deepcopy``: reference models, EMA, model soups;
    ``torch.save(model)`` / ``torch.load``) computes with ITS OWN weights: after changing them
    it gives what the unpatched model with those weights gives, in eval and training, and the
    original is unaffected; ``fastlm.unpatch`` on the copy leaves it exact, the original too."""
    ref, new = patched_twins(build(family))
    ids, mask = padded_batch(LENGTHS)
    clone = quiet(how, new)
    ref_clone = copy.deepcopy(ref)
    perturb_(clone)
    perturb_(ref_clone)
    out = lambda m: main_output(_eval(m, input_ids=ids, attention_mask=mask))  # noqa: E731
    assert_same_rows(out(clone), out(ref_clone), mask, "copy with changed weights")
    assert_same_rows(out(new), out(ref), mask, "original after copying")
    _assert_train_alike(ref_clone, clone, family, ids, mask)
    quiet(fastlm.unpatch, clone)
    assert torch.equal(out(clone), out(ref_clone)), "unpatched copy is not bit-identical to transformers"
    assert_same_rows(out(new), out(ref), mask, "original after unpatching the copy")
    quiet(fastlm.unpatch, new)
    assert torch.equal(out(new), out(ref))


# ------------------------------------------------------------------------ torch.export
@pytest.mark.parametrize("family", FAMILIES)
def test_torch_export(family):
    """``torch.export`` of the patched model; the exported program gives the unpatched
    outputs on the batch it was traced with AND on another padding pattern of the same shape
    (nothing data-dependent may be baked into the graph).  Decoders without a cache output
    (a DynamicCache is not an exportable output, patched or not)."""
    ref, new = patched_twins(build(family))
    extra = dict(use_cache=False) if family in DECODERS else {}
    ids, mask = padded_batch(LENGTHS)
    exported = quiet(torch.export.export, new, args=(), kwargs=dict(input_ids=ids, attention_mask=mask, **extra))
    for lengths in (LENGTHS, [3, 11, 11, 6, 9], [11] * 5):
        ids, mask = padded_batch(lengths, seq=11)
        got = main_output(quiet(exported.module(), input_ids=ids, attention_mask=mask, **extra))
        want = main_output(_eval(ref, input_ids=ids, attention_mask=mask, **extra))
        assert_same_rows(got, want, mask, f"exported program on lengths {lengths}")


# ---------------------------------------------------------------------- save / reload
RELOAD_SCRIPT = r"""
import json, sys, torch, transformers
out = {}
for entry in json.loads(open(sys.argv[1]).read()):
    model = getattr(transformers, entry["cls"]).from_pretrained(entry["path"]).eval()
    data = torch.load(entry["inputs"])
    with torch.no_grad():
        res = model(**data)
    logits = res.logits
    torch.save(logits, entry["path"] + "/reloaded_logits.pt")
    out[entry["family"]] = model.config._attn_implementation
assert "fastlm" not in sys.modules, "fastlm was imported"
print(json.dumps(out))
"""


def test_save_pretrained_then_plain_transformers_from_pretrained(tmp_path):
    """``save_pretrained`` of a patched model (after a training step), then a fresh process
    with transformers only loads it with ``from_pretrained`` and gets the unpatched twin's
    logits (the checkpoint is transformers', weights and config)."""
    entries, refs = [], {}
    for family in FAMILIES:
        ref, new = patched_twins(build(family))
        ids, mask = padded_batch(LENGTHS)
        _assert_train_alike(ref, new, family, ids, mask)  # a step (no optimizer): state untouched
        path = tmp_path / family
        new.save_pretrained(path)
        assert "fastlm" not in (path / "config.json").read_text()
        torch.save(dict(input_ids=ids, attention_mask=mask), path / "inputs.pt")
        refs[family] = (main_output(_eval(ref, input_ids=ids, attention_mask=mask)), mask)
        entries.append(dict(family=family, cls=type(new).__name__, path=str(path), inputs=str(path / "inputs.pt")))
    (tmp_path / "entries.json").write_text(json.dumps(entries))
    (tmp_path / "reload.py").write_text(RELOAD_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # transformers from the environment, not the source tree
    proc = subprocess.run([sys.executable, "-P", str(tmp_path / "reload.py"), str(tmp_path / "entries.json")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    impls = json.loads(proc.stdout.strip().splitlines()[-1])
    for family in FAMILIES:
        assert impls[family] != "fastlm"
        want, mask = refs[family]
        got = torch.load(tmp_path / family / "reloaded_logits.pt")
        assert_same_rows(got, want, mask, f"{family} reloaded without fastlm")


# ------------------------------------------------------------- torch.compile(fullgraph)
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_compile_fullgraph(family):
    """``torch.compile(model, fullgraph=True)`` of the whole patched model (no graph break
    allowed): eval outputs on a padded batch, then a training step's loss and gradients, as
    the unpatched twin.  Backend ``aot_eager``: dynamo's graph and AOT autograd's fake-tensor
    trace, which is what breaks on data-dependent code, without inductor's compile time."""
    torch._dynamo.reset()
    ref, new = patched_twins(build(family))
    compiled = torch.compile(new, fullgraph=True, backend="aot_eager")
    ids, mask = padded_batch(LENGTHS)
    assert_same_rows(main_output(_eval(compiled, input_ids=ids, attention_mask=mask)),
                     main_output(_eval(ref, input_ids=ids, attention_mask=mask)), mask, "compiled eval outputs")
    ref.train(), new.train()
    labels = _labels(family, ids, mask)
    a = quiet(ref, input_ids=ids, attention_mask=mask, labels=labels)
    b = quiet(compiled, input_ids=ids, attention_mask=mask, labels=labels)
    a.loss.backward()
    b.loss.backward()
    assert_close_rel(b.loss.detach(), a.loss.detach(), REL, "compiled training loss")
    assert_same_grads(ref, new, REL_GRAD.get(family, REL))
