"""Softmax benchmark: fastlm.ops.softmax (fused scale -> mask -> softmax -> dropout) per
backend against PyTorch's unfused chain; forward, backward and forward+backward.

    python bench/bench_softmax.py               # GPU: rows 128 .. 16k, fp16 and bf16
    python bench/bench_softmax.py --gpu-check   # the short GPU run of bench/gpu_check.sh
    python bench/bench_softmax.py --quick       # small shapes for a CPU
    python bench/report.py bench/results/softmax.csv

Cases ``n<N>-<dtype>-p<P>``: attention-probability shaped scores (batch, heads, queries,
N) with a (batch, 1, 1, N) bool key-padding mask (about 10% masked), scale 1/8 and
dropout P, keeping batch * heads * queries * N fixed (2^25 elements on GPU, 2^21 on
CPU) as N goes from 128 to 16k.

Providers: ``torch`` is the unfused chain an eager model runs (``x * scale`` ->
``masked_fill`` -> ``softmax`` -> ``dropout``; the baseline of the speedups);
``torch-softmax`` is ``F.softmax`` alone (no scale, mask or dropout: a lower bound of
eager cost); ``fastlm-<backend>`` the fused op.

GB/s counts the minimal traffic of the fused op, the same for every provider: forward
reads x and writes out (and the pre-dropout probabilities saved for backward when
P > 0); backward reads the output gradient and the saved probabilities and writes dx.
The mask (N bytes per batch row) is not counted.  The copy ceiling is measured in the
same run.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Case, Provider  # noqa: E402

SCALE = 0.125


def make_case(n: int, total: int, dtype: torch.dtype, dropout_p: float) -> Case:
    rows = max(1, total // n)
    batch = 4 if rows >= 4 * 8 else 1
    heads = 8 if rows >= batch * 8 else 1
    queries = max(1, rows // (batch * heads))
    shape = (batch, heads, queries, n)
    numel = batch * heads * queries * n
    elt = torch.tensor([], dtype=dtype).element_size()
    fwd = (3 if dropout_p > 0 else 2) * numel * elt
    bwd = 3 * numel * elt

    def make_inputs(device):
        x = torch.randn(shape, device=device, dtype=dtype)
        mask = torch.rand(batch, 1, 1, n, device=device) > 0.1
        return {"x": x, "mask": mask, "p": dropout_p}

    name = f"n{n}-{str(dtype).replace('torch.', '')}-p{dropout_p:g}"
    return Case(name, make_inputs, grad=("x",), bytes={"forward": fwd, "backward": bwd, "full": fwd + bwd},
                params={"n": n, "rows": batch * heads * queries, "dtype": str(dtype).replace("torch.", ""),
                        "dropout_p": dropout_p})


def cases_for(preset: str, device: torch.device) -> list[Case]:
    if preset == "quick":
        ns, total, dtypes, ps = [128, 512, 2048, 4096, 16384], 2**21, [torch.float32, torch.float16, torch.bfloat16], [0.0, 0.1]
    elif preset == "gpu-check":
        ns, total, dtypes, ps = [256, 1024, 4096, 8192], 2**25, [torch.bfloat16], [0.1]
    else:
        ns = [128, 256, 512, 1024, 2048, 4096, 8192, 16384]
        total, dtypes, ps = 2**25, [torch.float16, torch.bfloat16], [0.0, 0.1]
    return [make_case(n, total, dt, p) for dt in dtypes for p in ps for n in ns]


def _unfused(inputs):
    z = (inputs["x"] * SCALE).masked_fill(~inputs["mask"], float("-inf"))
    return F.dropout(torch.softmax(z, dim=-1), inputs["p"])


def _softmax_only(inputs):
    return torch.softmax(inputs["x"], dim=-1)


def _fastlm(inputs, backend):
    from fastlm.ops import softmax

    return softmax(inputs["x"], scale=SCALE, mask=inputs["mask"], dropout_p=inputs["p"], backend=backend)


def providers() -> list[Provider]:
    return [Provider("torch", _unfused), Provider("torch-softmax", _softmax_only),
            *harness.fastlm_providers(_fastlm)]


def main(argv=None) -> int:
    args = harness.arg_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    kwargs = harness.run_kwargs(args)
    device = torch.device(args.device) if args.device else harness.default_device()
    kwargs["device"] = device
    preset = "quick" if args.quick else "gpu-check" if args.gpu_check else "full"
    if preset == "full" and device.type != "cuda":
        print("bench_softmax: no GPU; the full shapes are GPU-sized, running --quick shapes", file=sys.stderr)
        preset = "quick"
    selected = harness.select_providers(providers(), args.providers)
    harness.run("softmax", cases_for(preset, device), selected, baseline="torch", **kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
