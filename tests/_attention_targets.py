"""Targets (backend x device) shared by the attention tests (each requests the NaN-poisoned
allocations of conftest's ``poison``), the tolerance checks, and the float64 truth (padded
batches; test_varlen_attention.py applies it per sequence).  Imported by name (pytest's ``pythonpath`` has tests/)."""
import importlib
import math
from dataclasses import dataclass

import pytest
import torch

from _backends import gpu_params
from fastlm import registry
from fastlm.registry import Problem

TARGETS = [
    pytest.param(("reference", "cpu"), id="reference"),
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("triton", "cpu"), id="triton"),
    *gpu_params(["reference", "triton", "cuda"], value=lambda backend: (backend, "cuda")),
]


def target_skip_reason(backend: str, device: str) -> str | None:
    """Why ``backend`` cannot be tested on ``device`` tensors in this process (None: it can)."""
    why = registry.BACKENDS[backend].unavailable_reason()
    if why:
        return why
    if backend == "triton":
        if (device == "cpu") != registry.triton_interpreted():
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (and on GPU ones only without it)"
        try:
            importlib.import_module("fastlm.kernels.attention")
        except ModuleNotFoundError as exc:
            if exc.name != "fastlm.kernels.attention":
                raise
            return "fastlm.kernels.attention does not exist yet"
    if backend in ("cpu", "cuda"):
        from fastlm import _ext

        key = "CPU" if backend == "cpu" else "CUDA"
        if not hasattr(_ext.kernels(), "attention_forward") or not torch._C._dispatch_has_kernel_for_dispatch_key(
                "fastlm_C::attention_forward", key):
            return f"fastlm._C has no {key} attention kernel yet"
    return None


@dataclass(frozen=True)
class Target:
    backend: str
    device: str

    @property
    def interpreted(self) -> bool:
        return self.backend == "triton" and self.device == "cpu"

    def require(self, q, k, causal=False, dropout=False, packed=False, window=None):
        """Skip when a GPU backend declares it cannot serve this input (never on CPU)."""
        if self.device == "cpu":
            return
        needs = {"window": window is not None, "dropout": dropout, "packed": packed, "gqa": q.shape[1] != k.shape[1],
                 "causal": causal is True, "bottom_right": causal == "bottom_right"}
        problem = Problem.of(q.device, q.dtype, head_dim=q.shape[-1], features=[f for f, on in needs.items() if on])
        reasons = registry.table("attention")[self.backend].unsupported_reasons(problem)
        if reasons:
            pytest.skip(f"{self.backend}: {'; '.join(reasons)}")


@pytest.fixture(params=TARGETS)
def target(request, poison):
    why = target_skip_reason(*request.param)
    if why:
        pytest.skip(f"{request.param[0]}: {why}")
    return Target(*request.param)


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def assert_close(actual, expected, tol, what):
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1.0)
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol * scale:.3g}"


def assert_within_eager(actual, eager, truth, factor, what):
    """Max error of ``actual`` vs float64 ``truth`` at most ``factor`` x that of plain eager PyTorch."""
    def err(t):
        return (t.double() - truth).abs().max().item()

    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    bound = factor * err(eager) + 1e-6
    assert err(actual) <= bound, f"{what}: error {err(actual):.3g} > {factor} x eager error {err(eager):.3g}"


# ------------------------------------------------------------------------------ numerics
# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, padding, bshd layout)


# ----------------------------------------------------------------- float64 expectation
def visible_mask(sq, sk, causal=False, key_padding_mask=None, device="cpu", window=None):
    """(B or 1, 1, sq, sk) bool: key j visible to query i.

    ``window`` w: query i sits at position i (i + sk - sq bottom-right) and sees the keys
    at distance < w, only those not after it when causal (flash-attn's window_size =
    (w - 1, w - 1) / (w - 1, 0))."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    if causal is True:
        m = j <= i
    elif causal == "bottom_right":
        m = j <= i + (sk - sq)
    else:
        m = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if window is not None:
        pos = i + (sk - sq) if causal == "bottom_right" else i
        m = m & ((pos - j).abs() < window)
    m = m[None, None]
    if key_padding_mask is not None:
        m = m & key_padding_mask[:, None, None, :]
    return m


def expected_attention(q, k, v, visible=None, scale=None, keep=None, dropout_p=0.0):
    """softmax(scale * q k^T) v in float64 (differentiable); rows with no visible key -> 0.

    ``keep`` (broadcastable to the scores) is an explicit dropout keep-mask.
    """
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, 1)
    v = v.repeat_interleave(groups, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return softmax_times_v(torch.einsum("bhid,bhjd->bhij", q, k) * scale, v, visible, keep, dropout_p)


def softmax_times_v(s, v, visible=None, keep=None, dropout_p=0.0):
    """softmax over the visible keys of the scores ``s`` (B, H, Lq, Lk), dropout by ``keep``,
    times ``v``; rows with no visible key -> 0.  In s's dtype (float64 in the truths)."""
    if visible is None:
        visible = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    visible = visible.expand(s.shape)
    any_visible = visible.any(-1, keepdim=True)
    s = torch.where(any_visible, s.masked_fill(~visible, float("-inf")), torch.zeros_like(s))
    p = torch.softmax(s, -1) * any_visible
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    return torch.einsum("bhij,bhjd->bhid", p, v)
