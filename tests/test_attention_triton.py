"""Kernel-level tests of the Triton flash attention (``fastlm.kernels.attention``).

Run under ``TRITON_INTERPRET=1`` on CPU tensors (tests/conftest.py sets it), so shapes
are tiny; the same tests run on a GPU when the interpreter is off.  Every expectation
comes from an explicit float64 softmax(Q K^T) V written here, and gradients from
float64 autograd through it.  The op-level behaviour shared by every backend is tested
in tests/test_attention.py.
"""
import math

import pytest
import torch

pytest.importorskip("triton")

from fastlm.kernels.attention import attention_backward, attention_forward  # noqa: E402


def _device():
    from fastlm.registry import triton_interpreted

    return "cpu" if triton_interpreted() else "cuda"


pytestmark = pytest.mark.skipif(_device() == "cuda" and not torch.cuda.is_available(),
                                reason="TRITON_INTERPRET=0 and no CUDA device")


@pytest.fixture(autouse=True)
def _poisoned(poison):
    """Every test here runs with NaN-poisoned allocations (conftest's ``poison``)."""


# --------------------------------------------------------------------- float64 truth
def ref_attention(q, k, v, key_padding_mask=None, causal=0, scale=None, keep=None, dropout_p=0.0):
    """(B, H, S, D) attention in q's dtype: returns (out, lse).  Rows with no visible key
    give out 0, lse -inf.  ``keep``: (B, Hq, Sq, Sk) bool dropout mask."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    sq, sk = s.shape[-2:]
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if causal == 1:
        visible = j <= i
    elif causal == 2:
        visible = j <= i + sk - sq
    visible = visible.to(s.device).expand(s.shape)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    p = e / torch.where(den == 0, torch.ones_like(den), den)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    return p @ v, (torch.log(den) + m).squeeze(-1)


def hf_layout(b, s, h, d, dtype=torch.float32):
    """(B, H, S, D) transposed view of a (B, S, H, D) tensor, as Hugging Face passes it."""
    return torch.randn(b, s, h, d, dtype=dtype, device=_device()).transpose(1, 2)


def padding_mask(kind, b, sk):
    if kind is None:
        return None
    lengths = torch.randint(1, sk + 1, (b,))
    lengths[0] = max(1, sk // 2)
    pos = torch.arange(sk)[None, :]
    if kind == "right":
        mask = pos < lengths[:, None]
    elif kind == "left":
        mask = pos >= sk - lengths[:, None]
    elif kind == "random":
        mask = torch.rand(b, sk) > 0.4
    elif kind == "empty_row":  # batch 1 has no key at all: all its query rows are empty
        mask = torch.rand(b, sk) > 0.4
        mask[1] = False
    return mask.to(_device())


def run_kernels(q, k, v, mask=None, causal=0, dropout_p=0.0, seed=0, scale=None, packed=None, dout=None):
    """Forward + backward through the kernels; ``packed`` = (cu_q, cu_k, max_q, max_k)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cu_q, cu_k, max_q, max_k = packed or (None, None, 0, 0)
    out, lse = attention_forward(q, k, v, mask, cu_q, cu_k, max_q, max_k, causal, 0, dropout_p, scale, seed)
    dout = torch.randn_like(out) if dout is None else dout
    grads = attention_backward(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, causal, 0, dropout_p,
                               scale, seed)
    return out, lse, dout, grads


def float64_grads(q, k, v, dout, **kw):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = ref_attention(*leaves, **kw)
    out.backward(dout.double())
    return out.detach(), lse.detach(), [t.grad for t in leaves]


def assert_matches(got, want, atol, rtol=1e-5):
    torch.testing.assert_close(got.double().cpu(), want.cpu(), atol=atol, rtol=rtol)


# ------------------------------------------------------------------- padded, fp32
PADDED = [
    # batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, key padding
    (2, 2, 2, 7, 7, 16, 0, None),
    (1, 2, 2, 1, 1, 80, 0, None),  # seq 1
    (2, 2, 2, 97, 97, 40, 0, "right"),
    (2, 4, 2, 61, 61, 64, 1, "left"),  # causal with left padding, grouped-query
    (1, 2, 2, 7, 97, 128, 1, None),  # top-left causal, seq_q < seq_k (SDPA is_causal)
    (1, 2, 2, 97, 7, 64, 1, None),  # top-left causal, seq_q > seq_k
    (2, 2, 2, 97, 7, 16, 2, "random"),  # bottom-right, seq_q > seq_k: early rows see nothing
    (1, 2, 2, 7, 97, 80, 2, None),  # bottom-right, seq_q < seq_k (KV cache)
    (2, 4, 1, 33, 45, 64, 0, "empty_row"),  # multi-query; batch 1 fully masked
    (1, 1, 1, 130, 130, 16, 1, "right"),
    pytest.param(2, 4, 2, 130, 257, 96, 2, "left", marks=pytest.mark.slow),  # head dim 96, several blocks
]


@pytest.mark.parametrize("b,hq,hk,sq,sk,d,causal,mask_kind", PADDED)
def test_padded_matches_float64(b, hq, hk, sq, sk, d, causal, mask_kind):
    q, k, v = hf_layout(b, sq, hq, d), hf_layout(b, sk, hk, d), hf_layout(b, sk, hk, d)
    mask = padding_mask(mask_kind, b, sk)
    scale = 0.7 / math.sqrt(d)
    out, lse, dout, (dq, dk, dv) = run_kernels(q, k, v, mask, causal, scale=scale)
    ref_out, ref_lse, (rq, rk, rv) = float64_grads(q, k, v, dout, key_padding_mask=mask, causal=causal, scale=scale)

    assert out.stride() == q.stride() and dq.stride() == q.stride() and dk.stride() == k.stride()
    assert lse.shape == (b, hq, sq) and lse.dtype == torch.float32
    assert_matches(out, ref_out, atol=1e-5)
    assert_matches(lse, ref_lse, atol=2e-5)
    for got, want in ((dq, rq), (dk, rk), (dv, rv)):
        assert_matches(got, want, atol=2e-5)
    empty = torch.isinf(ref_lse).cpu()  # rows with no visible key: exact zeros, -inf lse
    if mask_kind == "empty_row" or (causal == 2 and sq > sk):
        assert empty.any()
        assert (out.cpu()[empty] == 0).all() and (lse.cpu()[empty] == float("-inf")).all()
        assert (dq.cpu()[empty] == 0).all()


# ------------------------------------------------------------------- packed, fp32
def packed_inputs(lens_q, lens_k, hq, hk, d, dtype=torch.float32):
    dev = _device()
    cu = [torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(dev) for lens in (lens_q, lens_k)]
    q = torch.randn(sum(lens_q), hq, d, dtype=dtype, device=dev)
    k = torch.randn(sum(lens_k), hk, d, dtype=dtype, device=dev)
    v = torch.randn(sum(lens_k), hk, d, dtype=dtype, device=dev)
    return q, k, v, cu


def packed_reference(q, k, v, cu_q, cu_k, dout, causal, keep=None, dropout_p=0.0):
    """Per-sequence float64 attention; returns out, lse (Hq, Tq) and grads."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    outs, lses = [], []
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for n in range(len(bq) - 1):
        qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t, a, b in
                      ((leaves[0], bq[n], bq[n + 1]), (leaves[1], bk[n], bk[n + 1]), (leaves[2], bk[n], bk[n + 1])))
        kn = None if keep is None else keep[n]
        o, lse = ref_attention(qs, ks, vs, causal=causal, keep=kn, dropout_p=dropout_p)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs)
    out.backward(dout.double())
    return out.detach(), torch.cat(lses, dim=1).detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("causal", [0, 1, 2])
def test_packed_matches_float64(causal):
    # a length-1 sequence, an empty one, one longer than a block; k lengths differ from q's
    lens_q, lens_k = [5, 1, 0, 37, 6], [9, 1, 3, 30, 2]
    q, k, v, (cu_q, cu_k) = packed_inputs(lens_q, lens_k, 4, 2, 40)
    packed = (cu_q, cu_k, max(lens_q) + 3, max(lens_k))  # max_seqlen may overestimate
    out, lse, dout, (dq, dk, dv) = run_kernels(q, k, v, causal=causal, packed=packed)
    ref_out, ref_lse, (rq, rk, rv) = packed_reference(q, k, v, cu_q, cu_k, dout, causal)
    assert lse.shape == (4, sum(lens_q))
    assert_matches(out, ref_out, atol=1e-5)
    assert_matches(lse, ref_lse, atol=2e-5)
    for got, want in ((dq, rq), (dk, rk), (dv, rv)):
        assert_matches(got, want, atol=2e-5)


# ------------------------------------------------------------- fp16 / bf16 accuracy
def eager_lowp(q, k, v, dout, mask, causal):
    """Plain PyTorch attention in the low-precision dtype: the error budget's yardstick."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    qq, kk, vv = leaves
    group = qq.shape[1] // kk.shape[1]
    kk, vv = kk.repeat_interleave(group, 1), vv.repeat_interleave(group, 1)
    s = (qq @ kk.transpose(-1, -2)) * qq.shape[-1] ** -0.5
    sq, sk = s.shape[-2:]
    visible = torch.ones(sq, sk, dtype=torch.bool, device=s.device)
    if causal:
        visible = torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril()
    if mask is not None:
        visible = visible & mask[:, None, None, :]
    out = torch.softmax(s.masked_fill(~visible, float("-inf")), -1) @ vv
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


def max_err(got, want):
    return (got.double().cpu() - want.cpu()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,h,hk,s,d,causal,mask_kind", [
    (2, 2, 2, 97, 64, 0, "left"),
    (1, 2, 1, 97, 128, 1, None),
])
def test_low_precision_error_budget(dtype, b, h, hk, s, d, causal, mask_kind):
    q, k, v = hf_layout(b, s, h, d, dtype), hf_layout(b, s, hk, d, dtype), hf_layout(b, s, hk, d, dtype)
    mask = padding_mask(mask_kind, b, s)
    out, _, dout, grads = run_kernels(q, k, v, mask, causal)
    ref_out, _, ref_grads = float64_grads(q, k, v, dout, key_padding_mask=mask, causal=causal)
    eager_out, eager_grads = eager_lowp(q, k, v, dout, mask, causal)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert max_err(out, ref_out) <= 2 * max_err(eager_out, ref_out)
    for got, eager, want in zip(grads, eager_grads, ref_grads):
        assert max_err(got, want) <= 3 * max_err(eager, want)


# ------------------------------------------------------------------------- dropout
def uniform_identity_forward(b, h, sq, sk, dropout_p, seed, mask=None):
    """Forward with q = 0 (uniform probabilities) and v = identity: out[.., i, j] is the
    dropped, rescaled probability of (i, j), so the kernel's dropout mask is readable."""
    dev = _device()
    q = torch.zeros(b, h, sq, sk, device=dev)
    k = torch.randn(b, h, sk, sk, device=dev)
    v = torch.eye(sk, device=dev).expand(b, h, sk, sk)
    out, _ = attention_forward(q, k, v, mask, None, None, 0, 0, 0, 0, dropout_p, 1.0, seed)
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
        q, k, v = hf_layout(b, sq, hq, d), hf_layout(b, sk, hk, d), hf_layout(b, sk, hk, d)
        mask = padding_mask("left", b, sk)
        out, lse, dout, (dq, dk, dv) = run_kernels(q, k, v, mask, causal=1, dropout_p=p, seed=seed)
        # same q, k and mask, v = identity: out = dropped probabilities (nonzero where kept)
        eye = torch.eye(sk, device=dev).expand(b, hk, sk, sk)
        probe, _ = attention_forward(q, k, eye, mask, None, None, 0, 0, 1, 0, p, d ** -0.5, seed)
        keep = (probe != 0).double()
        ref_out, _, (rq, rk, rv) = float64_grads(q, k, v, dout, key_padding_mask=mask, causal=1, keep=keep,
                                                 dropout_p=p)
    else:
        lens_q, lens_k = [7, 1, 19], [12, 1, d]
        q, k, v, (cu_q, cu_k) = packed_inputs(lens_q, lens_k, 2, 2, d)
        packed = (cu_q, cu_k, max(lens_q), max(lens_k))
        out, lse, dout, (dq, dk, dv) = run_kernels(q, k, v, causal=2, dropout_p=p, seed=seed, packed=packed)
        # v[t] = e_(t's position in its sequence): out[i, :Lk] = dropped probabilities
        pos = torch.cat([torch.arange(n) for n in lens_k])
        eye = torch.eye(d)[pos][:, None, :].expand(-1, 2, d).contiguous().to(dev)
        probe, _ = attention_forward(q, k, eye, None, cu_q, cu_k, packed[2], packed[3], 2, 0, p, d ** -0.5, seed)
        keep, bq = [], cu_q.tolist()
        for n, lk in enumerate(lens_k):
            keep.append((probe[bq[n]:bq[n + 1], :, :lk] != 0).double().transpose(0, 1)[None])
        ref_out, _, (rq, rk, rv) = packed_reference(q, k, v, cu_q, cu_k, dout, 2, keep=keep, dropout_p=p)
    assert_matches(out, ref_out, atol=2e-5)
    for got, want in ((dq, rq), (dk, rk), (dv, rv)):
        assert_matches(got, want, atol=5e-5)
