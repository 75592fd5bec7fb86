"""fastlm.ops.varlen_attention (packed sequences) against float64 attention per sequence,
and against the padded op on the same sequences."""
import importlib
import importlib.util
import math
import os

import pytest
import torch

from fastlm.ops.attention import attention, varlen_attention

BACKENDS = ["reference", "cpu", "triton"]


def backend_skip_reason(name: str) -> str | None:
    """Why ``name`` cannot be tested on CPU tensors in this process (None: it can)."""
    if name == "cpu":
        from fastlm import _ext

        why = _ext.unavailable_reason()
        if why:
            return why
        if not hasattr(_ext.kernels(), "attention_forward") or not torch._C._dispatch_has_kernel_for_dispatch_key(
                "fastlm_C::attention_forward", "CPU"):
            return "fastlm._C has no CPU attention kernel yet"
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            return "Triton on CPU tensors needs TRITON_INTERPRET=1"
        try:
            importlib.import_module("fastlm.kernels.attention")
        except ModuleNotFoundError as exc:
            if exc.name != "fastlm.kernels.attention":
                raise
            return "fastlm.kernels.attention does not exist yet"
    return None


@pytest.fixture(params=BACKENDS)
def backend(request):
    why = backend_skip_reason(request.param)
    if why:
        pytest.skip(f"{request.param}: {why}")
    return request.param


def expected_sequence(q, k, v, causal=False, scale=None, keep=None, dropout_p=0.0):
    """float64 attention of one sequence: q (Lq, Hq, D), k/v (Lk, Hk, D) -> (Lq, Hq, D).

    Queries with no visible key give 0; ``keep`` (Hq, Lq, Lk) is an explicit dropout mask.
    """
    q, k, v = q.double(), k.double(), v.double()
    lq, lk, groups = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    visible = {False: torch.ones(lq, lk, dtype=torch.bool), True: j <= i, "bottom_right": j <= i + lk - lq}[causal]
    visible = visible.expand(s.shape)
    any_visible = visible.any(-1, keepdim=True)
    s = torch.where(any_visible, s.masked_fill(~visible, float("-inf")), torch.zeros_like(s))
    p = torch.softmax(s, -1) * any_visible
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    return torch.einsum("hij,jhd->ihd", p, v)


def pack(lengths_q, lengths_k, hq, hk, d, dtype=torch.float32, requires_grad=True):
    """Random packed q, k, v and their int32 cu_seqlens / max lengths."""
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), hq, d, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(int(cu_k[-1]), hk, d, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(int(cu_k[-1]), hk, d, dtype=dtype, requires_grad=requires_grad)
    return q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k)


def expected_packed(q, k, v, cu_q, cu_k, causal=False, keep=None, dropout_p=0.0):
    outs = []
    for n in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[n]), int(cu_q[n + 1]), int(cu_k[n]), int(cu_k[n + 1])
        outs.append(expected_sequence(q[qs:qe], k[ks:ke], v[ks:ke], causal,
                                      keep=None if keep is None else keep[n], dropout_p=dropout_p))
    return torch.cat(outs)


def assert_close(actual, expected, tol, what):
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1.0)
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol * scale:.3g}"


# (lengths_q, lengths_k, heads_q, heads_kv, head_dim, causal)
CASES = [
    ([1, 7, 13, 3], [1, 7, 13, 3], 4, 2, 16, False),
    ([1, 7, 13, 3], [1, 7, 13, 3], 2, 2, 40, True),
    ([5, 1, 9], [8, 4, 2], 4, 1, 64, "bottom_right"),  # seq 3: 9 queries, 2 keys -> empty rows
    ([4, 6], [9, 3], 2, 1, 80, True),
    ([97, 1, 30], [97, 1, 30], 2, 2, 64, True),
]
TRITON_CASES = {0, 1, 2, 3}


@pytest.mark.parametrize("case", range(len(CASES)))
def test_packed_matches_float64(backend, case):
    if backend == "triton" and case not in TRITON_CASES:
        pytest.skip("shape too slow for the Triton interpreter")
    lengths_q, lengths_k, hq, hk, d, causal = CASES[case]
    q, k, v, cu_q, cu_k, mq, mk = pack(lengths_q, lengths_k, hq, hk, d)
    out = varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=causal, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = expected_packed(q, k, v, cu_q, cu_k, causal)
    assert_close(out, expected, 1e-4, "out")
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(expected, (q, k, v), dout)
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, 1e-4, f"d{name}")


def test_packed_equals_padded_per_sequence(backend):
    """Each packed sequence gives what the padded op gives on it alone, and on a right-padded batch."""
    lengths = [1, 7, 13, 3]
    hq, hk, d = 4, 2, 16
    q, k, v, cu_q, cu_k, mq, mk = pack(lengths, lengths, hq, hk, d, requires_grad=False)
    packed = varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=True, backend=backend)
    b, s = len(lengths), max(lengths)
    qp, kp, vp = (torch.zeros(b, s, t.shape[1], d) for t in (q, k, v))
    mask = torch.zeros(b, s, dtype=torch.bool)
    for n, length in enumerate(lengths):
        rows = slice(int(cu_q[n]), int(cu_q[n + 1]))
        single = attention(q[rows].transpose(0, 1)[None], k[rows].transpose(0, 1)[None],
                           v[rows].transpose(0, 1)[None], causal=True, backend=backend)
        assert_close(packed[rows], single[0].transpose(0, 1), 1e-5, f"sequence {n} alone")
        qp[n, :length], kp[n, :length], vp[n, :length], mask[n, :length] = q[rows], k[rows], v[rows], True
    padded = attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), key_padding_mask=mask,
                       causal=True, backend=backend).transpose(1, 2)
    assert_close(packed, padded[mask], 1e-5, "right-padded batch")


def test_empty_key_sequence_gives_zeros(backend):
    q, k, v, cu_q, cu_k, mq, mk = pack([3, 4], [5, 0], 2, 2, 16)
    out = varlen_attention(q, k, v, cu_q, cu_k, mq, mk, backend=backend)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert (out[3:] == 0).all() and (dq[3:] == 0).all()
    assert_close(out, expected_packed(q, k, v, cu_q, cu_k), 1e-5, "out")


def test_packed_dropout_forward_and_backward_use_one_mask(backend):
    """Keep-mask read off a v = identity run with the same seed, then checked in fwd and bwd."""
    lengths, hq, hk, d, p, seed = [1, 9, 16], 2, 1, 16, 0.3, 11
    q, k, v, cu_q, cu_k, mq, mk = pack(lengths, lengths, hq, hk, d)
    eye = torch.cat([torch.eye(n, d) for n in lengths])[:, None].expand(-1, hk, d)
    torch.manual_seed(seed)
    probe = varlen_attention(q.detach(), k.detach(), eye, cu_q, cu_k, mq, mk, dropout_p=p, backend=backend)
    keep = [(probe[int(cu_q[n]):int(cu_q[n + 1]), :, :length] > 0).permute(1, 0, 2)
            for n, length in enumerate(lengths)]
    rate = torch.cat([m.flatten() for m in keep]).double().mean().item()
    assert 0.5 < rate < 0.9, f"keep rate {rate}"
    torch.manual_seed(seed)
    out = varlen_attention(q, k, v, cu_q, cu_k, mq, mk, dropout_p=p, backend=backend)
    expected = expected_packed(q, k, v, cu_q, cu_k, keep=keep, dropout_p=p)
    assert_close(out, expected, 1e-4, "out")
    dout = torch.randn_like(out)
    for name, g, w in zip("qkv", torch.autograd.grad(out, (q, k, v), dout),
                          torch.autograd.grad(expected, (q, k, v), dout)):
        assert_close(g, w, 1e-4, f"d{name}")
    torch.manual_seed(seed)
    again = varlen_attention(q, k, v, cu_q, cu_k, mq, mk, dropout_p=p, backend=backend)
    assert torch.equal(out, again)


@pytest.mark.parametrize("causal,dropout_p", [(False, 0.0), ("bottom_right", 0.0), (True, 0.4)])
def test_reference_gradcheck(causal, dropout_p):
    q, k, v, cu_q, cu_k, mq, mk = pack([1, 4, 3], [2, 3, 5], 2, 1, 3, dtype=torch.float64)

    def fn(q, k, v):
        torch.manual_seed(9)
        return varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=causal, dropout_p=dropout_p,
                                backend="reference")

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_opcheck():
    q, k, v, cu_q, cu_k, mq, mk = pack([1, 6, 3], [4, 6, 2], 4, 2, 16)
    seed = torch.tensor([8], dtype=torch.int64)
    args = (q, k, v, None, cu_q, cu_k, mq, mk, 2, 0.1, 0.3, seed, "reference")
    torch.library.opcheck(torch.ops.fastlm.attention.default, args)
    out, lse = torch.ops.fastlm.attention(*args)
    assert lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32
    torch.library.opcheck(torch.ops.fastlm.attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse,
                           None, cu_q, cu_k, mq, mk, 2, 0.1, 0.3, seed, "reference"))


def test_torch_compile_fullgraph():
    q, k, v, cu_q, cu_k, mq, mk = pack([1, 6, 3], [1, 6, 3], 4, 2, 16)

    def fn(q, k, v):
        return varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=True).sin()

    compiled = torch.compile(fn, fullgraph=True)
    got, want = compiled(q, k, v), fn(q, k, v)
    assert_close(got, want, 1e-6, "compiled out")
    for name, a, e in zip("qkv", torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        assert_close(a, e, 1e-6, f"compiled d{name}")


def _bad_inputs():
    q, k, v, cu, _, mq, mk = pack([2, 3], [2, 3], 4, 2, 16, requires_grad=False)
    return [
        ((q[None], k, v, cu, cu, mq, mk), ValueError, "q must be 3-dimensional"),
        ((q, k, v, cu.long(), cu, mq, mk), TypeError, "cu_seqlens_q must have dtype in \\(int32\\)"),
        ((q, k, v, cu, cu[None], mq, mk), ValueError, "cu_seqlens_k must be 1-dimensional"),
        ((q, k, v, cu[:1], cu[:1], mq, mk), ValueError, "cu_seqlens_q must have length batch \\+ 1 >= 2"),
        ((q, k, v, cu, torch.tensor([0, 5], dtype=torch.int32), mq, 5), ValueError,
         "cu_seqlens_q and cu_seqlens_k must have the same length"),
        ((q, k, v, cu + 1, cu, mq, mk), ValueError, "cu_seqlens_q must start at 0"),
        ((q, k, v, torch.tensor([0, 4, 3], dtype=torch.int32), cu, mq, mk), ValueError,
         "cu_seqlens_q must be non-decreasing"),
        ((q, k, v, cu, torch.tensor([0, 2, 4], dtype=torch.int32), mq, mk), ValueError,
         r"cu_seqlens_k\[-1\] must equal the number of packed tokens \(5\)"),
        ((q, k, v, cu, cu, 2, mk), ValueError, r"max_seqlen_q \(2\) is smaller than the longest sequence"),
        ((q, k, v, cu, cu, mq, 3.0), TypeError, "max_seqlen_k must be a python int"),
        ((q, k, v, cu, cu, -1, mk), ValueError, "max_seqlen_q must be >= 0"),
        ((q, k, v, cu.to("meta"), cu, mq, mk), ValueError, "cu_seqlens_q is on meta but q is on cpu"),
        ((q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), cu, cu, mq, mk), ValueError,
         r"query heads \(4\) must be a multiple of the number of key/value heads \(3\)"),
        ((q, k, v[:4], cu, cu, mq, mk), ValueError, "k and v must have the same shape"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_inputs())))
def test_bad_input_raises_clearly(index):
    args, exc, match = _bad_inputs()[index]
    with pytest.raises(exc, match=match):
        varlen_attention(*args)
