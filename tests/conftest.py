"""Shared test setup.

* Triton kernels are interpreted on the CPU (``TRITON_INTERPRET=1``) unless the
  environment says otherwise (``bench/gpu_check.sh`` sets 0 to run them on a GPU).
  It must be set before triton is first imported.
* Nothing here queries a GPU at import time: GPU tests are marked ``gpu`` and are
  skipped at collection-run time when no CUDA device is present.
"""
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per test, reproducible from the test id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def ext_loaded() -> bool:
    from fastlm import _ext

    return _ext.load() is not None


@pytest.fixture
def cpu_ext():
    """Skip (with the reason) when the compiled C++ extension is not available."""
    from fastlm import _ext

    why = _ext.unavailable_reason()
    if why:
        pytest.skip(why)
    return _ext.kernels()
