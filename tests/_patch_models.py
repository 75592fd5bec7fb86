"""Tiny random models and padded batches for the fastlm.patch tests (not a test module)."""
from __future__ import annotations

import copy
import importlib

import torch

V = 97  # vocab: odd on purpose

ENCODER_CONFIGS = {
    "bert": ("BertConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)),
    "roberta": ("RobertaConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=37, pad_token_id=1, max_position_embeddings=64)),
    "xlm-roberta": ("XLMRobertaConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=37, pad_token_id=1, max_position_embeddings=64)),
    "camembert": ("CamembertConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=37, pad_token_id=1, max_position_embeddings=64)),
    "electra": ("ElectraConfig", dict(embedding_size=24, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=37)),
    "distilbert": ("DistilBertConfig", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37, dropout=0.0,
                                            attention_dropout=0.0)),
    "albert": ("AlbertConfig", dict(embedding_size=24, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                    intermediate_size=37, num_hidden_groups=1)),
    # layers: global, local, local; local_attention 6 = sliding_window 3: each local query sees
    # the keys within distance 3 (the attention modules pass sliding_window + 1 = 4), which
    # cuts the 11-token rows of the tests' batches
    "modernbert": ("ModernBertConfig", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                            intermediate_size=37, global_attn_every_n_layers=3, local_attention=6,
                                            max_position_embeddings=64, pad_token_id=1, bos_token_id=2,
                                            eos_token_id=2, cls_token_id=2, sep_token_id=2)),
    # DeBERTa-v3's structure (shared attention key, c2p + p2c, layer-normed relative embeddings, no
    # absolute positions) with position_buckets 8, so the 11-token rows reach the log-bucketed distances
    "deberta-v2": ("DebertaV2Config", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=37, max_position_embeddings=64, pad_token_id=1,
                                           relative_attention=True, position_buckets=8, max_relative_positions=32,
                                           norm_rel_ebd="layer_norm", share_att_key=True,
                                           pos_att_type=["p2c", "c2p"], position_biased_input=False,
                                           type_vocab_size=0)),
}
ENCODER_PREFIX = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "camembert": "Camembert",
                  "electra": "Electra", "distilbert": "DistilBert", "albert": "Albert", "modernbert": "ModernBert",
                  "deberta-v2": "DebertaV2"}
# transformers' DeBERTa has one attention implementation of its own, which it calls "eager"
ONLY_EAGER = ("deberta-v2",)

DECODER_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=None)),
    # a causal sliding window (3) shorter than the 11-token rows
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=3)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=8)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
}
_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=64)


def _no_dropout(kw: dict, dropout: float) -> dict:
    out = dict(kw)
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout_prob"):
        out.setdefault(key, dropout)
    return out


def encoder(model_type: str, head: str = "ForMaskedLM", dropout: float = 0.0, **extra):
    import transformers

    config_name, kw = ENCODER_CONFIGS[model_type]
    kw = _no_dropout(kw, dropout)
    if model_type == "distilbert":
        kw.update(dropout=dropout, attention_dropout=dropout, seq_classif_dropout=dropout, qa_dropout=dropout)
    if model_type == "electra":
        kw.update(summary_last_dropout=dropout)
    if model_type == "modernbert":
        kw = dict(ENCODER_CONFIGS[model_type][1], attention_dropout=dropout, embedding_dropout=dropout,
                  mlp_dropout=dropout, classifier_dropout=dropout)
    impl = "eager" if model_type in ONLY_EAGER else "sdpa"
    config = getattr(transformers, config_name)(vocab_size=V, attn_implementation=impl, **{**kw, **extra})
    cls = getattr(transformers, ENCODER_PREFIX[model_type] + head)
    return cls(config)


def decoder(model_type: str, dropout: float = 0.0):
    import transformers

    config_name, cls_name, kw = DECODER_CONFIGS[model_type]
    full = dict(kw) if model_type == "gpt2" else dict(_LLAMA_LIKE, attention_dropout=dropout, **kw)
    if model_type == "gpt2" and dropout:
        full.update(attn_pdrop=dropout, resid_pdrop=dropout, embd_pdrop=dropout)
    config = getattr(transformers, config_name)(vocab_size=V, attn_implementation="sdpa", **full)
    return getattr(transformers, cls_name)(config)


def padded_batch(lengths, seq=None, left=False, low=3):
    """input_ids (B, S) and attention_mask (B, S) with the given real lengths."""
    seq = seq or max(lengths)
    ids = torch.randint(low, V, (len(lengths), seq))
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        if left:
            mask[i, seq - n:] = 1
        else:
            mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, 1)
    return ids, mask


def mlm_labels(ids, mask, rate=0.3):
    pick = (torch.rand(ids.shape) < rate) & (mask == 1)
    pick[:, 1] |= mask[:, 1] == 1  # at least one labelled token per row
    return torch.where(pick, ids, torch.full_like(ids, -100))


def twins(model):
    """(unpatched reference, copy to patch) with identical weights."""
    return model, copy.deepcopy(model)


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float, what: str, floor: float = 0.0) -> None:
    """max |a - b| <= rel * max(max |b|, floor)."""
    scale = max(b.abs().max().item(), floor)
    err = (a - b).abs().max().item()
    assert err <= rel * scale + 1e-30, f"{what}: max abs err {err:.3g} vs reference scale {scale:.3g} (rel {rel})"


def assert_same_grads(ref_model, patched_model, rel: float) -> None:
    """Every parameter's gradient: ||g_new - g_ref|| <= rel * max(||g_ref||, floor) (L2 per tensor).

    The norm (not the largest element) is the scale because embedding-table gradients are
    sums over many tokens in a different order (unpadded), so single small entries carry
    cancellation noise of ~1e-5 of the tensor's largest entry.  Gradients that are zero in
    exact arithmetic (the attention key bias: softmax is shift invariant) are rounding noise
    in both runs, so they are judged against 1% of the largest gradient norm (the floor).
    """
    assert_same_grad_dicts(grads(ref_model), grads(patched_model), rel)


def assert_same_grad_dicts(g_ref: dict, g_new: dict, rel: float, what: str = "grad") -> None:
    """:func:`assert_same_grads` on ``{name: gradient}`` dicts (e.g. recorded during training)."""
    assert g_ref.keys() == g_new.keys(), set(g_ref) ^ set(g_new)
    floor = 0.01 * max(g.norm().item() for g in g_ref.values())
    for name in g_ref:
        err, scale = (g_new[name] - g_ref[name]).norm().item(), max(g_ref[name].norm().item(), floor)
        assert err <= rel * scale, f"{what} {name}: |err| {err:.3g} vs |ref| {scale:.3g} (rel {rel})"


def assert_twins_train_alike(ref, new, rel: float, **inputs):
    """Forward with ``inputs`` (labels included) and backward on both twins: equal losses and
    gradients within ``rel``.  Returns both outputs."""
    a, b = ref(**inputs), new(**inputs)
    a.loss.backward()
    b.loss.backward()
    assert_close_rel(b.loss.detach(), a.loss.detach(), rel, "loss")
    assert_same_grads(ref, new, rel)
    return a, b


def trainer_losses(model, rows, output_dir, steps: int = 3) -> list:
    """The logged loss of each of ``steps`` Trainer steps (batch 4, CPU, fixed seeds) on ``rows``."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=4,
                             logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             learning_rate=1e-3, seed=0, data_seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def record_attention_calls(monkeypatch):
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


REL = 1e-5  # patched vs unpatched, relative to the largest reference value, fp32
LENGTHS = [11, 1, 7, 11, 4]  # a padded batch's row lengths: odd, one of length 1


def loss_backward(model, **inputs):
    """``model(**inputs)``, its loss back-propagated; returns the output."""
    out = model(**inputs)
    out.loss.backward()
    return out
