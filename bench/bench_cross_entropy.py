"""Cross-entropy benchmark: fused CE over materialised logits, and the masked-LM head + loss.

    python bench/bench_cross_entropy.py               # GPU: the issue's sizes
    python bench/bench_cross_entropy.py --gpu-check   # the short GPU run of bench/gpu_check.sh
    python bench/bench_cross_entropy.py --quick       # CPU: small shapes, a couple of minutes
    python bench/bench_cross_entropy.py --cpu-targets # CPU: the issue's MLM sizes (4096 tokens), full mode,
                                                      #      plus fresh-process peak memory (~10 min on 2 cores;
                                                      #      --memory-only: the memory alone)
    python bench/report.py bench/results/cross_entropy.csv

Cases
-----
* ``ce<N>x<V>``: ``fastlm.ops.cross_entropy`` per backend vs ``F.cross_entropy`` (``torch``,
  the baseline) on ``(N, V)`` logits, 15% of labels ignored.  Bytes are the minimum a
  fused kernel moves: forward reads the logits and writes their gradient (2 N V s),
  backward reads that gradient and writes the scaled one (2 N V s); full = 4 N V s.  The
  ``frac_copy`` column is GB/s over the copy bandwidth measured in the same run.
* ``mlm<T>-h<H>``: BERT's masked-LM head + loss over T tokens, hidden H, vocab 30,522,
  15% of tokens labelled (the rest -100).  The baseline is Hugging Face's
  ``BertLMPredictionHead`` + ``CrossEntropyLoss``: transform (dense H->H, GELU,
  LayerNorm) and decoder on every token, then CE over (T, V) logits: the ``torch``
  provider here, the baseline).
  ``fastlm-<backend>`` keeps only the labelled tokens (sparse prediction), runs the same
  transform on them, then ``fastlm.ops.linear_cross_entropy`` (chunked decoder + fused
  CE: no (T, V) logits).  Compare time and ``peak_mb``.

CPU memory: the harness's CPU ``peak_mb`` samples RSS growth inside a process whose
allocator already holds freed blocks, and a sampler misses short peaks.  For the MLM
cases on CPU this script therefore also runs each provider once (forward+backward) in a
fresh child process, after a warm-up on 64 tokens, and reports the growth of the
kernel's own resident high-water mark across that one step: ``VmHWM`` after it minus
``VmRSS`` before it, with ``VmHWM`` reset first (``fastlm.finetune.memory.PeakMemory``).
glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` maps every block over 64 KiB on allocation and
unmaps it on free, so the high-water mark follows live memory rather than the allocator's
cache.
The inputs are allocated before the step and not counted; the gradients it returns are.
(``vmhwm_growth_mb``, appended to ``bench/results/cross_entropy_cpu_memory.csv|json``.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Case, Provider  # noqa: E402

VOCAB = 30522
IGNORE = -100


# ----------------------------------------------------------------------------- cases
def _labels(n: int, v: int, labelled: float, device) -> torch.Tensor:
    y = torch.randint(0, v, (n,), device=device)
    y[torch.rand(n, device=device) >= labelled] = IGNORE
    return y


def ce_case(n: int, v: int, dtype: torch.dtype) -> Case:
    def make(device):
        return {"logits": torch.randn(n, v, device=device, dtype=dtype), "labels": _labels(n, v, 0.85, device)}

    per_pass = 2 * n * v * dtype.itemsize
    return Case(f"ce{n}x{v}", make, grad=("logits",),
                bytes={"forward": per_pass, "backward": per_pass, "full": 2 * per_pass},
                params={"rows": n, "vocab": v, "hidden": "", "dtype": str(dtype).replace("torch.", "")})


def mlm_case(tokens: int, hidden: int, dtype: torch.dtype) -> Case:
    def make(device):
        p = dict(device=device, dtype=dtype)
        return {
            "hidden": torch.randn(tokens, hidden, **p),
            "dense_w": torch.randn(hidden, hidden, **p) / hidden**0.5, "dense_b": torch.randn(hidden, **p) * 0.02,
            "ln_w": 1 + 0.1 * torch.randn(hidden, **p), "ln_b": 0.1 * torch.randn(hidden, **p),
            "dec_w": torch.randn(VOCAB, hidden, **p) * 0.05, "dec_b": torch.randn(VOCAB, **p) * 0.02,
            "labels": _labels(tokens, VOCAB, 0.15, device),
        }

    return Case(f"mlm{tokens}-h{hidden}", make,
                grad=("hidden", "dense_w", "dense_b", "ln_w", "ln_b", "dec_w", "dec_b"),
                params={"rows": tokens, "vocab": VOCAB, "hidden": hidden, "dtype": str(dtype).replace("torch.", "")})


def cases_for(preset: str, dtype: torch.dtype) -> list[Case]:
    mlm = [(4096, 384), (4096, 768)]  # the targets
    if preset == "quick":
        ce, mlm = [(256, VOCAB)], [(1024, 384)]
    elif preset == "cpu-targets":
        ce = [(256, VOCAB)]
    elif preset == "gpu-check":
        ce = [(8192, VOCAB), (512, 262144)]
    else:
        ce = [(4096, VOCAB), (16384, VOCAB), (32768, VOCAB), (2048, 262144)]
    return [ce_case(n, v, dtype) for n, v in ce] + [mlm_case(t, h, dtype) for t, h in mlm]


# ------------------------------------------------------------------------- providers
def _transform(inp, h):
    h = F.gelu(F.linear(h, inp["dense_w"], inp["dense_b"]))
    return F.layer_norm(h, h.shape[-1:], inp["ln_w"], inp["ln_b"], eps=1e-12)


def _torch(inp):
    if "logits" in inp:
        return F.cross_entropy(inp["logits"], inp["labels"])
    # Hugging Face BertOnlyMLMHead + CrossEntropyLoss: every token, dense (T, V) logits
    logits = F.linear(_transform(inp, inp["hidden"]), inp["dec_w"], inp["dec_b"])
    return F.cross_entropy(logits.view(-1, VOCAB), inp["labels"].view(-1))


def _fastlm(inp, backend):
    import fastlm

    if "logits" in inp:
        return fastlm.ops.cross_entropy(inp["logits"], inp["labels"], backend=backend)
    labels = inp["labels"]
    keep = (labels != IGNORE).nonzero().squeeze(1)  # sparse prediction: labelled tokens only
    h = _transform(inp, inp["hidden"].index_select(0, keep))
    return fastlm.ops.linear_cross_entropy(h, inp["dec_w"], labels.index_select(0, keep), bias=inp["dec_b"],
                                           backend=backend)


def providers() -> list[Provider]:
    return [Provider("torch", _torch), *harness.fastlm_providers(_fastlm)]


def _memory_child(case_name: str, provider_name: str, dtype: torch.dtype) -> None:
    """Child process: one forward+backward of one MLM provider; prints its VmHWM growth (MiB)."""
    from fastlm.finetune.memory import PeakMemory

    hidden = int(case_name.split("-h")[1])
    fn = {p.name: p.fn for p in providers()}[provider_name]

    def step(case):
        inputs = case.make_inputs(torch.device("cpu"))
        leaves = [inputs[name].requires_grad_() for name in case.grad]
        with PeakMemory("cpu") as peak:
            grads = torch.autograd.grad(fn(inputs), leaves)
        del grads
        return peak.growth

    step(mlm_case(64, hidden, dtype))  # warm-up: libraries, kernels, lazy imports
    print(json.dumps({"peak_mb": step(mlm_case(int(case_name[3:].split("-")[0]), hidden, dtype)) / 2**20}))


def cpu_fresh_memory(cases: list[Case], names: list[str], dtype: torch.dtype, results_dir, record: bool) -> None:
    """Fresh-process VmHWM growth of every MLM case x provider (see the module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    for case in (c for c in cases if c.name.startswith("mlm")):
        base = None
        for name in names:
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", case.name, name,
                   "--dtype", str(dtype).replace("torch.", "")]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if out.returncode or not lines:
                reason = (out.stderr.strip().splitlines() or ["no output"])[-1][:200]
                rows.append({"case": case.name, "provider": name, "status": "error", "reason": reason})
                continue
            peak = json.loads(lines[-1])["peak_mb"]
            base = peak if name == "torch" else base
            rows.append({"case": case.name, "provider": name, "status": "ok", "vmhwm_growth_mb": round(peak, 1),
                         "vs_torch": round(peak / base, 3) if base else None, **case.params})
    print("\nCPU peak resident growth (VmHWM), forward+backward, fresh process (MiB; x = vs torch):\n")
    print("| case | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for case_name in dict.fromkeys(r["case"] for r in rows):
        cells = []
        for name in names:
            r = next(r for r in rows if r["case"] == case_name and r["provider"] == name)
            cells.append(f"{r['vmhwm_growth_mb']:.0f} ({r['vs_torch']}x)" if r["status"] == "ok" else r["reason"])
        print(f"| {case_name} | " + " | ".join(cells) + " |")
    if record and rows:
        meta = harness.environment(torch.device("cpu"))
        harness.Recorder("cross_entropy_cpu_memory", results_dir).write(
            [{**r, "timestamp": meta["timestamp"], "commit": meta["commit"]} for r in rows], meta, {})


def main(argv=None) -> int:
    parser = harness.arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--cpu-targets", action="store_true",
                        help="CPU: the issue's MLM sizes, full mode, with fresh-process peak memory")
    parser.add_argument("--memory-only", action="store_true",
                        help="with --cpu-targets: only the fresh-process memory, no timing")
    parser.add_argument("--memory-child", nargs=2, metavar=("CASE", "PROVIDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        _memory_child(*args.memory_child, getattr(torch, args.dtype or "float32"))
        return 0
    kwargs = harness.run_kwargs(args)
    device = torch.device(args.device) if args.device else harness.default_device()
    kwargs["device"] = device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    preset = "cpu-targets" if args.cpu_targets else "quick" if args.quick else "gpu-check" if args.gpu_check else "full"
    if preset in ("cpu-targets", "gpu-check") and args.modes == parser.get_default("modes"):
        kwargs["modes"] = ("full",)  # the targets are forward+backward; keeps gpu_check.sh's budget
    cases = cases_for(preset, dtype)
    chosen = harness.select_providers(providers(), args.providers)
    if not args.memory_only:
        harness.run("cross_entropy", cases, chosen, baseline="torch", **kwargs)
    if device.type == "cpu" and preset == "cpu-targets":
        names = [p.name for p in chosen if p.skip_reason(cases[-1], device, "full") is None]
        cpu_fresh_memory(cases, names, dtype, args.results_dir, not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
