"""Targets (backend x device) shared by the attention tests (each requests the NaN-poisoned
allocations of conftest's ``poison``) and the tolerance checks; the float64 truth is
_attention_truth.py.  Imported by name (pytest's ``pythonpath`` has tests/)."""
import importlib
from dataclasses import dataclass

import pytest
import torch

from _backends import gpu_params
from fastlm import registry
from fastlm.ops.attention import _CAUSAL_CODES
from fastlm.ops.attention import problem as attention_problem

TARGETS = [
    pytest.param(("reference", "cpu"), id="reference"),
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("triton", "cpu"), id="triton"),
    # the torch backend's mapping, run against CPU emulations of PyTorch's kernels (tests/_aten_emulation.py)
    pytest.param(("torch", "cpu"), id="torch"),
    *gpu_params(["reference", "triton", "cuda", "torch"], value=lambda backend: (backend, "cuda")),
]


def target_skip_reason(backend: str, device: str) -> str | None:
    """Why ``backend`` cannot be tested on ``device`` tensors in this process (None: it can)."""
    if backend == "torch" and device == "cpu":
        return None  # emulated kernels: nothing to probe
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
        """Skip when a GPU backend (or the torch backend's kernels) declares it cannot serve
        this input; the CPU backends serve every input."""
        if self.device == "cpu" and self.backend != "torch":
            return
        seq = 0 if packed else 2
        problem = attention_problem(q, k, padding=False, packed=packed, causal=_CAUSAL_CODES[causal],
                                    window=window or 0, dropout_p=0.5 if dropout else 0.0,
                                    max_seqlen=max(q.shape[seq], k.shape[seq]),
                                    same_lengths=not packed and q.shape[seq] == k.shape[seq])
        reasons = registry.table("attention")[self.backend].unsupported_reasons(problem)
        if reasons:
            pytest.skip(f"{self.backend}: {'; '.join(reasons)}")


@pytest.fixture(params=TARGETS)
def target(request, poison):
    why = target_skip_reason(*request.param)
    if why:
        pytest.skip(f"{request.param[0]}: {why}")
    if request.param == ("torch", "cpu"):
        from _aten_emulation import EMULATION

        import fastlm.aten.attention

        request.getfixturevalue("torch_tier_on_cpu")
        request.getfixturevalue("monkeypatch").setattr(fastlm.aten.attention, "ATEN", EMULATION)
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


def assert_within_eager(actual, eager, truth, factor, what, per_problem=False, floor=1e-6):
    """Max error of ``actual`` vs float64 ``truth`` at most ``factor`` x that of plain eager
    PyTorch (+ ``floor``, so that an analytically exact zero is judged absolutely).
    ``per_problem``: the rule holds for every (batch, head) slice on its own, as for
    independent inputs (a problem whose gradients are tiny is not hidden by the others')."""
    dims = (-2, -1) if per_problem else tuple(range(truth.dim()))

    def err(t):
        return (t.double().cpu() - truth.cpu()).abs().amax(dims)

    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    ratio = err(actual) / (err(eager) + floor)
    worst = ratio.argmax()
    assert ratio.max() <= factor, (f"{what}: error {err(actual).flatten()[worst]:.3g} > {factor} x eager error "
                                   f"{err(eager).flatten()[worst]:.3g}" + (f" (problem {worst.item()})" if per_problem else ""))
