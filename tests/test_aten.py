"""The ``torch`` backend (fastlm/aten): our contracts mapped onto PyTorch's own fused kernels.

Without a GPU: the wiring on ``meta`` tensors through PyTorch's real ops and meta kernels
(shapes, dtypes, strides, lse layouts, forward and backward through autograd, which
kernel runs; a host read of tensor data would raise there, so these also show the
mapping makes none); the semantics through CPU emulations of the kernels
(tests/_aten_emulation.py) against float64 truth, for what the shared attention suites
(target ``torch``, fp32: the memory-efficient kernel) do not reach: flash in fp16/bf16,
windows, bottom-right alignment, packed GQA, dropout bookkeeping; and the auto rule.
With a GPU (marked ``gpu``, backend ``torch``): the real kernels against float64.
"""
import dataclasses
import itertools
import types

import pytest
import torch
from _aten_emulation import EMULATION, _keep
from _attention_targets import assert_close
from _attention_truth import expected_attention, visible
from _cross_entropy_truth import IGNORE, ce64, lce64

import fastlm.aten
import fastlm.aten.attention as aten_attention
from fastlm import registry
from fastlm.ops import _common
from fastlm.ops.attention import FEATURES, attention, varlen_attention
from fastlm.ops.cross_entropy import cross_entropy
from fastlm.ops.linear_cross_entropy import _add_weight_grad, _has_fp32_output_gemm, linear_cross_entropy
from fastlm.registry import BackendError, Problem

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
MISSING = fastlm.aten.missing_kernels()


class Recorder:
    """Forwards to a namespace of kernels and records which ones ran."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def call(*args, **kwargs):
            self.calls.append(name.split("_")[1])  # "flash" / "efficient"
            return fn(*args, **kwargs)
        return call


def _efficient_backward_meta(grad_out, query, key, value, bias, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, logsumexp, dropout_p, philox_seed, philox_offset, custom_mask_type,
                             bias_requires_grad, *, scale=None):
    """Shapes of aten._efficient_attention_backward.  PyTorch's own meta kernel for it lacks
    the schema's ``out`` argument (torch 2.14: "got multiple values for argument 'scale'"),
    so on meta tensors this stands in, checking what the kernel would."""
    assert grad_out.shape == out.shape == query.shape and query.shape[2] == key.shape[2] == value.shape[2]
    rows = max_seqlen_q if cu_seqlens_q is not None else query.shape[1]
    batch = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q is not None else query.shape[0]
    assert logsumexp.shape == (batch, query.shape[2], -(-rows // 32) * 32) and logsumexp.dtype == F32
    assert philox_seed.device.type == philox_offset.device.type == "cpu"  # read on the host
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), query.new_empty(0)


@pytest.fixture
def on_meta(torch_tier_on_cpu, monkeypatch):
    if MISSING:
        pytest.skip(f"this torch lacks PyTorch's attention kernels: {MISSING}")
    aten = types.SimpleNamespace(**{name: getattr(torch.ops.aten, name) for name in fastlm.aten.ATTENTION_OPS})
    aten._efficient_attention_backward = _efficient_backward_meta
    recorder = Recorder(aten)
    monkeypatch.setattr(aten_attention, "ATEN", recorder)
    return recorder


@pytest.fixture
def emulated(torch_tier_on_cpu, monkeypatch, poison):
    recorder = Recorder(EMULATION)
    monkeypatch.setattr(aten_attention, "ATEN", recorder)
    return recorder


def qkv(b, hq, hk, sq, sk, d, dtype, device="cpu", requires_grad=True):
    """(B, H, S, D) views of (B, S, H, D) tensors, as transformers lays them out."""
    def one(h, s):
        return torch.randn(b, s, h, d, dtype=dtype, device=device).transpose(1, 2).requires_grad_(requires_grad)
    return one(hq, sq), one(hk, sk), one(hk, sk)


def packed(lengths_q, lengths_k, hq, hk, d, dtype, device="cpu", same=False):
    def cu(lengths):
        return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)

    q = torch.randn(sum(lengths_q), hq, d, dtype=dtype, device=device, requires_grad=True)
    k, v = (torch.randn(sum(lengths_k), hk, d, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
    cu_q = cu(lengths_q)
    return q, k, v, cu_q, (cu_q if same else cu(lengths_k)), max(lengths_q), max(lengths_k)


def expected_packed(q, k, v, cu_q, cu_k, causal, window=None, keep=None, p=0.0):
    """Float64 truth per sequence (the padded truth on a batch of one)."""
    parts = []
    for n, (a, b, c, e) in enumerate(zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:])):
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[a:b], k[c:e], v[c:e]))
        vis = visible(b - a, e - c, causal=causal, window=window)
        kp = None if keep is None else keep[n:n + 1, :, :b - a, :e - c]
        parts.append(expected_attention(qs, ks, vs, vis, keep=kp, dropout_p=p)[0].transpose(0, 1))
    return torch.cat(parts)


def grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def assert_matches(out, expected, inputs, tol, grad_tol):
    """Output, then the gradients for one random output gradient, against the float64 truth;
    returns the gradients."""
    assert_close(out, expected, tol, "out")
    dout = torch.randn_like(out)
    got = grads(out, inputs, dout)
    for name, g, w in zip("qkv", got, grads(expected, inputs, dout)):
        assert_close(g, w, grad_tol, f"d{name}")
    return got


def assert_lse(lse, q, k, visible, scale):
    """Our lse convention: float64 logsumexp of the visible scaled scores, -inf where none."""
    groups = q.shape[1] // k.shape[1]
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double().repeat_interleave(groups, 1)) * scale
    want = torch.logsumexp(s.masked_fill(~visible, float("-inf")), -1)
    assert lse.dtype == F32 and torch.equal(torch.isneginf(lse), torch.isneginf(want)) and not torch.isnan(lse).any()
    finite = torch.isfinite(want)
    if finite.any():
        assert_close(lse[finite], want[finite], 1e-5, "lse")


# ------------------------------------------------------------------------- meta wiring
# On meta tensors a fastlm op runs its fake kernel; the mapping is called at kernel level
# (the functions the op calls), through PyTorch's real ops and meta kernels, and its results
# are compared with what the op's fake and autograd produce.
CODES = {False: 0, True: 1, "bottom_right": 2}


def check_kernel_level(q, k, v, mask, cu_q, cu_k, mq, mk, causal, window, p, lse_shape):
    """Forward and backward of the mapping; results shaped, typed and laid out as the op's
    fake and autograd say (fastlm's own autograd and fakes, run on the same meta inputs)."""
    args = (mask, cu_q, cu_k, mq, mk, CODES[causal], window or 0, p, 0.125, 1234)
    out, lse = aten_attention.attention_forward(q, k, v, *args)
    fake_out, fake_lse = torch.ops.fastlm.attention(q, k, v, *args[:-1], _common.dropout_seed(p), "torch")
    assert (out.shape, out.dtype, out.stride()) == (fake_out.shape, fake_out.dtype, fake_out.stride())
    assert lse.shape == fake_lse.shape == lse_shape and lse.dtype == F32 and lse.is_contiguous()
    grads_ = aten_attention.attention_backward(torch.ones_like(out), q, k, v, out, lse, *args)
    autograd = torch.autograd.grad(fake_out, (q, k, v), torch.ones_like(fake_out))
    for g, a, t in zip(grads_, autograd, (q, k, v)):
        assert (g.shape, g.dtype, g.stride()) == (a.shape, a.dtype, a.stride()) == (t.shape, t.dtype, t.stride())


# (dtype, heads_q, heads_kv, seq_q, seq_k, causal, window, padding, dropout, kernel)
META_PADDED = [
    (BF16, 4, 2, 7, 9, "bottom_right", 3, False, 0.1, "flash"),
    (F16, 2, 2, 8, 8, True, None, False, 0.0, "flash"),  # equal lengths: top-left is bottom-right
    (BF16, 2, 2, 7, 9, True, None, False, 0.0, "efficient"),  # top-left with seq_q != seq_k
    (F32, 4, 2, 7, 9, False, None, True, 0.2, "efficient"),  # fp32, padding mask, GQA expanded, dropout
    (BF16, 4, 1, 9, 9, True, None, True, 0.0, "efficient"),  # a padding mask
]


@pytest.mark.parametrize("case", META_PADDED, ids=[c[-1] + str(i) for i, c in enumerate(META_PADDED)])
def test_padded_wiring_on_meta(on_meta, case):
    dtype, hq, hk, sq, sk, causal, window, padding, p, kernel = case
    q, k, v = qkv(2, hq, hk, sq, sk, 64, dtype, "meta")
    mask = torch.ones(2, sk, dtype=torch.bool, device="meta") if padding else None
    check_kernel_level(q, k, v, mask, None, None, 0, 0, causal, window, p, (2, hq, sq))
    assert on_meta.calls == [kernel, kernel]


# (dtype, heads_q, heads_kv, lengths_q, lengths_k, same cu_seqlens tensor, causal, window, dropout, kernel)
META_PACKED = [
    (BF16, 4, 2, [3, 1, 9], [3, 1, 9], True, True, None, 0.1, "flash"),
    (BF16, 4, 2, [3, 1, 9], [5, 2, 2], False, "bottom_right", 2, 0.0, "flash"),
    (F32, 2, 1, [3, 1, 9], [5, 2, 2], False, True, None, 0.1, "efficient"),
    (BF16, 2, 2, [3, 1, 9], [3, 1, 9], False, True, None, 0.0, "efficient"),  # equal lengths, not known equal
]


@pytest.mark.parametrize("case", META_PACKED, ids=[c[-1] + str(i) for i, c in enumerate(META_PACKED)])
def test_packed_wiring_on_meta(on_meta, case):
    dtype, hq, hk, lq, lk, same, causal, window, p, kernel = case
    q, k, v, cu_q, cu_k, mq, mk = packed(lq, lk, hq, hk, 32, dtype, "meta", same)
    check_kernel_level(q, k, v, None, cu_q, cu_k, mq, mk, causal, window, p, (hq, q.shape[0]))
    assert on_meta.calls == [kernel, kernel]


@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 1e-3)])
def test_cross_entropy_wiring_on_meta(dtype, label_smoothing, z_loss):
    import fastlm.aten.cross_entropy as aten_ce

    logits = torch.empty(6, 50, dtype=dtype, device="meta")
    labels = torch.zeros(6, dtype=torch.long, device="meta")
    rows, grad = aten_ce.cross_entropy_forward(logits, labels, IGNORE, label_smoothing, z_loss, True)
    assert rows.shape == (6,) and rows.dtype == F32 and grad.shape == logits.shape and grad.dtype == dtype
    back = aten_ce.cross_entropy_backward(grad, torch.empty(6, device="meta"))
    assert back.shape == logits.shape and back.dtype == dtype


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_cross_entropy_label_gradient_of_confident_rows(torch_tier_on_cpu, dtype):
    """softmax - 1 at the label of a confident row is small: formed in fp32 and rounded once,
    it keeps the logits' dtype's relative precision (from a rounded probability it would not)."""
    logits = torch.randn(16, 300).to(dtype)
    labels = torch.randint(0, 300, (16,))
    logits[torch.arange(16), labels] = 12.0
    x = logits.clone().requires_grad_()
    (got,) = torch.autograd.grad(cross_entropy(x, labels, reduction="sum", backend="torch"), x)
    ref = logits.double().requires_grad_()
    (want,) = torch.autograd.grad(ce64(ref, labels, reduction="sum"), ref)
    at = (torch.arange(16), labels)
    assert (want[at].abs() < 1e-2).all()  # confident: the label's gradient is far from -1
    eps = torch.finfo(dtype).eps
    assert ((got[at].double() - want[at]).abs() <= eps * want[at].abs()).all()


def test_weight_gradient_accumulates_in_fp32_where_torch_can():
    """addmm(out_dtype=float32) exists for CUDA (and meta) only: feature-detected per device type."""
    assert not _has_fp32_output_gemm("cpu")
    if not hasattr(torch.ops.aten.addmm, "dtype_out"):
        pytest.skip("this torch has no addmm(out_dtype=)")
    assert _has_fp32_output_gemm("meta")
    grad_w = torch.zeros(5, 3, device="meta")
    _add_weight_grad(grad_w, torch.randn(4, 5, dtype=BF16, device="meta"), torch.randn(4, 3, dtype=BF16, device="meta"))
    assert grad_w.dtype == F32
    # on CPU: the bf16 product, rounded, then added in fp32 (the fallback)
    g, h = torch.randn(4, 5, dtype=BF16), torch.randn(4, 3, dtype=BF16)
    grad_w = torch.zeros(5, 3)
    _add_weight_grad(grad_w, g, h)
    torch.testing.assert_close(grad_w, (g.t() @ h).float())


# ------------------------------------------------------------- semantics, CPU emulation
# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, window)
FLASH_PADDED = [
    (2, 4, 2, 9, 9, 16, False, None),
    (1, 2, 2, 11, 7, 16, "bottom_right", None),  # the first 4 rows see no key
    (2, 2, 1, 13, 13, 32, True, 3),
    (1, 4, 1, 7, 12, 16, "bottom_right", 4),
    (2, 2, 2, 8, 8, 64, False, 2),
    (1, 2, 2, 9, 5, 16, "bottom_right", 2),  # empty rows and a window
]


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("case", range(len(FLASH_PADDED)))
def test_flash_padded_matches_float64(emulated, case, dtype):
    b, hq, hk, sq, sk, d, causal, window = FLASH_PADDED[case]
    q, k, v = qkv(b, hq, hk, sq, sk, d, dtype)
    out = attention(q, k, v, causal=causal, window=window, backend="torch")
    assert emulated.calls == ["flash"]
    vis = visible(sq, sk, causal=causal, window=window)
    expected = expected_attention(q, k, v, vis)
    got = assert_matches(out, expected, (q, k, v), 1e-2, 3e-2)
    empty = ~vis.any(-1)[0, 0]  # (sq,): rows that see nothing: exactly zero, zero gradient
    assert torch.all(out[:, :, empty] == 0) and torch.all(got[0][:, :, empty] == 0)
    _, lse = torch.ops.fastlm.attention(q, k, v, None, None, None, 0, 0, CODES[causal], window or 0, 0.0, 0.3, None,
                                        "torch")
    assert_lse(lse, q, k, vis, 0.3)


# (lengths_q, lengths_k, heads_q, heads_kv, head_dim, same cu tensor, causal, window)
FLASH_PACKED = [
    ([1, 7, 13, 3], [1, 7, 13, 3], 4, 2, 16, True, True, None),  # top-left on equal lengths
    ([5, 1, 9], [8, 4, 2], 4, 1, 16, False, "bottom_right", None),  # 9 queries, 2 keys: empty rows
    ([4, 6], [9, 3], 2, 1, 16, False, "bottom_right", 2),
    ([12, 20], [12, 20], 2, 2, 32, True, False, 3),
    ([1, 0, 1], [3, 2, 4], 4, 1, 16, False, False, None),  # one query per sequence, one sequence without
]


@pytest.mark.parametrize("case", range(len(FLASH_PACKED)))
def test_flash_packed_matches_float64(emulated, case):
    lq, lk, hq, hk, d, same, causal, window = FLASH_PACKED[case]
    q, k, v, cu_q, cu_k, mq, mk = packed(lq, lk, hq, hk, d, BF16, same=same)
    out = varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=causal, window=window, backend="torch")
    assert emulated.calls == ["flash"]
    expected = expected_packed(q, k, v, cu_q, cu_k, causal, window)
    assert_matches(out, expected, (q, k, v), 1e-2, 3e-2)
    _, lse = torch.ops.fastlm.attention(q, k, v, None, cu_q, cu_k, mq, mk, CODES[causal], window or 0, 0.0, 0.3,
                                        None, "torch")
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for n in range(len(lq)):  # (H, T) packed: each sequence's columns
        qs, ks = (t.transpose(0, 1)[None] for t in (q[cq[n]:cq[n + 1]], k[ck[n]:ck[n + 1]]))
        assert_lse(lse[None, :, cq[n]:cq[n + 1]], qs, ks, visible(lq[n], lk[n], causal=causal, window=window), 0.3)


# (lengths_q, lengths_k, heads_q, heads_kv, causal)
EFFICIENT_PACKED = [
    ([5, 1, 9], [8, 4, 2], 4, 2, True),  # top-left with different lengths
    ([5, 3, 9], [8, 0, 2], 2, 1, "bottom_right"),  # a sequence without keys; 9 queries on 2 keys
    ([4, 6], [9, 3], 2, 2, False),
]


@pytest.mark.parametrize("case", range(len(EFFICIENT_PACKED)))
def test_efficient_packed_matches_float64(emulated, case):
    lq, lk, hq, hk, causal = EFFICIENT_PACKED[case]
    q, k, v, cu_q, cu_k, mq, mk = packed(lq, lk, hq, hk, 16, F32)
    out = varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=causal, backend="torch")
    assert emulated.calls == ["efficient"]
    expected = expected_packed(q, k, v, cu_q, cu_k, causal)
    assert_matches(out, expected, (q, k, v), 1e-5, 1e-5)
    _, lse = torch.ops.fastlm.attention(q, k, v, None, cu_q, cu_k, mq, mk, 1 if causal is True else 2 * bool(causal),
                                        0, 0.0, 0.25, None, "torch")
    assert not torch.isnan(lse).any() and torch.equal(torch.isinf(lse), torch.isinf(lse) & (lse < 0))


def test_fully_padded_rows_zero_and_gradients_finite(emulated):
    """A batch whose keys are all padding, in bf16 with grouped heads (memory-efficient with
    expanded k/v): output 0 and every gradient of those rows 0, no NaN anywhere."""
    q, k, v = qkv(3, 4, 2, 6, 6, 16, BF16)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1] = False
    mask[2, :4] = False
    out = attention(q, k, v, key_padding_mask=mask, causal=True, backend="torch")
    assert emulated.calls == ["efficient"]
    expected = expected_attention(q, k, v, visible(6, 6, causal=True, key_padding_mask=mask))
    assert_close(out, expected, 1e-2, "out")
    dq, dk, dv = grads(out, (q, k, v), torch.randn_like(out))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert torch.all(out[1] == 0) and torch.all(dq[1] == 0) and torch.all(dk[1] == 0) and torch.all(dv[1] == 0)
    assert torch.all(out[2, :, :4] == 0) and torch.all(dq[2, :, :4] == 0)


@pytest.mark.parametrize("kernel,dtype,padding", [("flash", BF16, False), ("efficient", F32, True)])
def test_dropout_follows_the_seed_and_leaves_the_generator_alone(emulated, kernel, dtype, padding):
    """The kernels draw from the default generator; the mapping seeds it with fastlm's seed
    (offset 0), so the mask is the (seed, 0) one, the backward regenerates it, and the
    generator's state afterwards is as if only the seed had been drawn."""
    b, hq, hk, sq, sk, d, p = 2, 4, 2, 9, 9, 16, 0.3
    q, k, v = qkv(b, hq, hk, sq, sk, d, dtype)
    mask = torch.tensor([[True] * 9, [False] * 3 + [True] * 6]) if padding else None
    torch.manual_seed(5)
    seed = int(_common.dropout_seed(p))
    state = torch.default_generator.get_state()
    torch.manual_seed(5)
    out = attention(q, k, v, key_padding_mask=mask, dropout_p=p, backend="torch")
    assert torch.equal(torch.default_generator.get_state(), state)
    assert emulated.calls == [kernel]
    keep = _keep(seed, 0, (b, hq, sq, sk), p)
    expected = expected_attention(q, k, v, visible(sq, sk, causal=False, key_padding_mask=mask), keep=keep, dropout_p=p)
    tol = 1e-5 if dtype == F32 else 1e-2
    assert_matches(out, expected, (q, k, v), tol, 3 * tol)


def test_packed_dropout_follows_the_seed(emulated):
    q, k, v, cu_q, cu_k, mq, mk = packed([3, 8, 1], [3, 8, 1], 2, 1, 16, BF16, same=True)
    torch.manual_seed(9)
    seed = int(_common.dropout_seed(0.4))
    torch.manual_seed(9)
    out = varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=True, dropout_p=0.4, backend="torch")
    assert emulated.calls == ["flash"]
    keep = _keep(seed, 0, (3, 2, mq, mk), 0.4)
    expected = expected_packed(q, k, v, cu_q, cu_k, True, keep=keep, p=0.4)
    assert_matches(out, expected, (q, k, v), 1e-2, 3e-2)


def test_equal_lengths_are_known_from_one_cu_seqlens_tensor():
    """Top-left alignment matters (feature top_left) unless q and k share their cu_seqlens:
    the same object, or a view of the same memory (as a compiled graph may hand it back)."""
    from fastlm.ops.attention import problem_of

    q = torch.randn(5, 2, 16)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    for cu_k, aligned in ((cu, False), (cu.view(3), False), (cu.clone(), True)):
        features = problem_of(q, q, None, cu, cu_k, 3, 3, 1, 0, 0.0).features
        assert ("top_left" in features) == aligned and "causal" in features
    assert "top_left" not in problem_of(q[None].transpose(1, 2), q[None].transpose(1, 2), None, None, None, 0, 0, 1, 2,
                                        0.0).features  # padded, seq_q == seq_k
    assert "top_left" in problem_of(q[None].transpose(1, 2), q[None, :3].transpose(1, 2), None, None, None, 0, 0, 0,
                                    2, 0.0).features  # a window on unequal lengths: its positions


def test_unservable_calls_name_each_kernel(torch_tier_on_cpu):
    q, k, v = qkv(1, 2, 2, 8, 8, 16, F32, requires_grad=False)
    with pytest.raises(BackendError) as err:
        attention(q, k, v, window=3, backend="torch")
    msg = str(err.value)
    assert "flash: dtype float32 not supported" in msg and "memory-efficient: window not supported" in msg
    q, k, v = qkv(1, 2, 2, 8, 8, 12, BF16, requires_grad=False)
    with pytest.raises(BackendError, match="head_dim 12 outside 8..256 \\(multiples of 8\\)"):
        attention(q, k, v, backend="torch")


def test_info_lists_the_torch_row_and_its_kernels():
    import importlib

    info = importlib.import_module("fastlm.info")
    data = info.collect()
    row = data["ops"]["attention"]["torch"]
    assert set(row["kernels"]) == {"flash", "memory-efficient"}
    assert row["kernels"]["flash"]["features_missing"] == ["padding", "top_left"]
    assert row["kernels"]["memory-efficient"]["features_missing"] == ["window"]
    assert data["ops"]["cross_entropy"]["torch"]["status"] == "vendor kernels, mapping tested on CPU"
    text = info.info()
    assert "- flash" in text and "- memory-efficient" in text and "torch" in text


# -------------------------------------------------------------------------- the auto rule
def test_auto_on_cuda_picks_torch_wherever_it_serves(monkeypatch):
    """On CUDA problems auto never falls to the reference while the torch tier can serve:
    every dtype x head dim x feature combination the torch row declares it serves picks it
    (our own GPU kernels are unverified; once verified they would come first)."""
    backend = registry.BACKENDS["torch"]
    monkeypatch.setitem(registry.BACKENDS, "torch", dataclasses.replace(backend, probe=lambda: None))
    registry._probe.cache_clear()
    registry._DECISIONS.clear()
    try:
        served = 0
        for dtype, head_dim in itertools.product((F16, BF16, F32, torch.float64), (8, 64, 100, 256, 264)):
            for n in range(len(FEATURES) + 1):
                for features in itertools.combinations(sorted(FEATURES), n):
                    problem = Problem("cuda", dtype, head_dim, 4096, frozenset(features))
                    if registry.table("attention")["torch"].unsupported_reasons(problem):
                        continue
                    served += 1
                    assert registry.select("attention", problem).backend == "torch", problem
        assert served > 500
        for dtype in (F16, BF16, F32):
            assert registry.select("cross_entropy", Problem.of("cuda", dtype, length=30522)).backend == "torch"
    finally:
        registry._probe.cache_clear()
        registry._DECISIONS.clear()


def test_cpu_calls_do_not_probe_the_torch_backend(monkeypatch):
    """Probing torch reads the GPU's compute capability; a CPU call must not initialise CUDA."""
    probes = []
    backend = registry.BACKENDS["torch"]
    monkeypatch.setitem(registry.BACKENDS, "torch",
                        dataclasses.replace(backend, probe=lambda: probes.append(1) or "probed"))
    registry._probe.cache_clear()
    registry._DECISIONS.clear()
    try:
        q = torch.randn(1, 2, 4, 16)
        attention(q, q, q)
        cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]))
        assert probes == []
    finally:
        registry._probe.cache_clear()
        registry._DECISIONS.clear()


# -------------------------------------------------------------------------------- GPU
@pytest.fixture
def on_gpu():
    why = registry.BACKENDS["torch"].unavailable_reason()
    if why:
        pytest.skip(why)


def gpu_torch(test):
    """A GPU test of the torch backend (gpu_check runs it in the torch pass)."""
    for mark in (pytest.mark.backend("torch"), pytest.mark.gpu, pytest.mark.usefixtures("on_gpu")):
        test = mark(test)
    return test


@pytest.mark.parametrize("kernel", ["flash", "efficient"])
@gpu_torch
def test_gpu_seeded_generator_gives_the_kernels_seed_and_offset_zero(kernel):
    """The assumption the dropout mapping rests on, read back from the real kernels."""
    q = torch.randn(2, 64, 4, 64, dtype=BF16, device="cuda")
    gen = torch.cuda.default_generators[q.device.index]
    before = gen.get_state()
    with aten_attention._seeded(q.device, 12345, 0.1):
        if kernel == "flash":
            _, _, rng, *_ = torch.ops.aten._flash_attention_forward(q, q, q, None, None, 64, 64, 0.1, False, False)
            got = rng.view(torch.int64).tolist()
        else:
            _, _, s, o, *_ = torch.ops.aten._efficient_attention_forward(q, q, q, None, None, None, None, None, 0.1,
                                                                          0, True)
            got = [int(s), int(o)]
    assert got == [12345, 0]
    assert torch.equal(gen.get_state(), before)


@gpu_torch
@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize("padding", [False, True])
def test_gpu_padded_matches_float64(dtype, padding):
    q, k, v = qkv(4, 8, 2, 197, 197, 64, dtype, "cuda")
    mask = torch.arange(197, device="cuda")[None] >= torch.tensor([0, 17, 90, 197], device="cuda")[:, None]
    mask = mask if padding else None
    for causal in (False, True):
        out = attention(q, k, v, key_padding_mask=mask, causal=causal, backend="torch")
        expected = expected_attention(q, k, v, visible(197, 197, causal=causal, key_padding_mask=mask, device="cuda"))
        tol = 1e-4 if dtype == F32 else 2e-2
        assert_matches(out, expected, (q, k, v), tol, 3 * tol)


@gpu_torch
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_gpu_packed_matches_float64(dtype):
    lengths = [1, 77, 130, 40, 512]
    q, k, v, cu_q, cu_k, mq, mk = packed(lengths, lengths, 8, 2, 128, dtype, "cuda", same=True)
    for causal, window in ((True, None), ("bottom_right", 33), (False, None)):
        if dtype == F32 and window:
            continue
        out = varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=causal, window=window, backend="torch")
        expected = expected_packed(q, k, v, cu_q, cu_k, causal, window)
        tol = 1e-4 if dtype == F32 else 2e-2
        assert_matches(out, expected, (q, k, v), tol, 3 * tol)


@gpu_torch
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_gpu_cross_entropy_and_linear_matches_float64(dtype):
    logits = (torch.randn(64, 30522) * 3).to(dtype)
    labels = torch.randint(0, 30522, (64,))
    labels[::3] = IGNORE
    x = logits.cuda().requires_grad_()
    loss = cross_entropy(x, labels.cuda(), label_smoothing=0.1, z_loss=1e-3, backend="torch")
    ref = logits.double().requires_grad_()
    want = ce64(ref, labels, label_smoothing=0.1, z_loss=1e-3)
    tol = 1e-5 if dtype == F32 else 2e-2
    torch.testing.assert_close(loss.double().cpu(), want.detach(), rtol=tol, atol=tol)
    (g,) = torch.autograd.grad(loss, x)
    (w,) = torch.autograd.grad(want, ref)
    torch.testing.assert_close(g.double().cpu(), w, rtol=tol, atol=tol * 1e-2)
    hidden = torch.randn(300, 256, dtype=dtype, device="cuda", requires_grad=True)
    weight = (torch.randn(30522, 256, device="cuda") / 16).to(dtype).requires_grad_()
    labels = torch.randint(0, 30522, (300,), device="cuda")
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=64, backend="torch")
    want = lce64(hidden.detach().double().cpu().requires_grad_(), weight.detach().double().cpu(), labels.cpu())
    torch.testing.assert_close(loss.double().cpu(), want.detach(), rtol=tol, atol=tol)
