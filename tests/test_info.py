"""`fastlm info` and `python -m fastlm info` report versions, device and backends."""
import json
import os
import subprocess
import sys

import fastlm
from fastlm.info import collect


def test_collect_reports_every_backend_and_op():
    data = collect()
    assert set(data["backends"]) == {"reference", "cpu", "triton", "cuda"}
    for backend in data["backends"].values():
        assert backend["available"] or backend["reason"]
    assert {"attention", "softmax", "cross_entropy"} <= set(data["ops"])
    assert data["composites"]["linear_cross_entropy"]["via"] == "cross_entropy"
    for rows in data["ops"].values():
        assert rows["reference"]["auto"]
        for name in ("triton", "cuda"):
            if name in rows and "unverified" in rows[name]["status"]:
                assert not rows[name]["auto"]


def test_collect_reports_each_rows_limits():
    """The limits printed are the rows' declared data (the README points here)."""
    from fastlm import registry

    attention = collect()["ops"]["attention"]
    cuda = registry.table("attention")["cuda"]
    assert attention["cuda"]["head_dims"] == str(cuda.head_dims) == "{64, 128}"
    assert attention["cuda"]["features_missing"] == ["window"] and attention["cpu"]["features_missing"] == []
    assert attention["triton"]["head_dims"] == "16..256"
    assert attention["reference"]["dtypes"] == ["float16", "bfloat16", "float32", "float64"]


def test_cli_info_runs_as_module_and_json(tmp_path):
    # run outside the source tree so the installed package (with its _C) is what runs
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "fastlm", "info"], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for word in ("torch", "triton", "transformers", "reference", "unverified", "head_dim {64, 128}",
                 "all features but window", "linear_cross_entropy: via cross_entropy"):
        assert word in out.stdout
    out = subprocess.run([sys.executable, "-m", "fastlm", "info", "--json"], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert json.loads(out.stdout)["versions"]["torch"]


def test_import_is_lazy(tmp_path):
    code = ("import sys, fastlm; "
            "bad = [m for m in ('triton', 'transformers', 'fastlm._C') if m in sys.modules]; "
            "print(bad); assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert fastlm.__version__
