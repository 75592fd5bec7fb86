"""fastlm.patch on ModernBERT's own paths (tiny random models, CPU, fp32): padding sides, the
fused sliding window of its local layers, fall-backs, unpatch.  Tolerances as tests/test_patch.py."""
import importlib

import pytest
import torch

import fastlm

from _patch_models import (LENGTHS, REL, assert_close_rel, assert_same_grads, encoder, loss_backward,  # noqa: E402
                           mlm_labels, padded_batch, record_attention_calls, twins)


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


@pytest.mark.parametrize("unpad", [True, False])
def test_modernbert_local_layers_run_the_fused_window(monkeypatch, unpad):
    """Packed (unpadded) or padded, the local layers reach the fused kernels with the window
    transformers' flash path uses (sliding_window + 1 = 4), the global one without."""
    ref, new = twins(encoder("modernbert", "Model").eval())
    fastlm.patch(new, unpad=unpad)
    calls = record_attention_calls(monkeypatch)
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
    calls = record_attention_calls(monkeypatch)
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
    a = loss_backward(ref, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
    b = loss_backward(new, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
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
