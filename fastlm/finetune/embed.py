"""``fastlm finetune --task embed``: sentence-embedding training with sentence-transformers.

The model is a ``SentenceTransformer`` (its transformer module is what ``fastlm.patch``
patches); training pairs ``(anchor, positive)`` go through ``SentenceTransformerTrainer``
with ``MultipleNegativesRankingLoss`` (in-batch negatives: every other positive of the batch),
batches drawn unsorted as the trainer draws them.  Needs the ``fastlm[st]`` extra
(sentence-transformers and datasets).
"""
from __future__ import annotations

import tempfile

from fastlm.finetune.data import FinetuneError

EXTRA_HINT = "pip install 'fastlm[st]'"


def _require():
    try:
        import datasets  # noqa: F401 - SentenceTransformerTrainer needs it
        import sentence_transformers
    except ImportError as exc:
        raise FinetuneError(f"--task embed needs sentence-transformers and datasets ({EXTRA_HINT}): "
                            f"{exc}") from None
    return sentence_transformers


def load(path: str | None, config=None, tokenizer=None):
    """A ``SentenceTransformer`` from a folder (a sentence-transformers model, or a Hugging Face
    encoder, which gets mean pooling), or from a random ``config`` + ``tokenizer`` (seeded by
    the caller).  Float32, on the CPU (the trainer moves it)."""
    st = _require()
    if path is None:
        from transformers import AutoModel

        with tempfile.TemporaryDirectory(prefix="fastlm-embed-") as folder:
            AutoModel.from_config(config).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            return _open(st, folder)
    return _open(st, path)


def _open(st, path: str):
    import warnings

    try:
        with warnings.catch_warnings():   # "no sentence-transformers model found, using mean pooling"
            warnings.simplefilter("ignore")
            model = st.SentenceTransformer(path, device="cpu", local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        text = str(exc).strip().splitlines()
        raise FinetuneError(f"model {path}: not loadable as a sentence-transformers model "
                            f"({text[0] if text else type(exc).__name__})") from None
    if getattr(model, "tokenizer", None) is None:
        raise FinetuneError(f"model {path}: a sentence-transformers model without a text tokenizer")
    return model


def ranking_loss(model):
    """``MultipleNegativesRankingLoss(model)`` (found where this sentence-transformers keeps it)."""
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:   # before sentence-transformers 6
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    return MultipleNegativesRankingLoss(model)


def arguments_class():
    _require()
    from sentence_transformers import SentenceTransformerTrainingArguments

    return SentenceTransformerTrainingArguments


def trainer(mixin, model, train_set: list[dict], eval_set: list[dict], **kwargs):
    """A ``SentenceTransformerTrainer`` (with ``mixin``'s measurements) on ``(anchor, positive)`` pairs."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer

    class MeasuredSentenceTransformerTrainer(mixin, SentenceTransformerTrainer):
        def add_model_card_callback(self, default_args_dict):
            """No model card bookkeeping (it scans the datasets); ``save_pretrained`` still writes one."""

    return MeasuredSentenceTransformerTrainer(
        model=model, train_dataset=Dataset.from_list(train_set), eval_dataset=Dataset.from_list(eval_set),
        loss=ranking_loss(model), **kwargs)


def features(model, texts: list[str], device=None) -> dict:
    """The model's input tensors for ``texts`` (``preprocess``; ``tokenize`` before
    sentence-transformers 6), on ``device``."""
    prepare = getattr(model, "preprocess", None) or model.tokenize
    return {k: v.to(device) if device is not None else v for k, v in prepare(texts).items()
            if hasattr(v, "to")}


def token_counts(model, examples: list[dict], max_length: int) -> list[int]:
    """Tokens of every text of the pairs (special tokens included, truncated as in training)."""
    texts = [text for e in examples for text in e.values()]
    return [len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
