"""DeBERTa disentangled attention benchmark: fastlm.ops.disentangled_attention (padded) and
varlen_disentangled_attention (packed) per backend vs transformers' ``DisentangledSelfAttention``
and, on a GPU, DisentangledFlash (``disentangled-flash``) when installed; forward, backward and
forward+backward.

    python bench/bench_disentangled_attention.py               # GPU: base shapes (CPU-sized ones without a GPU)
    python bench/bench_disentangled_attention.py --gpu-check   # the short GPU run of bench/gpu_check.sh
    python bench/bench_disentangled_attention.py --quick       # small shapes for a CPU

Cases ``deberta<S>-b<B>-h<H>``: DeBERTa-v3 attention (c2p + p2c, position_buckets 256,
max_relative_positions 512, so R = 512 positional rows, head_dim 64), batch B, max length S,
right padding with lengths drawn uniformly in [0.2 S, S] (one at S): about 40% padding.

What is timed is the attention given the projected inputs.  transformers' module gets
identity projections (``query_proj = key_proj = value_proj = Identity`` with ``share_att_key``), so its
forward runs exactly its attention code on q = k = v = the hidden states and on the relative
embeddings as positional tables: the per-head layout copies, the positional products
against all R rows, the gathers, the ``(B, H, L, L)`` scores, mask, softmax and the product
with V (the mask and the relative positions are built outside the timing, as its encoder
does once per forward).  fastlm gets the same tensors as views, padded with the key padding
mask or packed (unpadded outside the timing: the patched encoder unpads once per forward).

FLOPs, counted on real (query, key) pairs only: forward ``8 * heads * head_dim * sum(len^2)``
(q k, the two positional terms, P V: as if each term cost one product per pair), backward
2.5x, forward+backward 3.5x.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from bench_attention import bert_lengths  # noqa: E402
from harness import Case, Provider  # noqa: E402

BUCKETS, MAX_REL, HEAD_DIM = 256, 512, 64
PRESETS = {  # (batch, max length, heads)
    "full": [(16, 128, 12), (16, 256, 12), (16, 512, 12), (32, 128, 12), (32, 512, 12)],
    "gpu-check": [(16, 512, 12)],
    "cpu": [(16, 128, 6), (16, 256, 6), (32, 128, 6), (16, 512, 6)],
    "quick": [(4, 64, 2), (4, 128, 2)],
}


def make_case(batch: int, seq: int, heads: int, dtype: torch.dtype) -> Case:
    lengths = bert_lengths(batch, seq, 0.4)
    hidden = heads * HEAD_DIM

    def make(device):
        from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

        mask = torch.arange(seq, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        x = torch.randn(batch, seq, hidden, device=device, dtype=dtype) * 0.5
        rel = torch.randn(2 * BUCKETS, hidden, device=device, dtype=dtype) * 0.5
        lens = torch.tensor(lengths, device=device)
        cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        return {"x": x, "rel": rel, "xp": x[mask].detach().clone(), "mask": mask, "cu": cu, "max_len": max(lengths),
                "ext_mask": (mask[:, None, None, :] & mask[:, None, :, None]),
                "rel_pos": build_relative_position(x, x, bucket_size=BUCKETS, max_position=MAX_REL),
                "heads": heads}

    pairs = sum(n * n for n in lengths)
    fwd = 8.0 * heads * HEAD_DIM * pairs
    padding = 1 - sum(lengths) / (batch * seq)
    return Case(f"deberta{seq}-b{batch}-h{heads}", make, grad=("x", "rel", "xp"),
                flops={"forward": fwd, "backward": 2.5 * fwd, "full": 3.5 * fwd},
                params={"batch": batch, "seq": seq, "heads": heads, "head_dim": HEAD_DIM,
                        "dtype": str(dtype).replace("torch.", ""), "padding": round(padding, 3)})


# ------------------------------------------------------------------------------ providers
_HF_MODULES: dict = {}


def _hf_module(heads: int, device, dtype):
    """transformers' DisentangledSelfAttention with identity projections (see the module docstring)."""
    key = (heads, str(device), dtype)
    if key not in _HF_MODULES:
        import transformers
        from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention

        config = transformers.DebertaV2Config(hidden_size=heads * HEAD_DIM, num_attention_heads=heads,
                                              relative_attention=True, position_buckets=BUCKETS,
                                              max_relative_positions=MAX_REL, pos_att_type=["p2c", "c2p"],
                                              share_att_key=True, attention_probs_dropout_prob=0.0,
                                              hidden_dropout_prob=0.0)
        module = DisentangledSelfAttention(config).to(device=device, dtype=dtype)
        module.query_proj = module.key_proj = module.value_proj = torch.nn.Identity()
        _HF_MODULES[key] = module
    return _HF_MODULES[key]


def _hf(inputs):
    x = inputs["x"]
    module = _hf_module(inputs["heads"], x.device, x.dtype)
    return module(x, inputs["ext_mask"], relative_pos=inputs["rel_pos"], rel_embeddings=inputs["rel"])[0]


def _tables(inputs):
    rel = inputs["rel"]
    table = rel.view(rel.shape[0], inputs["heads"], HEAD_DIM).transpose(0, 1)  # (H, R, D) view
    return table, table


def _fastlm_call(varlen: bool):
    def call(inputs, backend):
        from fastlm.ops.disentangled_attention import disentangled_attention, varlen_disentangled_attention

        pk, pq = _tables(inputs)
        kw = dict(position_buckets=BUCKETS, max_relative_positions=MAX_REL, backend=backend)
        if varlen:
            xp = inputs["xp"].view(-1, inputs["heads"], HEAD_DIM)
            return varlen_disentangled_attention(xp, xp, xp, pk, pq, inputs["cu"], inputs["max_len"], **kw)
        x = inputs["x"].view(*inputs["x"].shape[:2], inputs["heads"], HEAD_DIM).transpose(1, 2)
        return disentangled_attention(x, x, x, pk, pq, key_padding_mask=inputs["mask"], **kw)
    return call


def disentangled_flash_provider() -> Provider:
    """DisentangledFlash's differentiable Triton attention, padded with its 2D mask (GPU only).

    Written from its 1.1.1 sources (``training_attention`` with the compact position plan and
    the tables projected on the active slots); never run here (no GPU)."""
    plans: dict = {}

    def fn(inputs):
        from disentangled_flash.position import SharedPositionPlanCache, pad_position_table
        from disentangled_flash.training._kernels import training_attention

        x = inputs["x"]
        key = (x.shape[1], str(x.device))
        if key not in plans:
            cache = SharedPositionPlanCache(position_buckets=BUCKETS, max_relative_positions=MAX_REL,
                                            position_embedding_size=BUCKETS)
            plans[key] = cache.compact(x.shape[1], x.device)
        plan = plans[key]
        table = _tables(inputs)[0][:, plan.active_slots]
        table = pad_position_table(table)
        q = x.view(*x.shape[:2], inputs["heads"], HEAD_DIM).transpose(1, 2)
        return training_attention(q, q, q, table, table, plan.delta_to_local, inputs["mask"].contiguous(),
                                  score_scale=(3 * HEAD_DIM) ** -0.5, has_padding=True, strict_fp32=False,
                                  gradient_band=plan.gradient_band)

    def skip(case, device):
        try:
            import disentangled_flash  # noqa: F401
        except Exception as exc:
            return f"disentangled_flash not importable ({type(exc).__name__})"
        if device.type != "cuda":
            return "DisentangledFlash runs on NVIDIA GPUs only"
        return None

    return Provider("disentangled-flash", fn, skip)


def providers() -> list[Provider]:
    def skip(case, device, backend):
        if backend == "reference" and case.params["batch"] * case.params["heads"] * case.params["seq"] ** 2 > 2**28:
            return "reference materialises the (B, H, L, L) scores: skipped above 2^28 elements"
        return None

    out = [Provider("hf-eager", _hf)]
    for backend in ("reference", "cpu", "triton"):
        out += harness.fastlm_providers(_fastlm_call(False), [backend], skip=skip)
        out += harness.fastlm_providers(_fastlm_call(True), [backend], name="fastlm-{backend}-varlen", skip=skip)
    return out + [disentangled_flash_provider()]


def main(argv=None) -> int:
    parser = harness.arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                        help="default: bfloat16 on GPU, float32 on CPU")
    args = parser.parse_args(argv)
    kwargs = harness.run_kwargs(args)
    device = torch.device(args.device) if args.device else harness.default_device()
    kwargs["device"] = device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    preset = "quick" if args.quick else "gpu-check" if args.gpu_check else "full"
    if preset == "full" and device.type != "cuda":
        print("bench_disentangled_attention: no GPU; running CPU-sized shapes (xsmall's 6 heads)", file=sys.stderr)
        preset = "cpu"
    cases = [make_case(b, s, h, dtype) for b, s, h in PRESETS[preset]]
    harness.run("disentangled_attention", cases, harness.select_providers(providers(), args.providers),
                baseline="hf-eager", **kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
