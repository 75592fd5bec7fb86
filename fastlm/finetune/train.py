"""One measured Hugging Face ``Trainer`` run (patched or not) for ``fastlm finetune``.

What is measured, per optimizer step (callbacks around forward + backward + optimizer step;
batches are fetched before ``on_step_begin``, so data loading is excluded; CUDA is synchronised
at both ends):

* step time, and real (non-padding) tokens of the step's batch -> tokens/s;
* peak memory over ``trainer.train()``: on CUDA ``max_memory_allocated`` above the allocation at
  the start; on CPU the peak resident set size above the RSS at the start, sampled every 2 ms in
  a thread (freed heap is returned to the OS before the run, so an earlier run in the same
  process cannot hide this one's growth);
* train loss per step, eval loss (and accuracy for classify) before training and at a few points.
"""
from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import (DataCollatorForLanguageModeling, DataCollatorWithPadding, Trainer,
                          TrainerCallback, TrainingArguments)
from transformers.trainer_callback import ProgressCallback

from fastlm.finetune.data import FinetuneError

EVAL_POINTS = 2          # evaluations during training, the last at the end (plus one before it)
WARMUP_STEPS_EXCLUDED = 1  # first step (allocator / kernel warm-up) left out of the speed numbers


@dataclass
class Settings:
    task: str
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
    peak_memory_bytes: int | None = None
    memory_measure: str = ""
    wall_time_s: float = 0.0

    def summary(self, task: str) -> dict:
        """The run's numbers as plain data (the JSON report's ``runs.<label>``)."""
        skip = WARMUP_STEPS_EXCLUDED if len(self.step_times) > WARMUP_STEPS_EXCLUDED + 1 else 0
        times, tokens = self.step_times[skip:], self.step_tokens[skip:]
        tail = [loss for _, loss in self.losses[-max(1, len(self.losses) // 10):]]
        before, after = (self.evals[0], self.evals[-1]) if self.evals else ((0, None, None),) * 2
        out = {
            "steps": len(self.step_times),
            "tokens_per_s": sum(tokens) / sum(times) if times and sum(times) > 0 else None,
            "step_time_s": statistics.median(times) if times else None,
            "peak_memory_mib": None if self.peak_memory_bytes is None else self.peak_memory_bytes / 2**20,
            "memory_measure": self.memory_measure,
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
        else:
            out["accuracy_before"], out["accuracy"] = before[2], after[2]
        return out


def _perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 700.0))


def collator(task: str, tokenizer, mlm_probability: float, seed: int):
    """Dynamic padding to the longest sequence of each batch (plus seeded masking for mlm)."""
    if task == "mlm":
        return DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed)
    return DataCollatorWithPadding(tokenizer)


class _MeasuredTrainer(Trainer):
    """Counts each training batch's tokens; evaluates with fixed masks (same at every evaluation)."""

    def __init__(self, *args, result: RunResult, eval_collator, **kwargs):
        super().__init__(*args, **kwargs)
        self._result, self._eval_collator = result, eval_collator
        self._real_tokens: list[torch.Tensor] = []   # summed lazily: no host sync per step

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        self._real_tokens.append(mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel()))
        self._result.padded_tokens += inputs["input_ids"].numel()
        return super().training_step(model, inputs, num_items_in_batch)

    def evaluate(self, *args, **kwargs):
        train_collator = self.data_collator
        self.data_collator = self._eval_collator()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.data_collator = train_collator


class _Meter(TrainerCallback):
    """Step timing, loss / eval history, and the progress bar."""

    def __init__(self, result: RunResult, trainer_ref: list, cuda: bool):
        self.result, self.trainer_ref, self.cuda = result, trainer_ref, cuda
        self.bar = None
        self.t0 = 0.0

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=f"{self.result.label:>9}", unit="step", dynamic_ncols=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.result.step_times.append(time.perf_counter() - self.t0)
        trainer = self.trainer_ref[0]
        self.result.step_tokens.append(int(torch.stack(trainer._real_tokens).sum()))
        trainer._real_tokens.clear()
        self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.result.losses.append((state.global_step, float(logs["loss"])))
            recent = slice(-10, None)
            speed = sum(self.result.step_tokens[recent]) / max(sum(self.result.step_times[recent]), 1e-9)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", tok_s=f"{speed:,.0f}", refresh=False)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.result.evals.append((state.global_step, float(metrics["eval_loss"]), metrics.get("eval_accuracy")))

    def close(self):
        """Also called when training raises (Ctrl-C), so the bar does not linger."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _accuracy(prediction) -> dict:
    logits, labels = prediction.predictions, prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def run(model, tokenizer, train_set: list[dict], eval_set: list[dict], settings: Settings,
        label: str, scratch_dir: str) -> RunResult:
    """Fine-tune ``model`` in place on ``train_set`` and return the measurements."""
    result = RunResult(label)
    total = settings.total_steps(len(train_set))
    try:
        args = TrainingArguments(
            output_dir=scratch_dir, per_device_train_batch_size=settings.batch_size,
            per_device_eval_batch_size=settings.batch_size, num_train_epochs=settings.epochs,
            max_steps=settings.max_steps if settings.max_steps > 0 else -1, learning_rate=settings.lr,
            warmup_steps=max(0, total // 10), weight_decay=0.01, lr_scheduler_type="linear",
            logging_strategy="steps", logging_steps=1, eval_strategy="steps",
            eval_steps=max(1, math.ceil(total / EVAL_POINTS)), save_strategy="no", report_to="none",
            seed=settings.seed, data_seed=settings.seed, bf16=settings.dtype == "bf16",
            fp16=settings.dtype == "fp16", dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=torch.cuda.is_available(), remove_unused_columns=False,
            label_names=["labels"], prediction_loss_only=settings.task == "mlm", disable_tqdm=False)
    except (ValueError, ImportError) as exc:   # e.g. fp16 requested where autocast cannot do it
        raise FinetuneError(f"--dtype {settings.dtype}: {str(exc).strip().splitlines()[0]}") from None
    cuda = args.device.type == "cuda"
    trainer_ref: list = []
    trainer = _MeasuredTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
        data_collator=collator(settings.task, tokenizer, settings.mlm_probability, settings.seed),
        eval_collator=lambda: collator(settings.task, tokenizer, settings.mlm_probability, settings.seed + 1),
        processing_class=tokenizer, result=result,
        compute_metrics=_accuracy if settings.task == "classify" else None,
        callbacks=[meter := _Meter(result, trainer_ref, cuda)])
    trainer.remove_callback(ProgressCallback)
    trainer_ref.append(trainer)
    trainer.evaluate()                         # step 0: the starting point of both runs
    start = time.perf_counter()
    with _PeakMemory(cuda) as memory:
        try:
            trainer.train()
        finally:
            meter.close()
    result.wall_time_s = time.perf_counter() - start
    result.peak_memory_bytes, result.memory_measure = memory.peak, memory.measure
    return result


class _PeakMemory:
    """Peak memory growth over a ``with`` block (see the module docstring)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.peak: int | None = None
        self.measure = "max_memory_allocated above start" if cuda else "peak RSS above start (sampled 2 ms)"

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        _release_free_heap()
        self.start = _rss()
        if self.start is None:
            self.measure = "unavailable (no RSS source on this OS)"
            return self
        self.high = self.start
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.002):
            self.high = max(self.high, _rss())

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        elif self.start is not None:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.high, _rss()) - self.start
        return False


def _rss() -> int | None:
    """Current resident set size in bytes (Linux /proc, else psutil when installed)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``), so RSS growth is this run's."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
