"""pytest-benchmark microbenchmarks of the public ops against plain PyTorch.

    pytest bench/                                   # CPU here, CUDA when present
    pytest bench/ --benchmark-group-by=group --benchmark-columns=median,iqr,ops

Not part of the default ``pytest`` run (its testpaths is ``tests/``).  Each fastlm
benchmark first checks that fastlm and torch agree on its input, so a wrong kernel fails here
instead of looking fast.  Ops that are not importable yet are skipped with the reason.
Sizes are small on CPU and GPU-sized on CUDA; ``auto`` backend selection as a user gets it.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEVICE == "cuda"
DTYPE = torch.bfloat16 if GPU else torch.float32
TOL = {"atol": 2e-2, "rtol": 2e-2} if GPU else {"atol": 1e-4, "rtol": 1e-4}


def _op(name):
    try:
        return getattr(importlib.import_module(f"fastlm.ops.{name}"), name)
    except Exception as exc:  # the op module has not landed, or fastlm is broken
        pytest.skip(f"fastlm.ops.{name} not importable: {type(exc).__name__}: {exc}")


def _softmax_inputs():
    rows, cols = (8192, 4096) if GPU else (256, 1024)
    x = torch.randn(rows, cols, device=DEVICE, dtype=DTYPE)
    mask = torch.rand(rows, cols, device=DEVICE) > 0.1
    return (x, mask), lambda x, mask: torch.softmax(x.masked_fill(~mask, float("-inf")), -1), \
        lambda op, x, mask: op(x, mask=mask)


def _cross_entropy_inputs():
    n, vocab = (8192, 32768) if GPU else (256, 4096)
    logits = torch.randn(n, vocab, device=DEVICE, dtype=DTYPE)
    labels = torch.randint(0, vocab, (n,), device=DEVICE)
    labels[torch.rand(n, device=DEVICE) < 0.85] = -100  # masked LM: 15% of positions scored
    return (logits, labels), lambda logits, labels: F.cross_entropy(logits.float(), labels), \
        lambda op, logits, labels: op(logits, labels)


def _attention_inputs():
    b, h, s, d = (32, 12, 512, 64) if GPU else (2, 4, 128, 32)
    q, k, v = (torch.randn(b, h, s, d, device=DEVICE, dtype=DTYPE) for _ in range(3))
    lengths = torch.randint(s // 4, s + 1, (b,), device=DEVICE)
    mask = torch.arange(s, device=DEVICE)[None, :] < lengths[:, None]
    return (q, k, v, mask), \
        lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]), \
        lambda op, q, k, v, mask: op(q, k, v, key_padding_mask=mask)


CASES = {"softmax": _softmax_inputs, "cross_entropy": _cross_entropy_inputs, "attention": _attention_inputs}


def _timed(fn):
    if not GPU:
        return fn

    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out
    return synced


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("provider", ["torch", "fastlm"])
@pytest.mark.parametrize("op_name", list(CASES))
def test_op(benchmark, op_name, provider, mode):
    op = _op(op_name)
    inputs, torch_fn, fastlm_call = CASES[op_name]()
    inputs = tuple(t.requires_grad_(True) if t.is_floating_point() else t for t in inputs)
    fastlm_fn = lambda *a: fastlm_call(op, *a)  # noqa: E731
    expected = torch_fn(*inputs)
    fn = torch_fn if provider == "torch" else fastlm_fn
    if provider == "fastlm":
        torch.testing.assert_close(fn(*inputs).float(), expected.float(), **TOL)
    grads = [t for t in inputs if t.requires_grad]
    dout = torch.randn_like(expected) if expected.dim() else torch.ones_like(expected)

    def forward():
        with torch.no_grad():
            return fn(*inputs)

    def full():
        return torch.autograd.grad(fn(*inputs), grads, dout)

    benchmark.group = f"{op_name}-{mode}-{DEVICE}"
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), provider=provider)
    benchmark(_timed(forward if mode == "forward" else full))
