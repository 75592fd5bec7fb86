"""The C++ CPU attention kernels, called directly as torch.ops.fastlm_C.attention_forward/backward.

Every expectation comes from the float64 reference written below (not from fastlm code).
Cases the op layer's tests do not reach: odd head dims and lengths through the tiling
(query blocks of 64, key blocks of 256), strided HF-style views, left/right/holed
padding, rows that see no key, both causal alignments with seq_q != seq_k, packed
batches with length-1 and empty sequences, grouped-query heads, dropout (keep rate,
determinism, and the backward using exactly the forward's mask), low precision
against plain PyTorch eager in the same dtype.
"""
import math

import pytest
import torch

NEG_INF = float("-inf")


@pytest.fixture
def ops(cpu_ext):
    if not hasattr(cpu_ext, "attention_forward"):
        pytest.skip("fastlm._C has no attention kernels (built without csrc/cpu/attention.cpp)")
    return cpu_ext


# ----------------------------------------------------------------------------- reference
def visible_keys(B, Sq, Sk, mask, causal):
    """(B, 1, Sq, Sk) bool: which key each query sees."""
    vis = torch.ones(B, 1, Sq, Sk, dtype=torch.bool)
    if mask is not None:
        vis &= mask[:, None, None, :]
    i = torch.arange(Sq)[:, None]
    j = torch.arange(Sk)[None, :]
    if causal == 1:
        vis &= j <= i
    elif causal == 2:
        vis &= j <= i + (Sk - Sq)
    return vis


def attention_math(q, k, v, mask=None, causal=0, scale=None, keep=None):
    """Attention in q's dtype with safe all-masked rows; returns (out, lse).

    keep: optional (B, H, Sq, Sk) dropout multiplier (0 or 1/(1-p)) on the probabilities.
    """
    B, H, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    k = k.repeat_interleave(H // Hk, dim=1)
    v = v.repeat_interleave(H // Hk, dim=1)
    vis = visible_keys(B, Sq, Sk, mask, causal)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~vis, 0.0)
    m = s.masked_fill(~vis, NEG_INF).amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.where(vis, torch.exp(s - m), torch.zeros_like(s))
    total = e.sum(-1, keepdim=True)
    empty = total == 0
    total = torch.where(empty, torch.ones_like(total), total)
    p = e / total
    lse = torch.where(empty, torch.full_like(total, NEG_INF), torch.log(total) + m).squeeze(-1)
    if keep is not None:
        p = p * keep.to(p.dtype)
    return p @ v, lse


def reference(q, k, v, dout, **kw):
    """float64 output, lse and gradients."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = attention_math(q64, k64, v64, **kw)
    out.backward(dout.double())
    return out.detach(), lse.detach(), q64.grad, k64.grad, v64.grad


def call(ops, q, k, v, mask=None, causal=0, p=0.0, scale=None, seed=0, cu=None, max_len=(0, 0)):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cu_q, cu_k = cu if cu is not None else (None, None)
    if cu is None:
        max_len = (q.shape[2], k.shape[2])
    return ops.attention_forward(q, k, v, mask, cu_q, cu_k, max_len[0], max_len[1], causal, 0, p, scale, seed)


def call_backward(ops, dout, q, k, v, out, lse, mask=None, causal=0, p=0.0, scale=None, seed=0, cu=None, max_len=(0, 0)):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cu_q, cu_k = cu if cu is not None else (None, None)
    if cu is None:
        max_len = (q.shape[2], k.shape[2])
    return ops.attention_backward(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_len[0], max_len[1], causal, 0, p, scale, seed)


def hf_layout(B, H, S, D, dtype=torch.float32):
    """(B, H, S, D) views of (B, S, H, D) storage, as Hugging Face passes them."""
    return torch.randn(B, S, H, D, dtype=dtype).transpose(1, 2)


def padding_mask(lengths, S, left=False):
    j = torch.arange(S)[None, :]
    L = torch.tensor(lengths)[:, None]
    return j >= S - L if left else j < L


def close(actual, expected, tol):
    assert not torch.isnan(actual).any()
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- fp32 exactness
@pytest.mark.parametrize(
    "Sq,Sk,D,causal,pad",
    [
        (1, 1, 16, 0, None),
        (7, 7, 40, 1, "right"),
        (97, 130, 64, 0, "left"),
        (130, 97, 80, 2, "right"),
        (97, 300, 16, 1, "left"),  # several key blocks, causal top-left with Sk > Sq
        (130, 300, 40, 2, "holes"),  # bottom-right, a mask with holes inside key blocks
        (65, 33, 1, 0, None),  # head_dim 1
        (33, 20, 256, 1, "right"),  # head_dim 256
    ],
)
def test_forward_backward_fp32(ops, Sq, Sk, D, causal, pad):
    B, H = 2, 3
    q, k, v = hf_layout(B, H, Sq, D), hf_layout(B, H, Sk, D), hf_layout(B, H, Sk, D)
    mask = None
    if pad == "holes":
        mask = torch.rand(B, Sk) > 0.4
        mask[:, 256:] = False  # a fully hidden tail block
    elif pad is not None:
        mask = padding_mask([Sk, max(1, Sk // 3)], Sk, left=pad == "left")
    dout = torch.randn(B, H, Sq, D)
    out, lse = call(ops, q, k, v, mask, causal)
    assert out.shape == q.shape and out.stride() == q.stride()  # empty_like(q): HF strides kept
    assert lse.shape == (B, H, Sq) and lse.dtype == torch.float32
    ro, rl, rdq, rdk, rdv = reference(q, k, v, dout, mask=mask, causal=causal)
    close(out, ro, 2e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))
    close(torch.where(torch.isinf(lse), 0.0, lse), torch.where(torch.isinf(rl), 0.0, rl), 2e-5)
    dq, dk, dv = call_backward(ops, dout, q, k, v, out, lse, mask, causal)
    assert dq.stride() == q.stride() and dk.stride() == k.stride()
    for got, want in ((dq, rdq), (dk, rdk), (dv, rdv)):
        close(got, want, 5e-5)


def test_rows_that_see_no_key(ops):
    """Fully padded sequences and bottom-right rows before the first key: 0, -inf, zero grads."""
    B, H, Sq, Sk, D = 3, 2, 9, 5, 32
    q, k, v = hf_layout(B, H, Sq, D), hf_layout(B, H, Sk, D), hf_layout(B, H, Sk, D)
    mask = torch.ones(B, Sk, dtype=torch.bool)
    mask[1] = False  # every key of sequence 1 hidden
    mask[2, :3] = False  # left padding: with bottom-right causal, rows 0..6 of sequence 2 see nothing
    dout = torch.randn(B, H, Sq, D)
    out, lse = call(ops, q, k, v, mask, causal=2)
    dq, dk, dv = call_backward(ops, dout, q, k, v, out, lse, mask, causal=2)
    ro, rl, rdq, rdk, rdv = reference(q, k, v, dout, mask=mask, causal=2)
    assert (out[1] == 0).all() and torch.isinf(lse[1]).all() and (lse[1] < 0).all()
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert torch.equal(torch.isinf(lse), torch.isinf(rl)) and torch.isinf(rl[2, :, :7]).all()
    close(out, ro, 2e-5)
    for got, want in ((dq, rdq), (dk, rdk), (dv, rdv)):
        close(got, want, 5e-5)


@pytest.mark.parametrize("Hq,Hk,causal", [(6, 2, 0), (4, 1, 1), (4, 4, 2)])
def test_grouped_query(ops, Hq, Hk, causal):
    B, Sq, Sk, D = 2, 70, 45, 24
    q, k, v = hf_layout(B, Hq, Sq, D), hf_layout(B, Hk, Sk, D), hf_layout(B, Hk, Sk, D)
    mask = padding_mask([45, 20], Sk)
    dout = torch.randn(B, Hq, Sq, D)
    out, lse = call(ops, q, k, v, mask, causal, scale=0.3)
    dq, dk, dv = call_backward(ops, dout, q, k, v, out, lse, mask, causal, scale=0.3)
    ro, _, rdq, rdk, rdv = reference(q, k, v, dout, mask=mask, causal=causal, scale=0.3)
    assert dk.shape == k.shape and dv.shape == v.shape
    close(out, ro, 2e-5)
    for got, want in ((dq, rdq), (dk, rdk), (dv, rdv)):
        close(got, want, 5e-5)


@pytest.mark.parametrize("causal", [0, 1, 2])
def test_packed(ops, causal):
    """Packed (tokens, heads, head_dim) with lengths 1, 0, 97 and 70/30 (q/k differ)."""
    Hq, Hk, D = 4, 2, 40
    lq, lk = [1, 0, 97, 70], [1, 3, 97, 30]
    cu_q = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32)
    q, k, v = torch.randn(sum(lq), Hq, D), torch.randn(sum(lk), Hk, D), torch.randn(sum(lk), Hk, D)
    dout = torch.randn_like(q)
    kw = dict(causal=causal, cu=(cu_q, cu_k), max_len=(max(lq), max(lk)))
    out, lse = call(ops, q, k, v, **kw)
    assert lse.shape == (Hq, sum(lq))
    dq, dk, dv = call_backward(ops, dout, q, k, v, out, lse, **kw)
    for n in range(len(lq)):
        qs, ks = slice(cu_q[n], cu_q[n + 1]), slice(cu_k[n], cu_k[n + 1])
        seq = lambda t, s: t[s].transpose(0, 1)[None]  # (1, H, L, D)
        ro, rl, rdq, rdk, rdv = reference(seq(q, qs), seq(k, ks), seq(v, ks), seq(dout, qs), causal=causal)
        close(seq(out, qs), ro, 2e-5)
        assert torch.equal(torch.isinf(lse[:, qs]), torch.isinf(rl[0]))
        for got, want in ((dq, rdq), (dk, rdk), (dv, rdv)):
            close(seq(got, qs if got is dq else ks), want, 5e-5)


# ----------------------------------------------------------------------------- dropout
def dropout_multiplier(ops, B, H, Sq, Sk, p, seed, mask=None):
    """The kernel's dropout multiplier per (b, h, i, j), read back through the forward:
    with q = 0 every visible key has probability 1/L, and with v = identity the output
    row is the multiplier row scaled by 1/L."""
    q = torch.zeros(B, H, Sq, Sk)
    eye = torch.eye(Sk).expand(B, H, Sk, Sk).contiguous()
    out, _ = call(ops, q, eye, eye, mask, p=p, seed=seed)
    visible = mask.sum(-1).double()[:, None, None, None] if mask is not None else Sk
    return out.double() * visible


def test_dropout_statistics_and_determinism(ops):
    B, H, Sq, Sk, p = 2, 3, 64, 48, 0.3
    mult = dropout_multiplier(ops, B, H, Sq, Sk, p, seed=1234)
    kept = mult > 0
    torch.testing.assert_close(mult[kept], torch.full_like(mult[kept], 1 / (1 - p)), rtol=1e-5, atol=1e-5)
    assert ((mult == 0) | kept).all()
    rate = kept.double().mean().item()
    n = kept.numel()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    # no structure: masks of different heads / rows are not copies of each other
    assert not torch.equal(kept[:, 0], kept[:, 1]) and not torch.equal(kept[:, :, 0], kept[:, :, 1])
    assert torch.equal(mult, dropout_multiplier(ops, B, H, Sq, Sk, p, seed=1234))  # same seed, same mask
    assert not torch.equal(mult, dropout_multiplier(ops, B, H, Sq, Sk, p, seed=1235))


@pytest.mark.parametrize("causal", [0, 1])
def test_dropout_backward_uses_forward_mask(ops, causal):
    B, H, Sq, Sk, p, seed = 2, 2, 40, 48, 0.2, 99
    keep = dropout_multiplier(ops, B, H, Sq, Sk, p, seed)  # mask depends only on (seed, b, h, i, j)
    q, k, v = hf_layout(B, H, Sq, Sk), hf_layout(B, H, Sk, Sk), hf_layout(B, H, Sk, Sk)
    mask = padding_mask([48, 30], Sk)
    dout = torch.randn(B, H, Sq, Sk)
    out, lse = call(ops, q, k, v, mask, causal, p=p, seed=seed)
    dq, dk, dv = call_backward(ops, dout, q, k, v, out, lse, mask, causal, p=p, seed=seed)
    ro, rl, rdq, rdk, rdv = reference(q, k, v, dout, mask=mask, causal=causal, keep=keep)
    close(out, ro, 2e-5)
    close(lse, rl, 2e-5)  # lse is of the undropped probabilities
    for got, want in ((dq, rdq), (dk, rdk), (dv, rdv)):
        close(got, want, 5e-5)


# ----------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [0, 2])
def test_low_precision_vs_eager(ops, dtype, causal):
    """Error vs float64 at most 2x (out) / 3x (grads) that of plain eager attention in dtype."""
    B, H, Sq, Sk, D = 2, 4, 97, 130, 64
    q, k, v = hf_layout(B, H, Sq, D, dtype), hf_layout(B, H, Sk, D, dtype), hf_layout(B, H, Sk, D, dtype)
    mask = padding_mask([130, 77], Sk, left=True)
    dout = torch.randn(B, H, Sq, D, dtype=dtype)
    out, lse = call(ops, q, k, v, mask, causal)
    dq, dk, dv = call_backward(ops, dout, q, k, v, out, lse, mask, causal)
    assert out.dtype == dq.dtype == dtype
    ro, _, rdq, rdk, rdv = reference(q, k, v, dout, mask=mask, causal=causal)
    qe, ke, ve = (t.detach().clone().requires_grad_() for t in (q, k, v))
    eo, _ = attention_math(qe, ke, ve, mask=mask, causal=causal)
    eo.backward(dout)
    err = lambda a, b: (a.double() - b).abs().max().item()
    assert err(out, ro) <= 2 * err(eo, ro) + 1e-6
    for got, eager, want in ((dq, qe.grad, rdq), (dk, ke.grad, rdk), (dv, ve.grad, rdv)):
        assert err(got, want) <= 3 * err(eager, want) + 1e-6


# ----------------------------------------------------------------------------- refusals
def test_bad_inputs_raise(ops):
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="dtype"):
        call(ops, q.double(), q.double(), q.double())
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        call(ops, torch.randn(1, 3, 5, 8), q, q)
    with pytest.raises(RuntimeError, match="key_padding_mask"):
        call(ops, q, q, q, mask=torch.ones(1, 4, dtype=torch.bool))
    cu = torch.tensor([0, 3, 4], dtype=torch.int32)  # ends at 4, but there are 5 tokens
    t = torch.randn(5, 2, 8)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        call(ops, t, t, t, cu=(cu, cu), max_len=(3, 3))


# ----------------------------------------------------------------------------- the CUDA kernels
# Run by bench/gpu_check.sh on a GPU; the op-layer tests (test_attention.py,
# test_varlen_attention.py) cover the cuda backend's features through fastlm.ops.
def cuda_kernels(ops):
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastlm_C::attention_forward", "CUDA"):
        pytest.skip("fastlm._C was built without its CUDA attention kernels")
    return ops


@pytest.mark.gpu
@pytest.mark.backend("cuda")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_dropout_mask_matches_cpu(ops, dtype):
    """Both kernels hash (seed, sequence, head, query, key) the same way: identical masks."""
    cuda_kernels(ops)
    B, H, Sq, Sk, p = 2, 2, 80, 64, 0.25
    cpu = dropout_multiplier(ops, B, H, Sq, Sk, p, seed=7)
    q = torch.zeros(B, H, Sq, Sk, dtype=dtype, device="cuda")
    eye = torch.eye(Sk, dtype=dtype, device="cuda").expand(B, H, Sk, Sk).contiguous()
    out, _ = call(ops, q, eye, eye, p=p, seed=7)
    assert torch.equal(out.cpu() > 0, cpu > 0)


@pytest.mark.gpu
@pytest.mark.backend("cuda")
@pytest.mark.parametrize("D,causal", [(64, 2), (128, 1)])
def test_cuda_forward_backward(ops, D, causal):
    """HF-strided bf16 views, left padding, grouped-query heads, dropout: vs float64 with the CPU kernel's mask."""
    cuda_kernels(ops)
    B, Hq, Hk, Sq, Sk, p, seed = 2, 4, 2, 97, 130, 0.1, 5
    q, k, v = hf_layout(B, Hq, Sq, D), hf_layout(B, Hk, Sk, D), hf_layout(B, Hk, Sk, D)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    mask = padding_mask([130, 60], Sk, left=True)
    dout = torch.randn(B, Hq, Sq, D, dtype=torch.bfloat16)
    # the CPU kernel's mask for these coordinates (same hash), read back with D = Sk
    eye = torch.eye(Sk).expand(B, Hk, Sk, Sk).contiguous()
    probe, _ = call(ops, torch.zeros(B, Hq, Sq, Sk), eye, eye, mask, p=p, seed=seed)
    cpu_keep = probe.double() * mask.sum(-1).double()[:, None, None, None]
    dev = lambda t: t.cuda() if t is not None else None
    out, lse = call(ops, dev(q), dev(k), dev(v), dev(mask), causal, p=p, seed=seed)
    dq, dk, dv = call_backward(ops, dev(dout), dev(q), dev(k), dev(v), out, lse, dev(mask), causal, p=p, seed=seed)
    ro, rl, rdq, rdk, rdv = reference(q, k, v, dout, mask=mask, causal=causal, keep=cpu_keep)
    qe, ke, ve = (t.detach().clone().requires_grad_() for t in (q, k, v))
    eo, _ = attention_math(qe, ke, ve, mask=mask, causal=causal, keep=cpu_keep)
    eo.backward(dout)
    err = lambda a, b: (a.cpu().double() - b).abs().max().item()
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(rl))
    assert err(out, ro) <= 2 * err(eo, ro) + 1e-6
    for got, eager, want in ((dq, qe.grad, rdq), (dk, ke.grad, rdk), (dv, ve.grad, rdv)):
        assert err(got, want) <= 3 * err(eager, want) + 1e-6
