"""fastlm.ops.varlen_attention (packed sequences) against float64 attention per sequence,
and against the padded op on the same sequences."""
import pytest
import torch

from fastlm.ops.attention import attention, varlen_attention

# fixtures (target, _no_tf32) and checks shared with test_attention.py
from _attention_targets import _no_tf32, assert_close, assert_within_eager, target  # noqa: F401
from _attention_truth import eager, pack, spans, truth


# (lengths_q, lengths_k, heads_q, heads_kv, head_dim, causal)
CASES = [
    ([1, 7, 13, 3], [1, 7, 13, 3], 4, 2, 16, False),
    ([1, 7, 13, 3], [1, 7, 13, 3], 2, 2, 40, True),
    ([5, 1, 9], [8, 4, 2], 4, 1, 64, "bottom_right"),  # sequence 2: 9 queries, 2 keys -> empty rows
    ([4, 6], [9, 3], 2, 1, 80, True),
    ([97, 1, 30], [97, 1, 30], 2, 2, 64, True),
    ([130, 1, 61, 7], [130, 1, 61, 7], 4, 1, 128, True),
]
INTERPRETER_CASES = {0, 1, 2, 3}


@pytest.mark.parametrize("case", range(len(CASES)))
def test_packed_matches_float64(target, case):
    if target.interpreted and case not in INTERPRETER_CASES:
        pytest.skip("shape too slow for the Triton interpreter")
    lengths_q, lengths_k, hq, hk, d, causal = CASES[case]
    q, k, v, cu_q, cu_k, mq, mk = pack(lengths_q, lengths_k, hq, hk, d, device=target.device)
    target.require(q, k, causal, packed=True)
    out = varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=causal, backend=target.backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    dout = torch.randn_like(out)
    expected, _, want = truth(q, k, v, dout, cu_seqlens=(cu_q, cu_k), causal=causal)
    assert_close(out, expected, 1e-4, "out")
    got = torch.autograd.grad(out, (q, k, v), dout)
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, 1e-4, f"d{name}")


# (lengths_q, lengths_k, heads_q, heads_kv, head_dim, causal, window)
WINDOW_CASES = [
    ([1, 7, 13, 3], [1, 7, 13, 3], 4, 2, 16, False, 3),
    ([5, 1, 9], [8, 4, 2], 4, 1, 16, "bottom_right", 2),  # sequence 2: 9 queries, 2 keys
    ([4, 6], [9, 3], 2, 1, 16, True, 1),  # window 1 causal: the diagonal only
    ([12, 20], [12, 20], 2, 2, 16, False, 100),  # window larger than every sequence
    ([40, 3], [40, 3], 2, 2, 16, False, 2),  # a block edge of the interpreter's tiles
    ([300, 1, 520], [300, 1, 520], 2, 1, 32, True, 70),  # several 256-key CPU blocks skipped
]
INTERPRETER_WINDOW_CASES = {0, 1, 2, 3, 4}


@pytest.mark.parametrize("case", range(len(WINDOW_CASES)))
def test_packed_sliding_window_matches_float64(target, case):
    if target.interpreted and case not in INTERPRETER_WINDOW_CASES:
        pytest.skip("shape too slow for the Triton interpreter")
    lengths_q, lengths_k, hq, hk, d, causal, window = WINDOW_CASES[case]
    q, k, v, cu_q, cu_k, mq, mk = pack(lengths_q, lengths_k, hq, hk, d, device=target.device)
    target.require(q, k, causal, packed=True, window=window)
    out = varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=causal, window=window, backend=target.backend)
    dout = torch.randn_like(out)
    expected, _, want = truth(q, k, v, dout, cu_seqlens=(cu_q, cu_k), causal=causal, window=window)
    assert_close(out, expected, 1e-4, "out")
    for name, g, w in zip("qkv", torch.autograd.grad(out, (q, k, v), dout), want):
        assert_close(g, w, 1e-4, f"d{name}")


@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_packed_keys_with_token_stride_zero(target, causal):
    """Packed keys/values expanded over the tokens (a token stride of 0, below head_dim:
    BLAS rejects it as a leading dimension)."""
    lengths_q, lengths_k, h, d = [3, 9, 1], [5, 70, 2], 2, 64
    q, _, _, cu_q, cu_k, mq, mk = pack(lengths_q, lengths_k, h, h, d, device=target.device)
    k, v = (torch.randn(1, h, d, device=target.device, requires_grad=True).expand(sum(lengths_k), h, d)
            for _ in range(2))
    target.require(q, k, causal, packed=True)
    out = varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=causal, backend=target.backend)
    dout = torch.randn_like(out)
    expected, _, want = truth(q, k, v, dout, cu_seqlens=(cu_q, cu_k), causal=causal)
    assert_close(out, expected, 1e-5, "out")
    for name, g, w in zip("qkv", torch.autograd.grad(out, (q, k, v), dout), want):
        assert_close(g, w, 1e-5, f"d{name}")


def test_packed_window_equals_padded_window(target):
    """Packed and left-padded layouts of the same sequences agree under a window: the
    window counts positions from each sequence's first token, padding shifts them alike."""
    lengths, hq, hk, d, window = [3, 11, 8], 2, 1, 16, 4
    q, k, v, cu_q, cu_k, mq, mk = pack(lengths, lengths, hq, hk, d, requires_grad=False, device=target.device)
    target.require(q, k, packed=True, window=window)
    packed = varlen_attention(q, k, v, cu_q, cu_k, mq, mk, window=window, backend=target.backend)
    b, s = len(lengths), max(lengths)
    qp, kp, vp = (torch.zeros(b, s, t.shape[1], d, device=target.device) for t in (q, k, v))
    mask = torch.zeros(b, s, dtype=torch.bool, device=target.device)
    for n, ((rows, _), length) in enumerate(zip(spans(cu_q, cu_k), lengths)):
        for dst, src in ((qp, q), (kp, k), (vp, v)):
            dst[n, s - length:] = src[rows]
        mask[n, s - length:] = True
    padded = attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), key_padding_mask=mask,
                       window=window, backend=target.backend).transpose(1, 2)
    assert_close(packed, padded[mask], 1e-5, "left-padded batch")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_low_precision_error_within_eager(target, dtype):
    """Error vs float64 at most 2x (out) / 3x (grads) plain per-sequence PyTorch attention in ``dtype``."""
    if target.device == "cuda":
        lengths, hq, hk, d = [1, 77, 130, 40], 4, 2, 64
    else:
        lengths, hq, hk, d = ([1, 9, 16], 2, 1, 16) if target.interpreted else ([1, 40, 57], 4, 2, 64)
    q, k, v, cu_q, cu_k, mq, mk = pack(lengths, lengths, hq, hk, d, dtype=dtype, device=target.device)
    target.require(q, k, True, packed=True)
    dout = torch.randn_like(q)
    truth_out, _, truth_grads = truth(q, k, v, dout, cu_seqlens=(cu_q, cu_k), causal=True)
    eager_out, eager_grads = eager(q, k, v, dout, cu_seqlens=(cu_q, cu_k), causal=True)
    out = varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=True, backend=target.backend)
    assert out.dtype == dtype
    assert_within_eager(out, eager_out, truth_out, 2, "out")
    for name, got, want, ref in zip("qkv", torch.autograd.grad(out, (q, k, v), dout), truth_grads, eager_grads):
        assert_within_eager(got, ref, want, 3, f"d{name}")


def test_packed_equals_padded_per_sequence(target):
    """Each packed sequence gives what the padded op gives on it alone, and on a right-padded batch."""
    lengths, hq, hk, d = [1, 7, 13, 3], 4, 2, 64
    q, k, v, cu_q, cu_k, mq, mk = pack(lengths, lengths, hq, hk, d, requires_grad=False, device=target.device)
    target.require(q, k, True, packed=True)
    packed = varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=True, backend=target.backend)
    b, s = len(lengths), max(lengths)
    qp, kp, vp = (torch.zeros(b, s, t.shape[1], d, device=target.device) for t in (q, k, v))
    mask = torch.zeros(b, s, dtype=torch.bool, device=target.device)
    for n, ((rows, _), length) in enumerate(zip(spans(cu_q, cu_k), lengths)):
        single = attention(*(t[rows].transpose(0, 1)[None] for t in (q, k, v)), causal=True, backend=target.backend)
        assert_close(packed[rows], single[0].transpose(0, 1), 1e-5, f"sequence {n} alone")
        qp[n, :length], kp[n, :length], vp[n, :length], mask[n, :length] = q[rows], k[rows], v[rows], True
    padded = attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), key_padding_mask=mask,
                       causal=True, backend=target.backend).transpose(1, 2)
    assert_close(packed, padded[mask], 1e-5, "right-padded batch")


def test_empty_key_sequence_gives_zeros(target):
    q, k, v, cu_q, cu_k, mq, mk = pack([3, 4], [5, 0], 2, 2, 64, device=target.device)
    target.require(q, k, packed=True)
    out = varlen_attention(q, k, v, cu_q, cu_k, mq, mk, backend=target.backend)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert (out[3:] == 0).all() and (dq[3:] == 0).all()
    assert_close(out, truth(q, k, v, cu_seqlens=(cu_q, cu_k))[0], 1e-5, "out")


def test_packed_dropout_forward_and_backward_use_one_mask(target):
    """Keep-mask read off a v = identity run with the same seed, then checked in fwd and bwd."""
    lengths, hq, hk, d, p, seed = [1, 9, 16], 2, 1, 64, 0.3, 11
    q, k, v, cu_q, cu_k, mq, mk = pack(lengths, lengths, hq, hk, d, device=target.device)
    target.require(q, k, dropout=True, packed=True)
    eye = torch.cat([torch.eye(n, d, device=target.device) for n in lengths])[:, None].expand(-1, hk, d)
    torch.manual_seed(seed)
    probe = varlen_attention(q.detach(), k.detach(), eye, cu_q, cu_k, mq, mk, dropout_p=p, backend=target.backend)
    # out[i, j] = P_ij keep_ij / (1 - p) with every P_ij > 0
    keep = [(probe[rows, :, :length] > 0).permute(1, 0, 2) for (rows, _), length in zip(spans(cu_q, cu_k), lengths)]
    rate = torch.cat([m.flatten() for m in keep]).double().mean().item()
    assert 0.5 < rate < 0.9, f"keep rate {rate}"
    torch.manual_seed(seed)
    out = varlen_attention(q, k, v, cu_q, cu_k, mq, mk, dropout_p=p, backend=target.backend)
    dout = torch.randn_like(out)
    expected, _, want = truth(q, k, v, dout, cu_seqlens=(cu_q, cu_k), keep=keep, dropout_p=p)
    assert_close(out, expected, 1e-4, "out")
    for name, g, w in zip("qkv", torch.autograd.grad(out, (q, k, v), dout), want):
        assert_close(g, w, 1e-4, f"d{name}")
    torch.manual_seed(seed)
    again = varlen_attention(q, k, v, cu_q, cu_k, mq, mk, dropout_p=p, backend=target.backend)
    assert torch.equal(out, again)


@pytest.mark.parametrize("causal,dropout_p,window", [
    (False, 0.0, None), ("bottom_right", 0.0, None), (True, 0.4, None), (False, 0.0, 2), ("bottom_right", 0.4, 2)])
def test_reference_gradcheck(causal, dropout_p, window):
    q, k, v, cu_q, cu_k, mq, mk = pack([1, 4, 3], [2, 3, 5], 2, 1, 3, dtype=torch.float64)

    def fn(q, k, v):
        torch.manual_seed(9)
        return varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=causal, window=window, dropout_p=dropout_p,
                                backend="reference")

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_opcheck():
    q, k, v, cu_q, cu_k, mq, mk = pack([1, 6, 3], [4, 6, 2], 4, 2, 16)
    seed = torch.tensor([8], dtype=torch.int64)
    args = (q, k, v, None, cu_q, cu_k, mq, mk, 2, 2, 0.1, 0.3, seed, "reference")
    torch.library.opcheck(torch.ops.fastlm.attention.default, args)
    out, lse = torch.ops.fastlm.attention(*args)
    assert lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32
    torch.library.opcheck(torch.ops.fastlm.attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse,
                           None, cu_q, cu_k, mq, mk, 2, 2, 0.1, 0.3, seed, "reference"))


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
