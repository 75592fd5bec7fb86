"""Kernel-level tests of the Triton flash attention (``fastlm.kernels.attention``).

Run under ``TRITON_INTERPRET=1`` on CPU tensors (tests/conftest.py sets it), so shapes
are tiny; the same tests run on a GPU when the interpreter is off.  Every expectation
comes from the float64 truth (_attention_truth.py) and float64 autograd through it.  The
op-level behaviour shared by every backend is tested in tests/test_attention.py.
"""
import math

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
from _attention_truth import CAUSAL_CODE, eager, identity_values, make_qkv, pack, padding_mask, truth  # noqa: E402
from fastlm.kernels import _common as tuning  # noqa: E402
from fastlm.kernels import attention as kernels  # noqa: E402
from fastlm.kernels.attention import attention_backward, attention_forward  # noqa: E402


def _device():
    from fastlm.registry import triton_interpreted

    return "cpu" if triton_interpreted() else "cuda"


pytestmark = pytest.mark.skipif(_device() == "cuda" and not torch.cuda.is_available(),
                                reason="TRITON_INTERPRET=0 and no CUDA device")


@pytest.fixture(autouse=True)
def _poisoned(poison):
    """Every test here runs with NaN-poisoned allocations (conftest's ``poison``)."""


def hf_qkv(b, hq, hk, sq, sk, d, dtype=torch.float32):
    return make_qkv(b, hq, hk, sq, sk, d, dtype=dtype, hf=True, requires_grad=False, device=_device())


def run_kernels(q, k, v, mask=None, causal=False, dropout_p=0.0, seed=0, scale=None, packed=None, dout=None):
    """Forward + backward through the kernels; ``packed`` = (cu_q, cu_k, max_q, max_k)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cu_q, cu_k, max_q, max_k = packed or (None, None, 0, 0)
    code = CAUSAL_CODE[causal]
    out, lse = attention_forward(q, k, v, mask, cu_q, cu_k, max_q, max_k, code, 0, dropout_p, scale, seed)
    dout = torch.randn_like(out) if dout is None else dout
    grads = attention_backward(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, code, 0, dropout_p,
                               scale, seed)
    return out, lse, dout, grads


def assert_matches(got, want, atol, rtol=1e-5):
    torch.testing.assert_close(got.double().cpu(), want.cpu(), atol=atol, rtol=rtol)


# ------------------------------------------------------------------- padded, fp32
PADDED = [
    # batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, key padding
    (2, 2, 2, 7, 7, 16, False, None),
    (1, 2, 2, 1, 1, 80, False, None),  # seq 1
    (2, 2, 2, 97, 97, 40, False, "right"),
    (2, 4, 2, 61, 61, 64, True, "left"),  # causal with left padding, grouped-query
    (1, 2, 2, 7, 97, 128, True, None),  # top-left causal, seq_q < seq_k (SDPA is_causal)
    (1, 2, 2, 97, 7, 64, True, None),  # top-left causal, seq_q > seq_k
    (2, 2, 2, 97, 7, 16, "bottom_right", "holes"),  # bottom-right, seq_q > seq_k: early rows see nothing
    (1, 2, 2, 7, 97, 80, "bottom_right", None),  # bottom-right, seq_q < seq_k (KV cache)
    (2, 4, 1, 33, 45, 64, False, "empty_row"),  # multi-query; batch 1 fully masked
    (1, 1, 1, 130, 130, 16, True, "right"),
    pytest.param(2, 4, 2, 130, 257, 96, "bottom_right", "left", marks=pytest.mark.slow),  # head dim 96, several blocks
]


@pytest.mark.parametrize("b,hq,hk,sq,sk,d,causal,mask_kind", PADDED)
def test_padded_matches_float64(b, hq, hk, sq, sk, d, causal, mask_kind):
    q, k, v = hf_qkv(b, hq, hk, sq, sk, d)
    lengths = [max(1, sk // 2), *torch.randint(1, sk + 1, (b - 1,)).tolist()]  # left / right padding
    mask = padding_mask(b, sk, mask_kind, lengths=lengths, device=_device())
    scale = 0.7 / math.sqrt(d)
    out, lse, dout, (dq, dk, dv) = run_kernels(q, k, v, mask, causal, scale=scale)
    ref_out, ref_lse, (rq, rk, rv) = truth(q, k, v, dout, key_padding_mask=mask, causal=causal, scale=scale)

    assert out.stride() == q.stride() and dq.stride() == q.stride() and dk.stride() == k.stride()
    assert lse.shape == (b, hq, sq) and lse.dtype == torch.float32
    assert_matches(out, ref_out, atol=1e-5)
    assert_matches(lse, ref_lse, atol=2e-5)
    for got, want in ((dq, rq), (dk, rk), (dv, rv)):
        assert_matches(got, want, atol=2e-5)
    empty = torch.isinf(ref_lse).cpu()  # rows with no visible key: exact zeros, -inf lse
    if mask_kind == "empty_row" or (causal == "bottom_right" and sq > sk):
        assert empty.any()
        assert (out.cpu()[empty] == 0).all() and (lse.cpu()[empty] == float("-inf")).all()
        assert (dq.cpu()[empty] == 0).all()


# ------------------------------------------------------------------- packed, fp32
@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_packed_matches_float64(causal):
    # a length-1 sequence, an empty one, one longer than a block; k lengths differ from q's
    lens_q, lens_k = [5, 1, 0, 37, 6], [9, 1, 3, 30, 2]
    q, k, v, cu_q, cu_k, max_q, max_k = pack(lens_q, lens_k, 4, 2, 40, requires_grad=False, device=_device())
    packed = (cu_q, cu_k, max_q + 3, max_k)  # max_seqlen may overestimate
    out, lse, dout, (dq, dk, dv) = run_kernels(q, k, v, causal=causal, packed=packed)
    ref_out, ref_lse, (rq, rk, rv) = truth(q, k, v, dout, cu_seqlens=(cu_q, cu_k), causal=causal)
    assert lse.shape == (4, sum(lens_q))
    assert_matches(out, ref_out, atol=1e-5)
    assert_matches(lse, ref_lse, atol=2e-5)
    for got, want in ((dq, rq), (dk, rk), (dv, rv)):
        assert_matches(got, want, atol=2e-5)


# ------------------------------------------------------------- fp16 / bf16 accuracy
def max_err(got, want):
    return (got.double().cpu() - want.cpu()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,h,hk,s,d,causal,mask_kind", [
    (2, 2, 2, 97, 64, False, "left"),
    (1, 2, 1, 97, 128, True, None),
])
def test_low_precision_error_budget(dtype, b, h, hk, s, d, causal, mask_kind):
    q, k, v = hf_qkv(b, h, hk, s, s, d, dtype)
    mask = padding_mask(b, s, mask_kind, device=_device())
    out, _, dout, grads = run_kernels(q, k, v, mask, causal)
    ref_out, _, ref_grads = truth(q, k, v, dout, key_padding_mask=mask, causal=causal)
    eager_out, eager_grads = eager(q, k, v, dout, key_padding_mask=mask, causal=causal)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert max_err(out, ref_out) <= 2 * max_err(eager_out, ref_out)
    for got, ref, want in zip(grads, eager_grads, ref_grads):
        assert max_err(got, want) <= 3 * max_err(ref, want)


# ------------------------------------------------------------------------- dropout
def uniform_identity_forward(b, h, sq, sk, dropout_p, seed, mask=None):
    """Forward with q = 0 (uniform probabilities) and v = identity: out[.., i, j] is the
    dropped, rescaled probability of (i, j), so the kernel's dropout mask is readable."""
    dev = _device()
    q = torch.zeros(b, h, sq, sk, device=dev)
    k = torch.randn(b, h, sk, sk, device=dev)
    out, _ = attention_forward(q, k, identity_values(b, h, sk, sk, dev), mask, None, None, 0, 0, 0, 0, dropout_p,
                               1.0, seed)
    return out


def test_dropout_keep_rate_and_scaling():
    p, sk = 0.3, 64
    out = uniform_identity_forward(2, 2, 64, sk, p, seed=1234).cpu()
    kept = out != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    # every kept probability is exactly 1/sk rescaled by 1/(1-p)
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (sk * (1 - p))))
    # rows and columns are not stuck: each row keeps a plausible share of its keys
    assert kept.float().mean(-1).min() > 0.4 and kept.float().mean(-2).min() > 0.4


def test_dropout_seed_determinism():
    a = uniform_identity_forward(1, 2, 16, 32, 0.5, seed=7)
    b = uniform_identity_forward(1, 2, 16, 32, 0.5, seed=7)
    c = uniform_identity_forward(1, 2, 16, 32, 0.5, seed=2**40 + 7)  # 64-bit seeds use both halves
    assert torch.equal(a != 0, b != 0)
    assert not torch.equal(a != 0, c != 0)


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_dropout_forward_backward_same_mask(mode):
    """The kernel's dq/dk/dv equal float64 autograd through attention that uses the mask
    read back from the kernel's own forward (same seed, v = identity)."""
    p, seed, d = 0.25, 99, 32
    dev = _device()
    if mode == "padded":
        b, hq, hk, sq, sk = 2, 2, 1, 20, d
        q, k, v = hf_qkv(b, hq, hk, sq, sk, d)
        mask = padding_mask(b, sk, "left", lengths=[sk // 2, 7], device=dev)
        out, lse, dout, (dq, dk, dv) = run_kernels(q, k, v, mask, causal=True, dropout_p=p, seed=seed)
        # same q, k and mask, v = identity: out = dropped probabilities (nonzero where kept)
        probe, _ = attention_forward(q, k, identity_values(b, hk, sk, d, dev), mask, None, None, 0, 0, 1, 0, p,
                                     d ** -0.5, seed)
        ref_out, _, (rq, rk, rv) = truth(q, k, v, dout, key_padding_mask=mask, causal=True, keep=probe != 0,
                                         dropout_p=p)
    else:
        lens_q, lens_k = [7, 1, 19], [12, 1, d]
        q, k, v, cu_q, cu_k, max_q, max_k = pack(lens_q, lens_k, 2, 2, d, requires_grad=False, device=dev)
        packed = (cu_q, cu_k, max_q, max_k)
        out, lse, dout, (dq, dk, dv) = run_kernels(q, k, v, causal="bottom_right", dropout_p=p, seed=seed,
                                                   packed=packed)
        # v[t] = e_(t's position in its sequence): out[i, :Lk] = dropped probabilities
        pos = torch.cat([torch.arange(n) for n in lens_k])
        eye = torch.eye(d)[pos][:, None, :].expand(-1, 2, d).contiguous().to(dev)
        probe, _ = attention_forward(q, k, eye, None, cu_q, cu_k, max_q, max_k, 2, 0, p, d ** -0.5, seed)
        keep, bq = [], cu_q.tolist()
        for n, lk in enumerate(lens_k):
            keep.append((probe[bq[n]:bq[n + 1], :, :lk] != 0).transpose(0, 1))
        ref_out, _, (rq, rk, rv) = truth(q, k, v, dout, cu_seqlens=(cu_q, cu_k), causal="bottom_right", keep=keep,
                                         dropout_p=p)
    assert_matches(out, ref_out, atol=2e-5)
    for got, want in ((dq, rq), (dk, rk), (dv, rv)):
        assert_matches(got, want, atol=5e-5)


# ------------------------------------------------------------------- autotune pruning
# Checked without a GPU: the device's shared memory limit is substituted.
H200, A100 = 232448, 166912  # bytes of shared memory per program (H100 = H200)


def _sized(*sizes, stages=3):
    return [triton.Config({"BLOCK_M": s}, num_warps=4, num_stages=stages) for s in sizes]


def test_choose_fitting_configs_then_one_stage_then_smallest(monkeypatch):
    monkeypatch.delenv("FASTLM_TRITON_AUTOTUNE", raising=False)
    configs = _sized(300, 100, 200)
    size = lambda c: c.kwargs["BLOCK_M"] * c.num_stages  # noqa: E731
    summary = lambda cs: [(c.kwargs["BLOCK_M"], c.num_stages) for c in cs]  # noqa: E731
    assert summary(tuning.choose(configs, size, 700)) == [(100, 3), (200, 3)]  # in the given order
    assert summary(tuning.choose(configs, size, 1000, lambda c: c.kwargs["BLOCK_M"] == 200)) == [(200, 3)]
    assert summary(tuning.choose(configs, size, 250)) == [(100, 1), (200, 1)]  # benchmarked, not one guess
    assert summary(tuning.choose(configs, size, 50)) == [(100, 1)]  # last resort: the least shared memory
    monkeypatch.setenv("FASTLM_TRITON_AUTOTUNE", "0")
    assert summary(tuning.choose(configs, size, 700)) == [(100, 3)]  # pinned: the first that fits
    assert summary(tuning.choose(configs, size, 250)) == [(100, 1)]


@pytest.mark.parametrize("limit", [H200, A100])
@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
def test_attention_configs_pruned_to_the_device(monkeypatch, kernel, limit):
    """Every kept config fits the device by the estimate (which tests/test_triton_compile.py
    checks against the compiler); 16-bit head dims up to 128 keep a real choice on an H200
    (without dropout, whose register budget is tighter);
    FASTLM_TRITON_AUTOTUNE=0 keeps exactly the first config that fits."""
    monkeypatch.delenv("FASTLM_TRITON_AUTOTUNE", raising=False)
    monkeypatch.setattr(tuning, "shared_memory_limit", lambda device: limit)
    prune = getattr(kernels, {"fwd": "_attn_fwd", "dq": "_attn_bwd_dq", "dkdv": "_attn_bwd_dkdv"}[kernel])
    prune = prune.early_config_prune
    gpu_configs = kernels.configs(kernel, interpreted=False)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for block_d in (16, 64, 128, 256):
            for dropout in (False, True):
                meta = dict(BLOCK_D=block_d, DROPOUT=dropout)
                named = {"Q": torch.empty(0, dtype=dtype)}
                size = lambda c: kernels.shared_bytes(kernel, c, meta, named["Q"].element_size())  # noqa: E731
                chosen = prune(gpu_configs, named, **meta)
                assert chosen and all(size(c) <= limit for c in chosen), (dtype, block_d, chosen)
                if dtype != torch.float32 and block_d <= 128 and limit == H200 and not dropout:
                    assert len(chosen) >= 2 and all(c in gpu_configs for c in chosen), (dtype, block_d)
                monkeypatch.setenv("FASTLM_TRITON_AUTOTUNE", "0")
                pinned = prune(gpu_configs, named, **meta)
                monkeypatch.delenv("FASTLM_TRITON_AUTOTUNE")
                assert len(pinned) == 1 and size(pinned[0]) <= limit
                fitting = [c for c in gpu_configs if size(c) <= limit]
                if fitting:
                    assert pinned[0] in fitting
