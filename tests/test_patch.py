"""fastlm.patch on tiny random models of every supported family and head (CPU, dropout off
unless said): patched vs unpatched outputs, losses and every parameter's gradient.

Tolerance: 1e-5 relative (max abs error over max abs reference value), fp32.  Unpadding
and the fused kernels change only summation order, so the differences are a few ulps
amplified through 2-3 layers.
"""
import warnings

import pytest
import torch

import fastlm

from _patch_models import (DECODER_CONFIGS, ENCODER_CONFIGS, LENGTHS, REL, V, assert_close_rel,  # noqa: E402
                           assert_same_grads, decoder, encoder, loss_backward, mlm_labels, padded_batch,
                           record_attention_calls, twins)

# ALBERT runs its one shared layer 3 times, so each of its gradients sums 3 contributions
# rounded differently (unpadded rows): 3x the bound.  float64 runs agree to 1e-12 (below).
REL_GRAD = {"albert": 3e-5}


@pytest.mark.parametrize("model_type", list(ENCODER_CONFIGS))
def test_masked_lm_training_matches(model_type):
    ref, new = twins(encoder(model_type, "ForMaskedLM").train())
    report = fastlm.patch(new)
    assert report.patched == ["attention", "unpad", "head"], str(report)
    ids, mask = padded_batch(LENGTHS)
    labels = mlm_labels(ids, mask)
    a = loss_backward(ref, input_ids=ids, attention_mask=mask, labels=labels)
    b = loss_backward(new, input_ids=ids, attention_mask=mask, labels=labels)
    assert b.logits is None  # sparse prediction in training with labels (documented)
    assert_close_rel(b.loss.detach(), a.loss.detach(), REL, "loss")
    assert_same_grads(ref, new, REL_GRAD.get(model_type, REL))


@pytest.mark.parametrize("model_type", ["bert", "albert", "modernbert", "llama"])
def test_float64_is_exact(model_type):
    """In float64 the patched model equals the unpatched one to rounding: the same maths.  (Only
    the reference serves float64, so ``auto`` would hand attention back to transformers there:
    the backend is named to keep fastlm's path under test.)"""
    model = encoder(model_type) if model_type != "llama" else decoder(model_type)
    ref, new = twins(model.train().double())
    fastlm.patch(new, backend="reference")
    ids, mask = padded_batch(LENGTHS)
    if model_type == "llama":
        # transformers' causal-LM loss casts logits to float32 even from float64: the float64
        # truth is computed here from its logits instead
        labels = ids.masked_fill(mask == 0, -100)
        logits = ref(input_ids=ids, attention_mask=mask).logits
        loss_a = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
        loss_a.backward()
    elif model_type == "modernbert":  # its masked-LM loss casts to float32 as well
        labels = mlm_labels(ids, mask)
        logits = ref(input_ids=ids, attention_mask=mask).logits
        loss_a = torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1))
        loss_a.backward()
    else:
        labels = mlm_labels(ids, mask)
        loss_a = loss_backward(ref, input_ids=ids, attention_mask=mask, labels=labels).loss
    b = loss_backward(new, input_ids=ids, attention_mask=mask, labels=labels)
    assert_close_rel(b.loss.detach(), loss_a.detach(), 1e-12, "loss")
    assert_same_grads(ref, new, 1e-12)


@pytest.mark.parametrize("model_type", list(ENCODER_CONFIGS))
@pytest.mark.parametrize("head", ["ForSequenceClassification", "ForTokenClassification", "ForMultipleChoice",
                                  "ForQuestionAnswering", "Model"])
def test_encoder_heads_match(model_type, head):
    ref, new = twins(encoder(model_type, head).train())
    fastlm.patch(new)
    ids, mask = padded_batch(LENGTHS)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if head == "ForSequenceClassification":
        inputs["labels"] = torch.randint(0, 2, (len(LENGTHS),))
    elif head == "ForTokenClassification":
        inputs["labels"] = torch.where(mask == 1, torch.randint(0, 2, ids.shape), -100)
    elif head == "ForMultipleChoice":
        inputs = dict(input_ids=ids[:4].view(2, 2, -1), attention_mask=mask[:4].view(2, 2, -1),
                      labels=torch.tensor([0, 1]))
    a, b = ref(**inputs), new(**inputs)
    valid = (inputs["attention_mask"] == 1).reshape(-1)
    if head == "Model":
        # padded positions of last_hidden_state are zeros after unpadding (documented)
        h_a, h_b = (o.last_hidden_state.reshape(valid.numel(), -1) for o in (a, b))
        assert_close_rel(h_b[valid], h_a[valid], REL, "last_hidden_state")
        assert h_b[~valid].abs().max() == 0
        # a random projection: the mean square of LayerNorm outputs is nearly constant (gradients ~0)
        weight = torch.randn(h_a.shape[-1])
        loss_a, loss_b = ((h[valid] * weight).sum() for h in (h_a, h_b))
    elif head == "ForQuestionAnswering":
        # transformers' QA loss reads the logits of padded positions too, so only valid
        # positions are compared (and the loss on an unpadded batch, below)
        for name in ("start_logits", "end_logits"):
            la, lb = (getattr(o, name).reshape(-1) for o in (a, b))
            assert_close_rel(lb[valid], la[valid], REL, name)
        loss_a, loss_b = (o.start_logits.reshape(-1)[valid].square().sum() for o in (a, b))
    else:
        assert_close_rel(b.logits.reshape(valid.numel(), -1)[valid] if head == "ForTokenClassification" else b.logits,
                         a.logits.reshape(valid.numel(), -1)[valid] if head == "ForTokenClassification" else a.logits,
                         REL, "logits")
        assert_close_rel(b.loss, a.loss, REL, "loss")
        loss_a, loss_b = a.loss, b.loss
    loss_a.backward()
    loss_b.backward()
    assert_same_grads(ref, new, REL_GRAD.get(model_type, REL))


@pytest.mark.parametrize("model_type", list(ENCODER_CONFIGS))
def test_left_padding_runs_padded_so_position_0_matches(model_type):
    """Poolers and classification heads read position 0, a padding token under left padding:
    such a batch runs padded (fused attention), so logits, loss, gradients and even the
    padded positions' outputs are transformers'."""
    ref, new = twins(encoder(model_type, "ForSequenceClassification").train())
    fastlm.patch(new)
    ids, mask = padded_batch(LENGTHS, left=True)
    labels = torch.randint(0, 2, (len(LENGTHS),))
    a = loss_backward(ref, input_ids=ids, attention_mask=mask, labels=labels)
    b = loss_backward(new, input_ids=ids, attention_mask=mask, labels=labels)
    assert_close_rel(b.logits.detach(), a.logits.detach(), REL, "logits")
    assert_close_rel(b.loss.detach(), a.loss.detach(), REL, "loss")
    assert_same_grads(ref, new, REL_GRAD.get(model_type, REL))
    body_a, body_b = (m.base_model.eval() for m in (ref, new))
    with torch.no_grad():
        h_a, h_b = (m(input_ids=ids, attention_mask=mask).last_hidden_state for m in (body_a, body_b))
    assert_close_rel(h_b, h_a, REL, "last_hidden_state, padded positions included")


def test_question_answering_loss_without_padding():
    ref, new = twins(encoder("bert", "ForQuestionAnswering"))
    fastlm.patch(new)
    ids, mask = padded_batch([9, 9, 9])
    kw = dict(input_ids=ids, attention_mask=mask, start_positions=torch.tensor([1, 2, 3]),
              end_positions=torch.tensor([4, 5, 6]))
    assert_close_rel(new(**kw).loss, ref(**kw).loss, REL, "qa loss")


@pytest.mark.parametrize("model_type", list(DECODER_CONFIGS))
@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_causal_lm_training_matches(model_type, left):
    ref, new = twins(decoder(model_type).train())
    report = fastlm.patch(new)
    assert report.patched == ["attention", "head"], str(report)
    ids, mask = padded_batch(LENGTHS, left=left)
    labels = ids.masked_fill(mask == 0, -100)
    a = loss_backward(ref, input_ids=ids, attention_mask=mask, labels=labels)
    b = loss_backward(new, input_ids=ids, attention_mask=mask, labels=labels)
    assert b.logits is None
    assert_close_rel(b.loss.detach(), a.loss.detach(), REL, "loss")
    assert_same_grads(ref, new, REL)


@pytest.mark.parametrize("window", [3, 4096], ids=["window-cuts", "window-longer-than-rows"])
@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_causal_sliding_window_runs_the_fused_kernel(monkeypatch, window, left):
    """Mistral's causal sliding window (its default config has 4096) reaches the fused kernel
    with the window, not the softmax path, and matches transformers' sdpa."""
    ref, new = twins(decoder("mistral-window").train())
    for m in (ref, new):
        m.config.sliding_window = window
    fastlm.patch(new)
    calls = record_attention_calls(monkeypatch)
    ids, mask = padded_batch(LENGTHS, left=left)
    labels = ids.masked_fill(mask == 0, -100)
    a = loss_backward(ref, input_ids=ids, attention_mask=mask, labels=labels)
    b = loss_backward(new, input_ids=ids, attention_mask=mask, labels=labels)
    assert calls == [("padded", window if window < ids.shape[1] else None)] * 2
    assert_close_rel(b.loss.detach(), a.loss.detach(), REL, "loss")
    assert_same_grads(ref, new, REL)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_causal_lm_num_items_in_batch(model_type):
    """Gradient accumulation: sum / num_items_in_batch exactly as transformers' ForCausalLMLoss."""
    ref, new = twins(decoder(model_type).train())
    fastlm.patch(new)
    ids, mask = padded_batch([6, 3, 6])
    labels = ids.masked_fill(mask == 0, -100)
    n = torch.tensor(40)
    a = loss_backward(ref, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
    b = loss_backward(new, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
    assert_close_rel(b.loss.detach(), a.loss.detach(), REL, "loss")
    assert_same_grads(ref, new, REL)


@pytest.mark.parametrize("model_type", ["bert", "modernbert", "llama"])
def test_eval_outputs_and_logits_match(model_type):
    """Eval mode (and labels absent): full logits as transformers returns them."""
    model = decoder(model_type) if model_type == "llama" else encoder(model_type)
    ref, new = twins(model.eval())
    fastlm.patch(new)
    ids, mask = padded_batch(LENGTHS)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask, labels=labels)
        b = new(input_ids=ids, attention_mask=mask, labels=labels)
    valid = mask.reshape(-1) == 1
    la, lb = (o.logits.reshape(valid.numel(), -1) for o in (a, b))
    assert_close_rel(lb[valid], la[valid], REL, "logits")
    assert_close_rel(b.loss, a.loss, REL, "eval loss")


def test_padding_is_honoured():
    """The mask registration matters: padding tokens must not change the real tokens' output."""
    model = encoder("bert", "Model").eval()
    fastlm.patch(model, unpad=False)  # attention alone: the mask reaches the kernel as 2D
    ids, mask = padded_batch([5, 9])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        garbage = ids.masked_fill(mask == 0, 42)
        out2 = model(input_ids=garbage, attention_mask=mask).last_hidden_state
        alone = model(input_ids=ids[:1, :5]).last_hidden_state
    assert_close_rel(out2[0, :5], out[0, :5], REL, "output with other pad tokens")
    assert_close_rel(out[0, :5], alone[0], REL, "padded vs unpadded sequence")
    assert (out[0, :5] - out2[0, :5]).abs().max() < 1e-5
    # the same comparison would fail if padding were ignored:
    unmasked = model(input_ids=garbage, attention_mask=torch.ones_like(mask)).last_hidden_state
    assert (unmasked[0, :5] - out[0, :5]).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", ["bert", "modernbert"])
def test_packed_batch_kwargs(model_type):
    """Flattened batch (1, T) + cu_seq_lens / max_length kwargs as DataCollatorWithFlattening makes."""
    model = encoder(model_type, "Model").eval()
    fastlm.patch(model)
    ids, mask = padded_batch([4, 7, 1], seq=7)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).last_hidden_state
        flat = ids[mask == 1][None]
        pos = torch.cat([torch.arange(n) for n in (4, 7, 1)])[None]
        cu = torch.tensor([0, 4, 11, 12], dtype=torch.int32)
        packed = model(input_ids=flat, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                       max_length_q=7, max_length_k=7).last_hidden_state
    assert_close_rel(packed[0], padded[mask == 1], REL, "packed vs padded")


def test_packed_batch_with_output_attentions_stays_per_sequence():
    model = encoder("bert", "Model").eval()
    fastlm.patch(model)
    ids, mask = padded_batch([4, 6], seq=6)
    flat = ids[mask == 1][None]
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(input_ids=flat, position_ids=torch.cat([torch.arange(4), torch.arange(6)])[None],
                    cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6, max_length_k=6, output_attentions=True)
        padded = model(input_ids=ids, attention_mask=mask).last_hidden_state
    probs = out.attentions[0][0]  # (heads, 10, 10): no weight across the two sequences
    assert probs[:, :4, 4:].abs().max() == 0 and probs[:, 4:, :4].abs().max() == 0
    assert_close_rel(out.last_hidden_state[0], padded[mask == 1], REL, "packed with output_attentions")


def test_explicit_backend_reaches_the_ops():
    ref, new = twins(encoder("bert", "ForMaskedLM").train())
    report = fastlm.patch(new, backend="reference")
    assert report.backend == "reference"
    assert all(m._fastlm_backend == "reference" for m in new.modules())
    ids, mask = padded_batch(LENGTHS)
    labels = mlm_labels(ids, mask)
    a = loss_backward(ref, input_ids=ids, attention_mask=mask, labels=labels)
    b = loss_backward(new, input_ids=ids, attention_mask=mask, labels=labels)
    assert_close_rel(b.loss.detach(), a.loss.detach(), REL, "loss")
    fastlm.unpatch(new)
    assert not any("_fastlm_backend" in m.__dict__ for m in new.modules())


def test_output_attentions_and_4d_mask_fall_back_exactly():
    ref, new = twins(encoder("bert", "Model").eval())
    fastlm.patch(new)
    ids, mask = padded_batch([6, 3])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ref(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        b = new(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        mask4d = torch.rand(2, 1, 6, 6) > 0.3
        mask4d[..., 0] = True
        c = ref(input_ids=ids, attention_mask=mask4d)
        d = new(input_ids=ids, attention_mask=mask4d)
    valid = mask.bool()
    for x, y in zip(b.attentions, a.attentions):
        assert_close_rel(x[valid], y[valid], REL, "attention probabilities")
    for x, y in zip(b.hidden_states, a.hidden_states):
        assert_close_rel(x[valid], y[valid], REL, "hidden states")
    assert_close_rel(d.last_hidden_state, c.last_hidden_state, REL, "4D custom mask")


def test_gqa_causal_kv_cache_generation():
    """Greedy generation with a KV cache and left padding gives transformers' tokens."""
    ref, new = twins(decoder("llama").eval())
    fastlm.patch(new)
    ids, mask = padded_batch([5, 3], left=True)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert torch.equal(new.generate(**kw), ref.generate(**kw))


def test_unknown_model_type_untouched_with_one_warning():
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config(vocab_size=V, d_model=16, d_kv=4, num_heads=2, d_ff=20, num_layers=1))
    before = model.config._attn_implementation
    forward = model.forward
    with pytest.warns(UserWarning, match="t5") as record:
        report = fastlm.patch(model)
    assert len([w for w in record if "fastlm" in str(w.message)]) == 1
    assert report.patched == [] and "not in fastlm's architecture table" in str(report)
    assert model.config._attn_implementation == before and model.forward == forward
    assert "_fastlm_originals" not in model.__dict__


def test_unsupported_head_left_alone_with_warning():
    model = encoder("bert", "ForPreTraining")
    with pytest.warns(UserWarning, match="BertForPreTraining"):
        report = fastlm.patch(model)
    assert report.patched == ["attention", "unpad"]
    assert ("head", "no fused loss for BertForPreTraining") in report.left_alone


def test_explicit_requests_that_cannot_be_honoured_raise():
    model = encoder("bert")
    with pytest.raises(ValueError, match="backend"):
        fastlm.patch(model, backend="nope")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fastlm.patch(torch.nn.Linear(2, 2))
    from fastlm import registry

    unavailable = [b for b in registry.BACKENDS if registry.BACKENDS[b].unavailable_reason()]
    for name in unavailable:  # e.g. "cuda" in a CPU-only build
        with pytest.raises(registry.BackendError, match=name):
            fastlm.patch(model, backend=name)
    assert model.config._attn_implementation == "sdpa"  # nothing was half-patched


def test_unpatch_restores_bit_identical_outputs():
    model = encoder("bert", "ForMaskedLM").train()
    ids, mask = padded_batch(LENGTHS)
    labels = mlm_labels(ids, mask)
    torch.manual_seed(0)
    before = model(input_ids=ids, attention_mask=mask, labels=labels)
    cls_forward = type(model).forward
    fastlm.patch(model)
    patched = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert patched.logits is None
    fastlm.unpatch(model)
    torch.manual_seed(0)
    after = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)
    assert model.config._attn_implementation == "sdpa" and type(model).forward is cls_forward
    assert not any("_fastlm_originals" in m.__dict__ for m in model.modules())


def test_two_models_in_one_process_differ():
    a, b = twins(encoder("bert", "ForMaskedLM").train())
    fastlm.patch(b)
    ids, mask = padded_batch(LENGTHS)
    labels = mlm_labels(ids, mask)
    assert a(input_ids=ids, attention_mask=mask, labels=labels).logits is not None
    assert b(input_ids=ids, attention_mask=mask, labels=labels).logits is None
    assert a.config._attn_implementation == "sdpa" and b.config._attn_implementation == "fastlm"
    fresh = encoder("bert", "ForMaskedLM")
    assert fresh.config._attn_implementation == "sdpa" and "forward" not in fresh.__dict__


def test_return_dict_false_gives_tuples():
    ref, new = twins(encoder("bert", "ForMaskedLM").train())
    fastlm.patch(new)
    ids, mask = padded_batch(LENGTHS)
    labels = mlm_labels(ids, mask)
    a = ref(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    b = new(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(b, tuple) and len(b) == 1  # (loss,): logits is None in sparse mode
    assert_close_rel(b[0].detach(), a[0].detach(), REL, "loss")


def test_patch_twice_and_report_is_printable():
    model = encoder("bert", "ForMaskedLM")
    fastlm.patch(model, cross_entropy=False)
    report = fastlm.patch(model)
    text = str(report)
    assert "BertForMaskedLM" in text and "unpad" in text and "sparse masked-LM head" in text
    fastlm.unpatch(model)
    assert model.config._attn_implementation == "sdpa"


def test_dropout_on_loss_distribution_matches():
    """With dropout the masks differ, so compare the loss distribution over seeds."""
    ref, new = twins(encoder("bert", "ForMaskedLM", dropout=0.2).train())
    fastlm.patch(new)
    ids, mask = padded_batch([40, 25, 40, 33], low=3)
    labels = mlm_labels(ids, mask)
    with torch.no_grad():
        ref.eval()
        no_dropout = ref(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        ref.train()
        losses = {}
        for name, model in (("ref", ref), ("new", new)):
            vals = []
            for seed in range(24):
                torch.manual_seed(seed)
                vals.append(model(input_ids=ids, attention_mask=mask, labels=labels).loss.item())
            losses[name] = torch.tensor(vals)
    a, b = losses["ref"], losses["new"]
    assert b.std() > 0, "dropout not applied"
    # means agree within 4 standard errors; spreads within a factor 2
    se = ((a.var() + b.var()) / len(a)).sqrt()
    assert (a.mean() - b.mean()).abs() < 4 * se, (a.mean(), b.mean(), se)
    assert 0.5 < b.std() / a.std() < 2.0
    assert (b.mean() - no_dropout).abs() < 6 * b.std()


def test_convergence_30_steps():
    """30 AdamW steps patched vs unpatched: same loss curve and final weights."""
    ref, new = twins(encoder("bert", "ForMaskedLM").train())
    fastlm.patch(new)
    batches = []
    for _ in range(30):
        ids, mask = padded_batch([int(n) for n in torch.randint(2, 16, (4,))], seq=16)
        batches.append((ids, mask, mlm_labels(ids, mask)))
    curves = {}
    for name, model in (("ref", ref), ("new", new)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        curve = []
        for ids, mask, labels in batches:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(loss.item())
        curves[name] = torch.tensor(curve)
    assert curves["ref"][-5:].mean() < curves["ref"][:5].mean()  # it did learn
    # Adam normalises updates, so ulp-level gradient differences grow a little: 1e-4.
    assert_close_rel(curves["new"], curves["ref"], 1e-4, "loss curve")
    # Parameters whose gradient is zero in exact arithmetic (attention key biases) are moved
    # by Adam's normalised rounding noise in both runs; weights are O(0.02-1), so every
    # tensor is judged against a scale of at least 0.05 (init std is 0.02).
    for (name, p), q in zip(ref.named_parameters(), new.parameters()):
        assert_close_rel(q.detach(), p.detach(), 1e-4, f"param {name}", floor=0.05)
