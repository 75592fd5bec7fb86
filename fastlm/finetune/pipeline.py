"""What ``fastlm finetune`` does, in order: data, model, patch, interleaved runs, memory, output.

Under a distributed launcher (``torchrun``, ``accelerate launch``: ``RANK`` / ``WORLD_SIZE`` in
the environment) every process trains (the Trainers run DDP), and rank 0 alone prints,
measures memory and writes the output folder (staged and renamed into place, as always);
the other ranks train in a private scratch folder that is removed at the end.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fastlm.finetune.cli import DEMO_MAX_STEPS
from fastlm.finetune.data import FinetuneError

MAX_EVAL_EXAMPLES = 64
DEFAULT_LR = {"mlm": 1e-4, "classify": 5e-5, "embed": 5e-5}


@dataclass
class Outcome:
    """What ``run`` produced: the JSON report (as a dict; None on ranks other than 0), the
    fine-tuned (patched) model, its tokenizer, the output folder."""

    report: dict | None
    model: object
    tokenizer: object
    output_dir: Path


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _quiet(*args, **kwargs) -> None:
    pass


@contextlib.contextmanager
def _private_scratch():
    folder = Path(tempfile.mkdtemp(prefix="fastlm-finetune-rank-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Inputs:
    """The data, where the model comes from, and the training settings of one run."""

    args: object
    source: object            # model.ModelSource
    corpus: object            # data.Corpus (embed: the texts of the pairs)
    examples: list[dict]
    train_set: list[dict]
    eval_set: list[dict]
    settings: object          # train.Settings

    def fresh_model(self):
        """A newly loaded model (the same weights every call) and its newly initialised parts."""
        loaded, fresh = self.source.load(self.args.task, self.args.seed, self.corpus.label_names)
        if self.args.task == "embed":
            loaded.max_seq_length = self.args.max_length   # sentence-transformers truncates to it
        return loaded, fresh


def _inputs(args) -> Inputs:
    from fastlm.finetune import data, model, train

    task, demo = args.task, args.data is None
    source = model.checkpoint(args.model, task) if args.model else None
    if task == "embed":
        data_source, examples = data.load_pairs(args.data, args.text_column, args.pair_column)
        corpus = data.Corpus(data_source, [text for pair in examples for text in pair.values()])
    else:
        corpus = data.load_corpus(task, args.data, args.text_column, args.label_column)
    source = source or model.default(task, corpus.texts, args.tiny_random_model)
    if task == "mlm":
        examples = data.mlm_examples(corpus.texts, source.tokenizer, args.max_length)
    elif task == "classify":
        examples = data.classify_examples(corpus, source.tokenizer, args.max_length)
    train_set, eval_set = data.split(examples, args.seed, MAX_EVAL_EXAMPLES)
    settings = train.Settings(
        task=task, batch_size=args.batch_size, epochs=args.epochs or 1.0,
        max_steps=args.max_steps or (DEMO_MAX_STEPS if demo and args.epochs is None else 0),
        lr=args.lr or DEFAULT_LR[task], dtype=args.dtype, seed=args.seed,
        mlm_probability=args.mlm_probability)
    return Inputs(args, source, corpus, examples, train_set, eval_set, settings)


def finetune(args, output) -> Outcome:
    import torch

    import fastlm
    from fastlm.finetune import memory, report, train

    started = time.perf_counter()
    lead = _rank() == 0
    say = print if lead else _quiet
    compare = args.data is None if args.compare is None else args.compare
    inputs = _inputs(args)
    task, settings = args.task, inputs.settings
    net, fresh = inputs.fresh_model()
    tokenizer = inputs.source.tokenizer if inputs.source.tokenizer is not None else net.tokenizer
    _check_length(net, args.max_length)
    if task == "embed":
        from fastlm.finetune import embed

        lengths = embed.token_counts(net, inputs.examples, args.max_length)
    else:
        lengths = [len(e["input_ids"]) for e in inputs.examples]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    device += f", {world} processes" if world > 1 else ""
    say(f"fastlm finetune: {task} on {inputs.corpus.source}")
    say(f"  model: {inputs.source.name}" + "".join(f"; {n}" for n in inputs.source.notes))
    if fresh:
        say(f"  newly initialised (not in the checkpoint): {_summarise(fresh)}")
    say(f"  data: {len(inputs.examples)} {'pairs' if task == 'embed' else 'examples'} ({len(inputs.train_set)} "
        f"train / {len(inputs.eval_set)} eval), {sum(lengths) / len(lengths):.1f} tokens on average, "
        f"max length {args.max_length}")
    say(f"  training: {settings.total_steps(len(inputs.train_set) // world)} steps, batch {settings.batch_size}"
        f"{' per process' if world > 1 else ''}, lr {settings.lr:g}, {settings.dtype}, seed {settings.seed}, {device}"
        + (", with the unpatched model on the same batches, step by step interleaved" if compare else ""))

    with (output.staging() if lead else _private_scratch()) as stage:
        scratch = stage / "trainer-scratch"
        models = {}
        if compare:   # identical starting weights: the comparison copy is loaded before patching
            models["unpatched"] = inputs.fresh_model()[0]
        patch_report = fastlm.patch(net)
        say(patch_report)
        models["fastlm"] = net
        runs, first_batches = train.run_all(models, tokenizer, inputs.train_set, inputs.eval_set, settings,
                                            str(scratch), show_progress=lead)
        models.clear()
        shutil.rmtree(scratch, ignore_errors=True)
        if not lead:
            return Outcome(None, net, tokenizer, output.path)
        net.save_pretrained(str(stage))
        if task != "embed":
            tokenizer.save_pretrained(stage)
        peaks, memory_measure = memory.measure(stage, task, first_batches, list(runs), dtype=args.dtype,
                                               lr=settings.lr, scratch=scratch)
        shutil.rmtree(scratch, ignore_errors=True)
        for label, result in runs.items():
            result.peak_memory_bytes = peaks[label]
        summaries = {label: result.summary(task) for label, result in runs.items()}
        comparison = report.comparisons(summaries)
        if compare:
            comparison["step_speedup"] = train.speedup(runs["unpatched"], runs["fastlm"])
        text = report.table(summaries, memory_measure, comparison.get("step_speedup"))
        full = {
            "fastlm_finetune": report.FORMAT,
            "fastlm_version": fastlm.__version__,
            "task": task,
            "model": inputs.source.name,
            "model_notes": inputs.source.notes,
            "newly_initialised": fresh,
            "data": inputs.corpus.source,
            "labels": inputs.corpus.label_names,
            "examples": {"train": len(inputs.train_set), "eval": len(inputs.eval_set),
                         "mean_tokens": sum(lengths) / len(lengths), "max_length": args.max_length},
            "settings": {**vars(settings), "steps": len(runs["fastlm"].step_times), "compare": compare,
                         "processes": world},
            "environment": _environment(device),
            "patch": str(patch_report),
            "timing": "optimizer steps of the runs interleaved one by one (same batches, same load); "
                      f"the first {train.WARMUP_STEPS_EXCLUDED} step(s) left out of the speed numbers",
            "memory_measure": memory_measure,
            "runs": summaries,
            "comparison": comparison,
            "table": text,
            "total_wall_time_s": time.perf_counter() - started,
        }
        report.write_json(stage, full)
        report.write_plot(stage, summaries, f"fastlm finetune: {task}, {inputs.source.name}")
        output.commit(stage)
    say()
    say(text)
    say(f"\nwrote {output.path}: fine-tuned model + tokenizer (save_pretrained; loads without fastlm), "
        f"{report.REPORT_FILE}, {report.PLOT_FILE}  [{time.perf_counter() - started:.0f} s in all]")
    return Outcome(full, net, tokenizer, output.path)


def _check_length(net, max_length: int) -> None:
    config = getattr(net, "config", None)
    if config is None or not hasattr(config, "max_position_embeddings"):   # a SentenceTransformer
        config = next((m.config for m in net.modules() if hasattr(m, "config") and hasattr(m, "base_model")), None)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise FinetuneError(f"--max-length {max_length} exceeds the model's {positions} positions")


def _summarise(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _environment(device: str) -> dict:
    import platform

    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": device}
