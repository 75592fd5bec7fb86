"""Backend selection: auto picks the first trusted backend that fits, explicit requests
that cannot be served raise with reasons, FASTLM_BACKEND overrides auto."""
import sys
import types

import pytest
import torch

from fastlm import registry
from fastlm.registry import BackendError, Implementation, Problem


def _limit_head_dim(problem):
    if problem.get("head_dim", 0) > 128:
        yield f"head_dim {problem['head_dim']} > 128"


@pytest.fixture
def toy_op(monkeypatch):
    """A throwaway op with a row per backend; the cuda row is verified, triton is not."""
    module = types.ModuleType("fastlm_toy_kernels")
    module.toy_forward = lambda x: ("toy", x)
    monkeypatch.setitem(sys.modules, "fastlm_toy_kernels", module)
    monkeypatch.setattr(registry, "_TABLES", dict(registry._TABLES))
    f32, f16 = torch.float32, torch.float16
    registry.register(
        Implementation("toy", "reference", "fastlm_toy_kernels", (f32, f16, torch.float64)),
        Implementation("toy", "triton", "fastlm_toy_kernels", (f16,), _limit_head_dim),
        Implementation("toy", "cuda", "fastlm_toy_kernels", (f16,), verified="H200 (test fixture)"),
    )
    monkeypatch.delenv("FASTLM_BACKEND", raising=False)
    return "toy"


def test_auto_on_cpu_picks_reference(toy_op, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    impl = registry.select(toy_op, Problem.of("cpu", torch.float16, head_dim=64), "auto")
    assert impl.backend == "reference"
    assert impl.function("forward")(3) == ("toy", 3)


def test_auto_never_picks_interpreted_triton(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    problem = Problem.of("cpu", torch.float16, head_dim=64)
    assert registry.select(toy_op, problem, "auto").backend == "reference"
    if registry.BACKENDS["triton"].unavailable_reason() is None:
        assert registry.select(toy_op, problem, "triton").backend == "triton"


def test_explicit_request_lists_reasons(toy_op, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError) as err:
        registry.select(toy_op, Problem.of("cpu", torch.float32, head_dim=256), "triton")
    msg = str(err.value)
    assert "triton" in msg
    if registry.BACKENDS["triton"].unavailable_reason() is None:
        assert "not cpu" in msg and "float32 not supported" in msg and "head_dim 256 > 128" in msg
    with pytest.raises(BackendError, match="has no kernel for this op"):
        registry.select(toy_op, Problem.of("cpu", torch.float32), "cpu")


def test_backend_error_is_value_and_runtime_error():
    assert issubclass(BackendError, ValueError) and issubclass(BackendError, RuntimeError)


def test_env_override_and_bad_names(toy_op, monkeypatch):
    problem = Problem.of("cpu", torch.float16, head_dim=64)
    monkeypatch.setenv("FASTLM_BACKEND", "cuda")
    with pytest.raises(BackendError, match="backend 'cuda' cannot serve"):
        registry.select(toy_op, problem, "auto")
    # an explicit argument wins over the environment
    assert registry.select(toy_op, problem, "reference").backend == "reference"
    monkeypatch.setenv("FASTLM_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTLM_BACKEND"):
        registry.select(toy_op, problem, "auto")
    with pytest.raises(ValueError, match="backend must be"):
        registry.select(toy_op, problem, "gpu")


def test_unverified_gpu_rows_are_not_auto(toy_op):
    rows = registry.table(toy_op)
    cuda_problem = Problem.of("cuda", torch.float16, head_dim=64)
    assert rows["triton"].auto_exclusion(cuda_problem) == registry.UNVERIFIED
    assert rows["cuda"].auto_exclusion(cuda_problem) is None
    assert rows["triton"].status == "compiled, unverified"
    assert rows["cuda"].status.startswith("verified on GPU")


def test_every_real_gpu_row_is_unverified_until_a_gpu_run_says_otherwise():
    """Keeps the record honest: a GPU row may be marked verified only with a reference
    to a committed GPU check result."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    for op in registry.ops():
        for name, impl in registry.table(op).items():
            if registry.BACKENDS[name].runs_on_gpu and impl.verified is not None:
                results = root / "bench" / "results"
                assert any(results.rglob("gpu_verification*.json")), f"{op}/{name} marked verified without GPU results"


def test_problem_accessors():
    p = Problem.of(torch.device("cpu"), torch.float32, head_dim=64, causal=1)
    assert p.device == "cpu" and p["head_dim"] == 64 and p.get("missing", 5) == 5
    with pytest.raises(KeyError):
        p["missing"]
