"""End-to-end training steps, side by side: HF sdpa (and eager / compile / flash2 / Liger) vs fastlm.patch.

    python bench/bench_training.py --quick        # CPU: MiniLM masked LM + classification, small batches
    python bench/bench_training.py                # CPU: the same at batch 16 x 256
    python bench/bench_training.py --gpu-check    # GPU: BERT-base MLM + classification, Llama-1B causal LM,
                                                  #      HF sdpa vs fastlm's torch / triton / cuda tiers and auto
    python bench/bench_training.py --dry-run      # the --gpu-check code paths, tiny models on the CPU

Workloads and contenders: bench/training_workloads.py.  How it measures:

* **Time, interleaved.**  The contenders of a group train in one process on the same batches,
  step by step (``fastlm.finetune.interleave``: step i of every contender, order rotating,
  before any step i + 1), after untimed warm-up steps.  A contender's speed-up over HF sdpa
  is the median of the per-step ratios (baseline time / its time on the same step, under
  the same load), printed with their range; tokens/s is the median over the timed steps of
  real tokens (padding excluded) / step time.
* **Isolation.**  On a GPU (and in the dry run) each fastlm tier runs in its own process
  with the baseline, so a kernel that crashes its process costs only that tier's numbers;
  a process that dies or overruns its share of ``--budget-s`` leaves an error row.
* **Peak memory, in its own phase.**  CUDA: after the timed steps, one more step per
  contender, alone: the allocator's peak above what was allocated before it (activations,
  gradients, temporaries; weights and optimizer state excluded).  CPU: a fresh process per
  contender and workload (``MALLOC_MMAP_THRESHOLD_=65536``, so freed tensors leave the
  resident set): one warm-up step, then the growth of ``VmHWM`` over one step
  (``fastlm.finetune.memory.PeakMemory``).
* **Same training.**  Each contender's loss on the first batch before any step, dropout off,
  from the same weights: equal losses (to rounding) = the same function.

Writes ``training.csv|json`` (harness format, one row per workload x contender), ``training.md``
(the table), ``training_summary.json`` and ``training.png`` to the results folder.  Exits 1 when
a contender errored (one that cannot run here is "skipped", with the reason, and no failure).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import training_workloads as tw  # noqa: E402

from fastlm.finetune.memory import PeakMemory  # noqa: E402

CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # memory children only (see the module docstring)


# ------------------------------------------------------------------------ one contender
class Trainee:
    """One contender's model, optimizer and step on one workload."""

    def __init__(self, workload: tw.Workload, contender: tw.Contender, device: torch.device):
        if contender.why_not:
            raise harness.Unsupported(contender.why_not)
        self.workload, self.device = workload, device
        self.model = workload.model(contender.attn, device)
        self.runner = contender.prepare(self.model) if contender.prepare is not None else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=2e-5, fused=device.type == "cuda")

    def _autocast(self):
        dtype = self.workload.autocast
        return torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    def step(self, batch: dict) -> None:
        with self._autocast():
            loss = self.runner(**batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def first_loss(self, batch: dict) -> float:
        """Loss before any step, dropout off (eval mode), no gradients (uncompiled: the same function)."""
        self.model.eval()
        with torch.no_grad(), self._autocast():
            loss = float(self.model(**batch).loss)
        self.model.train()
        return loss


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]


def _status_of(exc: BaseException) -> str:
    return "skipped" if isinstance(exc, harness.skip_exceptions()) else "error"


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else None


# ------------------------------------------------------------------------------ child phases
def steps_phase(workload: tw.Workload, contenders: list[tw.Contender], device: torch.device, schedule: dict) -> dict:
    """Build every contender, check first losses, warm up, time the steps interleaved; on CUDA
    then the allocator peak of one step per contender.  Failures are per contender."""
    from fastlm.finetune.interleave import interleave

    batches = [{k: v.to(device) for k, v in b.items()} for b in workload.make_batches(schedule["distinct"])]
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    result = {c.name: {"status": "ok"} for c in contenders}
    trainees: dict[str, Trainee] = {}

    def fail(name: str, exc: BaseException, when: str) -> None:
        result[name] = {"status": _status_of(exc), "reason": f"{when}: {_why(exc)}"}
        trainees.pop(name, None)
        print(f"bench_training: {workload.name} / {name} {when} failed", file=sys.stderr)
        import traceback

        traceback.print_exception(exc, file=sys.stderr)

    for c in contenders:
        try:
            trainees[c.name] = Trainee(workload, c, device)
            result[c.name]["first_loss"] = trainees[c.name].first_loss(batches[0])
        except Exception as exc:
            fail(c.name, exc, "setup")
    for k in range(schedule["warmup"]):
        for name in list(trainees):
            try:
                trainees[name].step(batches[k % len(batches)])
            except Exception as exc:
                fail(name, exc, "warm-up")
    if device.type == "cuda" and trainees:
        torch.cuda.synchronize()

    def guarded(name: str):
        def step(i: int) -> None:
            if name in trainees:
                try:
                    trainees[name].step(batches[i % len(batches)])
                except Exception as exc:
                    fail(name, exc, f"timed step {i}")
        return step

    times = interleave({name: guarded(name) for name in list(trainees)}, schedule["steps"], sync=_sync(device))
    for name in list(trainees):
        result[name].update(times_s=times[name], tokens=[tokens[i % len(tokens)] for i in range(schedule["steps"])])
    if device.type == "cuda":
        for name, t in list(trainees.items()):
            torch.cuda.empty_cache()
            try:
                with PeakMemory(device) as peak:
                    t.step(batches[0])
                result[name]["peak_mb"] = peak.growth / 2**20
                result[name]["memory_measure"] = "CUDA allocator peak above the allocation before one step"
            except Exception as exc:
                fail(name, exc, "memory step")
    return {"workload": workload.name, "contenders": result, "real_tokens": tokens,
            "padded_tokens": [b["attention_mask"].numel() for b in batches]}


def memory_phase(workload: tw.Workload, contender: tw.Contender, device: torch.device) -> dict:
    """CPU, in a fresh process: one warm-up step, then the VmHWM growth across one step."""
    batch = workload.make_batches(1)[0]
    trainee = Trainee(workload, contender, device)
    trainee.step(batch)  # optimizer state, lazy initialisation, kernels
    with PeakMemory(device) as peak:
        trainee.step(batch)
    return {"peak_mb": peak.growth / 2**20,
            "memory_measure": "VmHWM growth over one step (after one warm-up step), fresh process"}


def run_child(args) -> int:
    size = _size(args)
    device = torch.device(args.device) if args.device else harness.default_device()
    workloads = {w.name: w for w in tw.workloads(size, args.model)}
    known = {c.name: c for c in tw.contenders(size, device)}
    chosen = [known[n] for n in args.contenders.split(",")]
    out = Path(args.out)
    for name in args.workloads.split(","):
        w = workloads[name]
        if args.phase == "memory":
            record = {"workload": name, "contender": chosen[0].name, **memory_phase(w, chosen[0], device)}
        else:
            record = steps_phase(w, chosen, device, tw.SCHEDULE[size])
        with out.open("a") as f:  # one line per workload: a child killed later keeps these
            f.write(json.dumps(record) + "\n")
    return 0


# -------------------------------------------------------------------------------- parent
def _size(args) -> str:
    if args.dry_run:
        return "dry"
    return "gpu-check" if args.gpu_check else "quick" if args.quick else "full"


class Budget:
    """Splits the time left among the children still to run, in proportion to their work
    (None: no limit).  A child's work: its workloads x contenders x (steps + 3, for building
    the model and the loss check), plus 5 for starting the process."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.monotonic() + seconds

    @staticmethod
    def work(n_workloads: int, n_contenders: int, n_steps: int) -> float:
        return n_workloads * n_contenders * (n_steps + 3) + 5

    def share(self, work: float, work_left: float) -> float | None:
        if self.deadline is None:
            return None
        return max(5.0, (self.deadline - time.monotonic()) * work / max(work_left, work))


def spawn(args, phase: str, workloads: list[str], contenders: list[str], timeout: float | None,
          env_extra: dict | None = None) -> tuple[list[dict], str | None]:
    """Run this script as a child for one phase; returns its JSON lines and why it failed (None: it did not)."""
    fd, out = tempfile.mkstemp(prefix="bench_training_", suffix=".jsonl")
    os.close(fd)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--workloads", ",".join(workloads),
           "--contenders", ",".join(contenders), "--out", out]
    cmd += [flag for flag, on in (("--dry-run", args.dry_run), ("--gpu-check", args.gpu_check),
                                  ("--quick", args.quick and not args.dry_run)) if on]
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--model", args.model] if args.model else []
    print(f"bench_training: {phase} {','.join(contenders)} on {','.join(workloads)}"
          + (f" (limit {timeout:.0f} s)" if timeout else ""), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env={**os.environ, **(env_extra or {})}, start_new_session=True)
    failure = None
    try:
        code = proc.wait(timeout=timeout)
        if code:
            failure = f"process exited with code {code} (signal {-code})" if code < 0 else f"process exited with code {code}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # compile workers and all
        proc.wait()
        failure = f"timed out after {timeout:.0f} s"
    lines = [json.loads(line) for line in Path(out).read_text().splitlines() if line.strip()]
    os.unlink(out)
    return lines, failure


def collect(args, size: str, device: torch.device, names: list[str], workloads: list[str],
            skipped: dict, budget: Budget) -> dict:
    """``{workload: {contender: result}}`` from the step children (then, on CPU, the memory children)."""
    isolate = args.isolate if args.isolate is not None else device.type == "cuda" or size == "dry"
    fresh_memory = device.type != "cuda"
    runnable = [n for n in names if n not in skipped]
    plan = tw.groups(runnable, isolate)
    schedule = tw.SCHEDULE[size]
    step_work = [Budget.work(len(workloads), len(g), schedule["warmup"] + schedule["steps"] + 1) for g in plan]
    memory_work = Budget.work(1, 1, 2) if fresh_memory else 0.0
    work_left = sum(step_work) + memory_work * len(runnable) * len(workloads)
    results = {w: {n: {"status": "skipped", "reason": why} for n, why in skipped.items()} for w in workloads}
    for group, work in zip(plan, step_work):
        lines, failure = spawn(args, "steps", workloads, group, budget.share(work, work_left))
        work_left -= work
        tag = "+".join(group)
        for line in lines:
            w, found = line["workload"], line["contenders"]
            base = found.get(tw.BASELINE, {})
            for name, r in found.items():
                r = {**r, "group": tag, "real_tokens": line["real_tokens"], "padded_tokens": line["padded_tokens"]}
                if name != tw.BASELINE:  # its ratios: against the baseline of its own process
                    r.update(base_times_s=base.get("times_s"), base_peak_mb=base.get("peak_mb"),
                             base_first_loss=base.get("first_loss"))
                    results[w][name] = r
                elif results[w].get(name, {}).get("status") != "ok":
                    results[w][name] = r
        for w in set(workloads) - {line["workload"] for line in lines}:
            for name in group:
                if results[w].get(name, {}).get("status") != "ok":
                    results[w][name] = {"status": "error", "reason": failure or "no result", "group": tag}
    if fresh_memory:
        for w in workloads:
            for name in runnable:
                if results[w].get(name, {}).get("status") != "ok":
                    work_left -= memory_work
                    continue
                lines, failure = spawn(args, "memory", [w], [name], budget.share(memory_work, work_left), CHILD_ENV)
                work_left -= memory_work
                results[w][name].update(lines[0] if lines else {"memory_error": failure})
    return results


# ------------------------------------------------------------------------------ reporting
def rows_of(results: dict, workloads: dict) -> list[dict]:
    """One harness row per workload x contender: times, tokens/s, ratio spread, memory, loss check."""
    from fastlm.finetune.interleave import ratio_spread

    rows = []
    for w, found in results.items():
        base = found.get(tw.BASELINE, {})
        for name, r in found.items():
            row = {"case": w, "provider": name, "mode": "step", "status": r.get("status", "error"),
                   "reason": r.get("reason", ""), "group": r.get("group", ""), **workloads[w].params}
            times = r.get("times_s")
            if row["status"] == "ok" and times:
                ms = sorted(1e3 * t for t in times)
                row.update(harness.summarize(ms))
                row["tokens_per_s"] = statistics.median(n / t for n, t in zip(r["tokens"], times))
                row["real_tokens"] = sum(r["real_tokens"]) / len(r["real_tokens"])
                row["padding_share"] = 1 - sum(r["real_tokens"]) / sum(r["padded_tokens"])
                base_times = r.get("base_times_s") if name != tw.BASELINE else times
                if base_times:
                    spread = ratio_spread(base_times, times)
                    row.update(speedup_median=spread["median"], speedup_min=spread["min"],
                               speedup_max=spread["max"], speedup_steps=spread["steps"])
                row["first_loss"] = r.get("first_loss")
                base_loss = r.get("base_first_loss") if name != tw.BASELINE else r.get("first_loss")
                row["baseline_first_loss"] = base_loss
            row["peak_mb"] = r.get("peak_mb")
            row["memory_measure"] = r.get("memory_measure") or r.get("memory_error", "")
            base_peak = r.get("base_peak_mb") or base.get("peak_mb")
            if row["peak_mb"] is not None and base_peak:
                row["memory_vs_baseline"] = row["peak_mb"] / base_peak
            rows.append(row)
    return rows


def _num(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def table(rows: list[dict]) -> str:
    """The markdown table of one run's rows."""
    lines = [f"speed-up: median of the per-step ratios {tw.BASELINE} time / contender time, steps interleaved in "
             f"one process [min-max]; memory: peak in its own phase (see `memory` column of training.csv)", "",
             "| workload | contender | tokens/s | speed-up vs hf-sdpa | peak MiB | memory vs hf-sdpa | first loss "
             "(hf-sdpa) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['provider']} | {r['status']}: {r['reason']} | | | | |")
            continue
        speed = (f"**{r['speedup_median']:.2f}x** [{r['speedup_min']:.2f}-{r['speedup_max']:.2f}]"
                 if r.get("speedup_median") and r["provider"] != tw.BASELINE else "")
        loss = _num(r.get("first_loss"), ".4f") + (f" ({r['baseline_first_loss']:.4f})"
                                                    if r["provider"] != tw.BASELINE and r.get("baseline_first_loss")
                                                    else "")
        lines.append(f"| {r['case']} | {r['provider']} | {r['tokens_per_s']:,.0f} | {speed} | "
                     f"{_num(r.get('peak_mb'), ',.0f')} | {_num(r.get('memory_vs_baseline'), '.2f')} | {loss} |")
    return "\n".join(lines)


def record(rows: list[dict], device: torch.device, results_dir: Path) -> None:
    env = harness.environment(device)
    meta = {"run_id": f"{env['timestamp']}-{os.getpid()}", "timestamp": env["timestamp"], "bench": "training",
            "baseline": tw.BASELINE, **{k: env[k] for k in harness.META_COLUMNS}}
    rows = [{**r, **meta} for r in rows]
    harness.Recorder("training", results_dir).write(rows, env, {})
    header = (f"### training: {env['device']}\n\ntorch {env['torch']} · triton {env['triton']} · transformers "
              f"{env['transformers']} · CUDA {env['cuda']} · commit {env['commit']} · {env['timestamp']}\n\n")
    (results_dir / "training.md").write_text(header + table(rows) + "\n")
    summary = {r["case"]: {} for r in rows}
    for r in rows:
        summary[r["case"]][r["provider"]] = {k: r.get(k) for k in (
            "status", "reason", "tokens_per_s", "speedup_median", "speedup_min", "speedup_max", "peak_mb",
            "memory_vs_baseline", "first_loss", "padding_share", "ms_median")}
    (results_dir / "training_summary.json").write_text(json.dumps(summary, indent=1))
    import report

    if any(r["status"] == "ok" for r in rows):
        print(f"plot: {report.plot(rows, results_dir / 'training.png')}")


def main(argv=None) -> int:
    parser = harness.arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=None, help="comma-separated workload names or tasks (mlm, cls, clm)")
    parser.add_argument("--model", default=None, help="CPU sizes: a local BERT checkpoint (default: all-MiniLM-L6-v2)")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock seconds for all child processes")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="one process per fastlm tier (default: on a GPU and in the dry run)")
    parser.add_argument("--phase", choices=("steps", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--workloads", help=argparse.SUPPRESS)
    parser.add_argument("--contenders", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.phase:
        return run_child(args)
    size = _size(args)
    device = torch.device(args.device) if args.device else harness.default_device()
    workloads = {w.name: w for w in tw.workloads(size, args.model)}
    if args.tasks:
        wanted = {t.strip() for t in args.tasks.split(",")}
        workloads = {n: w for n, w in workloads.items() if n in wanted or w.task in wanted}
    known = tw.contenders(size, device)
    chosen = [c for c in known if not args.providers or c.name in args.providers.split(",") or c.name == tw.BASELINE]
    skipped = {c.name: c.why_not for c in chosen if c.why_not}
    results = collect(args, size, device, [c.name for c in chosen], list(workloads), skipped, Budget(args.budget_s))
    rows = rows_of(results, workloads)
    print(table(rows))
    if not args.no_record:
        record(rows, device, Path(args.results_dir) if args.results_dir else harness.results_dir_default())
    return 1 if any(r["status"] == "error" for r in rows) else 0  # skipped contenders are no failure


if __name__ == "__main__":
    sys.exit(main())
