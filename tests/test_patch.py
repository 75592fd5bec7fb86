"""fastlm.patch on tiny random models of every supported family and head (CPU, dropout off
unless said): patched vs unpatched outputs, losses and every parameter's gradient.

Tolerance: 1e-5 relative (max abs error over max abs reference value), fp32.  Unpadding
and the fused kernels change only summation order, so the differences are a few ulps
amplified through 2-3 layers.
"""
import importlib
import warnings

import pytest
import torch

import fastlm

from _patch_models import (DECODER_CONFIGS, ENCODER_CONFIGS, V, assert_close_rel,  # noqa: E402
                           assert_same_grads, assert_twins_train_alike, decoder, encoder, mlm_labels,
                           padded_batch, twins)

REL = 1e-5
# ALBERT runs its one shared layer 3 times, so each of its gradients sums 3 contributions
# rounded differently (unpadded rows): 3x the bound.  float64 runs agree to 1e-12 (below).
REL_GRAD = {"albert": 3e-5}
LENGTHS = [11, 1, 7, 11, 4]


def _run(model, **inputs):
    out = model(**inputs)
    out.loss.backward()
    return out


@pytest.mark.parametrize("model_type", list(ENCODER_CONFIGS))
def test_masked_lm_training_matches(model_type):
    ref, new = twins(encoder(model_type, "ForMaskedLM").train())
    report = fastlm.patch(new)
    assert report.patched == ["attention", "unpad", "head"], str(report)
    ids, mask = padded_batch(LENGTHS)
    labels = mlm_labels(ids, mask)
    a = _run(ref, input_ids=ids, attention_mask=mask, labels=labels)
    b = _run(new, input_ids=ids, attention_mask=mask, labels=labels)
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
        loss_a = _run(ref, input_ids=ids, attention_mask=mask, labels=labels).loss
    b = _run(new, input_ids=ids, attention_mask=mask, labels=labels)
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
    a = _run(ref, input_ids=ids, attention_mask=mask, labels=labels)
    b = _run(new, input_ids=ids, attention_mask=mask, labels=labels)
    assert_close_rel(b.logits.detach(), a.logits.detach(), REL, "logits")
    assert_close_rel(b.loss.detach(), a.loss.detach(), REL, "loss")
    assert_same_grads(ref, new, REL_GRAD.get(model_type, REL))
    body_a, body_b = (m.base_model.eval() for m in (ref, new))
    with torch.no_grad():
        h_a, h_b = (m(input_ids=ids, attention_mask=mask).last_hidden_state for m in (body_a, body_b))
    assert_close_rel(h_b, h_a, REL, "last_hidden_state, padded positions included")


# ------------------------------------------------------------------------------ ModernBERT
# Its tiny config (tests/_patch_models.py) alternates a global layer with two local ones
# whose window (sliding_window 3) is shorter than the 11-token rows; the encoder tests above
# cover it with right padding, these its own paths.
def _modernbert_inputs(head, ids, mask):
    inputs = dict(input_ids=ids, attention_mask=mask)
    if head == "ForMaskedLM":
        inputs["labels"] = mlm_labels(ids, mask)
    elif head == "ForSequenceClassification":
        inputs["labels"] = torch.randint(0, 2, (ids.shape[0],))
    elif head == "ForTokenClassification":
        inputs["labels"] = torch.where(mask == 1, torch.randint(0, 2, ids.shape), -100)
    return inputs


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
@pytest.mark.parametrize("head, pooling", [("ForMaskedLM", "cls"), ("Model", "cls"), ("ForTokenClassification", "cls"),
                                           ("ForSequenceClassification", "cls"), ("ForSequenceClassification", "mean")])
def test_modernbert_padding_sides_match(head, left, pooling):
    ref, new = twins(encoder("modernbert", head, classifier_pooling=pooling).train())
    report = fastlm.patch(new)
    assert report.patched == ["attention", "unpad"] + (["head"] if head == "ForMaskedLM" else []), str(report)
    ids, mask = padded_batch(LENGTHS, left=left)
    inputs = _modernbert_inputs(head, ids, mask)
    a, b = ref(**inputs), new(**inputs)
    valid = mask.reshape(-1) == 1
    if head == "Model":
        h_a, h_b = (o.last_hidden_state.reshape(valid.numel(), -1) for o in (a, b))
        assert_close_rel(h_b[valid], h_a[valid], REL, "last_hidden_state")
        if left:  # run padded: padded positions are transformers' too
            assert_close_rel(h_b[~valid], h_a[~valid], REL, "padded positions")
        else:
            assert h_b[~valid].abs().max() == 0
        loss_a, loss_b = (h[valid].square().mean() for h in (h_a, h_b))
    else:
        if head == "ForMaskedLM":
            assert b.logits is None
        elif head == "ForTokenClassification":
            assert_close_rel(b.logits.reshape(valid.numel(), -1)[valid], a.logits.reshape(valid.numel(), -1)[valid],
                             REL, "logits")
        else:
            assert_close_rel(b.logits, a.logits, REL, "logits")
        assert_close_rel(b.loss.detach(), a.loss.detach(), REL, "loss")
        loss_a, loss_b = a.loss, b.loss
    loss_a.backward()
    loss_b.backward()
    assert_same_grads(ref, new, REL)


def _record_attention_calls(monkeypatch):
    """(layout, window) of every fused attention call; the softmax fallback fails the test."""
    ops = importlib.import_module("fastlm.ops.attention")  # the module (fastlm.ops.attention is the function)
    calls = []
    for layout, name in (("padded", "attention"), ("packed", "varlen_attention")):
        def spy(*args, _real=getattr(ops, name), _layout=layout, **kwargs):
            calls.append((_layout, kwargs.get("window")))
            return _real(*args, **kwargs)
        monkeypatch.setattr(ops, name, spy)

    def no_fallback(reason):
        raise AssertionError(f"softmax fallback: {reason}")
    monkeypatch.setattr("fastlm.patching.attention._warn_once", no_fallback)
    return calls


@pytest.mark.parametrize("unpad", [True, False])
def test_modernbert_local_layers_run_the_fused_window(monkeypatch, unpad):
    """Packed (unpadded) or padded, the local layers reach the fused kernels with the window
    transformers' flash path uses (sliding_window + 1 = 4), the global one without."""
    ref, new = twins(encoder("modernbert", "Model").eval())
    fastlm.patch(new, unpad=unpad)
    calls = _record_attention_calls(monkeypatch)
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        a, b = ref(input_ids=ids, attention_mask=mask), new(input_ids=ids, attention_mask=mask)
    assert calls == [("packed" if unpad else "padded", w) for w in (None, 4, 4)]
    valid = mask.bool()
    assert_close_rel(b.last_hidden_state[valid], a.last_hidden_state[valid], REL, "last_hidden_state")


@pytest.mark.parametrize("unpad", [True, False])
def test_window_falls_back_exactly_when_the_backend_lacks_it(monkeypatch, unpad):
    """A backend without sliding windows (the cuda one) gets the softmax path with the window
    in its dense mask (per sequence when packed), still transformers' result."""
    ref, new = twins(encoder("modernbert", "Model").eval())
    fastlm.patch(new, unpad=unpad)
    monkeypatch.setattr(importlib.import_module("fastlm.ops.attention"), "serves", lambda *a, **kw: False)
    monkeypatch.setattr("fastlm.patching.attention._WINDOW_SERVED", {})  # answers are cached per process
    reasons = []
    monkeypatch.setattr("fastlm.patching.attention._warn_once", reasons.append)
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        a, b = ref(input_ids=ids, attention_mask=mask), new(input_ids=ids, attention_mask=mask)
    assert reasons == ["backend 'auto' has no sliding window"] * 2  # the two local layers
    valid = mask.bool()
    assert_close_rel(b.last_hidden_state[valid], a.last_hidden_state[valid], REL, "last_hidden_state")


def test_modernbert_mask_with_holes_and_hidden_states_run_padded(monkeypatch):
    """A mask with holes changes distances between real tokens once packed, so that batch
    runs padded (window over padded positions, as transformers counts them); so does a call
    asking for hidden states.  Both stay on the fused kernels and match transformers."""
    ref, new = twins(encoder("modernbert", "Model").eval())
    fastlm.patch(new)
    calls = _record_attention_calls(monkeypatch)
    ids, mask = padded_batch([11, 9, 11])
    mask[0, 3:6] = 0
    valid = mask.bool()
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        b = new(input_ids=ids, attention_mask=mask)
        assert calls == [("padded", w) for w in (None, 4, 4)]
        ids2, mask2 = padded_batch([11, 9, 11])
        c = ref(input_ids=ids2, attention_mask=mask2, output_hidden_states=True)
        d = new(input_ids=ids2, attention_mask=mask2, output_hidden_states=True)
    assert_close_rel(b.last_hidden_state[valid], a.last_hidden_state[valid], REL, "holes")
    for x, y in zip(d.hidden_states, c.hidden_states):
        assert_close_rel(x[mask2.bool()], y[mask2.bool()], REL, "hidden states")


def test_modernbert_explicit_position_ids_and_embeddings():
    """Caller's position ids (here 5, 7, 9, ...) and inputs_embeds reach the packed run unchanged."""
    ref, new = twins(encoder("modernbert", "Model").eval())
    fastlm.patch(new)
    ids, mask = padded_batch(LENGTHS)
    pos = (5 + 2 * torch.arange(ids.shape[1]))[None].expand(ids.shape)  # not arange: distances count
    embeds = ref.embeddings.tok_embeddings(ids).detach()
    valid = mask.bool()
    with torch.no_grad():
        for kw in (dict(input_ids=ids, position_ids=pos), dict(inputs_embeds=embeds)):
            a, b = ref(attention_mask=mask, **kw), new(attention_mask=mask, **kw)
            assert_close_rel(b.last_hidden_state[valid], a.last_hidden_state[valid], REL, str(list(kw)))


def test_modernbert_masked_lm_num_items_in_batch():
    """ModernBERT's loss is transformers' ForMaskedLMLoss: sum / num_items_in_batch when given."""
    ref, new = twins(encoder("modernbert", "ForMaskedLM").train())
    fastlm.patch(new)
    ids, mask = padded_batch(LENGTHS)
    labels = mlm_labels(ids, mask)
    n = torch.tensor(40)
    a = _run(ref, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
    b = _run(new, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
    assert_close_rel(b.loss.detach(), a.loss.detach(), REL, "loss")
    assert_same_grads(ref, new, REL)


def test_modernbert_unpatch_restores_bit_identical_outputs():
    model = encoder("modernbert", "ForMaskedLM").train()
    ids, mask = padded_batch(LENGTHS, left=True)
    labels = mlm_labels(ids, mask)
    before = model(input_ids=ids, attention_mask=mask, labels=labels)
    fastlm.patch(model)
    assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is None
    fastlm.unpatch(model)
    after = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)
    assert model.config._attn_implementation == "sdpa"
    assert not any("_fastlm_originals" in m.__dict__ for m in model.modules())


def test_mask_builder_serves_only_the_bidirectional_window_as_2d():
    """transformers' bidirectional sliding-window pattern gets the 2D padding mask (the kernel
    applies the window); causal windows, chunks and look-alikes keep the 4D mask."""
    from types import SimpleNamespace

    from transformers import masking_utils as mu

    from fastlm.patching.masks import fastlm_mask

    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[1, :3] = False
    # what create_bidirectional_sliding_window_mask passes (config.sliding_window = 3)
    common = dict(batch_size=2, q_length=9, kv_length=9, attention_mask=padding, use_vmap=False,
                  allow_is_causal_skip=False, config=SimpleNamespace(sliding_window=3))
    band = mu.sliding_window_bidirectional_mask_function(3)
    assert torch.equal(fastlm_mask(mask_function=band, local_size=3, **common), padding)
    for function, size in ((band, 2),  # the band is not what the builder claims
                           (mu.sliding_window_bidirectional_mask_function(2), 3),  # nor the config's
                           (mu.sliding_window_causal_mask_function(3), 3),
                           (mu.and_masks(band, lambda b, h, q, kv: kv != 4), 3)):
        mask = fastlm_mask(mask_function=function, local_size=size, **common)
        assert mask.dim() == 4, function


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
    a = _run(ref, input_ids=ids, attention_mask=mask, labels=labels)
    b = _run(new, input_ids=ids, attention_mask=mask, labels=labels)
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
    calls = _record_attention_calls(monkeypatch)
    ids, mask = padded_batch(LENGTHS, left=left)
    labels = ids.masked_fill(mask == 0, -100)
    a = _run(ref, input_ids=ids, attention_mask=mask, labels=labels)
    b = _run(new, input_ids=ids, attention_mask=mask, labels=labels)
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
    a = _run(ref, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
    b = _run(new, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
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
    a = _run(ref, input_ids=ids, attention_mask=mask, labels=labels)
    b = _run(new, input_ids=ids, attention_mask=mask, labels=labels)
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
