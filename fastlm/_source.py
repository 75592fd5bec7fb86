"""Fingerprints of the source tree, so tests never run against a stale build.

``digest(root)`` hashes every C++/CUDA source under ``root/csrc`` (paths and bytes).
``setup.py`` writes it next to the compiled extension as ``_C.digest`` when it builds
``fastlm._C``; the test suite (``tests/conftest.py``) recomputes it from the tree it sits
in and refuses to run when they differ, and compares the tree's Python files with the
imported package's.  Standard library only: ``setup.py`` loads this file by path.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

CSRC_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")
DIGEST_FILE = "_C.digest"


def digest(root: str | Path) -> str:
    """sha256 over ``root/csrc``'s C++/CUDA sources (relative path and contents, sorted)."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in (root / "csrc").rglob("*") if p.suffix in CSRC_SUFFIXES and p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def stale_reason(tree: str | Path, package_dir: str | Path) -> str | None:
    """Why the fastlm package at ``package_dir`` is not a build of the source ``tree``, or None.

    Python files (``fastlm/`` and ``kernels/``, installed as ``fastlm.kernels``) are compared
    by content; the compiled extension by the digest written beside it at build time (only
    when one was built: a package without ``_C`` runs on Triton and the reference)."""
    tree, package_dir = Path(tree), Path(package_dir)
    pairs = [(tree / "fastlm", package_dir), (tree / "kernels", package_dir / "kernels")]
    for source, installed in pairs:
        for path in sorted(source.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            target = installed / path.relative_to(source)
            if not target.is_file() or target.read_bytes() != path.read_bytes():
                return f"{path.relative_to(tree)} differs from {target}"
    built = [p for p in package_dir.glob("_C*.so")] + [p for p in package_dir.glob("_C*.pyd")]
    if built:
        stamp = package_dir / DIGEST_FILE
        if not stamp.is_file():
            return f"{built[0].name} has no {DIGEST_FILE} (built before fingerprints existed)"
        if stamp.read_text().strip() != digest(tree):
            return f"{built[0].name} was compiled from other csrc/ sources than {tree / 'csrc'}"
    return None
