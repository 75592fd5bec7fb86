"""fastlm.ops.softmax (fused scale -> mask -> softmax -> dropout) on every backend.

Every result is checked against a float64 computation written here (``expected``),
never against the code under test.  Backends: reference, cpu (C++, skipped without
fastlm._C) and triton (interpreted on CPU: tiny shapes).  GPU cases (triton, cuda on
a CUDA device) are marked ``gpu`` and skipped without one.
"""
import math

import pytest
import torch
from _backends import CPU_TESTABLE, gpu_params, require_backend

import fastlm
from fastlm.ops import softmax

# one unit in the last place at 1.0: what rounding the result to the dtype may cost
FLOOR = {torch.float32: 6e-8, torch.float16: 4.9e-4, torch.bfloat16: 3.9e-3, torch.float64: 1e-15}


@pytest.fixture(params=CPU_TESTABLE)
def backend(request, poison):
    return require_backend(request, "softmax", request.param)


def expected(x, scale=1.0, mask=None, dim=-1):
    """float64 scale -> mask -> softmax, with all -inf rows giving zeros."""
    z = x.double() * scale
    if mask is not None:
        z = z.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else z + mask.double()
    zmax = z.amax(dim, keepdim=True)
    zmax = torch.where(zmax == -math.inf, torch.zeros_like(zmax), zmax)
    e = torch.exp(z - zmax)
    total = e.sum(dim, keepdim=True)
    return e / torch.where(total == 0, torch.ones_like(total), total)


def torch_in_dtype(x, scale, mask, dim):
    """Plain PyTorch in x's dtype: the error budget is ~2x this one's."""
    z = x * scale
    if mask is not None:
        z = z.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else z + mask
    return torch.softmax(z, dim).nan_to_num(0.0)


def assert_close_to_truth(y, x, scale=1.0, mask=None, dim=-1):
    truth = expected(x, scale, mask, dim)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert not torch.isnan(y).any(), "NaN in output"
    err = (y.double() - truth).abs().max().item()
    budget = 2 * (torch_in_dtype(x, scale, mask, dim).double() - truth).abs().max().item()
    assert err <= max(budget, FLOOR[x.dtype]), f"error {err:.3g} > budget {budget:.3g}"


def rand_x(*shape, dtype=torch.float32, spread=3.0):
    return (torch.randn(*shape) * spread).to(dtype)


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3, 97, 1000])
def test_forward_with_masks_and_inf(backend, dtype, n):
    if backend == "triton" and n == 1000:
        n = 37  # interpreter: keep it tiny
    x = rand_x(2, 3, n, dtype=dtype)
    x[0, 1, : n // 2 + 1] = -math.inf  # -inf entries (the whole row when n == 1)
    x[1, 2, 0] = -math.inf
    masks = [None, torch.rand(2, 1, n) > 0.3, torch.randn(3, n).to(dtype)]
    for mask in masks:
        y = softmax(x, scale=0.7, mask=mask, backend=backend)
        assert_close_to_truth(y, x, 0.7, mask)


@pytest.mark.parametrize("backend_name, n", [("reference", 4097), ("reference", 70000), ("cpu", 4097),
                                              ("cpu", 70000), ("triton", 70000)])
def test_long_rows(request, backend_name, n):
    backend = require_backend(request, "softmax", backend_name)
    rows = 1 if backend == "triton" else 3
    x = rand_x(rows, n, spread=4.0)
    mask = torch.rand(n) > 0.1
    y = softmax(x, scale=0.5, mask=mask, backend=backend)
    assert_close_to_truth(y, x, 0.5, mask)


@pytest.mark.parametrize("shape", [(1, 3, 4, 5), (2, 1, 4, 5), (2, 3, 1, 5), (2, 3, 4, 1), (5,), (4, 1), (2, 1, 1, 5)])
def test_mask_broadcast_along_each_dim(backend, shape):
    x = rand_x(2, 3, 4, 5)
    bool_mask = torch.rand(shape) > 0.3
    additive = torch.randn(shape)
    for mask in (bool_mask, additive):
        y = softmax(x, mask=mask, backend=backend)
        assert_close_to_truth(y, x, 1.0, mask)


def test_mask_view_is_never_expanded():
    from fastlm.ops.softmax import _mask_view

    mask = torch.rand(2, 1, 1, 64) > 0.5  # (batch, 1, 1, keys) over (2, 8, 16, 64) scores
    view = _mask_view(mask, torch.Size((2, 8, 16, 64)), 3)
    # heads and queries (both broadcast) merge into one stride-0 dim of 128 rows
    assert view.shape == (1, 2, 128, 64) and view.stride() == (0, 64, 0, 1)
    assert view.data_ptr() == mask.data_ptr()
    assert view.untyped_storage().nbytes() == mask.untyped_storage().nbytes()


@pytest.mark.parametrize("dim", [0, 1, -2])
def test_any_dim_and_non_contiguous_input(backend, dim):
    base = rand_x(6, 5, 8)
    x = base.transpose(0, 2)[:, ::2]  # (8, 3, 6), non-contiguous
    assert not x.is_contiguous()
    mask_shape = [1, 1, 1]
    mask_shape[dim] = x.shape[dim]
    mask = torch.rand(mask_shape) > 0.2
    y = softmax(x, scale=1.3, mask=mask, dim=dim, backend=backend)
    assert_close_to_truth(y, x, 1.3, mask, dim)


def test_fp16_extremes(backend):
    x = torch.tensor([[65504.0, 65000.0, -65504.0, 0.0, 60000.0],
                      [-65504.0, -65504.0, -65000.0, -60000.0, -65504.0],
                      [-math.inf, 65504.0, -math.inf, 1.0, -1.0]], dtype=torch.float16)
    for scale in (1.0, 0.125):
        y = softmax(x, scale=scale, backend=backend)
        assert_close_to_truth(y, x, scale)


def test_fully_masked_rows_give_zeros_and_zero_grads(backend):
    x = rand_x(3, 4, 9).requires_grad_()
    mask = torch.ones(3, 1, 9, dtype=torch.bool)
    mask[1] = False  # every row of batch 1 fully masked
    with torch.no_grad():
        x[0, 2] = -math.inf  # an all -inf row, no mask needed
    y = softmax(x, mask=mask, backend=backend)
    assert torch.equal(y[1], torch.zeros_like(y[1])) and torch.equal(y[0, 2], torch.zeros_like(y[0, 2]))
    y.backward(torch.randn_like(y))
    assert not torch.isnan(x.grad).any()
    assert torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
    assert torch.equal(x.grad[0, 2], torch.zeros_like(x.grad[0, 2]))


def test_nan_and_empty_follow_pytorch(backend):
    x = rand_x(2, 6)
    x[0, 3] = math.nan
    y = softmax(x, backend=backend)
    assert torch.isnan(y[0]).all() and not torch.isnan(y[1]).any()
    assert softmax(torch.empty(0, 5), backend=backend).shape == (0, 5)


@pytest.mark.parametrize("shape,dim", [((3, 0), -1), ((3, 0), 0), ((2, 0, 4), 1), ((2, 0, 4), 2), ((0,), 0)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_empty_tensors_forward_and_backward(backend, shape, dim, dropout_p):
    """A softmax over (or beside) a dimension of size 0 is an empty tensor, as in PyTorch,
    and so is its gradient, with or without a mask."""
    x = torch.randn(shape, requires_grad=True)
    mask = torch.ones(shape[-1:], dtype=torch.bool)
    for m in (None, mask):
        y = softmax(x, dim=dim, mask=m, dropout_p=dropout_p, backend=backend)
        want = torch.nn.functional.softmax(x, dim)
        assert y.shape == want.shape and y.dtype == want.dtype
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert dx.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bool_mask_hides_nan_and_inf_scores(backend, dtype):
    """Dropped positions are replaced (masked_fill), so garbage there cannot leak."""
    x = rand_x(3, 2, 67, dtype=dtype)
    keep = torch.rand(3, 1, 67) > 0.3
    keep[..., :2] = False
    x[..., 0], x[..., 1] = math.nan, math.inf
    assert_close_to_truth(softmax(x, scale=0.5, mask=keep, backend=backend), x, 0.5, keep)


# -------------------------------------------------------------------------- backward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_float64(backend, dtype):
    n = 37 if backend == "triton" else 300
    x = rand_x(2, 3, n, dtype=dtype).requires_grad_()
    mask = torch.randn(3, n).to(dtype).requires_grad_()  # additive, learned (gets a gradient)
    keep = torch.rand(2, 1, n) > 0.2
    g = torch.randn(2, 3, n).to(dtype)
    for m in (keep, mask):
        y = softmax(x, scale=0.6, mask=m, backend=backend)
        grads = torch.autograd.grad(y, (x, m) if m.requires_grad else (x,), g)
        x64 = x.detach().double().requires_grad_()
        m64 = m.detach().double().requires_grad_() if m.requires_grad else m
        want = torch.autograd.grad(expected(x64, 0.6, m64), (x64, m64) if m.requires_grad else (x64,), g.double())
        for got, ref in zip(grads, want):
            tol = 1e-6 if dtype == torch.float32 else 2e-2 * ref.abs().max().item()
            assert (got.double() - ref).abs().max().item() <= tol


def test_gradcheck_reference():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: softmax(a, scale=0.7, mask=b, dim=1, backend="reference"), (x, bias))

    keep = torch.rand(5) > 0.3

    def with_dropout(a):
        torch.manual_seed(0)  # the same dropout mask on every evaluation
        return softmax(a, mask=keep, dim=-1, dropout_p=0.3, backend="reference")

    assert torch.autograd.gradcheck(with_dropout, (x,))


# --------------------------------------------------------------------------- dropout
def test_dropout_statistics_consistency_and_seeding(backend):
    p = 0.25
    x = rand_x(16, 255, spread=1.0).requires_grad_()  # odd length: the kernels' row tails
    torch.manual_seed(123)
    y = softmax(x, scale=0.5, dropout_p=p, backend=backend)
    plain = expected(x.detach(), 0.5)
    kept = y != 0
    frac = kept.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / kept.numel())
    assert abs(frac - (1 - p)) < 5 * sigma, f"kept fraction {frac}"
    assert not torch.equal(kept[0], kept[1]), "rows must get different dropout masks"
    # Kept values are the probabilities scaled by 1 / (1 - p).
    torch.testing.assert_close(y[kept].double(), plain[kept] / (1 - p), rtol=1e-5, atol=1e-7)
    # The backward regenerates the same mask: compare with float64 autograd through it.
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    x64 = x.detach().double().requires_grad_()
    target = torch.where(kept, expected(x64, 0.5) / (1 - p), torch.zeros_like(plain))
    (want,) = torch.autograd.grad(target, x64, g.double())
    assert (dx.double() - want).abs().max().item() < 1e-6
    # Same seed, same mask; another seed, another mask.
    torch.manual_seed(123)
    again = softmax(x.detach(), scale=0.5, dropout_p=p, backend=backend)
    assert torch.equal(again, y.detach())
    torch.manual_seed(124)
    other = softmax(x.detach(), scale=0.5, dropout_p=p, backend=backend)
    assert not torch.equal(other != 0, kept)


@pytest.mark.parametrize("programs", [1, 512], ids=["one-segment-per-row", "three-segments-per-row"])
def test_triton_online_kernels(request, monkeypatch, programs):
    """The long-row (online, chunked, segmented) Triton kernels, on rows made "long" by
    tiny chunks: 41 columns = 3 chunks of 16, in one segment or in three."""
    require_backend(request, "softmax", "triton")
    import fastlm.kernels.softmax as kernels

    monkeypatch.setattr(kernels, "MAX_ROW_BLOCK", 16)
    monkeypatch.setattr(kernels, "ONLINE_BLOCK", 16)
    monkeypatch.setattr(kernels, "SEGMENT_PROGRAMS", programs)
    n = 41
    x = rand_x(2, 3, n).requires_grad_()
    with torch.no_grad():
        x[1, 1, 5:] = -math.inf
    keep = torch.rand(2, 1, n) > 0.3
    keep[0, 0, :] = False  # fully masked rows
    bias = torch.randn(3, 1)
    for m in (None, keep, bias):
        assert_close_to_truth(softmax(x.detach(), scale=0.8, mask=m, backend="triton"), x.detach(), 0.8, m)
    g = torch.randn(2, 3, n)
    torch.manual_seed(5)
    y = softmax(x, scale=0.8, mask=keep, dropout_p=0.3, backend="triton")
    (dx,) = torch.autograd.grad(y, x, g)
    kept = y != 0
    x64 = x.detach().double().requires_grad_()
    target = torch.where(kept, expected(x64, 0.8, keep) / 0.7, torch.zeros((), dtype=torch.float64))
    (want,) = torch.autograd.grad(target, x64, g.double())
    assert (dx.double() - want).abs().max().item() < 1e-6
    frac = kept[keep.expand_as(kept) & torch.isfinite(x.detach())].float().mean().item()
    assert 0.55 < frac < 0.85


def test_cpu_baseline_instruction_set_build(cpu_ext):
    """The C++ kernels' baseline (non-AVX2) build, forced by FASTLM_CPU_BASELINE=1 in a
    fresh process, passes the cpu cases of the numerical tests above."""
    import os
    import subprocess
    import sys

    selection = "cpu and (forward_with_masks or fp16_extremes or backward_matches or dropout_statistics)"
    env = {**os.environ, "FASTLM_CPU_BASELINE": "1"}
    # -P: no current folder on sys.path, so the installed fastlm is tested, not the source tree
    proc = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", selection],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]


# ----------------------------------------------------------- torch.library integration
def test_opcheck(backend):
    x = rand_x(2, 3, 7)
    mask = torch.rand(3, 1) > 0.3
    seed = torch.tensor([42])
    torch.library.opcheck(torch.ops.fastlm.softmax.default, (x, mask, 0.5, 2, 0.2, seed, backend))
    torch.library.opcheck(torch.ops.fastlm.softmax.default, (x.transpose(1, 2), None, 1.0, 1, 0.0, None, backend))
    y = torch.softmax(x, 1)
    torch.library.opcheck(torch.ops.fastlm.softmax_backward.default, (torch.randn_like(x), y, 0.5, 1, 0.2, seed, backend))


def test_torch_compile_fullgraph():
    mask = torch.rand(4, 1, 9) > 0.2

    def f(x, bias):
        return softmax(x, scale=0.3, mask=mask, dropout_p=0.1).sum() + softmax(x, mask=bias, dim=1).pow(2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 9, requires_grad=True)
    bias = torch.randn(3, 9)
    torch.manual_seed(7)
    out = compiled(x, bias)
    out.backward()
    torch.manual_seed(7)
    x2 = x.detach().clone().requires_grad_()
    ref = f(x2, bias)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)


# ------------------------------------------------------------------------ bad inputs
def test_bad_inputs():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="mask"):
        softmax(x, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        softmax(x, mask=torch.ones(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="mask"):
        softmax(x.half(), mask=torch.zeros(4))
    with pytest.raises(TypeError, match="mask"):
        softmax(x, mask=[True] * 4)
    for p in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match="dropout_p"):
            softmax(x, dropout_p=p)
    with pytest.raises(TypeError, match="dropout_p"):
        softmax(x, dropout_p="0.1")
    for dim in (3, -4):
        with pytest.raises(ValueError, match="dim"):
            softmax(x, dim=dim)
    with pytest.raises(TypeError, match="dim"):
        softmax(x, dim=1.0)
    with pytest.raises(TypeError, match="x"):
        softmax(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="x"):
        softmax(torch.tensor(1.0))
    with pytest.raises(TypeError, match="scale"):
        softmax(x, scale="2")
    with pytest.raises(TypeError, match="scale"):
        softmax(x, scale=math.inf)
    with pytest.raises(ValueError, match="backend"):
        softmax(x, backend="nope")
    for name in ("cpu", "triton"):  # the fast backends present here refuse float64, saying so
        if fastlm.registry.BACKENDS[name].unavailable_reason() is None:
            with pytest.raises(fastlm.BackendError, match="float64"):
                softmax(x.double(), backend=name)


def test_backend_selection():
    from fastlm import registry
    from fastlm.registry import Problem

    rows = registry.table("softmax")
    assert set(rows) == {"reference", "cpu", "triton", "cuda"}
    assert rows["triton"].verified is None and rows["cuda"].verified is None
    f64 = registry.select("softmax", Problem.of("cpu", torch.float64, length=8))
    assert f64.backend == "reference"
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(softmax(x), expected(x))  # auto: float64 runs on the reference


# ------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", gpu_params(["triton", "cuda"]))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 3, 128, 1000, 4096, 4097, 20000, 70000])
def test_gpu_kernels(gpu_backend, dtype, n):
    problem = fastlm.registry.Problem.of("cuda", dtype, length=n)
    why = fastlm.registry.table("softmax")[gpu_backend].unsupported_reasons(problem)
    if why:
        pytest.skip("; ".join(why))
    x = rand_x(2, 3, n, dtype=dtype).cuda().requires_grad_()
    mask = (torch.rand(2, 1, n) > 0.2).cuda()
    bias = torch.randn(3, n).to(dtype).cuda()
    for m in (None, mask, bias):
        y = softmax(x, scale=0.5, mask=m, backend=gpu_backend)
        assert_close_to_truth(y.cpu(), x.detach().cpu(), 0.5, None if m is None else m.cpu())
    g = torch.randn_like(x)
    torch.manual_seed(3)
    y = softmax(x, scale=0.5, mask=mask, dropout_p=0.2, backend=gpu_backend)
    (dx,) = torch.autograd.grad(y, x, g)
    kept = (y != 0).cpu()
    x64 = x.detach().cpu().double().requires_grad_()
    target = torch.where(kept, expected(x64, 0.5, mask.cpu()) / 0.8, torch.zeros(()).double())
    (want,) = torch.autograd.grad(target, x64, g.cpu().double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2 * want.abs().max().item()
    assert (dx.cpu().double() - want).abs().max().item() <= tol
