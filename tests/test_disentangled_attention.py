"""fastlm.ops.disentangled_attention / varlen_disentangled_attention against a float64 truth
written here from DeBERTa's formulas (not by calling transformers, nor fastlm's reference):

    s_ij = scale * (q_i.k_j + q_i.pos_key[t] + k_j.pos_query[t]),  t = clamp(bucket(i - j) + R/2, 0, R - 1)
    bucket(d) = d for |d| <= mid = position_buckets // 2, else
                sign(d) * (mid + ceil(log(|d| / mid) / log((max_relative_positions - 1) / mid) * (mid - 1)))

with the positional rows gathered per (i, j) explicitly, softmax over visible keys, dropout,
``@ v``; gradients by float64 autograd through it.  Every backend that can run here is tested
(reference, cpu, Triton under TRITON_INTERPRET=1 on tiny shapes), outputs NaN-poisoned.
"""
import math

import pytest
import torch

from fastlm import _ext, registry
from fastlm.ops.disentangled_attention import (disentangled_attention, relative_slots,
                                               varlen_disentangled_attention)
from fastlm.registry import BackendError

from _attention_targets import assert_close, assert_within_eager  # noqa: E402
from _attention_truth import softmax_times_v  # noqa: E402
from _backends import gpu_params, require_backend  # noqa: E402

TARGETS = [
    pytest.param(("reference", "cpu"), id="reference"),
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("triton", "cpu"), id="triton"),
    *gpu_params(["reference", "triton"], value=lambda backend: (backend, "cuda")),
]


class Target:
    def __init__(self, backend, device):
        self.backend, self.device = backend, device

    @property
    def interpreted(self) -> bool:
        return self.backend == "triton" and self.device == "cpu"


@pytest.fixture(params=TARGETS)
def target(request, poison):
    backend, device = request.param
    why = registry.BACKENDS[backend].unavailable_reason()
    if why:
        pytest.skip(f"{backend}: {why}")
    if backend == "triton" and (device == "cpu") != registry.triton_interpreted():
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1 (and on GPU ones only without it)")
    if backend == "cpu" and not hasattr(_ext.kernels(), "disentangled_attention_forward"):
        pytest.skip("fastlm._C was built without the disentangled_attention kernels")
    return Target(backend, device)


# --------------------------------------------------------------------- float64 truth
def truth_bucket(d: int, buckets: int, max_rel: int) -> int:
    if buckets <= 0:
        return d
    mid = buckets // 2
    if abs(d) <= mid:
        return d
    return int(math.copysign(mid + math.ceil(math.log(abs(d) / mid) / math.log((max_rel - 1) / mid) * (mid - 1)), d))


def truth_slot(d: int, slots: int, buckets: int, max_rel: int) -> int:
    return min(max(truth_bucket(d, buckets, max_rel) + slots // 2, 0), slots - 1)


def truth_slots(length: int, slots: int, buckets: int, max_rel: int) -> torch.Tensor:
    """(length, length) long: the positional row of query i, key j."""
    by_distance = torch.tensor([truth_slot(d, slots, buckets, max_rel) for d in range(1 - length, length)])
    pos = torch.arange(length)
    return by_distance[pos[:, None] - pos[None, :] + length - 1]


def truth(q, k, v, pos_key, pos_query, slots, key_mask=None, scale=None, keep=None, dropout_p=0.0):
    """(B, H, L, D) DeBERTa attention in float64 (differentiable); rows with no visible key -> 0."""
    q, k, v = q.double(), k.double(), v.double()
    terms = 1 + (pos_key is not None) + (pos_query is not None)
    scale = 1.0 / math.sqrt(q.shape[-1] * terms) if scale is None else scale
    s = torch.einsum("bhid,bhjd->bhij", q, k)
    if pos_key is not None:  # q_i . pos_key[slot(i, j)]
        s = s + torch.einsum("bhid,hijd->bhij", q, pos_key.double()[:, slots.to(q.device)])
    if pos_query is not None:  # k_j . pos_query[slot(i, j)]
        s = s + torch.einsum("bhjd,hijd->bhij", k, pos_query.double()[:, slots.to(q.device)])
    visible = None if key_mask is None else key_mask[:, None, None, :]
    return softmax_times_v(s * scale, v, visible, keep, dropout_p)[0]


def truth_and_grads(inputs, dout, slots, mask):
    """The float64 truth's output and its gradients w.r.t. float64 copies of ``inputs`` (q, k,
    v, pos_key, pos_query): gradients of the low-precision leaves themselves would come back
    rounded to their dtype."""
    wide = [t.detach().double().requires_grad_() for t in inputs]
    out = truth(*wide, slots, mask)
    return out, torch.autograd.grad(out, wide, dout.double())


# ------------------------------------------------------------------------------ inputs
def make_inputs(b, h, length, d, slots, c2p=True, p2c=True, dtype=torch.float32, bshd=False, device="cpu"):
    """q, k, v (B, H, L, D) (``bshd``: transposed views of (B, L, H, D), as transformers makes them)
    and the positional tables (H, R, D) (``bshd``: views of (R, H, D)) or None, all requiring grad."""
    def qkv():
        t = torch.randn(b, length, h, d, dtype=dtype, device=device).transpose(1, 2) if bshd else \
            torch.randn(b, h, length, d, dtype=dtype, device=device)
        return t.requires_grad_(True)

    def table(on):  # bshd: (R, H, D) in memory, as transformers projects the relative embeddings
        if not on:
            return None
        t = torch.randn(slots, h, d, dtype=dtype, device=device).transpose(0, 1) if bshd else \
            torch.randn(h, slots, d, dtype=dtype, device=device)
        return t.requires_grad_(True)

    return qkv(), qkv(), qkv(), table(c2p), table(p2c)


def padding_mask(b, length, side, device="cpu"):
    """(b, length) bool with lengths length, length - 3, ... (at least 1); None for side None."""
    if side is None:
        return None
    lengths = torch.tensor([max(length - 3 * i, 1) for i in range(b)], device=device)
    pos = torch.arange(length, device=device)[None, :]
    return pos < lengths[:, None] if side == "right" else pos >= (length - lengths)[:, None]


def leaves(*tensors):
    return [t for t in tensors if t is not None]


def check_grads(out, expected, inputs, tol):
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, dout)
    want = torch.autograd.grad(expected, inputs, dout.double())
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == inputs[i].shape and g.dtype == inputs[i].dtype
        assert_close(g, w, tol, f"gradient of input {i}")


# (batch, heads, length, head_dim, position_buckets, max_relative_positions, R, c2p, p2c, padding, bshd)
CASES = [
    (1, 1, 1, 16, 8, 32, 16, True, True, None, False),       # length 1
    (2, 2, 7, 32, 4, 16, 8, True, True, "right", True),     # longer than position_buckets
    (3, 2, 37, 16, 8, 32, 16, True, True, "left", False),   # many log buckets, clamped slots
    (2, 3, 13, 64, -1, 6, 12, True, False, "right", False),  # no buckets, c2p only, |d| > span clamps
    (2, 2, 11, 128, 6, 20, 12, False, True, "left", True),   # p2c only, head_dim 128
    (2, 2, 9, 32, 4, 16, 8, False, False, "right", False),   # no positional term
    (3, 2, 97, 64, 16, 64, 32, True, True, "right", True),  # odd, several 64-query blocks
    (1, 4, 300, 64, 256, 512, 512, True, True, None, True),  # DeBERTa-v3 buckets, > 256 keys
]
INTERPRETER_CASES = {0, 1, 2, 3, 5}


@pytest.mark.parametrize("case", range(len(CASES)))
def test_padded_matches_float64(target, case):
    if target.interpreted and case not in INTERPRETER_CASES:
        pytest.skip("shape too slow for the Triton interpreter")
    b, h, length, d, buckets, max_rel, slots, c2p, p2c, padding, bshd = CASES[case]
    q, k, v, pk, pq = make_inputs(b, h, length, d, slots, c2p, p2c, bshd=bshd, device=target.device)
    mask = padding_mask(b, length, padding, target.device)
    out = disentangled_attention(q, k, v, pk, pq, key_padding_mask=mask, position_buckets=buckets,
                                 max_relative_positions=max_rel, backend=target.backend)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride() == q.stride()
    expected = truth(q, k, v, pk, pq, truth_slots(length, slots, buckets, max_rel), mask)
    assert_close(out, expected, 1e-4, "out")
    check_grads(out, expected, leaves(q, k, v, pk, pq), 1e-4)


# lengths per packed sequence (0: an empty sequence, 1: a lone token)
PACKED = [([1, 7, 1, 0, 20], 8, 32, 16), ([5, 1, 1], -1, 8, 8), ([260, 3, 1, 130], 256, 512, 512)]


@pytest.mark.parametrize("case", range(len(PACKED)))
def test_packed_matches_float64_per_sequence(target, case):
    """Positions restart at every sequence; a sequence never sees another's keys."""
    lengths, buckets, max_rel, slots = PACKED[case]
    if target.interpreted and max(lengths) > 64:
        pytest.skip("shape too slow for the Triton interpreter")
    h, d = 2, 32
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, d, device=target.device, requires_grad=True) for _ in range(3))
    pk, pq = (torch.randn(h, slots, d, device=target.device, requires_grad=True) for _ in range(2))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=target.device)
    out = varlen_disentangled_attention(q, k, v, pk, pq, cu, max(lengths), position_buckets=buckets,
                                        max_relative_positions=max_rel, backend=target.backend)
    parts, start = [], 0
    for n in lengths:
        if n:
            one = [t[start:start + n].transpose(0, 1)[None] for t in (q, k, v)]
            parts.append(truth(*one, pk, pq, truth_slots(n, slots, buckets, max_rel))[0].transpose(0, 1))
        start += n
    expected = torch.cat(parts)
    assert_close(out, expected, 1e-4, "out")
    check_grads(out, expected, [q, k, v, pk, pq], 1e-4)


def test_fully_masked_rows_give_zeros_and_zero_gradients(target):
    b, h, length, d, slots = 3, 2, 9, 16, 8
    q, k, v, pk, pq = make_inputs(b, h, length, d, slots, device=target.device)
    mask = padding_mask(b, length, "right", target.device)
    mask[1] = False  # batch row 1: no key at all
    out = disentangled_attention(q, k, v, pk, pq, key_padding_mask=mask, position_buckets=4,
                                 max_relative_positions=16, backend=target.backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.equal(g[1], torch.zeros_like(g[1])), f"{name} of the masked row"  # exact zeros
    assert_close(out, truth(q, k, v, pk, pq, truth_slots(length, slots, 4, 16), mask), 1e-4, "out")


# ----------------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_2x_eager_error(target, dtype):
    """bf16 / fp16 output and gradients err at most 2x what the same formula computed by plain
    PyTorch in that dtype (transformers' eager path: products and softmax in the dtype) errs."""
    b, h, length, d, buckets, max_rel, slots = 2, 2, 37 if not target.interpreted else 19, 64, 8, 32, 16
    q, k, v, pk, pq = make_inputs(b, h, length, d, slots, dtype=dtype, device=target.device)
    mask = padding_mask(b, length, "right", target.device)
    table = truth_slots(length, slots, buckets, max_rel)
    out = disentangled_attention(q, k, v, pk, pq, key_padding_mask=mask, position_buckets=buckets,
                                 max_relative_positions=max_rel, backend=target.backend)
    eager = _eager(q, k, v, pk, pq, table.to(target.device), mask)
    dout = torch.randn_like(out)
    inputs = [q, k, v, pk, pq]
    expected, wanted = truth_and_grads(inputs, dout, table, mask)
    assert_within_eager(out, eager, expected, 2.0, f"{dtype} out")
    for i, (g, e, w) in enumerate(zip(torch.autograd.grad(out, inputs, dout), torch.autograd.grad(eager, inputs, dout),
                                      wanted)):
        assert_within_eager(g, e, w, 2.0, f"{dtype} gradient of input {i}")


# (length, head_dim, visible keys per sequence, q scale): sequences of one to three tokens
# and peaked softmaxes, where delta = rowsum(dO * O) taken from the 16-bit output would err
# far beyond plain PyTorch (see kernels/attention.py); 32 independent problems each.
FEW_KEYS_CASES = [(1, 64, 1, 1.0), (2, 64, 1, 4.0), (3, 16, 2, 3.0), (7, 64, 2, 4.0)]


@pytest.mark.parametrize("case", range(len(FEW_KEYS_CASES)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_few_keys_or_peaked_within_eager(target, dtype, case):
    """Per (batch, head) problem, for rows that see one or two keys: out within 2x, gradients
    within 3x plain PyTorch's error (attention's rule, tests/test_attention.py).  A query that
    sees one key has analytically zero dQ and dK, judged absolutely: up to 1e-5, the fp32
    rounding of its log-sum-exp (|s| * 2^-24 off an exact P = 1, times dP ~ 10), a hundred
    times below the 16-bit outputs' resolution."""
    length, d, seen, peak = FEW_KEYS_CASES[case]
    b, h, slots = 4, 8, 8
    q, k, v, pk, pq = (t.detach() for t in make_inputs(b, h, length, d, slots, dtype=dtype, device=target.device))
    q = (q.float() * peak).to(dtype)
    q, k, v, pk, pq = (t.requires_grad_() for t in (q, k, v, pk, pq))
    mask = torch.arange(length, device=target.device)[None, :] < seen  # the first `seen` keys only
    mask = mask.expand(b, length)
    table = truth_slots(length, slots, 4, 16)
    out = disentangled_attention(q, k, v, pk, pq, key_padding_mask=mask, position_buckets=4,
                                 max_relative_positions=16, backend=target.backend)
    eager = _eager(q, k, v, pk, pq, table.to(target.device), mask)
    dout = torch.randn_like(out)
    expected, wanted = truth_and_grads([q, k, v, pk, pq], dout, table, mask)
    assert_within_eager(out, eager, expected, 2.0, f"{dtype} out", per_problem=True)
    inputs = [q, k, v]  # the tables' gradients sum over the batch: judged in the test above
    for i, (g, e, w) in enumerate(zip(torch.autograd.grad(out, inputs, dout), torch.autograd.grad(eager, inputs, dout),
                                      wanted[:3])):
        assert_within_eager(g, e, w, 3.0, f"{dtype} gradient of input {'qkv'[i]}", per_problem=True, floor=1e-5)


def _eager(q, k, v, pk, pq, slots, mask):
    """transformers' dense formula in q's dtype: bmm products, gathers, masked softmax, bmm."""
    scale = 1.0 / math.sqrt(q.shape[-1] * 3)
    index = slots.expand(*q.shape[:2], *slots.shape)
    s = q @ k.transpose(-1, -2) + torch.gather(q @ pk.transpose(-1, -2), -1, index) + \
        torch.gather(k @ pq.transpose(-1, -2), -1, index.transpose(-1, -2)).transpose(-1, -2)
    s = (s * scale).masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(s, -1) @ v


# ------------------------------------------------------------------------------ dropout
def recover_keep(target, b, h, length, d, slots, p, seed, mask=None):
    """The dropout keep-mask of a call, read off by attending to v = identity: out[i, j] =
    P_ij keep_ij / (1 - p) with every visible P_ij > 0; the mask depends on the seed and the
    shapes only, not on the inputs."""
    assert length <= d
    q, k, _, pk, pq = (t.detach() * 0.3 if t is not None else None
                       for t in make_inputs(b, h, length, d, slots, device=target.device))
    v = torch.eye(length, d, device=target.device).expand(b, h, length, d)
    torch.manual_seed(seed)
    out = disentangled_attention(q, k, v, pk, pq, key_padding_mask=mask, position_buckets=4,
                                 max_relative_positions=16, dropout_p=p, backend=target.backend)
    return out[..., :length] > 0


def test_dropout_keep_rate_and_scaling(target):
    b, h, length, d, slots, p = 2, 2, 16, 64, 8, 0.3
    zeros = torch.zeros(b, h, length, d, device=target.device)  # all scores 0: probabilities 1/L
    table = torch.zeros(h, slots, d, device=target.device)
    v = torch.eye(length, d, device=target.device).expand(b, h, length, d)
    out = disentangled_attention(zeros, zeros, v, table, table, position_buckets=4, max_relative_positions=16,
                                 dropout_p=p, backend=target.backend)[..., :length]
    kept = out > 0
    assert_close(out[kept], torch.full_like(out[kept], 1.0 / (length * (1 - p))), 1e-5, "kept probability")
    rate = kept.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / kept.numel()), f"keep rate {rate:.4f}, expected {1 - p}"


def test_dropout_same_seed_same_result(target):
    q, k, v, pk, pq = make_inputs(1, 2, 9, 32, 8, device=target.device)
    results = []
    for seed in (123, 123, None):
        if seed is not None:
            torch.manual_seed(seed)
        results.append(disentangled_attention(q, k, v, pk, pq, position_buckets=4, max_relative_positions=16,
                                              dropout_p=0.5, backend=target.backend))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_dropout_forward_and_backward_use_one_mask(target):
    """Output and every gradient equal the float64 truth with the keep-mask recovered from the forward."""
    b, h, length, d, slots, p, seed = 2, 2, 13, 32, 8, 0.4, 77
    mask = padding_mask(b, length, "right", target.device)
    keep = recover_keep(target, b, h, length, d, slots, p, seed, mask)
    q, k, v, pk, pq = make_inputs(b, h, length, d, slots, device=target.device)
    torch.manual_seed(seed)
    out = disentangled_attention(q, k, v, pk, pq, key_padding_mask=mask, position_buckets=4,
                                 max_relative_positions=16, dropout_p=p, backend=target.backend)
    expected = truth(q, k, v, pk, pq, truth_slots(length, slots, 4, 16), mask, keep=keep, dropout_p=p)
    assert_close(out, expected, 1e-4, "out")
    check_grads(out, expected, [q, k, v, pk, pq], 1e-4)


# ------------------------------------------------------------------------ relative slots
@pytest.mark.parametrize("buckets,max_rel,slots", [(256, 512, 512), (8, 32, 16), (6, 20, 12), (-1, 24, 16)])
def test_relative_slots_equal_the_written_formula(buckets, max_rel, slots):
    length = 2000
    table = relative_slots(length, slots, buckets, max_rel, "cpu")
    expected = torch.tensor([truth_slot(d, slots, buckets, max_rel) for d in range(1 - length, length)])
    assert table.dtype == torch.int32 and torch.equal(table.long(), expected)


# ----------------------------------------------------------------------- registration
@pytest.mark.parametrize("c2p,p2c,dropout_p", [(True, True, 0.0), (False, True, 0.3), (True, False, 0.0)])
def test_reference_gradcheck(c2p, p2c, dropout_p):
    q, k, v, pk, pq = make_inputs(2, 2, 5, 3, 4, c2p, p2c, dtype=torch.float64)
    mask = padding_mask(2, 5, "left")

    def fn(*tensors):
        torch.manual_seed(5)  # the same dropout mask on every evaluation
        it = iter(tensors)
        q, k, v = next(it), next(it), next(it)
        return disentangled_attention(q, k, v, next(it) if c2p else None, next(it) if p2c else None,
                                      key_padding_mask=mask, position_buckets=2, max_relative_positions=4,
                                      dropout_p=dropout_p, backend="reference")

    assert torch.autograd.gradcheck(fn, tuple(leaves(q, k, v, pk, pq)))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(request, backend):
    require_backend(request, "disentangled_attention", backend)
    q, k, v, pk, pq = make_inputs(2, 2, 7, 16, 8, bshd=True)
    mask = padding_mask(2, 7, "left")
    slots = relative_slots(7, 8, 4, 16, "cpu")
    seed = torch.tensor([3], dtype=torch.int64)
    args = (q, k, v, pk, pq, slots, mask, None, 0, 0.2, 0.25, seed, backend)
    torch.library.opcheck(torch.ops.fastlm.disentangled_attention.default, args)
    out, lse = torch.ops.fastlm.disentangled_attention(*args)
    torch.library.opcheck(torch.ops.fastlm.disentangled_attention_backward.default,
                          (torch.randn_like(out), *(t.detach() for t in (q, k, v, pk, pq)), slots, out.detach(), lse,
                           mask, None, 0, 0.2, 0.25, seed, backend))


def test_torch_compile_fullgraph():
    q, k, v, pk, pq = make_inputs(2, 2, 9, 16, 8)
    mask = padding_mask(2, 9, "right")

    def fn(q, k, v, pk, pq):
        return disentangled_attention(q, k, v, pk, pq, key_padding_mask=mask, position_buckets=4,
                                      max_relative_positions=16).sin()

    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, pk, pq)
    want = fn(q, k, v, pk, pq)
    assert_close(got, want, 1e-6, "compiled out")
    inputs = [q, k, v, pk, pq]
    for i, (a, e) in enumerate(zip(torch.autograd.grad(got.sum(), inputs), torch.autograd.grad(want.sum(), inputs))):
        assert_close(a, e, 1e-6, f"compiled gradient {i}")


# ---------------------------------------------------------------------------- bad input
def _bad_inputs():
    q, k, v, pk, pq = (t.detach() for t in make_inputs(2, 2, 5, 16, 8))
    ok = dict(position_buckets=4, max_relative_positions=16)
    return [
        ((q, k[:, :, :4], v), {}, ValueError, "same shape"),
        ((q[0], k[0], v[0]), {}, ValueError, "q must be 4-dimensional"),
        ((q, k, v.long()), {}, TypeError, "v must have dtype"),
        ((q, k, v, pk[:, :7]), ok, ValueError, r"R even and >= 2"),
        ((q, k, v, pk[:1]), ok, ValueError, r"pos_key must have shape \(heads, 2 \* span, head_dim\)"),
        ((q, k, v, pk, pq[:, :6]), ok, ValueError, "pos_key and pos_query must have the same shape"),
        ((q, k, v, pk.double()), ok, TypeError, "pos_key has dtype float64 but q has float32"),
        ((q, k, v, pk), dict(position_buckets=8, max_relative_positions=5), ValueError, "must exceed"),
        ((q, k, v, pk), dict(position_buckets=4.0), TypeError, "position_buckets must be an int"),
        ((q, k, v), {"key_padding_mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError, "key_padding_mask"),
        ((q, k, v), {"dropout_p": 1.0}, ValueError, "dropout_p must be in"),
        ((q, k, v), {"scale": float("inf")}, ValueError, "scale must be finite"),
        ((q, k, v), {"backend": "fast"}, ValueError, "backend must be 'auto' or one of"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_inputs())))
def test_bad_input_raises_clearly(index):
    args, kwargs, exc, match = _bad_inputs()[index]
    with pytest.raises(exc, match=match):
        disentangled_attention(*args, **kwargs)


def test_varlen_bad_input_raises_clearly():
    q = torch.randn(5, 2, 16)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen"):
        varlen_disentangled_attention(q, q, q, None, None, cu, 2)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal"):
        varlen_disentangled_attention(q, q, q, None, None, cu[:2], 3)


def test_backend_errors(monkeypatch):
    q, k, v, pk, pq = (t.detach() for t in make_inputs(1, 2, 3, 16, 4))
    with pytest.raises(BackendError, match="backend 'cpu' cannot serve this input: .*float64"):
        disentangled_attention(q.double(), k.double(), v.double(), backend="cpu")
    if registry.BACKENDS["triton"].unavailable_reason() is None:
        with pytest.raises(BackendError, match="head_dim 8 outside 16..128"):
            disentangled_attention(q[..., :8], k[..., :8], v[..., :8], backend="triton")
    monkeypatch.setenv("FASTLM_BACKEND", "cuda")
    with pytest.raises(BackendError, match="backend 'cuda' has no kernel for this op"):
        disentangled_attention(q, k, v)


def test_gradients_are_deterministic(target):
    """The same call twice gives bit-identical gradients (the C++ kernel sums the positional
    tables' gradients in a fixed order; Triton's atomic scatter does not promise it)."""
    if target.backend == "triton":
        pytest.skip("atomic adds: the summation order of dpos_key / dpos_query is not fixed")
    lengths = [30, 3, 17, 30]
    q, k, v, pk, pq = make_inputs(len(lengths), 3, 30, 16, 16, device=target.device)
    mask = torch.arange(30, device=target.device)[None] < torch.tensor(lengths, device=target.device)[:, None]
    runs = []
    for _ in range(2):
        out = disentangled_attention(q, k, v, pk, pq, key_padding_mask=mask, position_buckets=8,
                                     max_relative_positions=32, backend=target.backend)
        runs.append(torch.autograd.grad(out, [q, k, v, pk, pq], torch.ones_like(out)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
