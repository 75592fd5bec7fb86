"""Backend selection: auto picks the first trusted backend that fits, explicit requests
that cannot be served raise with reasons and the input, FASTLM_BACKEND overrides auto;
limits are data, decisions and availability are cached."""
import pathlib
import sys
import types

import pytest
import torch

import fastlm
from fastlm import registry
from fastlm.registry import Backend, BackendError, Implementation, Problem, Sizes

F16, F32 = torch.float16, torch.float32


@pytest.fixture
def toy_op(monkeypatch):
    """A throwaway op with a row per backend; the cuda row is verified, triton is not."""
    module = types.ModuleType("fastlm_toy_kernels")
    module.toy_forward = lambda x: ("toy", x)
    monkeypatch.setitem(sys.modules, "fastlm_toy_kernels", module)
    monkeypatch.setattr(registry, "_TABLES", dict(registry._TABLES))
    registry.register(
        Implementation("toy", "reference", "fastlm_toy_kernels", (F32, F16, torch.float64),
                       features=frozenset({"window", "dropout"})),
        Implementation("toy", "triton", "fastlm_toy_kernels", (F16,), head_dims=Sizes(1, 128),
                       features=frozenset({"dropout"})),
        Implementation("toy", "cuda", "fastlm_toy_kernels", (F16,), verified="H200 (test fixture)"),
    )
    monkeypatch.delenv("FASTLM_BACKEND", raising=False)
    yield "toy"
    registry._DECISIONS.clear()


def test_auto_on_cpu_picks_reference(toy_op, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    impl = registry.select(toy_op, Problem.of("cpu", F16, head_dim=64), "auto")
    assert impl.backend == "reference"
    assert impl.function("forward")(3) == ("toy", 3)


def test_auto_never_picks_interpreted_triton(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    problem = Problem.of("cpu", F16, head_dim=64)
    assert registry.select(toy_op, problem, "auto").backend == "reference"
    if registry.BACKENDS["triton"].unavailable_reason() is None:
        assert registry.select(toy_op, problem, "triton").backend == "triton"


def test_explicit_request_lists_reasons_and_input(toy_op, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(2, 3)
    with pytest.raises(BackendError) as err:
        registry.select(toy_op, Problem.of("cpu", F32, head_dim=256, features={"window"}), "triton", x=x, causal=1)
    msg = str(err.value)
    assert "backend 'triton' cannot serve this input" in msg
    if registry.BACKENDS["triton"].unavailable_reason() is None:
        for reason in ("not cpu", "TRITON_INTERPRET=1", "float32 not supported", "head_dim 256 outside 1..128",
                       "window not supported"):
            assert reason in msg
    assert "input: x (2, 3) float32 on cpu, causal=1; features needed: window" in msg
    with pytest.raises(BackendError, match="has no kernel for this op"):
        registry.select(toy_op, Problem.of("cpu", F32), "cpu")


def test_no_backend_lists_every_backend(toy_op, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError) as err:
        registry.select(toy_op, Problem.of("cpu", torch.int32), "auto")
    lines = str(err.value).splitlines()
    assert lines[0] == "fastlm.toy: no backend can serve this input:"
    assert [line.split(":")[0].strip() for line in lines[1:4]] == ["cuda", "triton", "reference"]
    assert lines[-1] == "  input: int32 on cpu"


def test_backend_error_is_value_and_runtime_error():
    assert issubclass(BackendError, ValueError) and issubclass(BackendError, RuntimeError)


def test_env_override_and_bad_names(toy_op, monkeypatch):
    problem = Problem.of("cpu", F16, head_dim=64)
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
    triton_missing = registry.BACKENDS["triton"].unavailable_reason()
    assert rows["triton"].auto_exclusion("cuda") == (triton_missing or registry.UNVERIFIED)
    assert rows["triton"].status == "compiled, unverified"
    assert rows["cuda"].status.startswith("verified on GPU")
    assert rows["reference"].auto_exclusion("cpu") is None and rows["reference"].status == "tested on CPU"


def test_limits_are_data():
    sizes = Sizes(8, 256, multiple=8)
    assert 64 in sizes and 260 not in sizes and 12 not in sizes and 0 not in sizes
    assert str(sizes) == "8..256 (multiples of 8)" and str(Sizes.of(128, 64)) == "{64, 128}"
    assert 96 not in Sizes.of(64, 128) and 10**6 in Sizes(16)
    impl = Implementation("toy", "reference", "m", (F16,), head_dims=Sizes.of(64, 128), max_length=8192,
                          features=frozenset({"dropout"}))
    assert impl.limit_reasons(Problem.of("cpu", F16, head_dim=64, length=8192, features={"dropout"})) == []
    assert impl.limit_reasons(Problem.of("cpu", F32, head_dim=96, length=8193, features={"window", "gqa"})) == [
        "dtype float32 not supported (supports float16)", "head_dim 96 outside {64, 128}", "length 8193 > 8192",
        "gqa, window not supported"]
    # an op without such sizes leaves them None: no limit applies
    assert impl.limit_reasons(Problem.of("cpu", F16)) == []


def test_problem_of_is_hashable_and_normalised():
    p = Problem.of(torch.device("cuda", 1), F32, head_dim=64, features=["window", "window"])
    assert p == Problem("cuda", F32, 64, None, frozenset({"window"}))
    assert {p: 1}[Problem.of("cuda:1", F32, head_dim=64, features={"window"})] == 1


def test_decisions_are_cached_per_problem_request_and_environment(toy_op, monkeypatch):
    calls = []
    decide = registry._decide
    monkeypatch.setattr(registry, "_decide", lambda *a: calls.append(a) or decide(*a))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    problem = Problem.of("cpu", F16, head_dim=64)
    for _ in range(3):
        assert registry.select(toy_op, problem, "auto").backend == "reference"
    with pytest.raises(BackendError):
        registry.select(toy_op, problem, "cuda")
    with pytest.raises(BackendError, match="x \\(1,\\)"):  # a cached refusal still names this call's input
        registry.select(toy_op, problem, "cuda", x=torch.zeros(1))
    assert len(calls) == 2
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the environment is part of the key
    registry.select(toy_op, problem, "auto")
    monkeypatch.setenv("FASTLM_BACKEND", "reference")
    registry.select(toy_op, problem, "auto")
    assert len(calls) == 4
    registry.register(Implementation("toy", "cpu", "fastlm_toy_kernels", (F16,)))  # new rows: decide again
    registry.select(toy_op, problem, "auto")
    assert len(calls) == 5


def test_a_backend_is_added_by_data_only(toy_op, monkeypatch):
    """A trusted GPU backend (as PyTorch's own kernels would be) inserted between triton and
    cpu: auto picks it on CUDA tensors without a verification record; its probe runs once."""
    probes = []
    torch_like = Backend("toytorch", "a test backend", frozenset({"cuda"}),
                         probe=lambda: probes.append(1) or None, trusted="PyTorch's kernels")
    order = list(registry.BACKENDS.values())
    order.insert([b.name for b in order].index("cpu"), torch_like)
    monkeypatch.setattr(registry, "BACKENDS", {b.name: b for b in order})
    registry.register(Implementation("toy", "toytorch", "fastlm_toy_kernels", (F16, F32)))
    registry.register(Implementation("toy", "cuda", "fastlm_toy_kernels", (F16,)))  # unverified: not auto
    assert registry.select(toy_op, Problem.of("cuda", F32), "auto").backend == "toytorch"
    assert registry.select(toy_op, Problem.of("cpu", F32), "auto").backend == "reference"
    assert registry.select(toy_op, Problem.of("cuda", F16), "auto").backend == "toytorch"
    assert probes == [1]
    assert registry.check_backend_name("toytorch") == "toytorch"


def test_every_real_gpu_row_is_unverified_until_a_gpu_run_says_otherwise():
    """Keeps the record honest: a GPU row may be marked verified only with a reference
    to a committed GPU check result."""
    root = pathlib.Path(__file__).resolve().parents[1]
    for op in registry.ops():
        for name, impl in registry.table(op).items():
            if registry.BACKENDS[name].runs_on_gpu and impl.verified is not None:
                results = root / "bench" / "results"
                assert any(results.rglob("gpu_verification*.json")), f"{op}/{name} marked verified without GPU results"


def test_linear_cross_entropy_is_served_by_the_cross_entropy_backends():
    assert "linear_cross_entropy" not in registry.ops()
    assert registry.composites()["linear_cross_entropy"][0] == "cross_entropy"
    if registry.BACKENDS["cpu"].unavailable_reason():
        pytest.skip(registry.BACKENDS["cpu"].unavailable_reason())
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(BackendError, match="fastlm.cross_entropy: backend 'cpu' cannot serve this input: "
                                           "dtype float64 not supported.*\n  input: hidden \\(3, 4\\) float64"):
        fastlm.ops.linear_cross_entropy(x, torch.randn(5, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.long),
                                        backend="cpu")
