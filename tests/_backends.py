"""Which backends a test runs on: CPU-testable backends, and the GPU tests' backend convention.

GPU tests (``bench/gpu_check.sh`` runs them one pytest process per backend:
``pytest -m gpu --gpu-backend NAME``, see tests/conftest.py).  Every ``gpu``-marked test
declares the ONE fastlm backend it exercises with the mark ``backend(NAME)``:

* parametrized over backends: ``@pytest.mark.parametrize("gpu_backend", gpu_params(["triton", "cuda"]))``
  (or ``@pytest.fixture(params=[..., *gpu_params(...)])``): each case gets the id ``gpu-NAME``
  and the marks ``gpu`` and ``backend(NAME)``; ``value=`` maps the name to the parameter;
* a test of one backend: ``@pytest.mark.gpu`` and ``@pytest.mark.backend("cuda")``.

A gpu test that declares none runs in gpu_check's last pass (``--gpu-backend cuda,undeclared``),
and tests/test_bench_harness.py fails on it.  The id ``gpu-NAME`` also lets a record of a
crashed test name its backend (bench/gpu_verification.py).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import pytest

import fastlm

CPU_TESTABLE = ["reference", "cpu", "triton"]
UNDECLARED = "undeclared"  # --gpu-backend name for gpu tests that declare no backend


def require_backend(request, op: str, name: str) -> str:
    """Skip (with the reason) when backend ``name`` cannot run ``op`` on CPU tensors here:
    no compiled extension or one built without the op's kernels (cpu), no triton or no
    ``TRITON_INTERPRET=1`` (triton).  Returns ``name``."""
    if name == "cpu":
        kernels = request.getfixturevalue("cpu_ext")
        if not hasattr(kernels, f"{op}_forward"):
            pytest.skip(f"fastlm._C was built without the {op} kernels")
    if name == "triton":
        why = fastlm.registry.BACKENDS["triton"].unavailable_reason()
        if why:
            pytest.skip(why)
        if not fastlm.registry.triton_interpreted():
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (GPU runs: the gpu-marked tests)")
    return name


def gpu_params(backends: Iterable[str], value: Callable[[str], Any] = lambda name: name) -> list:
    """One ``pytest.param(value(name), id="gpu-<name>")`` per backend, marked ``gpu`` and ``backend(name)``."""
    return [pytest.param(value(name), id=f"gpu-{name}", marks=(pytest.mark.gpu, pytest.mark.backend(name)))
            for name in backends]


def declared_backend(item) -> str | None:
    """The backend a collected test declares with the ``backend`` mark (None: none)."""
    mark = item.get_closest_marker("backend")
    return mark.args[0] if mark is not None and mark.args else None


def split_by_gpu_backend(items: list, names: Iterable[str]) -> tuple[list, list]:
    """``(kept, dropped)``: kept = the gpu-marked items whose declared backend is in ``names``
    (``"undeclared"`` keeps those that declare none), in their order."""
    names = set(names)
    kept, dropped = [], []
    for item in items:
        backend = declared_backend(item) or UNDECLARED
        (kept if item.get_closest_marker("gpu") is not None and backend in names else dropped).append(item)
    return kept, dropped
