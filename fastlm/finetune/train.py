"""The measured Hugging Face ``Trainer`` runs of ``fastlm finetune``, side by side.

Every model (fastlm, and with ``--compare`` the unpatched twin) gets its own ``Trainer`` with
the same arguments, seed, data order and masking, and :func:`run_all` advances them one
optimizer step at a time, interleaved (:mod:`fastlm.finetune.lockstep`): step ``i`` of one
model and step ``i`` of the other run back to back, so the per-step ratio of their times is
taken under the same machine load.  Per step it records:

* the step's time (forward + backward + clipping + optimizer step; batches are fetched and
  evaluations run between timed steps; CUDA is synchronised at both ends);
* the real (non-padding) tokens of the step's batch -> tokens/s;
* the train loss, and the eval loss (and accuracy for classify) before training and at a
  few points.

Peak memory is not measured here (two models share the process): see
:mod:`fastlm.finetune.memory`.  The first batches the fastlm run trains on are kept for it.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import (DataCollatorForLanguageModeling, DataCollatorWithPadding, Trainer, TrainerCallback,
                          TrainingArguments)
from transformers.trainer_callback import ProgressCallback

from fastlm.finetune import lockstep
from fastlm.finetune.data import FinetuneError
from fastlm.finetune.interleave import ratio_spread

EVAL_POINTS = 2          # evaluations during training, the last at the end (plus one before it)
WARMUP_STEPS_EXCLUDED = 1  # first step (allocator / kernel warm-up) left out of the speed numbers
KEPT_BATCHES = 2         # first training batches kept for the memory phase


@dataclass
class Settings:
    task: str                 # mlm | classify | embed
    batch_size: int
    epochs: float
    max_steps: int            # > 0 overrides epochs
    lr: float
    dtype: str                # fp32 | bf16 | fp16 (bf16/fp16: autocast mixed precision)
    seed: int
    mlm_probability: float

    def total_steps(self, n_train: int) -> int:
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.epochs * math.ceil(n_train / self.batch_size)))


@dataclass
class RunResult:
    label: str
    step_times: list[float] = field(default_factory=list)   # seconds per optimizer step
    step_tokens: list[int] = field(default_factory=list)    # real (non-padding) tokens per step
    padded_tokens: int = 0                                   # tokens incl. padding, all steps
    losses: list[tuple[int, float]] = field(default_factory=list)            # (step, train loss)
    evals: list[tuple[int, float, float | None]] = field(default_factory=list)  # (step, loss, accuracy)
    peak_memory_bytes: int | None = None                     # from the memory phase
    wall_time_s: float = 0.0                                 # its steps + its time between steps

    def summary(self, task: str) -> dict:
        """The run's numbers as plain data (the JSON report's ``runs.<label>``)."""
        skip = _skip(len(self.step_times))
        times, tokens = self.step_times[skip:], self.step_tokens[skip:]
        tail = [loss for _, loss in self.losses[-max(1, len(self.losses) // 10):]]
        before, after = (self.evals[0], self.evals[-1]) if self.evals else ((0, None, None),) * 2
        out = {
            "steps": len(self.step_times),
            "tokens_per_s": sum(tokens) / sum(times) if times and sum(times) > 0 else None,
            "step_time_s": statistics.median(times) if times else None,
            "peak_memory_mib": None if self.peak_memory_bytes is None else self.peak_memory_bytes / 2**20,
            "train_loss": statistics.fmean(tail) if tail else None,
            "train_loss_steps_averaged": len(tail),
            "eval_loss_before": before[1],
            "eval_loss": after[1],
            "padding_fraction": 1 - sum(self.step_tokens) / self.padded_tokens if self.padded_tokens else None,
            "wall_time_s": self.wall_time_s,
            "curves": {"loss": self.losses, "step_time_s": self.step_times, "tokens": self.step_tokens,
                       "eval": self.evals},
        }
        if task == "mlm":
            out["perplexity_before"] = _perplexity(before[1])
            out["perplexity"] = _perplexity(after[1])
        elif task == "classify":
            out["accuracy_before"], out["accuracy"] = before[2], after[2]
        return out


def _skip(n_steps: int) -> int:
    return WARMUP_STEPS_EXCLUDED if n_steps > WARMUP_STEPS_EXCLUDED + 1 else 0


def speedup(baseline: RunResult, contender: RunResult) -> dict:
    """The contender's per-step speed-up over the baseline (same steps, interleaved): median and range."""
    return ratio_spread(baseline.step_times, contender.step_times, skip=_skip(len(baseline.step_times)))


def _perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 700.0))


def collator(task: str, tokenizer, mlm_probability: float, seed: int):
    """Dynamic padding to the longest sequence of each batch (plus seeded masking for mlm)."""
    if task == "mlm":
        return DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed)
    return DataCollatorWithPadding(tokenizer)


class _Measured:
    """Trainer mixin: counts each training batch's tokens, keeps the first batches; mlm evaluates
    with fixed masks (the same at every evaluation)."""

    def __init__(self, *args, result: RunResult, eval_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._result, self._eval_collator = result, eval_collator
        self.real_tokens: list[torch.Tensor] = []   # summed after each step: no host sync inside it
        self.kept_batches: list[dict] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        masks = [v for k, v in inputs.items() if k.endswith("attention_mask")]
        ids = [v for k, v in inputs.items() if k.endswith("input_ids")]
        self.real_tokens.append(sum(m.sum() for m in masks) if masks else torch.tensor(sum(i.numel() for i in ids)))
        self._result.padded_tokens += sum(i.numel() for i in ids)
        if len(self.kept_batches) < KEPT_BATCHES:
            self.kept_batches.append({k: v.detach().cpu() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        return super().training_step(model, inputs, num_items_in_batch)

    def evaluate(self, *args, **kwargs):
        if self._eval_collator is None:
            return super().evaluate(*args, **kwargs)
        train_collator = self.data_collator
        self.data_collator = self._eval_collator()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.data_collator = train_collator


class _MeasuredTrainer(_Measured, Trainer):
    pass


class _Meter(TrainerCallback):
    """Tokens per step, loss and eval history."""

    def __init__(self, result: RunResult, trainer_ref: list):
        self.result, self.trainer_ref = result, trainer_ref

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer_ref[0]
        self.result.step_tokens.append(int(torch.stack(trainer.real_tokens).sum()))
        trainer.real_tokens.clear()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.result.losses.append((state.global_step, float(logs["loss"])))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.result.evals.append((state.global_step, float(metrics["eval_loss"]), metrics.get("eval_accuracy")))


def _accuracy(prediction) -> dict:
    logits, labels = prediction.predictions, prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def _arguments(settings: Settings, scratch_dir: str, n_train: int, args_class=TrainingArguments):
    total = settings.total_steps(n_train)
    # sentence-transformers names its own columns and labels
    columns = {} if settings.task == "embed" else dict(remove_unused_columns=False, label_names=["labels"])
    try:
        return args_class(
            output_dir=scratch_dir, per_device_train_batch_size=settings.batch_size,
            per_device_eval_batch_size=settings.batch_size, num_train_epochs=settings.epochs,
            max_steps=settings.max_steps if settings.max_steps > 0 else -1, learning_rate=settings.lr,
            warmup_steps=max(0, total // 10), weight_decay=0.01, lr_scheduler_type="linear",
            logging_strategy="steps", logging_steps=1, eval_strategy="steps",
            eval_steps=max(1, math.ceil(total / EVAL_POINTS)), save_strategy="no", report_to="none",
            seed=settings.seed, data_seed=settings.seed, bf16=settings.dtype == "bf16",
            fp16=settings.dtype == "fp16", dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
            dataloader_pin_memory=torch.cuda.is_available(), prediction_loss_only=settings.task != "classify",
            disable_tqdm=False, **columns)
    except (ValueError, ImportError) as exc:   # e.g. fp16 requested where autocast cannot do it
        raise FinetuneError(f"--dtype {settings.dtype}: {str(exc).strip().splitlines()[0]}") from None


def _trainer(model, tokenizer, train_set, eval_set, settings: Settings, result: RunResult, scratch_dir: str):
    trainer_ref: list = []
    callbacks = [_Meter(result, trainer_ref)]
    if settings.task == "embed":
        from fastlm.finetune import embed

        trainer = embed.trainer(_Measured, model, train_set, eval_set, result=result, callbacks=callbacks,
                                args=_arguments(settings, scratch_dir, len(train_set), embed.arguments_class()))
    else:
        seed, p = settings.seed, settings.mlm_probability
        trainer = _MeasuredTrainer(
            model=model, args=_arguments(settings, scratch_dir, len(train_set)), train_dataset=train_set,
            eval_dataset=eval_set, data_collator=collator(settings.task, tokenizer, p, seed),
            eval_collator=(lambda: collator("mlm", tokenizer, p, seed + 1)) if settings.task == "mlm" else None,
            processing_class=tokenizer, result=result, callbacks=callbacks,
            compute_metrics=_accuracy if settings.task == "classify" else None)
    trainer.remove_callback(ProgressCallback)   # one progress bar for all runs: run_all's
    trainer_ref.append(trainer)
    return trainer


def run_all(models: dict, tokenizer, train_set: list[dict], eval_set: list[dict], settings: Settings,
            scratch_dir: str, show_progress: bool = True) -> tuple[dict[str, RunResult], list[dict]]:
    """Fine-tune every model of ``{label: model}`` in place, step by step interleaved.

    Returns the measurements per label and the first training batches (CPU tensors) of the
    first model, for the memory phase."""
    results = {label: RunResult(label) for label in models}
    trainers = {label: _trainer(model, tokenizer, train_set, eval_set, settings, results[label], scratch_dir)
                for label, model in models.items()}
    for trainer in trainers.values():
        trainer.evaluate()                     # step 0: the starting point of every run
    steps = {label: lockstep.Stepped(trainer) for label, trainer in trainers.items()}
    bar = None

    def start(n_steps: int) -> None:
        nonlocal bar
        bar = tqdm(total=n_steps, desc="training", unit="step", dynamic_ncols=True, disable=not show_progress)

    def progress(i: int) -> None:
        bar.update(1)
        losses = {label: r.losses[-1][1] for label, r in results.items() if r.losses}
        bar.set_postfix({f"loss {label}": f"{loss:.3f}" for label, loss in losses.items()}, refresh=False)

    cuda = next(iter(trainers.values())).args.device.type == "cuda"
    try:
        times = lockstep.lockstep(steps, sync=torch.cuda.synchronize if cuda else None, on_start=start,
                                  on_step=progress)
    finally:
        if bar is not None:
            bar.close()
    for label, result in results.items():
        result.step_times = times[label]
        result.wall_time_s = sum(times[label]) + steps[label].between_s
    return results, next(iter(trainers.values())).kept_batches
