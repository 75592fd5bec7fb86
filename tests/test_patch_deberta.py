"""fastlm.patch on DeBERTa-v2/v3-shaped models (random weights, CPU): patched vs unpatched
outputs, losses and every parameter's gradient (fp32: 1e-5 relative, as tests/test_patch.py),
the paths that fall back to transformers, the refusals, unpatch, save/reload and Trainer.

The small config is tests/_patch_models.py's (DeBERTa-v3's structure, position_buckets 8, so the
11-token rows reach the log-bucketed distances; the compatibility suite runs it as one of the
families); the slow test uses the real xsmall sizes.
"""
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import fastlm
from fastlm.patching.report import UNSUPPORTED

from _patch_models import (assert_close_rel, assert_same_grads, encoder, mlm_labels, padded_batch,  # noqa: E402
                           trainer_losses, twins)

REL = 1e-5
LENGTHS = [11, 1, 7, 11, 4]
VARIANTS = {
    "v3": {},
    "own-position-projections": dict(share_att_key=False),
    "c2p-only": dict(pos_att_type=["c2p"]),
    "p2c-only": dict(pos_att_type=["p2c"], share_att_key=False),
    "no-buckets": dict(position_buckets=-1, max_relative_positions=6),  # |i - j| > 6 clamps
    "absolute-positions": dict(position_biased_input=True, type_vocab_size=2, norm_rel_ebd="none"),
    "no-relative-attention": dict(relative_attention=False),
}


def deberta(head="ForSequenceClassification", dropout=0.0, **overrides):
    return encoder("deberta-v2", head, dropout, **overrides)


def head_inputs(head, ids, mask):
    inputs = dict(input_ids=ids, attention_mask=mask)
    if head == "ForSequenceClassification":
        inputs["labels"] = torch.randint(0, 2, (ids.shape[0],))
    elif head == "ForTokenClassification":
        inputs["labels"] = torch.where(mask == 1, torch.randint(0, 2, ids.shape), -100)
    elif head == "ForMaskedLM":
        inputs["labels"] = mlm_labels(ids, mask)
    elif head == "ForMultipleChoice":
        inputs = dict(input_ids=ids[:4].view(2, 2, -1), attention_mask=mask[:4].view(2, 2, -1),
                      labels=torch.tensor([0, 1]))
    return inputs


def compare(ref, new, head, inputs, rel=REL):
    """Outputs on real positions, the loss (or a loss over real positions) and every gradient."""
    a, b = ref(**inputs), new(**inputs)
    valid = (inputs["attention_mask"] == 1).reshape(-1)
    if head == "Model":
        h_a, h_b = (o.last_hidden_state.reshape(valid.numel(), -1) for o in (a, b))
        assert_close_rel(h_b[valid], h_a[valid], rel, "last_hidden_state")
        # a random projection: the mean square of LayerNorm outputs would be constant (zero gradients)
        weight = torch.randn(h_a.shape[-1], dtype=h_a.dtype)
        loss_a, loss_b = ((h[valid] * weight).sum() for h in (h_a, h_b))
    elif head == "ForQuestionAnswering":  # its loss reads padded positions' logits too (as for BERT)
        for name in ("start_logits", "end_logits"):
            la, lb = (getattr(o, name).reshape(-1) for o in (a, b))
            assert_close_rel(lb[valid], la[valid], rel, name)
        loss_a, loss_b = (o.start_logits.reshape(-1)[valid].square().sum() for o in (a, b))
    else:
        if b.logits is not None:
            pick = (lambda t: t.reshape(valid.numel(), -1)[valid]) if head == "ForTokenClassification" else \
                (lambda t: t)
            if head != "ForMaskedLM":
                assert_close_rel(pick(b.logits), pick(a.logits), rel, "logits")
        assert_close_rel(b.loss.detach(), a.loss.detach(), rel, "loss")
        loss_a, loss_b = a.loss, b.loss
    loss_a.backward()
    loss_b.backward()
    assert_same_grads(ref, new, rel)
    return a, b


HEADS = ["ForSequenceClassification", "ForMaskedLM", "ForTokenClassification", "ForQuestionAnswering",
         "ForMultipleChoice", "Model"]


@pytest.mark.parametrize("head", HEADS)
def test_heads_match_in_training(head):
    ref, new = twins(deberta(head).train())
    report = fastlm.patch(new)
    expected = ["attention", "unpad", "head"] if head == "ForMaskedLM" else ["attention", "unpad"]
    assert report.patched == expected, str(report)
    ids, mask = padded_batch(LENGTHS)
    a, b = compare(ref, new, head, head_inputs(head, ids, mask))
    if head == "ForMaskedLM":
        assert b.logits is None  # sparse prediction in training with labels (documented)
    if head == "Model":
        assert b.last_hidden_state[mask == 0].abs().max() == 0  # padded positions: zeros (documented)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_match(variant):
    ref, new = twins(deberta("ForSequenceClassification", **VARIANTS[variant]).train())
    assert fastlm.patch(new).patched == ["attention", "unpad"]
    ids, mask = padded_batch(LENGTHS)
    compare(ref, new, "ForSequenceClassification", head_inputs("ForSequenceClassification", ids, mask))


def test_non_legacy_masked_lm_head():
    """The non-legacy head multiplies by the word embeddings plus its own bias."""
    ref, new = twins(deberta("ForMaskedLM", legacy=False).train())
    assert fastlm.patch(new).patched == ["attention", "unpad", "head"]
    ids, mask = padded_batch(LENGTHS)
    compare(ref, new, "ForMaskedLM", head_inputs("ForMaskedLM", ids, mask))


def test_float64_is_exact():
    """(Only the reference serves float64, so ``auto`` would hand attention back to transformers
    there: the backend is named to keep fastlm's path under test.)"""
    ref, new = twins(deberta("ForMaskedLM").train().double())
    fastlm.patch(new, backend="reference")
    ids, mask = padded_batch(LENGTHS)
    compare(ref, new, "ForMaskedLM", head_inputs("ForMaskedLM", ids, mask), rel=1e-12)


def test_eval_full_logits_match():
    ref, new = twins(deberta("ForMaskedLM").eval())
    fastlm.patch(new)
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        a, b = (m(input_ids=ids, attention_mask=mask).logits for m in (ref, new))
    assert_close_rel(b[mask == 1], a[mask == 1], REL, "eval logits")


@pytest.mark.slow
def test_real_xsmall_sizes_match():
    """DeBERTa-v3-xsmall's shape (12 layers, hidden 384, 6 heads, 256 buckets; a small vocabulary):
    rows longer than position_buckets / 2, one past position_buckets."""
    model = deberta("ForSequenceClassification", hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                    intermediate_size=1536, position_buckets=256, max_relative_positions=-1,
                    max_position_embeddings=512).train()
    ref, new = twins(model)
    fastlm.patch(new)
    ids, mask = padded_batch([300, 140, 7, 211], seq=300)
    compare(ref, new, "ForSequenceClassification", head_inputs("ForSequenceClassification", ids, mask))


# ------------------------------------------------------------------------ other layouts
def test_mask_holes_unpad_false_and_hidden_states_run_padded(monkeypatch):
    """Distances inside a row with holes change when packed, so such a batch runs the fused op
    padded (the padded row's positions), as does unpad=False and a call for per-layer outputs.
    Padded runs give a padding query transformers' uniform row, so outputs and hidden states
    agree at EVERY position, padded ones included."""
    op_module = sys.modules["fastlm.ops.disentangled_attention"]  # (fastlm.ops.<name> is the function)
    calls = []
    for name in ("disentangled_attention", "varlen_disentangled_attention"):
        real = getattr(op_module, name)
        monkeypatch.setattr(op_module, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name),
                                                                                     _real(*a, **k))[1])
    ids, mask = padded_batch(LENGTHS)
    holes = mask.clone()
    holes[0, 3] = 0
    for unpad, mask_, kwargs in ((True, holes, {}), (False, mask, {}), (True, mask, {"output_hidden_states": True})):
        calls.clear()
        ref, new = twins(deberta("ForTokenClassification").train())
        fastlm.patch(new, unpad=unpad)
        inputs = dict(head_inputs("ForTokenClassification", ids, mask_), **kwargs)
        a, b = compare(ref, new, "ForTokenClassification", inputs)
        assert calls and set(calls) == {"disentangled_attention"}, (unpad, kwargs, calls)
        assert_close_rel(b.logits.detach(), a.logits.detach(), REL, "logits at every position")
        if kwargs:
            assert len(b.hidden_states) == len(a.hidden_states) == 3
            for x, y in zip(b.hidden_states, a.hidden_states):
                assert_close_rel(x.detach(), y.detach(), REL, "hidden states at every position")


def test_fallbacks_run_transformers_exactly_with_one_warning_each():
    """Left padding, output_attentions and a 4D mask go through transformers' own attention."""
    from fastlm.patching import deberta as module

    ref, new = twins(deberta("ForSequenceClassification").train())
    fastlm.patch(new)
    ids, left = padded_batch(LENGTHS, left=True)
    _, mask = padded_batch(LENGTHS)
    labels = torch.randint(0, 2, (len(LENGTHS),))
    module._WARNED.clear()
    cases = [dict(attention_mask=left), dict(attention_mask=mask, output_attentions=True),
             dict(attention_mask=mask[:, None, None, :])]
    for kwargs in cases:
        with pytest.warns(UserWarning, match="runs transformers' own attention"):
            b = new(input_ids=ids, labels=labels, **kwargs)
        a = ref(input_ids=ids, labels=labels, **kwargs)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
        if kwargs.get("output_attentions"):
            assert all(torch.equal(x, y) for x, y in zip(a.attentions, b.attentions))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        new(input_ids=ids, attention_mask=left, labels=labels)


def test_set_attn_implementation_hands_attention_back_and_fastlm_resumes():
    """DeBERTa has one implementation, its own (transformers calls it "eager" and does not switch
    it): set_attn_implementation with anything else hands attention and unpadding back to it
    (transformers' forward, bit for bit, quietly), the report says so; "fastlm" resumes both."""
    ref, new = twins(deberta("Model").eval())
    report = fastlm.patch(new)
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        for impl in ("sdpa", "eager"):
            new.set_attn_implementation("fastlm")
            new.set_attn_implementation(impl)
            assert new.config._attn_implementation == "eager"
            statuses = {part: status for part, status, _ in report.entries}
            assert statuses == {"attention": "handed back", "unpad": "handed back", "head": "not applicable"}
            assert "transformers' 'eager' serves attention" in str(report)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert torch.equal(new(input_ids=ids, attention_mask=mask).last_hidden_state, want)
        new.set_attn_implementation("fastlm")
        assert report.patched == ["attention", "unpad"]
        got = new(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close_rel(got[mask == 1], want[mask == 1], REL, "fastlm again")
    assert got[mask == 0].abs().max() == 0  # unpadded again
    fastlm.unpatch(new)
    assert new.config._attn_implementation == "eager"


def test_explicit_backend_that_cannot_serve_raises_with_reasons(monkeypatch):
    """Triton installed: the patch takes the request and the first CPU forward refuses it with
    the row's reason; without triton, ``patch`` itself refuses the unavailable backend."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = deberta("ForSequenceClassification").eval()
    why = fastlm.registry.BACKENDS["triton"].unavailable_reason()
    if why:
        with pytest.raises(fastlm.BackendError, match="backend 'triton' is unavailable: " + re.escape(why)):
            fastlm.patch(model, backend="triton")
        return
    fastlm.patch(model, backend="triton")
    ids, mask = padded_batch(LENGTHS)
    with pytest.raises(fastlm.BackendError, match="backend 'triton' cannot serve.*runs on cuda tensors, not cpu"):
        model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
def test_torch_export_runs_the_fused_op_padded(layout):
    """Under tracing the layers run the fused op padded (packing is data-dependent); the exported
    program equals the untraced patched model at EVERY position: zeros where it unpads, and for
    left padding (untraced: transformers' own path) the padding queries' uniform rows, which the
    sequence-classification pooler reads at position 0."""
    ref, new = twins(deberta("ForSequenceClassification").eval())
    fastlm.patch(new)
    ids, mask = padded_batch(LENGTHS, left=layout == "left")
    if layout == "holes":
        mask[0, 3] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the left-padding notice
        program = torch.export.export(new, (), dict(input_ids=ids, attention_mask=mask))
        assert "fastlm.disentangled_attention" in str(program.graph)
        body = torch.export.export(new.deberta, (), dict(input_ids=ids, attention_mask=mask))
        with torch.no_grad():
            got, untraced = program.module()(input_ids=ids, attention_mask=mask)["logits"], new(input_ids=ids,
                                                                                                attention_mask=mask)
            hidden = body.module()(input_ids=ids, attention_mask=mask)["last_hidden_state"]
            want_hidden = new.deberta(input_ids=ids, attention_mask=mask).last_hidden_state
            want = ref(input_ids=ids, attention_mask=mask).logits
    assert_close_rel(got, untraced.logits, REL, "exported vs untraced logits")
    assert_close_rel(got, want, REL, "exported vs transformers logits")
    assert_close_rel(hidden, want_hidden, REL, "exported vs untraced hidden states, every position")


@pytest.mark.parametrize("overrides,why", [(dict(pos_att_type=["p2c", "c2p", "p2p"]), "p2p"),
                                           (dict(conv_kernel_size=3), "conv_kernel_size")])
def test_unserved_configs_are_refused_and_left_unchanged(overrides, why):
    ref, new = twins(deberta("ForSequenceClassification", **overrides).eval())
    with pytest.warns(UserWarning, match=why):
        report = fastlm.patch(new)
    statuses = {part: status for part, status, _ in report.entries}
    assert statuses["attention"] == statuses["unpad"] == UNSUPPORTED
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids, attention_mask=mask).logits,
                           new(input_ids=ids, attention_mask=mask).logits)


def test_attention_false():
    new = deberta("ForMaskedLM")
    report = fastlm.patch(new, attention=False, unpad=False)
    assert report.patched == ["head"]


def test_relative_slots_are_transformers_buckets():
    """The slot table the kernels read equals transformers' c2p and p2c gather indices."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    from fastlm.ops.disentangled_attention import relative_slots

    length = 600
    pos = torch.arange(length)
    for buckets, max_rel, span in ((256, 512, 256), (8, 32, 8), (-1, 24, 24)):
        x = torch.zeros(1, length, 1)
        rel = build_relative_position(x, x, bucket_size=buckets, max_position=max_rel)[0]
        c2p = torch.clamp(rel + span, 0, 2 * span - 1)        # row i, column j
        p2c = torch.clamp(-rel + span, 0, 2 * span - 1).t()   # transformers gathers by key, then transposes
        ours = relative_slots(length, 2 * span, buckets, max_rel, "cpu").long()[pos[:, None] - pos[None, :] + length - 1]
        assert torch.equal(ours, c2p) and torch.equal(ours, p2c)


# ------------------------------------------------------------------------ the rest of the stack
def test_unpatch_restores_bit_identical_outputs_and_state_dict():
    model = deberta("ForMaskedLM").train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = padded_batch(LENGTHS)
    labels = mlm_labels(ids, mask)
    before = model(input_ids=ids, attention_mask=mask, labels=labels)
    fastlm.patch(model)
    assert model.state_dict().keys() == state.keys()
    assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is None
    fastlm.unpatch(model)
    after = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)
    assert not any("_fastlm_originals" in m.__dict__ or "_fastlm_unpad" in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_save_pretrained_reloads_without_fastlm(tmp_path):
    ref, new = twins(deberta("ForSequenceClassification").eval())
    fastlm.patch(new)
    new.save_pretrained(tmp_path / "patched")
    ids, mask = padded_batch(LENGTHS)
    torch.save(dict(ids=ids, mask=mask), tmp_path / "batch.pt")
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
    code = ("import sys, torch; from transformers import DebertaV2ForSequenceClassification as M; "
            f"m = M.from_pretrained({str(tmp_path / 'patched')!r}).eval(); "
            f"b = torch.load({str(tmp_path / 'batch.pt')!r}); "
            "assert 'fastlm' not in sys.modules; "
            f"torch.save(m(input_ids=b['ids'], attention_mask=b['mask']).logits.detach(), "
            f"{str(tmp_path / 'logits.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert torch.equal(torch.load(tmp_path / "logits.pt"), want)


def test_trainer_short_run_same_losses(tmp_path):
    ids, mask = padded_batch([12, 5, 9, 12, 3, 7, 12, 8], seq=12)
    labels = torch.randint(0, 2, (len(ids),))
    rows = [dict(input_ids=ids[i], attention_mask=mask[i], labels=labels[i]) for i in range(len(ids))]
    ref, new = twins(deberta("ForSequenceClassification"))
    fastlm.patch(new)
    histories = [trainer_losses(model, rows, tmp_path) for model in (ref, new)]
    assert len(histories[1]) == 3
    assert_close_rel(torch.tensor(histories[1]), torch.tensor(histories[0]), 1e-4, "trainer losses")


def test_gradient_checkpointing_and_dropout_train():
    """Gradient checkpointing recomputes the fused layers (same gradients without dropout); with
    dropout the patched model trains (finite loss and gradients, dropout regenerated in backward)."""
    ref, new = twins(deberta("ForSequenceClassification").train())
    fastlm.patch(new)
    new.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = padded_batch(LENGTHS)
    compare(ref, new, "ForSequenceClassification", head_inputs("ForSequenceClassification", ids, mask))
    model = deberta("ForSequenceClassification", dropout=0.3).train()
    fastlm.patch(model)
    out = model(**head_inputs("ForSequenceClassification", ids, mask))
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                            if p.grad is not None)
    with torch.no_grad():
        model.eval()
        first, second = (model(input_ids=ids, attention_mask=mask).logits for _ in range(2))
    assert torch.equal(first, second)  # eval: no dropout


def test_explicit_backend_reaches_the_op(monkeypatch):
    op_module = sys.modules["fastlm.ops.disentangled_attention"]
    seen = []
    real = op_module.varlen_disentangled_attention
    monkeypatch.setattr(op_module, "varlen_disentangled_attention",
                        lambda *a, **k: (seen.append(k["backend"]), real(*a, **k))[1])
    ref, new = twins(deberta("ForSequenceClassification").train())
    assert fastlm.patch(new, backend="reference").backend == "reference"
    ids, mask = padded_batch(LENGTHS)
    compare(ref, new, "ForSequenceClassification", head_inputs("ForSequenceClassification", ids, mask))
    assert seen and set(seen) == {"reference"}


def test_autocast_bf16():
    """bf16 autocast: the patched masked-LM loss is as close to the fp32 loss as transformers' own."""
    ref, new = twins(deberta("ForMaskedLM").train())
    fastlm.patch(new)
    ids, mask = padded_batch(LENGTHS)
    labels = mlm_labels(ids, mask)
    exact = ref(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
        b = new(input_ids=ids, attention_mask=mask, labels=labels).loss
    b.backward()
    assert b.dtype == torch.float32
    assert abs(b.item() - exact) <= 2 * abs(a.item() - exact) + 2e-3 * abs(exact)
    assert all(torch.isfinite(p.grad).all() for p in new.parameters() if p.grad is not None)
