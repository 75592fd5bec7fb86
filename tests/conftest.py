"""Shared test setup.

* Triton kernels are interpreted on the CPU (``TRITON_INTERPRET=1``) unless the
  environment says otherwise (``bench/gpu_check.sh`` sets 0 to run them on a GPU).
  It must be set before triton is first imported.
* Nothing here queries a GPU at import time: GPU tests are marked ``gpu`` and are
  skipped at collection-run time when no CUDA device is present.
* ``--gpu-backend NAMES`` (comma-separated) keeps only the gpu-marked tests that declare one
  of these backends (mark ``backend(NAME)``; ``undeclared``: those that declare none): one
  pytest process per backend in ``bench/gpu_check.sh``.  The convention: tests/_backends.py.
* The suite refuses to start when the fastlm it imports is not a build of the source tree
  it sits in (an installed copy from before an edit, or an extension compiled from other
  C++ sources): see ``fastlm/_source.py`` and the README's Development section.
"""
import importlib.util
import os
import zlib
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--gpu-backend", default=None, metavar="NAMES",
                     help="keep only the gpu tests of these backends (comma-separated; 'undeclared': "
                          "gpu tests that declare none); see tests/_backends.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "backend(name): the one fastlm backend a gpu test exercises "
                                       "(tests/_backends.py: gpu_params)")
    tree = Path(__file__).resolve().parent.parent
    if not (tree / "setup.py").is_file():  # tests copied out of a checkout: nothing to compare with
        return
    import fastlm

    spec = importlib.util.spec_from_file_location("_fastlm_source", tree / "fastlm" / "_source.py")
    source = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(source)
    why = source.stale_reason(tree, Path(fastlm.__file__).parent)
    if why:
        raise pytest.UsageError(
            f"the fastlm under test ({Path(fastlm.__file__).parent}) is not a build of this source tree: {why}. "
            "Reinstall (pip install --no-build-isolation .) or use the dev loop of README.md's Development section.")


def pytest_collection_modifyitems(config, items):
    wanted = config.getoption("--gpu-backend")
    if wanted:
        from _backends import split_by_gpu_backend

        items[:], dropped = split_by_gpu_backend(items, [n.strip() for n in wanted.split(",") if n.strip()])
        if dropped:
            config.hook.pytest_deselected(items=dropped)
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


@pytest.fixture
def poison():
    """Every uninitialised allocation starts as NaN, so elements a kernel fails to write
    show up: PyTorch's ``fill_uninitialized_memory`` (active in deterministic mode) makes
    ``torch.empty*`` in Python and ``at::empty*`` in the C++/CUDA kernels fill floats with
    NaN.  ``warn_only``: ops without a deterministic implementation still run."""
    import warnings

    old_mode, old_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deterministic.*")
        yield
    torch.use_deterministic_algorithms(old_mode, warn_only=old_warn)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill
