"""Property-based tests (hypothesis) of the public ops against the float64 truths of the op
tests (imported, never rewritten here): ``fastlm.ops.attention`` / ``varlen_attention``
(random batch, heads, grouped-query, lengths 1 and odd, padding left / right / holes / none,
every causal mode, windows, scale, layouts), ``softmax`` (shapes incl. a dimension of size 0,
dims, bool / additive broadcast masks, -inf rows, dtypes), ``cross_entropy`` and ``linear_cross_entropy`` (ignored
labels, all ignored, smoothing, z-loss, reductions, chunking), outputs and gradients, on
every CPU-testable backend (reference, cpu; triton under the interpreter with tiny sizes).

Every tensor of an example comes from a seed hypothesis draws, so the printed falsifying
example reproduces a failure.  CI runs a fixed (derandomized) set; ``FASTLM_FUZZ=1`` the big
run (tests/_fuzz.py).
"""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from _attention_targets import assert_close, target_skip_reason
from _attention_truth import attention_math, cu_seqlens, expected_attention, visible
from _backends import require_backend
from _cross_entropy_truth import IGNORE, ce64, lce64
from _fuzz import examples
from test_softmax import assert_close_to_truth, expected as softmax64

from fastlm.ops.attention import attention, varlen_attention
from fastlm.ops.cross_entropy import cross_entropy
from fastlm.ops.linear_cross_entropy import linear_cross_entropy
from fastlm.ops.softmax import softmax

SEEDS = st.integers(0, 2**32 - 1)


@pytest.fixture(params=["reference", "cpu"])
def host(request, poison):
    """The backends that run at full size on CPU tensors."""
    return request.param


def _require(request, op, name):
    """Skip (with the reason) when backend ``name`` cannot run ``op`` on CPU tensors here."""
    if op == "linear_cross_entropy":  # one chunk loop over the cross_entropy backends
        op = "cross_entropy"
    if op not in ("attention", "varlen_attention"):
        return require_backend(request, op, name)
    why = target_skip_reason(name, "cpu")
    if why:
        pytest.skip(f"{name}: {why}")
    return name


def fuzz(op, case, check, host_examples, interpreted_examples):
    """The two tests of one op: ``case(small=False)`` on the reference and cpu backends,
    ``case(small=True)`` on Triton under the interpreter; ``check(backend, case)`` asserts."""
    @examples(host_examples)
    @given(c=case(small=False))
    def on_host(request, host, c):
        check(_require(request, op, host), c)

    @examples(interpreted_examples)
    @given(c=case(small=True))
    def interpreted(request, poison, c):
        check(_require(request, op, "triton"), c)

    return on_host, interpreted


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, [t for t in inputs if t.requires_grad], dout, allow_unused=True)


def _assert_zero_where(actual, where, what):
    """Analytically zero entries (rows that see no key, keys no query sees) are judged absolutely."""
    bad = actual.detach()[where.expand_as(actual)]
    assert not bad.any(), f"{what}: {int(bad.ne(0).sum())} entries should be exactly 0, max |x| {bad.abs().max():.3g}"


# ------------------------------------------------------------------------ attention
@st.composite
def attention_case(draw, small):
    hk = draw(st.integers(1, 3))
    longest = 12 if small else 40
    sq = draw(st.integers(1, longest))
    return dict(
        batch=draw(st.integers(1, 3)), hk=hk, hq=hk * draw(st.integers(1, 3)), sq=sq,
        sk=draw(st.sampled_from([sq, draw(st.integers(1, longest))])),
        d=draw(st.integers(16, 40) if small else st.integers(1, 72)),
        causal=draw(st.sampled_from([False, True, "bottom_right"])),
        padding=draw(st.sampled_from([None, "left", "right", "holes"])),
        window=draw(st.none() | st.integers(1, longest + 2)),
        scale=draw(st.none() | st.floats(0.05, 2.0)),
        bshd=draw(st.booleans()), seed=draw(SEEDS))


def _padding(kind, batch, sk, gen):
    """(batch, sk) bool key mask, True = attend: left/right padding (lengths 0..sk) or holes."""
    if kind is None:
        return None
    if kind == "holes":
        return torch.rand(batch, sk, generator=gen) < 0.7
    lengths = torch.randint(0, sk + 1, (batch,), generator=gen)
    pos = torch.arange(sk)[None, :]
    return pos < lengths[:, None] if kind == "right" else pos >= (sk - lengths)[:, None]


def check_attention(backend, c):
    gen = torch.Generator().manual_seed(c["seed"])

    def rand(h, s):
        shape = (c["batch"], s, h, c["d"]) if c["bshd"] else (c["batch"], h, s, c["d"])
        t = torch.randn(shape, generator=gen)
        return (t.transpose(1, 2) if c["bshd"] else t).requires_grad_()

    q, k, v = rand(c["hq"], c["sq"]), rand(c["hk"], c["sk"]), rand(c["hk"], c["sk"])
    mask = _padding(c["padding"], c["batch"], c["sk"], gen)
    out = attention(q, k, v, key_padding_mask=mask, causal=c["causal"], window=c["window"], scale=c["scale"],
                    backend=backend)
    vis = visible(c["sq"], c["sk"], causal=c["causal"], key_padding_mask=mask, window=c["window"])
    want = expected_attention(q, k, v, vis, c["scale"])
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, want, 1e-4, "out")
    dout = torch.randn(out.shape, generator=gen)
    got_grads, want_grads = _grads(out, (q, k, v), dout), _grads(want, (q, k, v), dout.double())
    for name, got, ref in zip("qkv", got_grads, want_grads):
        assert_close(got, ref, 1e-4, f"d{name}")
    blind_rows = ~vis.any(-1, keepdim=True).expand(-1, c["hq"], -1, -1)  # queries that see no key
    unseen = ~vis.any(-2).expand(-1, c["hk"], -1)[..., None]              # keys no query sees
    _assert_zero_where(out, blind_rows, "output of a query that sees no key")
    _assert_zero_where(got_grads[0], blind_rows, "dq of a query that sees no key")
    for name, g in (("dk", got_grads[1]), ("dv", got_grads[2])):
        _assert_zero_where(g, unseen, f"{name} of a key no query sees")


# ------------------------------------------------------------------- varlen_attention
@st.composite
def varlen_case(draw, small):
    longest = 10 if small else 30
    lengths_q = draw(st.lists(st.integers(0, longest), min_size=1, max_size=4))
    same = draw(st.booleans())
    lengths_k = lengths_q if same else [draw(st.integers(0, longest)) for _ in lengths_q]
    # empty sequences are fine, an empty packed batch is refused (ValueError, documented)
    lengths_q = lengths_q if sum(lengths_q) else [1, *lengths_q[1:]]
    lengths_k = lengths_k if sum(lengths_k) else [1, *lengths_k[1:]]
    hk = draw(st.integers(1, 3))
    return dict(lengths_q=lengths_q, lengths_k=lengths_k, hk=hk, hq=hk * draw(st.integers(1, 3)),
                d=draw(st.integers(16, 40) if small else st.integers(1, 72)),
                causal=draw(st.sampled_from([False, True, "bottom_right"])),
                window=draw(st.none() | st.integers(1, longest + 2)),
                scale=draw(st.none() | st.floats(0.05, 2.0)),
                slack=draw(st.integers(0, 3)),  # max_seqlen may exceed the longest sequence
                seed=draw(SEEDS))


def check_varlen(backend, c):
    gen = torch.Generator().manual_seed(c["seed"])
    tq, tk = sum(c["lengths_q"]), sum(c["lengths_k"])
    q = torch.randn(tq, c["hq"], c["d"], generator=gen).requires_grad_()
    k = torch.randn(tk, c["hk"], c["d"], generator=gen).requires_grad_()
    v = torch.randn(tk, c["hk"], c["d"], generator=gen).requires_grad_()

    cu_q, cu_k = cu_seqlens(c["lengths_q"]), cu_seqlens(c["lengths_k"])
    out = varlen_attention(q, k, v, cu_q, cu_k, max(c["lengths_q"]) + c["slack"], max(c["lengths_k"]) + c["slack"],
                           causal=c["causal"], window=c["window"], scale=c["scale"], backend=backend)
    want = attention_math(*(t.double() for t in (q, k, v)), cu_seqlens=(cu_q, cu_k), causal=c["causal"],
                          window=c["window"], scale=c["scale"])[0]
    assert out.shape == q.shape
    assert_close(out, want, 1e-4, "out")
    dout = torch.randn(out.shape, generator=gen)
    for name, got, ref in zip("qkv", _grads(out, (q, k, v), dout), _grads(want, (q, k, v), dout.double())):
        assert_close(got if got is not None else torch.zeros_like(ref), ref if ref is not None else 0 * got,
                     1e-4, f"d{name}")


# --------------------------------------------------------------------------- softmax
@st.composite
def softmax_case(draw, small):
    shape = draw(st.lists(st.integers(1, 6 if small else 9) | st.just(0), min_size=1, max_size=4))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    kind = draw(st.sampled_from([None, "bool", "additive", "learned"]))
    mask_shape = None
    if kind is not None:  # broadcastable: drop leading dims, set others to 1
        lead = draw(st.integers(0, len(shape) - 1))
        mask_shape = [n if draw(st.booleans()) else 1 for n in shape[lead:]]
    neg_inf = draw(st.sampled_from([0.0, 0.2, 1.0]))  # share of -inf entries in x
    # (a scale <= 0 turns -inf into NaN / +inf: undefined, as in PyTorch)
    scale = draw(st.floats(0.05, 3.0) if neg_inf else st.floats(-3.0, 3.0))
    return dict(shape=shape, dim=dim, kind=kind, mask_shape=mask_shape, scale=scale, neg_inf=neg_inf,
                spread=draw(st.sampled_from([0.1, 1.0, 3.0, 30.0])),
                dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16])),
                seed=draw(SEEDS))


def check_softmax(backend, c):
    gen = torch.Generator().manual_seed(c["seed"])
    x = torch.randn(c["shape"], generator=gen) * c["spread"]
    x = x.masked_fill(torch.rand(c["shape"], generator=gen) < c["neg_inf"], -math.inf).to(c["dtype"])
    mask = None
    if c["kind"] == "bool":
        mask = torch.rand(c["mask_shape"], generator=gen) < 0.7
    elif c["kind"] is not None:
        mask = (torch.randn(c["mask_shape"], generator=gen) * 2).masked_fill(
            torch.rand(c["mask_shape"], generator=gen) < 0.2, -math.inf).to(c["dtype"])
    learned = c["kind"] == "learned" and c["dtype"] == torch.float32
    x.requires_grad_(c["dtype"] == torch.float32)
    if learned:
        mask = mask.masked_fill(mask == -math.inf, -1e4).requires_grad_()  # a learned bias is finite
    y = softmax(x, scale=c["scale"], mask=mask, dim=c["dim"], backend=backend)
    if x.numel() == 0:  # a dimension of size 0: an empty result and gradient, as PyTorch
        assert y.shape == x.shape and y.dtype == x.dtype
        if x.requires_grad:
            assert torch.autograd.grad(y.sum(), x)[0].shape == x.shape
        return
    assert_close_to_truth(y.detach(), x.detach(), c["scale"], None if mask is None else mask.detach(), c["dim"])
    if not x.requires_grad:
        return
    inputs = (x, mask) if learned else (x,)
    g = torch.randn(y.shape, generator=gen)
    got = torch.autograd.grad(y, inputs, g)
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    m64 = leaves[1] if learned else mask
    y64 = softmax64(leaves[0], c["scale"], m64, c["dim"])
    want = torch.autograd.grad(y64, leaves, g.double())
    # budget: 2x plain PyTorch's own fp32 error (large |scale * x| costs digits in exp), or 2e-6
    plain = [t.detach().requires_grad_() for t in inputs]
    z = plain[0] * c["scale"]
    if mask is not None:
        m = plain[1] if learned else mask
        z = z.masked_fill(~m, -math.inf) if m.dtype == torch.bool else z + m
    eager = torch.autograd.grad(torch.softmax(z, c["dim"]), plain, g)
    for name, a, b, e in zip(("dx", "dmask"), got, want, eager):
        scale = max(b.abs().max().item(), 1.0)
        err = (a.double() - b).abs().max().item()
        budget = max(2 * (e.nan_to_num(0.0).double() - b).abs().max().item(), 2e-6 * scale)
        assert err <= budget, f"{name}: max abs err {err:.3g} > budget {budget:.3g} (scale {scale:.3g})"
    # zero probability (-inf input, masked entry, fully masked row): dx = p * (...) is exactly 0
    assert not got[0][y64.detach() == 0].any(), "dx: nonzero where the probability is exactly 0"


# ------------------------------------------------------- cross_entropy, linear_cross_entropy
def _labels(shape, v, ignored, gen):
    y = torch.randint(0, v, shape, generator=gen)
    return y.masked_fill(torch.rand(shape, generator=gen) < ignored, IGNORE)


LOSS_OPTIONS = dict(
    ignored=st.sampled_from([0.0, 0.3, 0.9, 1.0]),  # 1.0: every label ignored
    label_smoothing=st.sampled_from([0.0, 0.0]) | st.floats(0.0, 1.0),
    z_loss=st.sampled_from([0.0, 0.0, 1e-4, 1e-2]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=SEEDS)


@st.composite
def ce_case(draw, small):
    return dict(lead=draw(st.lists(st.integers(1, 4 if small else 9), min_size=1, max_size=2)),
                v=draw(st.integers(1, 40 if small else 400)),
                spread=draw(st.sampled_from([0.1, 1.0, 5.0, 30.0, 1e3])),
                offset=draw(st.sampled_from([0.0, 0.0, 1e4, -3e4])),  # |logits| ~ 1e4: lse must not eat digits
                **{k: draw(s) for k, s in LOSS_OPTIONS.items()})


def _kw(c):
    return dict(label_smoothing=c["label_smoothing"], z_loss=c["z_loss"], reduction=c["reduction"])


def _assert_loss_close(got, want, what):
    """fp32 results vs the float64 truth: 1e-5 relative to max(|truth|, 1) (the op tests' bound)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite"
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
    assert err <= 1e-5 * scale, f"{what}: max abs err {err:.3g} (scale {scale:.3g})"


def check_cross_entropy(backend, c):
    gen = torch.Generator().manual_seed(c["seed"])
    logits = (torch.randn(*c["lead"], c["v"], generator=gen) * c["spread"] + c["offset"]).requires_grad_()
    labels = _labels(c["lead"], c["v"], c["ignored"], gen)
    loss = cross_entropy(logits, labels, backend=backend, **_kw(c))
    x64 = logits.detach().double().requires_grad_()
    want = ce64(x64, labels, **_kw(c))
    assert loss.dtype == torch.float32
    _assert_loss_close(loss.detach(), want.detach(), "loss")
    g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    (got_grad,) = torch.autograd.grad(loss, logits, g.float())
    (want_grad,) = torch.autograd.grad(want, x64, g)
    _assert_loss_close(got_grad, want_grad, "dlogits")
    assert not got_grad[labels == IGNORE].any(), "ignored rows must get exactly zero gradient"


@st.composite
def lce_case(draw, small):
    n = draw(st.integers(1, 6 if small else 40))
    return dict(n=n, h=draw(st.integers(1, 24)), v=draw(st.integers(1, 40 if small else 300)),
                bias=draw(st.booleans()), chunk=draw(st.none() | st.integers(1, n + 3)),
                **{k: draw(s) for k, s in LOSS_OPTIONS.items()})


def check_linear_cross_entropy(backend, c):
    gen = torch.Generator().manual_seed(c["seed"])
    hidden = torch.randn(c["n"], c["h"], generator=gen).requires_grad_()
    weight = (torch.randn(c["v"], c["h"], generator=gen) / c["h"] ** 0.5).requires_grad_()
    bias = torch.randn(c["v"], generator=gen).requires_grad_() if c["bias"] else None
    labels = _labels((c["n"],), c["v"], c["ignored"], gen)
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=c["chunk"], backend=backend, **_kw(c))
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight) + ((bias,) if c["bias"] else ())]
    want = lce64(*leaves[:2], labels, leaves[2] if c["bias"] else None, **_kw(c))
    assert loss.dtype == torch.float32
    _assert_loss_close(loss.detach(), want.detach(), "loss")
    g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    got = torch.autograd.grad(loss, inputs, g.float(), allow_unused=True)
    ref = torch.autograd.grad(want, leaves, g, allow_unused=True)
    for name, a, b in zip(("dhidden", "dweight", "dbias"), got, ref):
        b = torch.zeros_like(inputs[0 if name == "dhidden" else 1 if name == "dweight" else 2],
                             dtype=torch.float64) if b is None else b
        a = torch.zeros_like(b, dtype=torch.float32) if a is None else a
        _assert_loss_close(a, b, name)
    if got[0] is not None:
        assert not got[0][labels == IGNORE].any(), "ignored rows must get exactly zero gradient"


test_attention, test_attention_triton_interpreted = fuzz("attention", attention_case, check_attention, 40, 6)
test_varlen_attention, test_varlen_attention_triton_interpreted = fuzz(
    "varlen_attention", varlen_case, check_varlen, 40, 6)
test_softmax, test_softmax_triton_interpreted = fuzz("softmax", softmax_case, check_softmax, 60, 10)
test_cross_entropy, test_cross_entropy_triton_interpreted = fuzz(
    "cross_entropy", ce_case, check_cross_entropy, 60, 10)
test_linear_cross_entropy, test_linear_cross_entropy_triton_interpreted = fuzz(
    "linear_cross_entropy", lce_case, check_linear_cross_entropy, 40, 8)
