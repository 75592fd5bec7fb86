"""The suite's stale-build guard (fastlm/_source.py): a package that is not a build of the tree is named."""
import shutil

from fastlm import _source


def _tree(tmp_path):
    tree = tmp_path / "tree"
    (tree / "csrc" / "cpu").mkdir(parents=True)
    (tree / "csrc" / "cpu" / "op.cpp").write_text("int f() { return 1; }\n")
    (tree / "fastlm" / "ops").mkdir(parents=True)
    (tree / "fastlm" / "__init__.py").write_text("")
    (tree / "fastlm" / "ops" / "op.py").write_text("X = 1\n")
    (tree / "kernels").mkdir()
    (tree / "kernels" / "op.py").write_text("K = 1\n")
    return tree


def _install(tree, tmp_path):
    pkg = tmp_path / "site" / "fastlm"
    shutil.copytree(tree / "fastlm", pkg)
    shutil.copytree(tree / "kernels", pkg / "kernels")
    (pkg / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    (pkg / _source.DIGEST_FILE).write_text(_source.digest(tree) + "\n")
    return pkg


def test_a_fresh_build_passes(tmp_path):
    tree = _tree(tmp_path)
    assert _source.stale_reason(tree, _install(tree, tmp_path)) is None


def test_an_edited_python_file_is_named(tmp_path):
    tree = _tree(tmp_path)
    pkg = _install(tree, tmp_path)
    (tree / "fastlm" / "ops" / "op.py").write_text("X = 2\n")
    assert "fastlm/ops/op.py differs" in _source.stale_reason(tree, pkg)
    (tree / "fastlm" / "ops" / "op.py").write_text("X = 1\n")
    (tree / "kernels" / "new.py").write_text("")
    assert "kernels/new.py differs" in _source.stale_reason(tree, pkg)


def test_an_extension_from_other_sources_is_named(tmp_path):
    tree = _tree(tmp_path)
    pkg = _install(tree, tmp_path)
    (tree / "csrc" / "cpu" / "op.cpp").write_text("int f() { return 2; }\n")
    assert "compiled from other csrc/ sources" in _source.stale_reason(tree, pkg)
    (pkg / _source.DIGEST_FILE).unlink()
    assert "has no _C.digest" in _source.stale_reason(tree, pkg)


def test_digest_covers_paths_and_contents(tmp_path):
    tree = _tree(tmp_path)
    before = _source.digest(tree)
    (tree / "csrc" / "cpu" / "op.cpp").rename(tree / "csrc" / "cpu" / "op2.cpp")
    assert _source.digest(tree) != before
    (tree / "csrc" / "cpu" / "notes.txt").write_text("not a source")
    renamed = _source.digest(tree)
    assert _source.digest(tree) == renamed
