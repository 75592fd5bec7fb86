"""fastlm.ops.linear_cross_entropy against a float64 dense head + cross-entropy written here.

The op runs one chunk loop over the cross_entropy backends: ``backend=`` picks the
cross_entropy kernels.  CPU: reference, cpu (C++, skipped without fastlm._C) and triton
(TRITON_INTERPRET=1).  GPU (marked ``gpu``): triton and cuda on CUDA tensors.
"""
import pytest
import torch
from _backends import CPU_TESTABLE, gpu_params, require_backend
from _cross_entropy_truth import IGNORE, lce64

from fastlm.ops.linear_cross_entropy import linear_cross_entropy


def run(fn, tensors, seed=0):
    """Loss and gradients of ``fn(*tensors)`` for a random grad_output (same for every fn)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    loss = fn(*leaves)
    g = torch.randn(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    loss.backward(g.to(device=loss.device, dtype=loss.dtype))
    return loss.detach(), [t.grad if t is not None else None for t in leaves]


def assert_close_all(got, want, rtol, atol):
    for a, b in zip(got, want):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a.cpu().double(), b, rtol=rtol, atol=atol)


@pytest.fixture(params=CPU_TESTABLE)
def backend(request, poison):
    return require_backend(request, "cross_entropy", request.param)


def _inputs(n, h, v, bias=True, ignored=0.5, dtype=torch.float32):
    hidden = torch.randn(n, h, dtype=dtype)
    weight = (torch.randn(v, h) / h**0.5).to(dtype)
    b = torch.randn(v, dtype=dtype) if bias else None
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < ignored] = IGNORE
    return hidden, weight, b, labels


# ------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 1e-2)])
def test_matches_float64(backend, reduction, bias, label_smoothing, z_loss):
    hidden, weight, b, labels = _inputs(23, 16, 97, bias)
    labels[3] = 96
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)
    got, got_grads = run(lambda h, w, bb: linear_cross_entropy(h, w, labels, bias=bb, chunk_size=5,
                                                               backend=backend, **kw), (hidden, weight, b))
    want, want_grads = run(lambda h, w, bb: lce64(h, w, labels, bb, **kw),
                           (hidden.double(), weight.double(), None if b is None else b.double()))
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert_close_all(got_grads, want_grads, rtol=1e-4, atol=1e-5)
    assert torch.all(got_grads[0][labels == IGNORE] == 0)


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_chunk_boundaries(backend, offset):
    """tokens = chunk - 1, chunk, chunk + 1 (all labelled), chunk size from the argument."""
    chunk = 8
    hidden, weight, b, labels = _inputs(chunk + offset, 12, 33, ignored=0.0)
    got, got_grads = run(lambda h, w, bb: linear_cross_entropy(h, w, labels, bias=bb, chunk_size=chunk,
                                                               backend=backend), (hidden, weight, b))
    want, want_grads = run(lambda h, w, bb: lce64(h, w, labels, bb), (hidden.double(), weight.double(), b.double()))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert_close_all(got_grads, want_grads, rtol=1e-4, atol=1e-6)


def test_chunk_rows_from_env_and_sparse_rows(monkeypatch):
    """Only labelled rows reach the cross_entropy kernels, in chunks of at most FASTLM_LCE_CHUNK_ROWS."""
    import fastlm.reference.cross_entropy as ref

    seen = []
    real = ref.cross_entropy_forward

    def spy(logits, labels, *args):
        seen.append((logits.shape[0], bool((labels == IGNORE).any())))
        return real(logits, labels, *args)

    monkeypatch.setattr(ref, "cross_entropy_forward", spy)
    monkeypatch.setenv("FASTLM_LCE_CHUNK_ROWS", "3")
    hidden, weight, b, labels = _inputs(20, 8, 17)
    labels[:7] = torch.arange(7)  # 7 labelled rows at least
    labels[7:] = IGNORE
    labels[15] = 2  # 8 labelled rows in all
    got = linear_cross_entropy(hidden, weight, labels, bias=b, backend="reference")
    assert [rows for rows, _ in seen] == [3, 3, 2] and not any(has_ignored for _, has_ignored in seen)
    torch.testing.assert_close(got.double(), lce64(hidden, weight, labels, b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_labels_ignored(backend, reduction):
    hidden, weight, b, labels = _inputs(6, 8, 19)
    labels[:] = IGNORE
    got, (gh, gw, gb) = run(lambda h, w, bb: linear_cross_entropy(h, w, labels, bias=bb, reduction=reduction,
                                                                  label_smoothing=0.1, backend=backend),
                            (hidden, weight, b))
    assert torch.all(got == 0) and not torch.isnan(got).any()
    assert torch.all(gh == 0) and torch.all(gw == 0) and torch.all(gb == 0)


def test_tied_weight_gets_gradient_from_both_ends(backend):
    """Embedding lookup and decoder share one weight: the two gradients add up."""
    v, h, n = 41, 12, 15
    weight = torch.randn(v, h) / h**0.5
    tokens = torch.randint(0, v, (n,))
    labels = torch.randint(0, v, (n,))
    labels[::3] = IGNORE
    proj = torch.randn(h, h, dtype=torch.float64) / h**0.5

    def model(w, loss_fn):
        hidden = torch.tanh(torch.nn.functional.embedding(tokens, w) @ proj.to(w.dtype))
        return loss_fn(hidden, w)

    got, (gw,) = run(lambda w: model(w, lambda hid, ww: linear_cross_entropy(hid, ww, labels, chunk_size=4,
                                                                             backend=backend)), (weight,))
    want, (want_gw,) = run(lambda w: model(w, lambda hid, ww: lce64(hid, ww, labels)), (weight.double(),))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw.double(), want_gw, rtol=1e-4, atol=1e-6)
    # both ends contribute: the embedding rows of the input tokens differ from the decoder-only gradient
    _, (decoder_only,) = run(lambda w: lce64(torch.tanh(torch.nn.functional.embedding(tokens, weight.double())
                                                        @ proj), w, labels), (weight.double(),))
    assert (want_gw - decoder_only)[tokens].abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_2x_torch(backend, dtype):
    """Error vs float64 at most ~2x a plain PyTorch dense head + CE in the same dtype."""
    hidden, weight, b, labels = _inputs(48, 64, 500, ignored=0.3, dtype=dtype)
    want, want_grads = run(lambda h, w, bb: lce64(h, w, labels, bb, reduction="sum"),
                           (hidden.double(), weight.double(), b.double()))
    got, got_grads = run(lambda h, w, bb: linear_cross_entropy(h, w, labels, bias=bb, reduction="sum",
                                                               chunk_size=16, backend=backend), (hidden, weight, b))
    ref, ref_grads = run(lambda h, w, bb: torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(h, w, bb), labels, reduction="sum"), (hidden, weight, b))
    err = lambda a, t: (a.double() - t).abs().max().item()
    assert got.dtype == torch.float32 and all(g.dtype == dtype for g in got_grads)
    assert err(got, want) <= 2 * err(ref, want) + 1e-6
    for g, r, t in zip(got_grads, ref_grads, want_grads):
        assert err(g, t) <= 2 * err(r, t) + 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_loss_is_float32_as_transformers(backend, dtype, reduction):
    """A bf16/fp16 head returns the loss in fp32, never rounded to the inputs' dtype: what
    transformers computes (low-precision logits, upcast, then the loss in fp32)."""
    hidden, weight, b, labels = _inputs(40, 32, 300, ignored=0.3, dtype=dtype)
    got = linear_cross_entropy(hidden, weight, labels, bias=b, reduction=reduction, chunk_size=16, backend=backend)
    want = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, b).float(), labels,
                                             reduction=reduction)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_float64_loss_stays_float64():
    hidden, weight, b, labels = _inputs(9, 8, 30, dtype=torch.float64)
    got = linear_cross_entropy(hidden, weight, labels, bias=b, backend="reference")
    assert got.dtype == torch.float64


def test_leading_dims_and_no_grad(backend):
    hidden, weight, b, labels = _inputs(6, 8, 19, ignored=0.3)
    hidden, labels = hidden.reshape(2, 3, 8), labels.reshape(2, 3)
    got = linear_cross_entropy(hidden, weight, labels, bias=b, reduction="none", backend=backend)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got.double(), lce64(hidden, weight, labels, b, reduction="none"), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, labels, backend=backend)
    torch.testing.assert_close(got.double(), lce64(hidden, weight, labels), rtol=1e-5, atol=1e-6)


def test_out_of_range_label_raises_on_cpu(backend):
    hidden, weight, b, labels = _inputs(4, 8, 19, ignored=0.0)
    labels[2] = 19
    with pytest.raises(ValueError, match=r"labels\[2\]"):
        linear_cross_entropy(hidden, weight, labels, backend=backend)


# ------------------------------------------------------------------------- autograd/compile
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_reference(reduction):
    hidden, weight, b, labels = _inputs(5, 3, 7, ignored=0.0, dtype=torch.float64)
    labels[1] = IGNORE
    fn = lambda h, w, bb: linear_cross_entropy(h, w, labels, bias=bb, reduction=reduction, label_smoothing=0.1,
                                               z_loss=0.05, chunk_size=2, backend="reference")
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (hidden, weight, b)))


def test_opcheck(backend):
    hidden, weight, b, labels = _inputs(7, 8, 13, ignored=0.3)
    labels[0] = 1
    hidden.requires_grad_(), weight.requires_grad_(), b.requires_grad_()
    for bias, reduction in ((b, "mean"), (None, "none")):
        torch.library.opcheck(torch.ops.fastlm.linear_cross_entropy.default,
                              (hidden, weight, bias, labels, IGNORE, 0.1, 0.0, reduction, 3, backend))
    torch.library.opcheck(torch.ops.fastlm.linear_cross_entropy_backward.default,
                          (torch.tensor(1.5), hidden.detach(), weight.detach(), b.detach(), labels, IGNORE, 0.1, 0.0,
                           "mean", 3, backend))


def test_torch_compile_fullgraph(backend):
    hidden, weight, b, labels = _inputs(10, 8, 21, ignored=0.3)
    labels[0] = 2

    @torch.compile(fullgraph=True, backend="aot_eager")
    def head(h, w, bb):
        return linear_cross_entropy(torch.relu(h), w, labels, bias=bb, chunk_size=4, backend=backend)

    got, got_grads = run(head, (hidden, weight, b))
    want, want_grads = run(lambda h, w, bb: lce64(torch.relu(h), w, labels, bb),
                           (hidden.double(), weight.double(), b.double()))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert_close_all(got_grads, want_grads, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(weight=torch.randn(11, 5)), ValueError, "weight"),
    (dict(weight=torch.randn(11)), ValueError, "weight"),
    (dict(weight=torch.randn(11, 4, dtype=torch.float64)), TypeError, "dtype"),
    (dict(bias=torch.randn(10)), ValueError, "bias"),
    (dict(bias=torch.randn(11, dtype=torch.float16)), TypeError, "dtype"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels"),
    (dict(labels=torch.zeros(6, dtype=torch.int32)), TypeError, "int64"),
    (dict(hidden=torch.zeros(6, 4, dtype=torch.int64)), TypeError, "hidden"),
    (dict(reduction="mean "), ValueError, "reduction"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(backend="tpu"), ValueError, "backend"),
])
def test_bad_inputs(kwargs, exc, match):
    args = dict(hidden=torch.randn(6, 4), weight=torch.randn(11, 4), labels=torch.tensor([0, 1, 2, IGNORE, 4, 10]))
    args.update(kwargs)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(exc, match=match):
        linear_cross_entropy(hidden, weight, labels, **args)


def test_bad_chunk_env(monkeypatch):
    monkeypatch.setenv("FASTLM_LCE_CHUNK_ROWS", "lots")
    with pytest.raises(ValueError, match="FASTLM_LCE_CHUNK_ROWS"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]))


# ----------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", gpu_params(["triton", "cuda"]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_float64(gpu_backend, dtype):
    if gpu_backend == "cuda":
        from fastlm import _ext

        if not _ext.with_cuda():
            pytest.skip("fastlm._C built without CUDA kernels")
    hidden, weight, b, labels = _inputs(1000, 256, 30522, ignored=0.85, dtype=dtype)
    kw = dict(reduction="mean", label_smoothing=0.1)
    want, want_grads = run(lambda h, w, bb: lce64(h, w, labels, bb, **kw),
                           (hidden.double(), weight.double(), b.double()))
    got, got_grads = run(lambda h, w, bb: linear_cross_entropy(h, w, labels.cuda(), bias=bb, chunk_size=64,
                                                               backend=gpu_backend, **kw),
                         (hidden.cuda(), weight.cuda(), b.cuda()))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol)
    assert_close_all(got_grads, want_grads, rtol=tol, atol=tol * 1e-2)
