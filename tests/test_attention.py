"""fastlm.ops.attention (padded batches) against float64 attention written here.

Numerics tests run on every target (backend x device) that this process can serve:
on CPU ``reference`` always, ``cpu`` when fastlm._C has its attention kernel, ``triton``
under TRITON_INTERPRET=1 when ``fastlm.kernels.attention`` exists (tiny shapes: the
interpreter is slow); on a CUDA device (``gpu`` mark) ``reference``, ``triton`` and
``cuda``.  A GPU backend that declares it cannot serve a case (dtype, head_dim, feature)
is skipped with its reasons; a CPU target never is.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastlm import registry
from fastlm.ops.attention import attention
from fastlm.registry import BackendError, Problem

# fixtures (target, _no_tf32) and checks shared with test_varlen_attention.py
from _attention_targets import (_no_tf32, assert_close, assert_within_eager, expected_attention,  # noqa: F401
                                target, visible_mask)

def make_qkv(b, hq, hk, sq, sk, d, dtype=torch.float32, bshd=False, requires_grad=True, device="cpu"):
    """Random q, k, v; ``bshd``: transposed views of (B, S, H, D) tensors as HF makes them."""
    def one(h, s):
        if bshd:
            t = torch.randn(b, s, h, d, dtype=dtype, device=device).transpose(1, 2)
        else:
            t = torch.randn(b, h, s, d, dtype=dtype, device=device)
        return t.requires_grad_(requires_grad)
    return one(hq, sq), one(hk, sk), one(hk, sk)


def padding_mask(b, sk, side, device="cpu"):
    """(b, sk) bool with lengths sk, sk-3, sk-6, ... (at least 1); None for side None."""
    if side is None:
        return None
    lengths = torch.tensor([max(sk - 3 * i, 1) for i in range(b)], device=device)
    pos = torch.arange(sk, device=device)[None, :]
    return pos < lengths[:, None] if side == "right" else pos >= (sk - lengths)[:, None]


def grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


CASES = [
    (1, 2, 2, 1, 1, 16, False, None, False),
    (3, 2, 1, 7, 97, 40, False, "right", True),
    (3, 4, 2, 97, 7, 80, True, None, False),
    (1, 2, 2, 130, 130, 64, True, None, True),
    (3, 4, 1, 7, 7, 16, True, "left", False),
    (3, 2, 2, 13, 9, 64, "bottom_right", "left", True),
    (1, 4, 2, 9, 13, 40, "bottom_right", "right", False),
    (3, 2, 2, 97, 130, 16, False, "left", False),
    (2, 2, 1, 65, 65, 128, True, "left", True),
]
# Shapes the Triton interpreter runs in seconds.
INTERPRETER_CASES = {0, 2, 4, 5, 6}


@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_backward_match_float64(target, case):
    if target.interpreted and case not in INTERPRETER_CASES:
        pytest.skip("shape too slow for the Triton interpreter")
    b, hq, hk, sq, sk, d, causal, padding, bshd = CASES[case]
    q, k, v = make_qkv(b, hq, hk, sq, sk, d, bshd=bshd, device=target.device)
    target.require(q, k, causal)
    mask = padding_mask(b, sk, padding, target.device)
    out = attention(q, k, v, key_padding_mask=mask, causal=causal, backend=target.backend)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride() == q.stride()
    expected = expected_attention(q, k, v, visible_mask(sq, sk, causal, mask, target.device))
    assert_close(out, expected, 1e-4, "out")
    dout = torch.randn_like(out)
    for name, got, want in zip("qkv", grads(out, (q, k, v), dout), grads(expected, (q, k, v), dout)):
        assert got.stride() == (q if name == "q" else k).stride()
        assert_close(got, want, 1e-4, f"d{name}")


def test_lse_matches_float64(target):
    """The kernel-level logsumexp (the backward's input): natural log, -inf for empty rows."""
    b, hq, hk, sq, sk, d = 2, 4, 2, 9, 7, 64
    q, k, v = make_qkv(b, hq, hk, sq, sk, d, requires_grad=False, device=target.device)
    target.require(q, k, "bottom_right")
    mask = torch.ones(b, sk, dtype=torch.bool, device=target.device)
    mask[1] = False  # batch 1: every row fully masked
    scale = 0.3
    out, lse = torch.ops.fastlm.attention(q, k, v, mask, None, None, 0, 0, 2, 0, 0.0, scale, None, target.backend)
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, sq)
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double().repeat_interleave(hq // hk, 1)) * scale
    s = s.masked_fill(~visible_mask(sq, sk, "bottom_right", mask, target.device), float("-inf"))
    want = torch.logsumexp(s, -1)
    assert torch.equal(torch.isinf(lse), torch.isinf(want))
    finite = torch.isfinite(want)
    assert_close(lse[finite], want[finite], 1e-5, "lse")
    assert (out[1] == 0).all()


@pytest.mark.parametrize("sq,sk", [(5, 11), (11, 5)])
def test_causal_top_left_is_sdpa_is_causal(target, sq, sk):
    q, k, v = make_qkv(2, 2, 2, sq, sk, 64, device=target.device)
    target.require(q, k, True)
    out = attention(q, k, v, causal=True, backend=target.backend)
    sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert_close(out, sdpa, 1e-5, "out vs SDPA is_causal")


def test_fully_masked_rows_give_zeros_and_zero_grads(target):
    """Batch 1 has no keys; with bottom-right alignment and seq_q > seq_k the first rows see none."""
    b, h, sq, sk, d = 2, 2, 9, 5, 64
    q, k, v = make_qkv(b, h, h, sq, sk, d, device=target.device)
    target.require(q, k, "bottom_right")
    mask = torch.ones(b, sk, dtype=torch.bool, device=target.device)
    mask[1] = False
    out = attention(q, k, v, key_padding_mask=mask, causal="bottom_right", backend=target.backend)
    dq, dk, dv = grads(out, (q, k, v), torch.randn_like(out))
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    empty_rows = sq - sk  # query i sees keys j <= i - (sq - sk)
    assert (out[0, :, :empty_rows] == 0).all() and (dq[0, :, :empty_rows] == 0).all()
    expected = expected_attention(q, k, v, visible_mask(sq, sk, "bottom_right", mask, target.device))
    assert_close(out, expected, 1e-5, "out")


def test_non_contiguous_last_dim_is_accepted(target):
    q, k, v = (t.detach() for t in make_qkv(1, 2, 2, 7, 7, 128, device=target.device))
    q2, k2, v2 = (t[..., ::2] for t in (q, k, v))  # head_dim 64, last-dim stride 2
    target.require(q2, k2)
    out = attention(q2, k2, v2, backend=target.backend)
    assert_close(out, expected_attention(q2, k2, v2), 1e-5, "out")


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, padding)
LOW_PRECISION_CASES = [
    (2, 2, 1, 33, 33, 16, True, "right"),  # small enough for the interpreter
    (2, 4, 2, 97, 97, 64, True, "right"),
    (3, 4, 1, 70, 130, 128, "bottom_right", "left"),
    (2, 2, 2, 128, 128, 64, False, "left"),
]


@pytest.mark.parametrize("case", range(len(LOW_PRECISION_CASES)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_eager(target, dtype, case):
    """Error vs float64 at most 2x (out) / 3x (grads) plain PyTorch attention in ``dtype``."""
    if target.device == "cpu" and case not in ((0,) if target.interpreted else (0, 1)):
        pytest.skip("the larger cases run on a GPU only")
    b, hq, hk, sq, sk, d, causal, padding = LOW_PRECISION_CASES[case]
    q, k, v = make_qkv(b, hq, hk, sq, sk, d, dtype=dtype, device=target.device)
    target.require(q, k, causal)
    mask = padding_mask(b, sk, padding, target.device)
    vis = visible_mask(sq, sk, causal, mask, target.device)
    assert vis.any(-1).all(), "the eager baseline needs every row to see a key"
    dout = torch.randn(b, hq, sq, d, dtype=dtype, device=target.device)
    truth = expected_attention(q, k, v, vis)
    truth_grads = grads(truth, (q, k, v), dout.double())
    # Plain eager attention computed in ``dtype`` end to end.
    kk, vv = (t.repeat_interleave(hq // hk, 1) for t in (k, v))
    scores = (q @ kk.transpose(-1, -2) * (1.0 / math.sqrt(d))).masked_fill(~vis, float("-inf"))
    eager = torch.softmax(scores, -1) @ vv
    eager_grads = grads(eager, (q, k, v), dout)
    out = attention(q, k, v, key_padding_mask=mask, causal=causal, backend=target.backend)
    assert out.dtype == dtype
    assert_within_eager(out, eager, truth, 2, "out")
    for name, got, want, ref in zip("qkv", grads(out, (q, k, v), dout), truth_grads, eager_grads):
        assert got.dtype == dtype
        assert_within_eager(got, ref, want, 3, f"d{name}")


# ------------------------------------------------------------------------------- dropout
def recover_keep(target, b, hq, hk, sq, sk, d, p, seed, causal=False, key_padding_mask=None):
    """The dropout keep-mask of a call, read off by attending to v = identity.

    With v[:, :, j] = e_j, out[i, j] = P_ij * keep_ij / (1 - p) and every visible P_ij > 0;
    the mask depends on the seed and the shapes only, not on q, k, v.
    """
    assert sk <= d
    q = torch.randn(b, hq, sq, d, device=target.device) * 0.5
    k = torch.randn(b, hk, sk, d, device=target.device) * 0.5
    v = torch.eye(sk, d, device=target.device).expand(b, hk, sk, d)
    torch.manual_seed(seed)
    out = attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal, dropout_p=p, backend=target.backend)
    return out[..., :sk] > 0


def test_dropout_keep_rate_and_scaling(target):
    b, h, sq, sk, d, p = 2, 2, 64, 16, 64, 0.3
    q = torch.zeros(b, h, sq, d, device=target.device)  # uniform probabilities 1/sk
    target.require(q, q, dropout=True)
    v = torch.eye(sk, d, device=target.device).expand(b, h, sk, d)
    out = attention(q, q[:, :, :sk], v, dropout_p=p, backend=target.backend)[..., :sk]
    kept = out > 0
    # every kept probability is exactly (1/sk) / (1 - p); dropped ones are 0
    assert_close(out[kept], torch.full_like(out[kept], 1.0 / (sk * (1 - p))), 1e-5, "kept probability")
    n = kept.numel()
    rate = kept.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), f"keep rate {rate:.4f}, expected {1 - p}"


def test_dropout_same_seed_same_result(target):
    q, k, v = make_qkv(1, 2, 2, 9, 13, 64, requires_grad=False, device=target.device)
    target.require(q, k, dropout=True)
    torch.manual_seed(123)
    a = attention(q, k, v, dropout_p=0.5, backend=target.backend)
    torch.manual_seed(123)
    b = attention(q, k, v, dropout_p=0.5, backend=target.backend)
    c = attention(q, k, v, dropout_p=0.5, backend=target.backend)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dropout_forward_and_backward_use_one_mask(target):
    """Output and gradients equal float64 attention with the keep-mask recovered from the forward."""
    b, hq, hk, sq, sk, d, p, seed = 2, 4, 2, 9, 16, 64, 0.4, 77
    q, k, v = make_qkv(b, hq, hk, sq, sk, d, device=target.device)
    target.require(q, k, True, dropout=True)
    mask = padding_mask(b, sk, "left", target.device)
    keep = recover_keep(target, b, hq, hk, sq, sk, d, p, seed, causal=True, key_padding_mask=mask)
    torch.manual_seed(seed)
    out = attention(q, k, v, key_padding_mask=mask, causal=True, dropout_p=p, backend=target.backend)
    expected = expected_attention(q, k, v, visible_mask(sq, sk, True, mask, target.device), keep=keep, dropout_p=p)
    assert_close(out, expected, 1e-4, "out")
    dout = torch.randn_like(out)
    for name, got, want in zip("qkv", grads(out, (q, k, v), dout), grads(expected, (q, k, v), dout)):
        assert_close(got, want, 1e-4, f"d{name}")


# ------------------------------------------------------------------------ sliding window
# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, padding, window)
WINDOW_CASES = [
    (2, 2, 1, 9, 9, 16, False, "left", 1),  # window 1: itself only; padded rows see nothing
    (2, 2, 2, 13, 13, 16, False, "right", 3),
    (1, 2, 1, 7, 12, 16, False, None, 2),  # seq_q != seq_k without causal: top-left positions
    (2, 2, 2, 9, 13, 16, True, "left", 4),  # top-left causal + window + left padding
    (1, 2, 2, 11, 7, 16, "bottom_right", None, 3),  # bottom-right: the first rows see nothing
    (1, 2, 2, 7, 7, 16, False, None, 50),  # window larger than the sequence: full attention
    # several key blocks, most outside the window; the windows put block-range limits
    # exactly on the interpreter's block edges, so an off-by-one there shows
    (1, 2, 2, 40, 40, 16, False, "right", 2),
    (1, 2, 1, 40, 40, 16, True, None, 18),
    (2, 2, 1, 300, 600, 32, False, "left", 100),  # several 256-key CPU blocks skipped
    (1, 2, 2, 520, 520, 16, True, "right", 70),
]
INTERPRETER_WINDOW_CASES = {0, 1, 2, 3, 4, 5, 6, 7}


@pytest.mark.parametrize("case", range(len(WINDOW_CASES)))
def test_sliding_window_matches_float64(target, case):
    if target.interpreted and case not in INTERPRETER_WINDOW_CASES:
        pytest.skip("shape too slow for the Triton interpreter")
    b, hq, hk, sq, sk, d, causal, padding, window = WINDOW_CASES[case]
    q, k, v = make_qkv(b, hq, hk, sq, sk, d, bshd=True, device=target.device)
    target.require(q, k, causal, window=window)
    mask = padding_mask(b, sk, padding, target.device)
    out = attention(q, k, v, key_padding_mask=mask, causal=causal, window=window, backend=target.backend)
    expected = expected_attention(q, k, v, visible_mask(sq, sk, causal, mask, target.device, window))
    assert_close(out, expected, 1e-4, "out")
    dout = torch.randn_like(out)
    for name, got, want in zip("qkv", grads(out, (q, k, v), dout), grads(expected, (q, k, v), dout)):
        assert_close(got, want, 1e-4, f"d{name}")


def test_sliding_window_is_a_band():
    """The window's edges, checked on the reference against the definition by counting
    visible keys: |i - j| < w gives min(i, w-1) + 1 + min(S-1-i, w-1) keys per row."""
    s, w = 10, 3
    q = torch.zeros(1, 1, s, 16)  # uniform scores: out[i] = mean of the visible v rows
    v = torch.eye(s, 16)[None, None]
    out = attention(q, q, v, window=w, backend="reference")[0, 0, :, :s]
    i = torch.arange(s)
    count = torch.minimum(i, torch.tensor(w - 1)) + 1 + torch.minimum(s - 1 - i, torch.tensor(w - 1))
    assert torch.equal((out > 0).sum(1), count)
    causal = attention(q, q, v, window=w, causal=True, backend="reference")[0, 0, :, :s]
    assert torch.equal((causal > 0).sum(1), torch.minimum(i + 1, torch.tensor(w)))


def test_cuda_backend_declines_a_window():
    problem = Problem.of("cuda", torch.float16, head_dim=64, features={"window"})
    cuda = registry.table("attention")["cuda"]
    assert cuda.limit_reasons(problem) == ["window not supported"]
    assert cuda.limit_reasons(Problem.of("cuda", torch.float16, head_dim=64, features={"causal", "gqa"})) == []


# ----------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("causal,padding,dropout_p,window", [
    (False, None, 0.0, None), (True, "left", 0.0, None), ("bottom_right", "right", 0.0, None),
    (True, "right", 0.3, None), (False, "left", 0.0, 2), ("bottom_right", None, 0.3, 2)])
def test_reference_gradcheck(causal, padding, dropout_p, window):
    q, k, v = make_qkv(2, 2, 1, 4, 5, 3, dtype=torch.float64)
    mask = padding_mask(2, 5, padding)

    def fn(q, k, v):
        torch.manual_seed(5)  # the same dropout mask on every evaluation
        return attention(q, k, v, key_padding_mask=mask, causal=causal, window=window, dropout_p=dropout_p,
                         backend="reference")

    assert torch.autograd.gradcheck(fn, (q, k, v))


# --------------------------------------------------------------------- registration
def test_opcheck():
    q, k, v = make_qkv(2, 4, 2, 5, 7, 16, bshd=True)
    mask = padding_mask(2, 7, "left")
    seed = torch.tensor([3], dtype=torch.int64)
    args = (q, k, v, mask, None, None, 0, 0, 1, 3, 0.2, 0.25, seed, "reference")
    torch.library.opcheck(torch.ops.fastlm.attention.default, args)
    out, lse = torch.ops.fastlm.attention(*args)
    torch.library.opcheck(torch.ops.fastlm.attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, mask,
                           None, None, 0, 0, 1, 3, 0.2, 0.25, seed, "reference"))


def test_torch_compile_fullgraph():
    q, k, v = make_qkv(2, 4, 2, 7, 9, 16)
    mask = padding_mask(2, 9, "left")

    def fn(q, k, v):
        return attention(q, k, v, key_padding_mask=mask, causal=True, scale=0.3).sin()

    compiled = torch.compile(fn, fullgraph=True)
    got = compiled(q, k, v)
    want = fn(q, k, v)
    assert_close(got, want, 1e-6, "compiled out")
    for name, a, e in zip("qkv", grads(got.sum(), (q, k, v), None), grads(want.sum(), (q, k, v), None)):
        assert_close(a, e, 1e-6, f"compiled d{name}")


def test_integer_attention_mask_is_nonzero_keeps():
    """A tokenizer's int64 0/1 attention_mask works as the key padding mask (nonzero = attend)."""
    q, k, v = make_qkv(2, 4, 2, 5, 7, 16, requires_grad=False)
    keep = padding_mask(2, 7, "left")
    want = expected_attention(q, k, v, visible_mask(5, 7, key_padding_mask=keep))
    for mask in (keep.long(), keep.to(torch.uint8) * 3):
        assert_close(attention(q, k, v, key_padding_mask=mask), want, 1e-5, f"{mask.dtype} mask")


# ---------------------------------------------------------------------------- bad input
def _bad_inputs():
    q, k, v = make_qkv(2, 4, 2, 5, 7, 16, requires_grad=False)
    ok_mask = torch.ones(2, 7, dtype=torch.bool)
    return [
        ((q.numpy(), k, v), {}, TypeError, "q must be a torch.Tensor"),
        ((q, k, v.long()), {}, TypeError, "v must have dtype"),
        ((q, k.half(), v), {}, TypeError, "k has dtype float16 but q has float32"),
        ((q[0], k, v), {}, ValueError, "q must be 4-dimensional"),
        ((q, k, v[:, :, :6]), {}, ValueError, "k and v must have the same shape"),
        ((q, k[..., :8], v[..., :8]), {}, ValueError, "same head_dim"),
        ((q[:, :3], k, v), {}, ValueError, r"query heads \(3\) must be a multiple"),
        ((q[:1], k, v), {}, ValueError, "same batch size"),
        ((q[:, :, :0], k, v), {}, ValueError, "q must not be empty"),
        ((q, k.to("meta"), v.to("meta")), {}, ValueError, "k is on meta but q is on cpu"),
        ((q, k, v), {"key_padding_mask": ok_mask.float()}, TypeError, "key_padding_mask must have dtype"),
        ((q, k, v), {"key_padding_mask": ok_mask[:, :5]}, ValueError,
         r"key_padding_mask must have shape \(batch, seq_k\)"),
        ((q, k, v), {"key_padding_mask": ok_mask[0]}, ValueError, "key_padding_mask must be 2-dimensional"),
        ((q, k, v), {"key_padding_mask": ok_mask.to("meta")}, ValueError, "key_padding_mask is on meta"),
        ((q, k, v), {"causal": "top_right"}, ValueError, "causal must be False, True or 'bottom_right'"),
        ((q, k, v), {"causal": 1}, ValueError, "causal must be"),
        ((q, k, v), {"window": 0}, ValueError, "window must be >= 1"),
        ((q, k, v), {"window": 2.0}, TypeError, "window must be an int or None"),
        ((q, k, v), {"window": True}, TypeError, "window must be an int or None"),
        ((q, k, v), {"dropout_p": 1.0}, ValueError, "dropout_p must be in"),
        ((q, k, v), {"dropout_p": "0.1"}, TypeError, "dropout_p must be a float"),
        ((q, k, v), {"scale": "1"}, TypeError, "scale must be a float"),
        ((q, k, v), {"scale": float("nan")}, ValueError, "scale must be finite"),
        ((q, k, v), {"backend": "fast"}, ValueError, "backend must be 'auto' or one of"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_inputs())))
def test_bad_input_raises_clearly(index):
    args, kwargs, exc, match = _bad_inputs()[index]
    with pytest.raises(exc, match=match):
        attention(*args, **kwargs)


def test_backend_errors(monkeypatch):
    q, k, v = make_qkv(1, 2, 2, 3, 3, 16, requires_grad=False)
    with pytest.raises(BackendError, match="backend 'cuda' cannot serve this input: .+") as err:
        attention(q, k, v, backend="cuda")
    assert "not cpu" in str(err.value) or "fastlm._C" in str(err.value)
    if registry.BACKENDS["triton"].unavailable_reason() is None:
        with pytest.raises(BackendError, match="head_dim 8 outside 16..256"):
            attention(q[..., :8], k[..., :8], v[..., :8], backend="triton")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
            attention(q, k, v, backend="triton")
    monkeypatch.setenv("FASTLM_BACKEND", "cuda")
    with pytest.raises(BackendError, match="backend 'cuda'"):
        attention(q, k, v)


def test_auto_on_cpu_picks_a_cpu_backend():
    f16 = Problem.of("cpu", torch.float16, head_dim=64, features={"causal", "dropout", "gqa"})
    assert registry.select("attention", f16, "auto").backend in ("cpu", "reference")
    f64 = Problem.of("cpu", torch.float64, head_dim=64, features={"packed"})
    assert registry.select("attention", f64, "auto").backend == "reference"
    assert set(registry.table("attention")) == {"reference", "cpu", "triton", "cuda"}
