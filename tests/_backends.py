"""Which CPU-testable backends can run an op here; shared by the op test files."""
import pytest

import fastlm

CPU_TESTABLE = ["reference", "cpu", "triton", "torch"]


def require_backend(request, op: str, name: str) -> str:
    """Skip (with the reason) when backend ``name`` cannot run ``op`` on CPU tensors here:
    no compiled extension or one built without the op's kernels (cpu), no triton or no
    ``TRITON_INTERPRET=1`` (triton), no kernels for the op (torch, whose kernels are
    plain torch ops run on CPU tensors through conftest's ``torch_tier_on_cpu``).
    Returns ``name``."""
    if name == "torch":
        if "torch" not in fastlm.registry.table(op):
            pytest.skip(f"the torch backend has no {op} kernels")
        request.getfixturevalue("torch_tier_on_cpu")
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
