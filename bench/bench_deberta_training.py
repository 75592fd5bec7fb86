"""End-to-end DeBERTa-v3 sequence-classification training steps: transformers vs fastlm.patch.

One step = forward, backward and AdamW step on a fresh batch of real English text (the
standard library's docstrings, tokenized with the all-MiniLM-L6-v2 WordPiece tokenizer, ids
used as DeBERTa ids), dynamic padding to the batch's longest row: about 40% padding at
max length 256.  Model: DeBERTa-v3-xsmall's configuration (12 layers, hidden 384, 6 heads,
vocabulary 128,100, 256 position buckets; random weights, no download), dropout as configured
(0.1).

    python bench/bench_deberta_training.py               # batch 16, max length 256 (CPU: fp32, 2 threads here)
    python bench/bench_deberta_training.py --gpu-check   # GPU: the same shape (random ids), bf16 autocast
    python bench/bench_deberta_training.py --quick       # 2 layers, batch 4, max length 64

Timing: the two models (same weights) train side by side, step by step, interleaved
(``fastlm.finetune.interleave``: step i of both before step i + 1, order rotated), so load
that changes during the run hits both alike; the speed-up is the median of the per-step time
ratios (first step excluded), with their range.
Peak memory: each provider again in a FRESH process (this script re-executed), after one
warm-up step (AdamW's state exists from then on): the growth of the resident set's high-water
mark (``VmHWM``, reset through ``/proc/self/clear_refs``) over the resident set before the
measured steps, with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave the RSS.  On a GPU:
the allocator's peak over what was allocated before the steps (both:
``fastlm.finetune.memory.PeakMemory``).
Loss: each provider's first-step loss from the same weights on the same batch, dropout off.
Rows go to ``bench/results/deberta_training.{csv,json}``.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

XSMALL = dict(vocab_size=128100, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
              intermediate_size=1536, max_position_embeddings=512, relative_attention=True, position_buckets=256,
              norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
              position_biased_input=False, type_vocab_size=0, hidden_act="gelu", layer_norm_eps=1e-7,
              hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_relative_positions=-1,
              pooler_hidden_size=384, pooler_dropout=0, pooler_hidden_act="gelu", num_labels=2)
PRESETS = {
    "full": dict(batch=16, max_length=256, steps=5, layers=12),
    "gpu-check": dict(batch=16, max_length=256, steps=4, layers=12, random_ids=True),
    "quick": dict(batch=4, max_length=64, steps=3, layers=2),
}
PROVIDERS = ("hf", "fastlm")


def batches(size: dict, device, count: int, seed: int = 0) -> list[dict]:
    """Padded batches with random binary labels: real text (see the module docstring), or for
    ``--gpu-check`` random ids with ~40% padding (no tokenizer in the GPU budget)."""
    import random

    import training_workloads as tw

    if size.get("random_ids"):
        out = tw.random_batches("cls", XSMALL["vocab_size"], size["batch"], size["max_length"], 0.4, count, seed)
        return [{k: v.to(device) for k, v in b.items()} for b in out]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tw.minilm_path(None))
    encoded = tok(tw.docstrings(), truncation=True, max_length=size["max_length"])["input_ids"]
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        rows = [{"input_ids": encoded[rng.randrange(len(encoded))]} for _ in range(size["batch"])]
        batch = tok.pad(rows, return_tensors="pt")
        out.append({"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
                    "labels": torch.randint(0, 2, (size["batch"],), generator=gen).to(device)})
    return out


def build(provider: str, size: dict, device, dropout: bool = True, backend: str = "auto"):
    """(model, optimizer) for a provider: the same seeded weights for both."""
    import transformers

    config = dict(XSMALL, num_hidden_layers=size["layers"])
    if not dropout:
        config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(**config)).to(device).train()
    if provider == "fastlm":
        import fastlm

        print(fastlm.patch(model, backend=backend), file=sys.stderr)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-5)


def train_step(model, opt, batch, autocast: bool) -> float:
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


# ------------------------------------------------------------------------ fresh-process memory
def measure_memory(provider: str, preset: str, device, backend: str) -> float:
    """Peak memory growth in MiB of two training steps after a warm-up step (in this process:
    a fresh one on CPU, see fresh_process_memory)."""
    from fastlm.finetune.memory import PeakMemory

    size = PRESETS[preset]
    data = batches(size, device, 3)
    model, opt = build(provider, size, device, backend=backend)
    autocast = device.type == "cuda"
    train_step(model, opt, data[0], autocast)
    with PeakMemory(device) as peak:
        for batch in data[1:]:
            train_step(model, opt, batch, autocast)
    return peak.growth / 2**20


def fresh_process_memory(provider: str, preset: str, device, backend: str) -> float | None:
    if device.type == "cuda":  # the allocator's own peak: no fresh process needed
        return measure_memory(provider, preset, device, backend)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-of", provider, "--preset", preset,
           "--device", str(device), "--backend", backend]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"memory run of {provider} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = harness.arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="interleaved steps per provider")
    parser.add_argument("--backend", default=None,
                        help="fastlm backend (default: auto on CPU; triton on a GPU, where auto would not pick "
                             "the GPU-unverified kernels)")
    parser.add_argument("--memory-of", default=None, help=argparse_hidden())
    parser.add_argument("--preset", default=None, help=argparse_hidden())
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else harness.default_device()
    backend = args.backend or ("triton" if device.type == "cuda" else "auto")
    if args.memory_of:  # the fresh-process half (see fresh_process_memory)
        print(json.dumps({"peak_mb": measure_memory(args.memory_of, args.preset, device, backend)}))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    preset = "quick" if args.quick else "gpu-check" if args.gpu_check or device.type == "cuda" else "full"
    size = PRESETS[preset]
    steps = args.steps or size["steps"]
    names = [p for p in PROVIDERS if not args.providers or p in args.providers.split(",")]
    from fastlm.finetune.interleave import interleave, ratio_spread

    data = batches(size, device, steps)
    real = sum(int(b["attention_mask"].sum()) for b in data) / steps
    padded = sum(b["attention_mask"].numel() for b in data) / steps
    autocast = device.type == "cuda"
    bundles = {name: build(name, size, device, backend=backend) for name in names}
    times = interleave({name: (lambda i, name=name: train_step(*bundles[name], data[i], autocast))
                        for name in names}, steps, sync=torch.cuda.synchronize if device.type == "cuda" else None)
    bundles.clear()
    first = {}
    for name in names:  # first-step loss, dropout off, same weights and batch
        model, _ = build(name, size, device, dropout=False, backend=backend)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            first[name] = float(model(**copy.deepcopy(data[0])).loss)
    memory = {name: fresh_process_memory(name, preset, device, backend) for name in names}

    env = harness.environment(device)
    rows = []
    for name in names:
        stats = harness.summarize([t * 1e3 for t in times[name][1:]])
        rows.append({"run_id": env["timestamp"], "timestamp": env["timestamp"], "bench": "deberta_training",
                     "baseline": "hf", "case": f"xsmall-cls-b{size['batch']}-L{size['max_length']}", "provider": name,
                     "mode": "forward", "status": "ok", "reason": "", "peak_mb": memory[name], **stats,
                     "batch": size["batch"], "max_length": size["max_length"], "layers": size["layers"],
                     "real_tokens": round(real), "padding_share": round(1 - real / padded, 3),
                     "tokens_per_s": real / (stats["ms_median"] / 1e3), "first_step_loss": first[name],
                     **{k: env[k] for k in harness.META_COLUMNS}})
    print(f"\n{rows[0]['case']}: {real:.0f} real tokens per step, {100 * (1 - real / padded):.0f}% padding, "
          f"{steps} interleaved steps (first excluded)")
    print("| provider | step s (median) | tokens/s | speed-up vs hf (median per-step ratio, range) | "
          "peak extra MB | memory vs hf | first-step loss |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        spread = ratio_spread(times["hf"], times[row["provider"]], skip=1) if "hf" in times else None
        row["speedup_vs_hf"] = spread["median"] if spread else None
        mem = (row["peak_mb"] / memory["hf"]) if memory.get("hf") and row["peak_mb"] else float("nan")
        row["memory_vs_hf"] = mem
        ratio = f"{spread['median']:.2f}x ({spread['min']:.2f}-{spread['max']:.2f})" if spread else ""
        print(f"| {row['provider']} | {row['ms_median'] / 1e3:.2f} | {row['tokens_per_s']:.0f} | {ratio} | "
              f"{row['peak_mb'] if row['peak_mb'] is not None else float('nan'):.0f} | {mem:.2f}x | "
              f"{row['first_step_loss']:.6f} |")
    if not args.no_record:
        results = Path(args.results_dir) if args.results_dir else harness.results_dir_default()
        harness.Recorder("deberta_training", results).write(rows, env, {})
    return 0


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    raise SystemExit(main())
