"""Cross-entropy benchmark: fused CE over materialised logits, and the masked-LM head + loss.

    python bench/bench_cross_entropy.py               # GPU: the issue's sizes
    python bench/bench_cross_entropy.py --gpu-check   # the short GPU run of bench/gpu_check.sh
    python bench/bench_cross_entropy.py --quick       # CPU: small CE rows, MLM head at 4096 tokens
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
  CE: no (T, V) logits).  Compare time and ``peak_mb`` (on CPU a sampled-RSS lower bound).
"""
from __future__ import annotations

import os
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
    if preset == "quick":  # CPU: small CE; the MLM head at the size (its CPU targets)
        ce = [(256, VOCAB)]
    elif preset == "gpu-check":
        ce = [(8192, VOCAB), (512, 262144)]
    else:
        ce = [(4096, VOCAB), (16384, VOCAB), (32768, VOCAB), (2048, 262144)]
    mlm = [(4096, 384), (4096, 768)]
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


def main(argv=None) -> int:
    parser = harness.arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    args = parser.parse_args(argv)
    kwargs = harness.run_kwargs(args)
    device = torch.device(args.device) if args.device else harness.default_device()
    kwargs["device"] = device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    preset = "quick" if args.quick else "gpu-check" if args.gpu_check else "full"
    harness.run("cross_entropy", cases_for(preset, dtype), harness.select_providers(providers(), args.providers),
                baseline="torch", **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
