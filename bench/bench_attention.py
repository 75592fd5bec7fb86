"""Attention benchmark: fastlm.ops.attention / varlen_attention per backend vs PyTorch SDPA
(each SDPA backend) and flash_attn when installed; forward, backward and forward+backward.

    python bench/bench_attention.py               # GPU: BERT-base shapes + long causal / non-causal sweeps
                                                  # (no GPU: CPU-sized BERT and long shapes)
    python bench/bench_attention.py --gpu-check   # the short GPU run of bench/gpu_check.sh
    python bench/bench_attention.py --quick       # small shapes for a CPU
    python bench/report.py bench/results/attention.csv

Cases
-----
* ``bert<S>-pad<P>``: BERT-base attention, batch 32, 12 heads, head_dim 64, max length
  S in (128, 512), right padding with a realistic length mix: lengths drawn uniformly in
  [(1 - 2P) S, S] (one sequence at S, so the batch really pads to S) for a target P of
  0.40 / 0.48; the draw (fixed seed) pads 36% / 38%, the case name gives the drawn share.
  ``sdpa`` is SDPA's own choice (the baseline of the speedups), ``sdpa-<backend>`` one
  backend forced with ``sdpa_kernel``.  fastlm runs three ways: ``fastlm-<backend>`` on
  the padded batch with ``key_padding_mask`` (the torch backend: PyTorch's memory-efficient
  kernel with the mask as a broadcast bias), ``fastlm-<backend>-varlen`` on tokens
  unpadded beforehand (once per forward, as the patch does for encoders), and
  ``fastlm-<backend>-unpad`` unpadding inside the call (gather the real tokens, varlen,
  scatter back: one host sync for the token count, the per-call alternative to the
  padded kernel; the gpu check decides between them).  SDPA gets the
  padding mask as it takes it, a bool ``attn_mask`` of shape (batch, 1, 1, S); its flash
  backend refuses any mask (the row says so).  ``flash_attn`` runs varlen.
* ``causal<S>`` / ``full<S>``: head_dim 128, 16 heads, S from 1k to 16k, batch * S = 16k
  tokens, no padding, causal (top-left) or not.
* ``local<S>-w<W>``: the same, non-causal, with a sliding window W (ModernBERT's local
  layers): key j visible from query i iff |i - j| < W.  SDPA gets the band as a bool
  ``attn_mask`` (what transformers' sdpa path builds); fastlm and flash_attn take the window.

FLOPs are counted on real tokens only: forward 4 * heads * head_dim * sum_b(len_b^2)
(two matmuls; causal and windowed cases count only the visible (i, j) pairs),
backward 2.5x and forward+backward 3.5x the forward (five matmuls against two, the
FlashAttention convention).  A padded provider that computes the padding too does more
work than it is credited with: that is the cost the benchmark exposes.

Providers that materialise the (S x S) score matrix (``torch`` eager, ``sdpa-math``,
``fastlm-reference``) are skipped when it would exceed ``--quadratic-gib`` of fp32 scores.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Case, Provider, Unsupported  # noqa: E402



# ----------------------------------------------------------------------------- cases
def bert_lengths(batch: int, seq: int, pad_frac: float, seed: int = 0) -> list[int]:
    """Lengths in [(1 - 2 pad_frac) seq, seq], one at seq: about ``pad_frac`` padding."""
    gen = torch.Generator().manual_seed(seed)
    lo = max(1, round((1 - 2 * pad_frac) * seq))
    lengths = torch.randint(lo, seq + 1, (batch,), generator=gen)
    lengths[0] = seq
    return lengths.tolist()


def visible_pairs(n: int, causal: bool, window: int | None) -> int:
    """(query, key) pairs that attend in a sequence of n tokens."""
    if window is None or window >= n:
        return n * (n + 1) // 2 if causal else n * n
    i = torch.arange(n)
    lo = (i - window + 1).clamp(min=0)
    hi = i + 1 if causal else (i + window).clamp(max=n)
    return int((hi - lo).sum())


def attention_flops(lengths: list[int], heads: int, head_dim: int, causal: bool, window: int | None = None) -> dict:
    pairs = sum(visible_pairs(n, causal, window) for n in lengths)
    fwd = 4.0 * heads * head_dim * pairs
    return {"forward": fwd, "backward": 2.5 * fwd, "full": 3.5 * fwd}


def make_case(name: str, lengths: list[int], seq: int, heads: int, head_dim: int, causal: bool,
              dtype: torch.dtype, padded: bool, modes: tuple | None = None, window: int | None = None) -> Case:
    batch = len(lengths)
    total = sum(lengths)

    def make_inputs(device):
        shape = (batch, heads, seq, head_dim)
        packed = (total, heads, head_dim)
        inputs = {n: torch.randn(shape, device=device, dtype=dtype) for n in ("q", "k", "v")}
        inputs.update({n: torch.randn(packed, device=device, dtype=dtype) for n in ("qp", "kp", "vp")})
        lens = torch.tensor(lengths, device=device)
        cu = torch.zeros(batch + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(lens, 0)
        mask = None
        if padded:
            mask = torch.arange(seq, device=device)[None, :] < lens[:, None]
        band = None
        if window is not None:  # (S, S) bool, True = visible: the mask an sdpa / eager path needs
            pos = torch.arange(seq, device=device)
            dist = pos[:, None] - pos[None, :]
            band = (dist < window) & ((dist >= 0) if causal else (dist > -window))
        inputs.update(mask=mask, cu=cu, max_len=max(lengths), causal=causal, window=window, band=band)
        return inputs

    pad = 1 - total / (batch * seq)
    params = {"batch": batch, "heads": heads, "head_dim": head_dim, "seq": seq, "causal": causal,
              "pad_frac": round(pad, 3), "tokens": total, "dtype": str(dtype).replace("torch.", ""),
              "window": window}
    return Case(name, make_inputs, grad=("q", "k", "v", "qp", "kp", "vp"),
                flops=attention_flops(lengths, heads, head_dim, causal, window), params=params, modes=modes)


def cases_for(preset: str, dtype: torch.dtype) -> list[Case]:
    """``quick``: tiny CPU shapes; ``gpu-check``: one case per target of the attention issue,
    most important first (a time limit then cuts the least important); ``full``: the sweeps
    (``cpu``: what ``full`` runs on a machine without a GPU)."""
    def bert(seq, pad, b=32, h=12, d=64):
        lengths = bert_lengths(b, seq, pad, seed=seq)
        actual = 1 - sum(lengths) / (b * seq)  # the name gives the padding drawn, not the target
        return make_case(f"bert{seq}-pad{round(100 * actual)}", lengths, seq, h, d, False, dtype, True)

    def long(seq, causal, tokens=16384, h=16, d=128, modes=None, window=None):
        name = f"local{seq}-w{window}" if window else f"{'causal' if causal else 'full'}{seq}"
        return make_case(name, [seq] * max(1, tokens // seq), seq, h, d, causal, dtype, False, modes, window)

    if preset == "quick":
        return [bert(64, 0.45, b=4, h=2, d=32), long(128, True, tokens=256, h=2, d=64),
                long(128, False, tokens=256, h=2, d=64), long(128, False, tokens=256, h=2, d=64, window=16)]
    if preset == "cpu":  # what `full` means without a GPU: CPU-sized, minutes
        return [bert(128, 0.4, b=16), bert(256, 0.45, b=16), long(256, False, tokens=4096, h=12, d=64),
                long(1024, True, tokens=2048, h=8, d=128), long(1024, False, tokens=2048, h=8, d=128),
                long(1024, False, tokens=2048, h=8, d=128, window=128)]
    if preset == "gpu-check":
        return [bert(512, 0.48), long(8192, True), long(8192, False, modes=("forward",)), bert(128, 0.4),
                long(2048, True)]
    seqs = (1024, 2048, 4096, 8192, 16384)
    return [bert(128, 0.4), bert(512, 0.48), *(long(s, True) for s in seqs), *(long(s, False) for s in seqs),
            long(8192, False, window=128)]


# ------------------------------------------------------------------------- providers
def _quadratic_skip(limit_gib: float):
    def skip(case: Case, device: torch.device, *_):
        p = case.params
        gib = p["batch"] * p["heads"] * p["seq"] ** 2 * 4 / 2**30
        if gib > limit_gib:
            return f"materialises {gib:.1f} GiB of fp32 scores (> --quadratic-gib {limit_gib})"
        return None
    return skip


def _eager(inputs):
    """Plain PyTorch: scores, mask, fp32 softmax, weighted sum (what HF's eager path does)."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if inputs["mask"] is not None:
        scores = scores.masked_fill(~inputs["mask"][:, None, None, :], float("-inf"))
    if inputs["causal"]:
        s = q.shape[-2]
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if inputs["band"] is not None:
        scores = scores.masked_fill(~inputs["band"], float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def _sdpa(backend):
    """SDPA restricted to one backend, or (``backend=None``) its own dispatch, as HF calls it."""
    from contextlib import nullcontext

    from torch.nn.attention import sdpa_kernel

    def fn(inputs):
        mask, band = inputs["mask"], inputs["band"]
        attn_mask = None if mask is None else mask[:, None, None, :]
        if band is not None:  # SDPA takes no window: the band as a mask (causal folded in)
            attn_mask = band if attn_mask is None else attn_mask & band
        causal = inputs["causal"] and band is None
        try:
            with sdpa_kernel(backend) if backend is not None else nullcontext():
                return F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"],
                                                      attn_mask=attn_mask, is_causal=causal)
        except RuntimeError as exc:
            if "No available kernel" in str(exc) or "No viable backend" in str(exc):
                raise Unsupported(f"SDPA {getattr(backend, 'name', 'dispatch')} refuses this input") from None
            raise
    return fn


def sdpa_providers(quadratic_skip) -> list[Provider]:
    from torch.nn.attention import SDPBackend

    names = {"MATH": "math", "EFFICIENT_ATTENTION": "efficient", "FLASH_ATTENTION": "flash",
             "CUDNN_ATTENTION": "cudnn"}
    providers = [Provider("sdpa", _sdpa(None))]  # the baseline: what SDPA picks by itself
    for attr, short in names.items():
        backend = getattr(SDPBackend, attr, None)
        if backend is None:
            continue
        skip = quadratic_skip if short == "math" else None
        if short == "cudnn":
            skip = lambda case, device: None if device.type == "cuda" else "cuDNN attention is CUDA-only"
        providers.append(Provider(f"sdpa-{short}", _sdpa(backend), skip))
    return providers


def _fastlm_call(varlen: bool):
    def call(inputs, backend):
        from fastlm.ops.attention import attention, varlen_attention

        if varlen:
            return varlen_attention(inputs["qp"], inputs["kp"], inputs["vp"], inputs["cu"], inputs["cu"],
                                    inputs["max_len"], inputs["max_len"], causal=inputs["causal"],
                                    window=inputs["window"], backend=backend)
        return attention(inputs["q"], inputs["k"], inputs["v"], key_padding_mask=inputs["mask"],
                         causal=inputs["causal"], window=inputs["window"], backend=backend)
    return call


def _fastlm_unpad_call(inputs, backend):
    """Padded batch in, padded batch out, through the varlen kernels: gather the real tokens
    (``nonzero``: one host sync), attend packed, scatter back (padding rows 0)."""
    from fastlm.ops.attention import varlen_attention

    mask = inputs["mask"]
    if mask is None:
        raise Unsupported("no padding to remove")
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    b, h, s, d = q.shape
    idx = mask.reshape(-1).nonzero().squeeze(1)
    cu = torch.nn.functional.pad(mask.sum(1).cumsum(0, dtype=torch.int32), (1, 0))
    qp, kp, vp = (t.transpose(1, 2).reshape(b * s, h, d).index_select(0, idx) for t in (q, k, v))
    out = varlen_attention(qp, kp, vp, cu, cu, s, s, causal=inputs["causal"], window=inputs["window"], backend=backend)
    full = out.new_zeros(b * s, h, d).index_copy(0, idx, out)
    return full.view(b, s, h, d).transpose(1, 2)


def fastlm_attention_providers(quadratic_skip) -> list[Provider]:
    def skip(case, device, backend):
        try:
            import fastlm.ops.attention  # noqa: F401
        except Exception as exc:
            return f"fastlm.ops.attention not importable: {type(exc).__name__}: {exc}"
        return quadratic_skip(case, device) if backend == "reference" else None

    providers = []
    for backend in harness.BACKENDS:
        providers += harness.fastlm_providers(_fastlm_call(False), [backend], skip=skip)
        providers += harness.fastlm_providers(_fastlm_call(True), [backend], name="fastlm-{backend}-varlen", skip=skip)
        providers += harness.fastlm_providers(_fastlm_unpad_call, [backend], name="fastlm-{backend}-unpad",
                                              skip=skip)
    return providers


def flash_attn_provider() -> Provider:
    def fn(inputs):
        from flash_attn import flash_attn_varlen_func

        w = inputs["window"]
        window_size = (-1, -1) if w is None else (w - 1, 0 if inputs["causal"] else w - 1)
        return flash_attn_varlen_func(inputs["qp"], inputs["kp"], inputs["vp"], inputs["cu"], inputs["cu"],
                                      inputs["max_len"], inputs["max_len"], causal=inputs["causal"],
                                      window_size=window_size)

    def skip(case, device):
        try:
            import flash_attn  # noqa: F401
        except Exception as exc:
            return f"flash_attn not importable ({type(exc).__name__})"
        if device.type != "cuda" or case.params["dtype"] not in ("float16", "bfloat16"):
            return "flash_attn needs CUDA fp16/bf16"
        return None

    return Provider("flash_attn", fn, skip)


def providers_for(quadratic_gib: float) -> list[Provider]:
    quad = _quadratic_skip(quadratic_gib)
    return [Provider("torch", _eager, quad), *sdpa_providers(quad), *fastlm_attention_providers(quad),
            flash_attn_provider()]


def main(argv=None) -> int:
    parser = harness.arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                        help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--quadratic-gib", type=float, default=None,
                        help="skip score-materialising providers above this many GiB of scores "
                             "(default 8; 2.5 with --gpu-check)")
    args = parser.parse_args(argv)
    kwargs = harness.run_kwargs(args)
    device = torch.device(args.device) if args.device else harness.default_device()
    kwargs["device"] = device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    preset = "quick" if args.quick else "gpu-check" if args.gpu_check else "full"
    if preset == "full" and device.type != "cuda":
        print("bench_attention: no GPU; the full shapes are GPU-sized, running CPU-sized ones", file=sys.stderr)
        preset = "cpu"
    quad = args.quadratic_gib if args.quadratic_gib is not None else (2.5 if preset == "gpu-check" else 8.0)
    providers = harness.select_providers(providers_for(quad), args.providers)
    print("FLOPs are counted on real (unpadded) tokens only; backward = 2.5x, fwd+bwd = 3.5x forward.",
          file=sys.stderr)
    harness.run("attention", cases_for(preset, dtype), providers, baseline="sdpa", **kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
