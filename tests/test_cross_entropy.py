"""fastlm.ops.cross_entropy against a float64 cross-entropy written here, per backend.

CPU: reference, cpu (C++, skipped without fastlm._C) and triton (TRITON_INTERPRET=1).
GPU (marked ``gpu``): triton and cuda on CUDA tensors.
"""
import pytest
import torch
import torch.nn.functional as F
from _backends import CPU_TESTABLE, gpu_params, require_backend
from _cross_entropy_truth import IGNORE, ce64

from fastlm import registry
from fastlm.ops.cross_entropy import cross_entropy


def loss_and_grad(fn, logits, grad_seed=None):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x)
    g = torch.randn(loss.shape, dtype=torch.float64, generator=grad_seed) if grad_seed is not None else torch.ones_like(loss, dtype=torch.float64)
    loss.backward(g.to(device=loss.device, dtype=loss.dtype))
    return loss.detach(), x.grad


@pytest.fixture(params=CPU_TESTABLE)
def backend(request, poison):
    return require_backend(request, "cross_entropy", request.param)


def _labels(n, v, ignored=0.3, generator=None):
    y = torch.randint(0, v, (n,))
    y[torch.rand(n) < ignored] = IGNORE
    return y


# ------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("n,v", [(1, 1), (7, 97), (5, 1025)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 0.0), (0.2, 1e-2)])
def test_matches_float64(backend, n, v, reduction, label_smoothing, z_loss):
    logits = torch.randn(n, v) * 3
    labels = _labels(n, v)
    labels[0] = v - 1  # at least one labelled row, and the last class
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)
    gen = torch.Generator().manual_seed(n * v)
    got, got_grad = loss_and_grad(lambda x: cross_entropy(x, labels, backend=backend, **kw), logits, gen)
    gen = torch.Generator().manual_seed(n * v)
    want, want_grad = loss_and_grad(lambda x: ce64(x, labels, **kw), logits.double(), gen)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-5, atol=1e-6)
    assert torch.all(got_grad[labels == IGNORE] == 0)


def test_matches_torch_semantics(backend):
    """Label smoothing together with ignored labels, exactly as F.cross_entropy."""
    logits = torch.randn(9, 31)
    labels = _labels(9, 31, ignored=0.5)
    labels[1] = 4
    for reduction in ("mean", "sum", "none"):
        want = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.3, reduction=reduction)
        got = cross_entropy(logits, labels, label_smoothing=0.3, reduction=reduction, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: 0 * -inf, discarded
def test_neg_inf_logits_and_leading_dims(backend):
    logits = torch.randn(2, 3, 40)
    logits[0, 0, :30] = -float("inf")  # masked-out classes
    labels = torch.randint(30, 40, (2, 3))
    labels[1, 2] = IGNORE
    got, got_grad = loss_and_grad(lambda x: cross_entropy(x, labels, reduction="none", backend=backend), logits)
    want, want_grad = loss_and_grad(lambda x: ce64(x, labels, reduction="none"), logits.double())
    assert got.shape == (2, 3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-5, atol=1e-6)
    assert torch.all(got_grad[0, 0, :30] == 0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: 0 * -inf, discarded
@pytest.mark.parametrize("v", [40, 10007])
def test_neg_inf_logits_with_label_smoothing_and_z_loss(backend, v):
    """With label smoothing a -inf logit makes the loss +inf (the smoothed target puts mass
    on an impossible class), its gradient stays finite; as PyTorch and the float64 truth.
    Row 1 has a -inf label logit (+inf loss even without smoothing)."""
    logits = torch.randn(3, v) * 3 + 1e4
    logits[:2, : v // 2] = -float("inf")  # whole leading blocks: the running max starts at -inf
    labels = torch.tensor([v - 1, 3, 0])
    for label_smoothing, z_loss in ((0.1, 0.0), (0.0, 1e-4), (0.2, 1e-4)):
        kw = dict(label_smoothing=label_smoothing, z_loss=z_loss, reduction="none")
        got, got_grad = loss_and_grad(lambda x: cross_entropy(x, labels, backend=backend, **kw), logits)
        want, want_grad = loss_and_grad(lambda x: ce64(x, labels, **kw), logits.double())
        assert torch.isinf(want[1]) and (torch.isinf(want[0]) == (label_smoothing > 0))
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-5)
        torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: log(0), -inf - -inf: the NaN under test
@pytest.mark.parametrize("v", [50, 10007])
def test_nan_rows(backend, v):
    """A row of only -inf logits (no class can carry the label) and a row holding a NaN
    logit: that row's loss and gradient are NaN, as in PyTorch and the float64 truth (never
    a silently finite value); the other rows are untouched."""
    logits = torch.randn(4, v)
    logits[1] = -float("inf")
    logits[2, v - 3] = float("nan")
    labels = torch.tensor([4, 7, 9, 0])
    for label_smoothing in (0.0, 0.1):
        kw = dict(reduction="none", label_smoothing=label_smoothing)
        got, got_grad = loss_and_grad(lambda x: cross_entropy(x, labels, backend=backend, **kw), logits)
        want, want_grad = loss_and_grad(lambda x: ce64(x, labels, **kw), logits.double())
        assert torch.isnan(want[1:3]).all() and torch.isnan(F.cross_entropy(logits, labels, **kw)[1:3]).all()
        assert torch.isnan(got[1:3]).all() and torch.isnan(got_grad[1:3]).all()
        torch.testing.assert_close(got[[0, 3]].double(), want[[0, 3]], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_grad[[0, 3]].double(), want_grad[[0, 3]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_single_class(backend, label_smoothing):
    """V = 1: the loss is 0 and the gradient exactly 0 (judged absolutely) at any logit
    size; with z-loss, z * x^2 and 2 z x."""
    logits = torch.randn(5, 1) * 1e4
    labels = torch.tensor([0, 0, IGNORE, 0, 0])
    got, got_grad = loss_and_grad(lambda x: cross_entropy(x, labels, reduction="none", backend=backend,
                                                          label_smoothing=label_smoothing), logits)
    assert torch.all(got == 0) and torch.all(got_grad == 0)
    kw = dict(reduction="none", label_smoothing=label_smoothing, z_loss=1e-3)
    got, got_grad = loss_and_grad(lambda x: cross_entropy(x, labels, backend=backend, **kw), logits)
    want, want_grad = loss_and_grad(lambda x: ce64(x, labels, **kw), logits.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_labels_ignored(backend, reduction):
    logits = torch.randn(6, 17)
    labels = torch.full((6,), IGNORE)
    got, grad = loss_and_grad(lambda x: cross_entropy(x, labels, reduction=reduction, label_smoothing=0.1,
                                                      backend=backend), logits)
    assert torch.all(got == 0) and not torch.isnan(got).any()
    assert torch.all(grad == 0)


def test_custom_ignore_index(backend):
    logits = torch.randn(5, 11)
    labels = torch.tensor([3, 7, 7, 0, 10])
    got = cross_entropy(logits, labels, ignore_index=7, backend=backend)
    torch.testing.assert_close(got.double(), ce64(logits, labels, ignore_index=7), rtol=1e-5, atol=1e-6)


def assert_within_2x_torch(got, got_grad, logits, labels, *, loss_dtype=None, label_smoothing=0.0, z_loss=0.0):
    """Loss rows ``got`` and their gradient ``got_grad`` (w.r.t. ``logits``) err at most 2x
    PyTorch's own error against the float64 truth: its gradient in the logits' dtype, and its
    loss computed in ``loss_dtype`` (default: the logits' dtype).  z-loss, which PyTorch lacks,
    is in the truth only; the floor, half an fp32 ulp at 1, spares a bound of 2 x 0."""
    kw = dict(reduction="none", label_smoothing=label_smoothing)
    want, want_grad = loss_and_grad(lambda x: ce64(x, labels.cpu(), z_loss=z_loss, **kw), logits.cpu().double())
    ref = F.cross_entropy(logits.to(loss_dtype or logits.dtype), labels, **kw)  # on the logits' device
    _, ref_grad = loss_and_grad(lambda x: F.cross_entropy(x, labels, **kw), logits)
    err = lambda a, b: (a.cpu().double() - b).abs().max().item()
    assert got_grad.dtype == logits.dtype
    assert err(got, want) <= 2 * err(ref, want) + 2.0**-24, (err(got, want), err(ref, want))
    assert err(got_grad, want_grad) <= 2 * err(ref_grad, want_grad) + 2.0**-24, (
        err(got_grad, want_grad), err(ref_grad, want_grad))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_2x_torch(backend, dtype):
    """fp32 accumulation: error vs float64 at most ~2x plain PyTorch's in the same dtype."""
    logits = (torch.randn(64, 1000) * 4).to(dtype)
    labels = _labels(64, 1000)
    got, got_grad = loss_and_grad(lambda x: cross_entropy(x, labels, reduction="none", backend=backend), logits)
    assert got.dtype == dtype
    assert_within_2x_torch(got, got_grad, logits, labels)


def kernel_rows(backend, logits, labels, label_smoothing=0.0, z_loss=0.0):
    """The backend's kernel-level ``cross_entropy_forward``: (fp32 loss rows, gradient rows)."""
    impl = registry.select("cross_entropy", registry.Problem.of(logits.device, logits.dtype, length=logits.shape[1]),
                           backend)
    return impl.function("forward")(logits, labels, IGNORE, label_smoothing, z_loss, True)


LARGE_LOGITS = [(torch.float32, 1e4), (torch.float32, 1e5), (torch.float32, -1e4), (torch.bfloat16, 1e5),
                (torch.float16, -3e4)]


def large_logits(n, v, dtype, offset):
    """``(n, v)`` logits near ``offset``, row 0 increasing (the running max grows in every
    block: running sums rescaled each time), row 1's max in the last block."""
    logits = torch.randn(n, v) * 3
    logits[0] = torch.linspace(-30, 30, v)
    logits[1, -1] += 40
    return (logits + offset).to(dtype)


@pytest.mark.parametrize("v", [97, 10007])  # one block / several blocks per row (cpu: 1024, triton: 8192)
@pytest.mark.parametrize("dtype,offset", LARGE_LOGITS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_large_logits_within_2x_torch(backend, v, dtype, offset, label_smoothing):
    """Logits near +-1e4..1e5 keep their precision: the loss must not subtract a rounded
    logsumexp (ulp(1e4) ~ 1e-3 in fp32) from x[y], nor the gradient exp(x - lse).  The loss
    rows are fp32 in every dtype (linear_cross_entropy reduces them in fp32), so they are
    judged against PyTorch's fp32 loss of the same rounded logits; gradients in the dtype."""
    n = 6
    logits = large_logits(n, v, dtype, offset)
    labels = torch.randint(0, v, (n,))
    labels[[0, 1]] = torch.tensor([v - 1, 0])
    labels[2] = IGNORE
    got, got_grad = kernel_rows(backend, logits, labels, label_smoothing)
    assert got.dtype == torch.float32
    assert torch.all(got[2] == 0) and torch.all(got_grad[2] == 0)
    assert_within_2x_torch(got, got_grad, logits, labels, loss_dtype=torch.float32, label_smoothing=label_smoothing)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("label_smoothing,z_loss", [(1e-39, 0.0), (2.0**-149, 0.0), (0.1, 1e-40)])
def test_subnormal_float_arguments(backend, dtype, label_smoothing, z_loss):
    """label_smoothing / z_loss below fp32's normal range are valid values (Triton's
    interpreter typed such a Python float fp64, which broke the kernel)."""
    logits = (torch.randn(7, 97) * 3).to(dtype)
    labels = _labels(7, 97)
    labels[0] = 96
    kw = dict(label_smoothing=label_smoothing, z_loss=z_loss)
    got, got_grad = loss_and_grad(lambda x: cross_entropy(x, labels, reduction="none", backend=backend, **kw), logits)
    assert_within_2x_torch(got, got_grad, logits, labels, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_vocab_262144(backend, dtype):
    """A 262,144-word vocabulary: several sweeps per row in every kernel; in fp16 most
    probabilities (~1/V) are subnormal."""
    v = 262144
    logits = torch.randn(3, v) * 2
    logits[1, 5] = 30.0  # one dominant class
    logits = logits.to(dtype)
    labels = torch.tensor([v - 1, 5, IGNORE])
    got, got_grad = kernel_rows(backend, logits, labels, label_smoothing=0.1)
    if dtype == torch.float32:
        want, want_grad = loss_and_grad(lambda x: ce64(x, labels, label_smoothing=0.1, reduction="none"),
                                        logits.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-4, atol=1e-8)
    else:
        assert_within_2x_torch(got, got_grad, logits, labels, loss_dtype=torch.float32, label_smoothing=0.1)


def test_no_grad_forward(backend):
    logits = torch.randn(4, 50)
    labels = torch.tensor([1, IGNORE, 49, 0])
    with torch.no_grad():
        got = cross_entropy(logits.requires_grad_(), labels, backend=backend)
    torch.testing.assert_close(got.double(), ce64(logits, labels), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- out-of-range
@pytest.mark.parametrize("bad", [-1, 13, 10**6])
def test_out_of_range_label_raises_on_cpu(backend, bad):
    logits = torch.randn(3, 13)
    labels = torch.tensor([0, bad, IGNORE])
    with pytest.raises(ValueError, match=r"labels\[1\]"):
        cross_entropy(logits, labels, backend=backend)


@pytest.mark.parametrize("module", ["fastlm.reference.cross_entropy", "fastlm.kernels.cross_entropy"])
def test_kernel_flags_out_of_range_label_with_nan(module):
    """The device-side flag used on GPUs: the kernel marks a bad row's loss and gradient NaN."""
    if "kernels" in module:
        pytest.importorskip("triton")
    import importlib

    kern = importlib.import_module(module)
    logits = torch.randn(3, 13)
    loss, grad = kern.cross_entropy_forward(logits, torch.tensor([2, 13, IGNORE]), IGNORE, 0.0, 0.0, True)
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()


# ------------------------------------------------------------------------- autograd/compile
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_reference(reduction):
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, IGNORE, 5, 0])
    fn = lambda x: cross_entropy(x, labels, reduction=reduction, label_smoothing=0.1, z_loss=0.05,
                                 backend="reference")
    assert torch.autograd.gradcheck(fn, (logits,))


def test_opcheck(backend):
    logits = torch.randn(5, 19, requires_grad=True)
    labels = torch.tensor([1, IGNORE, 18, 0, 3])
    for reduction in ("mean", "none"):
        torch.library.opcheck(torch.ops.fastlm.cross_entropy.default,
                              (logits, labels, IGNORE, 0.1, 0.0, reduction, True, backend))
    grad_rows = torch.randn(5, 19)
    torch.library.opcheck(torch.ops.fastlm.cross_entropy_backward.default,
                          (torch.tensor(2.0), grad_rows, labels, IGNORE, "mean", backend))


def test_torch_compile_fullgraph(backend):
    logits = torch.randn(2, 3, 23, requires_grad=True)
    labels = torch.tensor([[1, IGNORE, 22], [0, 5, 7]])

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x):
        return cross_entropy(x * 2, labels, label_smoothing=0.1, backend=backend)

    got, grad = loss_and_grad(step, logits)
    want, want_grad = loss_and_grad(lambda x: ce64(x * 2, labels, label_smoothing=0.1), logits.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(labels=torch.zeros(4, dtype=torch.int32)), TypeError, "int64"),
    (dict(labels=torch.zeros(4)), TypeError, "int64"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "shape"),
    (dict(logits=torch.zeros(4, 7, dtype=torch.int64)), TypeError, "logits"),
    (dict(logits=torch.zeros(4, 0)), ValueError, "class"),
    (dict(logits="x"), TypeError, "logits"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(label_smoothing="0.1"), TypeError, "label_smoothing"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(backend="gpu"), ValueError, "backend"),
])
def test_bad_inputs(kwargs, exc, match):
    args = dict(logits=torch.randn(4, 7), labels=torch.tensor([0, 1, 2, IGNORE]))
    args.update(kwargs)
    logits, labels = args.pop("logits"), args.pop("labels")
    with pytest.raises(exc, match=match):
        cross_entropy(logits, labels, **args)


def test_float64_refused_by_fast_backends():
    from fastlm.registry import BACKENDS, BackendError

    if BACKENDS["triton"].unavailable_reason():
        pytest.skip(BACKENDS["triton"].unavailable_reason())
    with pytest.raises(BackendError, match="float64"):
        cross_entropy(torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1]), backend="triton")


# ----------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", gpu_params(["triton", "cuda"]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [97, 30522, 262144])
def test_gpu_matches_float64(gpu_backend, dtype, v):
    if gpu_backend == "cuda":
        from fastlm import _ext

        if not _ext.with_cuda():
            pytest.skip("fastlm._C built without CUDA kernels")
    n = 64 if v < 100000 else 4
    logits = (torch.randn(n, v) * 3).to(dtype)
    labels = _labels(n, v)
    labels[0] = v - 1
    for reduction in ("mean", "none"):
        kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
        gen = torch.Generator().manual_seed(v)
        want, want_grad = loss_and_grad(lambda x: ce64(x, labels, **kw), logits.double(), gen)
        gen = torch.Generator().manual_seed(v)
        got, got_grad = loss_and_grad(lambda x: cross_entropy(x, labels.cuda(), backend=gpu_backend, **kw),
                                      logits.cuda(), gen)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol)
        torch.testing.assert_close(got_grad.cpu().double(), want_grad, rtol=tol, atol=tol * 1e-2)
    bad = labels.clone().cuda()
    bad[0] = v  # out of range: NaN flag, no exception, no sync
    assert torch.isnan(cross_entropy(logits.cuda(), bad, backend=gpu_backend)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", gpu_params(["triton", "cuda"]))
@pytest.mark.parametrize("dtype,offset", LARGE_LOGITS)
@pytest.mark.parametrize("v", [97, 30522])
def test_gpu_large_logits_within_2x_torch(gpu_backend, dtype, offset, v):
    """test_large_logits_within_2x_torch on the GPU kernels, judged against PyTorch on the GPU."""
    if gpu_backend == "cuda":
        from fastlm import _ext

        if not _ext.with_cuda():
            pytest.skip("fastlm._C built without CUDA kernels")
    logits = large_logits(64, v, dtype, offset).cuda()
    labels = _labels(64, v).cuda()
    labels[0] = v - 1
    for label_smoothing in (0.0, 0.1):
        got, got_grad = kernel_rows(gpu_backend, logits, labels, label_smoothing)
        assert_within_2x_torch(got, got_grad, logits, labels, loss_dtype=torch.float32,
                               label_smoothing=label_smoothing)
