"""Build script for fastlm's one compiled extension, ``fastlm._C``.

* The C++ CPU kernels (``csrc/cpu/*.cpp``) are always built.
* The CUDA kernels (``csrc/cuda/*.cu`` plus their ``*_ops.cpp`` glue) are built when
  the installed torch is a CUDA build and ``nvcc`` is found; no GPU is needed.
  ``FASTLM_SKIP_CUDA_BUILD=1`` skips them, ``FASTLM_FORCE_CUDA_BUILD=1`` fails the
  build instead of skipping when they cannot be built.
* ``TORCH_CUDA_ARCH_LIST`` picks the GPU targets (default "8.0;9.0"); ``MAX_JOBS``
  bounds the parallel compile jobs (ninja).
* Triton sources live in the top-level ``kernels/`` folder and are installed as
  ``fastlm.kernels`` (never as a top-level ``kernels`` module).

torch must already be installed: build with ``pip install --no-build-isolation .``
so the extension is compiled against the torch you will run it with.
"""
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_source_module():
    """fastlm/_source.py by path (importing the fastlm package here would need torch's ops)."""
    spec = importlib.util.spec_from_file_location("_fastlm_source", os.path.join(ROOT, "fastlm", "_source.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_home(torch_guess):
    """The CUDA toolkit folder: the one holding both bin/nvcc and include/cuda_runtime.h.

    torch guesses from ``which nvcc``; a wrapper script such as /usr/local/bin/nvcc makes
    that guess /usr/local, which has no CUDA headers, so check candidates in order.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), torch_guess]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in filter(None, candidates):
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return home
    return None


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # pragma: no cover - exercised only on a broken install
        sys.exit(
            "fastlm: torch is not installed. fastlm compiles against the torch you run with;\n"
            "install it first (e.g. `pip install torch==2.14.1`), then\n"
            "`pip install --no-build-isolation .`"
        )

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = ["csrc/fastlm.cpp"] + rel("csrc/cpu/*.cpp")
    cuda_sources = rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")

    want_cuda = not _flag("FASTLM_SKIP_CUDA_BUILD")
    cuda_home = _cuda_home(cpp_extension.CUDA_HOME)
    cpp_extension.CUDA_HOME = cuda_home  # torch's include/library paths follow this global
    nvcc = cuda_home and shutil.which(os.path.join(cuda_home, "bin", "nvcc"))
    why_not = None
    if torch.version.cuda is None:
        why_not = "the installed torch is a CPU-only build"
    elif not nvcc:
        why_not = "nvcc was not found (set CUDA_HOME)"
    with_cuda = want_cuda and why_not is None and bool(cuda_sources)
    if _flag("FASTLM_FORCE_CUDA_BUILD") and not with_cuda:
        sys.exit(f"fastlm: FASTLM_FORCE_CUDA_BUILD=1 but the CUDA kernels cannot be built: {why_not or 'skipped'}")
    if want_cuda and why_not:
        print(f"fastlm: building without CUDA kernels: {why_not}", file=sys.stderr)

    # No -std flag: torch.utils.cpp_extension adds the standard its headers need
    # (C++17 for torch 2.11, C++20 for newer).
    cxx = ["-O3", "-fopenmp"]
    define = []
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        define.append(("FASTLM_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "fastlm._C",
            sources + cuda_sources,
            define_macros=define,
            extra_compile_args={
                "cxx": cxx,
                # .cu files include only CUDA headers (no torch/extension.h): fast nvcc.
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "fastlm._C", sources, define_macros=define,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": _stamped(cpp_extension.BuildExtension).with_options(use_ninja=True)}


def _stamped(build_ext_class):
    """build_ext that writes the csrc digest beside the built ``_C`` (see fastlm/_source.py),
    so the tests can refuse a stale extension."""
    source = _load_source_module()

    class StampedBuildExtension(build_ext_class):
        def run(self):
            super().run()
            # beside the built library, and beside its in-place copy (setup.py build_ext --inplace)
            folders = {os.path.dirname(os.path.join(self.build_lib, self.get_ext_filename(e.name)))
                       for e in self.extensions}
            if self.inplace:
                build_py = self.get_finalized_command("build_py")
                folders |= {build_py.get_package_dir(e.name.rpartition(".")[0]) for e in self.extensions}
            for folder in folders:
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, source.DIGEST_FILE), "w") as f:
                    f.write(source.digest(ROOT) + "\n")

    return StampedBuildExtension


ext_modules, cmdclass = _extensions()

setup(
    # every package under fastlm/ (the dev loop's fastlm/kernels link excluded), and kernels/ as fastlm.kernels
    packages=find_packages(include=["fastlm", "fastlm.*"], exclude=["fastlm.kernels", "fastlm.kernels.*"])
    + ["fastlm.kernels"],
    package_dir={"fastlm": "fastlm", "fastlm.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
