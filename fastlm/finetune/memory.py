"""Peak memory of a block of code, and of each model's training, measured in its own phase.

:class:`PeakMemory` is the one meter of the project (``fastlm finetune --compare`` and the
benchmarks in ``bench/`` use it): the most memory in use during a block above what was in use
at its start,

* on CPU: the growth of the kernel's own high-water mark of resident memory (``VmHWM`` in
  ``/proc/self/status``, reset to the current RSS just before the block by writing ``5`` to
  ``/proc/self/clear_refs``, Linux >= 4.0), which no short peak escapes.  It counts the
  whole process: run it in a fresh one, ideally with glibc's ``MALLOC_MMAP_THRESHOLD_=65536``
  so that freed tensors leave the resident set instead of staying in the allocator's cache;
* on CUDA: ``torch.cuda.max_memory_allocated()`` above the allocation at the block's start.

Timing runs the models side by side in one process (:mod:`fastlm.finetune.train`), where
neither's memory can be told apart from the other's, and a sampling meter misses short
peaks.  So :func:`measure` measures each model alone: a fresh Python process loads the
fine-tuned model saved in the output folder, patches it (fastlm) or not (unpatched), and runs
:data:`~fastlm.finetune.train.KEPT_BATCHES` training steps (forward, backward, AdamW) on the
batches the real run trained on first, inside a :class:`PeakMemory`.  The peak covers
activations, gradients and the optimizer state allocated at the first step: the same parts
for both models, so their ratio is the patch's effect.
"""
from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

MEASURE = {"cpu": "VmHWM growth over {n} training steps (forward, backward, AdamW), fresh process per model",
           "cuda": "CUDA allocator peak above start over {n} training steps (forward, backward, AdamW), "
                   "fresh process per model"}
# distributed-launch variables: the measuring process is a single, ordinary one
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
               "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_WORLD_SIZE", "ACCELERATE_USE_CPU")


# ------------------------------------------------------------------------------------ the meter
_CLEAR_REFS = "/proc/self/clear_refs"


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` -> ``peak.growth``: bytes by which memory use
    rose, at its highest during the block, above its level at entry (see the module docstring).

    At entry it collects garbage; on CPU it also returns freed heap to the OS (``malloc_trim``,
    so the resident set at entry is what is live) and resets ``VmHWM``.  A refused reset raises
    ``OSError``: a high-water mark left from before the block would not be the block's peak.
    """

    def __init__(self, device="cpu"):
        import torch

        self.device = torch.device(device)
        self.growth: int | None = None

    def __enter__(self):
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):   # not glibc: the reset below still holds
            pass
        try:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
        except OSError as exc:
            raise OSError(f"cannot reset the resident high-water mark (VmHWM) through {_CLEAR_REFS}: {exc}") from exc
        self.start = _status("VmRSS")
        return self

    def __exit__(self, exc_type, *exc):
        import torch

        if exc_type is not None:   # no reading: it could only mask the block's error
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.growth = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.growth = max(0, _status("VmHWM") - self.start)
        return False


# ------------------------------------------------------------------- each model in a fresh process
def measure(model_dir: Path, task: str, batches: list[dict], labels: list[str], *, dtype: str, lr: float,
            scratch: Path) -> tuple[dict[str, int | None], str]:
    """Peak bytes per label (``"fastlm"``: patched), and how they were measured."""
    import torch

    cuda = torch.cuda.is_available()
    scratch.mkdir(parents=True, exist_ok=True)
    batch_file = scratch / "memory_batches.pt"
    torch.save(batches, batch_file)
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV and not k.startswith("TORCHELASTIC_")}
    # the same fastlm as this process, and the same CPU threads
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    peaks = {}
    for label in labels:
        spec = dict(model=str(model_dir), task=task, batches=str(batch_file), patch=label == "fastlm",
                    dtype=dtype, lr=lr, device="cuda" if cuda else "cpu")
        done = subprocess.run([sys.executable, "-m", "fastlm.finetune.memory", json.dumps(spec)], env=env,
                              capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"  memory phase ({label}) failed: {tail}", file=sys.stderr)
            peaks[label] = None
            continue
        peaks[label] = json.loads(lines[-1])["peak_bytes"]
    batch_file.unlink()
    return peaks, MEASURE["cuda" if cuda else "cpu"].format(n=len(batches))


# ----------------------------------------------------------------------------- inside the fresh process
def _load(spec: dict):
    """The model and a ``batch -> loss`` function for the spec's task."""
    import torch

    if spec["task"] == "embed":
        from sentence_transformers import SentenceTransformer

        from fastlm.finetune.embed import ranking_loss

        model = SentenceTransformer(spec["model"], device=spec["device"], local_files_only=True)
        loss = ranking_loss(model)

        def step_loss(batch):   # the trainer's columns: <column>_input_ids, <column>_attention_mask, ...
            columns = [k[: -len("input_ids")] for k in batch if k.endswith("input_ids")]
            return loss([{k[len(c):]: v for k, v in batch.items() if k.startswith(c)} for c in columns], None)
    else:
        from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

        auto = AutoModelForMaskedLM if spec["task"] == "mlm" else AutoModelForSequenceClassification
        model = auto.from_pretrained(spec["model"], dtype=torch.float32, local_files_only=True).to(spec["device"])

        def step_loss(batch):
            return model(**batch).loss
    return model, step_loss


def _child(spec: dict) -> dict:
    import torch

    import fastlm

    device = torch.device(spec["device"])
    model, step_loss = _load(spec)
    if spec["patch"]:
        fastlm.patch(model)
    model.train()
    batches = [{k: v.to(device) for k, v in b.items()} for b in torch.load(spec["batches"])]
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"])
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec["dtype"])
    with PeakMemory(device) as peak:
        for batch in batches:
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = step_loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {"peak_bytes": peak.growth}

if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
