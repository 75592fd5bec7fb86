"""The benchmark harness (bench/harness.py), its report (bench/report.py) and the GPU-check
evidence folding (bench/gpu_verification.py).  Fast, CPU only; no test asserts a time."""
import csv
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        yield {name: importlib.import_module(name) for name in ("harness", "report", "gpu_verification")}
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture
def harness(bench_modules):
    return bench_modules["harness"]


@pytest.fixture
def report(bench_modules):
    return bench_modules["report"]


# ----------------------------------------------------------------------- statistics
def test_summarize_quantiles_match_linear_interpolation(harness):
    stats = harness.summarize([10.0, 1.0, 7.0, 4.0, 2.0, 9.0, 3.0, 6.0, 5.0, 8.0])
    # sorted 1..10: position q*(n-1); p20 -> 1.8 -> 2.8, median -> 4.5 -> 5.5, p80 -> 7.2 -> 8.2
    assert stats["ms_median"] == pytest.approx(5.5)
    assert stats["ms_p20"] == pytest.approx(2.8)
    assert stats["ms_p80"] == pytest.approx(8.2)
    assert stats["ms_min"] == 1.0 and stats["reps"] == 10 and stats["ms_mean"] == pytest.approx(5.5)
    one = harness.summarize([3.25])
    assert one["ms_median"] == one["ms_p20"] == one["ms_p80"] == 3.25
    with pytest.raises(ValueError):
        harness.summarize([])


def test_derived_rates_and_fractions_of_ceilings(harness):
    d = harness.derived(2.0, flops=6e9, nbytes=8e6, ceilings={"matmul_tflops": 6.0, "copy_gbps": 16.0})
    assert d["tflops"] == pytest.approx(3.0)          # 6e9 / 2e-3 s = 3e12
    assert d["gbps"] == pytest.approx(4.0)            # 8e6 / 2e-3 s = 4e9
    assert d["frac_matmul"] == pytest.approx(0.5) and d["frac_copy"] == pytest.approx(0.25)
    none = harness.derived(2.0, None, None, None)
    assert all(v is None for v in none.values())


def test_measure_ceilings_small_cpu(harness):
    c = harness.measure_ceilings("cpu", copy_bytes=2**20, matmul_n=64)
    assert c["copy_gbps"] > 0 and c["matmul_tflops"] > 0
    assert c["matmul_dtype"] == "float32" and c["copy_bytes"] == 2**20


# --------------------------------------------------------------------------- running
def _case(harness, n=64, params=None):
    def make(device):
        return {"x": torch.randn(n, n, device=device), "flag": True}

    return harness.Case(f"sq{n}", make, grad=("x",), params=params or {"n": n},
                        flops={"forward": 2.0 * n**3, "full": 6.0 * n**3}, bytes={"forward": 8.0 * n * n})


def _run(harness, providers, tmp_path, cases=None, **kw):
    return harness.run("fake", cases or [_case(harness)], providers, device="cpu", warmup_ms=0.0, rep_ms=0.0,
                       min_reps=2, max_reps=2, ceilings=False, results_dir=tmp_path, progress=False,
                       print_table=False, **kw)


def test_run_rows_statuses_and_skip_reasons(harness, tmp_path):
    H = harness

    def refuses(inputs):
        raise H.Unsupported("shape not served")

    def broken(inputs):
        raise ZeroDivisionError("bad kernel")

    providers = [
        H.Provider("torch", lambda inp: inp["x"] @ inp["x"]),
        H.Provider("nograd", lambda inp: (inp["x"] @ inp["x"]).detach()),
        H.Provider("refuses", refuses),
        H.Provider("declines", lambda inp: inp["x"], skip=lambda case, device: "needs a GPU"),
        H.Provider("fwdonly", lambda inp: inp["x"] * 2, modes=("forward",)),
        H.Provider("broken", broken),
    ]
    rows = _run(H, providers, tmp_path)
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert len(rows) == len(providers) * 3
    for mode in H.MODES:
        r = by[("torch", mode)]
        assert r["status"] == "ok" and r["reps"] == 2 and r["ms_median"] > 0 and r["n"] == 64
        assert r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
    assert by[("torch", "forward")]["tflops"] > 0 and by[("torch", "forward")]["gbps"] > 0
    assert by[("torch", "backward")]["tflops"] is None  # no flops counted for that mode
    assert by[("nograd", "forward")]["status"] == "ok"
    assert by[("nograd", "backward")]["status"] == "skipped" and "grad" in by[("nograd", "backward")]["reason"]
    assert all(by[("refuses", m)]["status"] == "skipped" for m in H.MODES)
    assert "shape not served" in by[("refuses", "full")]["reason"]
    assert by[("declines", "forward")]["reason"] == "needs a GPU"
    assert by[("fwdonly", "forward")]["status"] == "ok" and by[("fwdonly", "full")]["status"] == "skipped"
    assert by[("broken", "forward")]["status"] == "error" and "bad kernel" in by[("broken", "forward")]["reason"]
    for r in rows:
        assert r["bench"] == "fake" and r["device_type"] == "cpu" and r["torch"] == torch.__version__
        assert r["commit"] and r["timestamp"] and r["run_id"]


def test_backward_mode_computes_the_gradient(harness, tmp_path):
    seen = []

    def square_sum(inputs):
        out = (inputs["x"] ** 2).sum()
        seen.append(inputs["x"])
        return out

    rows = _run(harness, [harness.Provider("sq", square_sum)], tmp_path, modes=("backward",))
    assert rows[0]["status"] == "ok"
    x = seen[0]
    m = harness._Measurement([{"x": x}], [[x]], harness.Provider("sq", square_sum), "backward")
    (grad,) = m.call(0)
    torch.testing.assert_close(grad, 2 * x.detach())  # d/dx sum(x^2), output gradient 1 for a scalar


def test_inputs_rotate_when_they_fit_in_cache(harness, monkeypatch):
    monkeypatch.setattr(harness, "_cache_bytes", lambda device: 10_000)
    small = harness._make_sets(_case(harness, n=8), torch.device("cpu"), rotate=True)  # 256 B per set
    assert len(small) == harness.MAX_INPUT_SETS
    assert not torch.equal(small[0]["x"], small[1]["x"]) and small[0]["x"].requires_grad
    big = harness._make_sets(_case(harness, n=64), torch.device("cpu"), rotate=True)  # 16 KiB > cache/4
    assert len(big) == 3  # ceil(4 * 10000 / 16384)
    assert len(harness._make_sets(_case(harness, n=8), torch.device("cpu"), rotate=False)) == 1


def test_cpu_peak_memory_sees_a_large_temporary(harness):
    def allocate():
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so its pages are resident
        return t.sum()

    mb = harness.peak_memory_mb(allocate, torch.device("cpu"))
    assert mb is not None and 32 <= mb <= 256


# ------------------------------------------------------------------------ recording
def test_recorder_appends_csv_and_json_with_metadata(harness, tmp_path):
    p1 = [harness.Provider("torch", lambda inp: inp["x"] + 1)]
    rows1 = _run(harness, p1, tmp_path, modes=("forward",))
    rows2 = _run(harness, p1, tmp_path, modes=("forward",), cases=[_case(harness, 16, {"n": 16, "extra": "y"})])
    with open(tmp_path / "fake.csv", newline="") as f:
        reader = csv.DictReader(f)
        header, lines = reader.fieldnames, list(reader)
    assert len(lines) == 2 and "extra" in header  # the new column made the file be rewritten
    assert lines[0]["extra"] == "" and lines[1]["extra"] == "y"
    for col in ("device", "python", "torch", "triton", "transformers", "cuda", "commit", "timestamp", "ms_median"):
        assert col in header and lines[1][col] != ""
    assert lines[0]["run_id"] == rows1[0]["run_id"] != lines[1]["run_id"] == rows2[0]["run_id"]
    runs = json.loads((tmp_path / "fake.json").read_text())
    assert len(runs) == 2 and runs[1]["rows"][0]["case"] == "sq16"
    assert {"device", "torch", "commit", "timestamp"} <= set(runs[0]["meta"])


def test_git_commit_override_and_environment(harness, monkeypatch):
    monkeypatch.setenv("FASTLM_GIT_COMMIT", "abc123")
    env = harness.environment("cpu")
    assert env["commit"] == "abc123" and env["device_type"] == "cpu" and env["python"].count(".") == 2


def test_fastlm_providers_skip_with_reasons(harness):
    case = _case(harness)
    providers = {p.name: p for p in harness.fastlm_providers(lambda inp, b: inp["x"], name="op-{backend}")}
    assert set(providers) == {"op-reference", "op-cpu", "op-torch", "op-triton", "op-cuda"}
    assert providers["op-reference"].skip_reason(case, torch.device("cpu"), "forward") is None
    triton = providers["op-triton"].skip_reason(case, torch.device("cpu"), "forward")
    assert triton and ("interpret" in triton.lower() or "triton" in triton)  # never times the interpreter
    assert providers["op-cuda"].skip_reason(case, torch.device("cpu"), "forward")
    assert providers["op-torch"].skip_reason(case, torch.device("cpu"), "forward")  # CUDA tensors only


# --------------------------------------------------------------------------- report
def _fake_rows():
    base = {"bench": "fake", "run_id": "r1", "device": "Fake GPU", "torch": "2.x", "commit": "abc",
            "timestamp": "t", "ceiling_matmul_tflops": 100.0, "ceiling_copy_gbps": 1000.0}
    rows = []
    for case in ("small", "large"):
        for mode in ("forward", "full"):
            rows.append({**base, "case": case, "mode": mode, "provider": "torch", "status": "ok",
                         "ms_median": 2.0, "tflops": 10.0, "frac_matmul": 0.1, "peak_mb": 5.0})
            rows.append({**base, "case": case, "mode": mode, "provider": "fast", "status": "ok",
                         "ms_median": 1.0, "tflops": 20.0, "frac_matmul": 0.2, "peak_mb": 1.0})
            rows.append({**base, "case": case, "mode": mode, "provider": "gpu-only", "status": "skipped",
                         "reason": "needs CUDA"})
    return rows


def test_report_markdown_table(report):
    text = report.markdown(_fake_rows())
    assert "| case | mode | torch | fast |" in text
    assert "| small | forward | 2 ms · 10 TFLOP/s (10%) | 1 ms · 20 TFLOP/s (20%) · 2.00x |" in text
    assert "`gpu-only` skipped (all cases): needs CUDA" in text
    assert "Fake GPU" in text and "commit abc" in text and "100 TFLOP/s" in text


def test_report_cli_writes_markdown_and_png(report, harness, tmp_path):
    harness.Recorder("fake", tmp_path).write(_fake_rows(), {"device": "Fake GPU"}, {})
    for path in (tmp_path / "fake.csv", tmp_path / "fake.json"):
        assert report.main([str(path), "--png", str(tmp_path / f"{path.suffix[1:]}.png")]) == 0
        png = (tmp_path / f"{path.suffix[1:]}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert "| large | full |" in (tmp_path / "fake.md").read_text()
    loaded = report.load(tmp_path / "fake.csv")
    assert loaded[1]["ms_median"] == 1.0 and report.latest(loaded) == loaded


# ------------------------------------------------------------------ GPU verification
def test_gpu_verification_summary(bench_modules):
    gv = bench_modules["gpu_verification"]
    records = [
        {"nodeid": "tests/test_softmax.py::a", "file": "tests/test_softmax.py", "outcome": "passed",
         "kernels": [["softmax", "triton", "cuda"], ["softmax", "reference", "cpu"]]},
        {"nodeid": "tests/test_softmax.py::b", "file": "tests/test_softmax.py", "outcome": "failed",
         "kernels": [["softmax", "cuda", "cuda"]]},
        {"nodeid": "tests/test_softmax.py::c", "file": "tests/test_softmax.py", "outcome": "passed",
         "kernels": [["softmax", "cuda", "cuda"]]},
        {"nodeid": "tests/test_x.py::d", "file": "tests/test_x.py", "outcome": "skipped", "kernels": []},
    ]
    records.append({"collected": [r["nodeid"] for r in records]})
    s = gv.summarize(records, "Fake GPU", date="2026-01-01")
    soft = s["ops"]["softmax"]
    assert soft["triton"]["status"] == "passed" and soft["triton"]["tests_passed"] == 1
    assert soft["cuda"]["status"] == "failed" and soft["cuda"]["failing"] == ["tests/test_softmax.py::b"]
    assert "reference" not in soft or soft["reference"]["status"] == "not exercised"  # CPU calls are no GPU evidence
    assert soft["triton"]["device"] == "Fake GPU" and soft["triton"]["date"] == "2026-01-01"
    assert s["groups"]["tests/test_softmax.py"] == {"passed": 2, "failed": 1, "error": 0, "skipped": 0, "not run": 0}
    assert s["complete"]
    assert "| softmax | cuda | failed | 1 | 1 |" in gv.markdown(s)
    # cut off after the first test: test_softmax.py did not finish, so triton's pass is not final
    cut = gv.summarize(records[:1] + records[-1:], "Fake GPU")
    assert cut["ops"]["softmax"]["triton"]["status"] == "incomplete" and not cut["complete"]
    assert cut["groups"]["tests/test_softmax.py"]["not run"] == 2
    # a file of another op that did not finish does not hold softmax back
    other = records[:1] + [{"collected": [records[0]["nodeid"], "tests/test_attention.py::z"]}]
    assert gv.summarize(other, "Fake GPU")["ops"]["softmax"]["triton"]["status"] == "passed"
    # killed before the selection was recorded: nothing is final
    assert gv.summarize(records[:1], "Fake GPU", complete=False)["ops"]["softmax"]["triton"]["status"] == "incomplete"
    assert gv._op_of_file("tests/test_linear_cross_entropy.py", ["cross_entropy", "linear_cross_entropy"]) \
        == "linear_cross_entropy"


# ------------------------------------------------------------------- bench_attention
@pytest.fixture
def bench_attention(bench_modules):
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("bench_attention")
    finally:
        sys.path.remove(str(BENCH))


def test_attention_flop_count_and_length_mix(bench_attention):
    ba = bench_attention
    flops = ba.attention_flops([2, 3], heads=1, head_dim=1, causal=False)
    assert flops["forward"] == 4 * (2 * 2 + 3 * 3) and flops["backward"] == 2.5 * flops["forward"]
    assert ba.attention_flops([2, 3], 1, 1, causal=True)["forward"] == 4 * (3 + 6)  # n(n+1)/2 visible pairs
    # window 2 over 5 tokens: |i - j| < 2 gives 2 + 3 + 3 + 3 + 2 pairs, causally 1 + 2 + 2 + 2 + 2
    assert ba.attention_flops([5], 1, 1, causal=False, window=2)["forward"] == 4 * 13
    assert ba.attention_flops([5], 1, 1, causal=True, window=2)["forward"] == 4 * 9
    assert ba.attention_flops([5], 1, 1, causal=False, window=5)["forward"] == 4 * 25
    lengths = ba.bert_lengths(32, 512, 0.45, seed=1)
    assert max(lengths) == 512 and min(lengths) >= round(0.1 * 512)
    assert 0.3 < 1 - sum(lengths) / (32 * 512) < 0.55


def test_attention_providers_compute_the_same_function(bench_attention):
    """The bench feeds every padded provider equivalent inputs: eager, SDPA and fastlm agree
    (the windowed case too: SDPA and eager get the band as a mask, fastlm the window)."""
    ba = bench_attention
    providers = {p.name: p for p in ba.providers_for(8.0)}
    for case in ba.cases_for("quick", torch.float32):
        inputs = case.make_inputs(torch.device("cpu"))
        expected = providers["torch"].fn(inputs)
        got = {"sdpa": providers["sdpa"].fn(inputs), "sdpa-math": providers["sdpa-math"].fn(inputs)}
        if providers["fastlm-reference"].skip_reason(case, torch.device("cpu"), "forward") is None:
            got["fastlm-reference"] = providers["fastlm-reference"].fn(inputs)
        for name, out in got.items():
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=f"{case.name} {name}")
        assert inputs["cu"][-1] == inputs["qp"].shape[0] == case.params["tokens"]


def test_attention_bench_runs_with_torch_providers(bench_attention, harness, tmp_path):
    ba = bench_attention
    providers = harness.select_providers(ba.providers_for(8.0), "torch,sdpa,sdpa-cudnn,fastlm-cuda")
    rows = harness.run("attention", ba.cases_for("quick", torch.float32)[:1], providers, device="cpu",
                       warmup_ms=0.0, rep_ms=0.0, min_reps=1, max_reps=1, ceilings=False, results_dir=tmp_path,
                       progress=False, print_table=False, baseline="sdpa")
    status = {(r["provider"], r["mode"]): r["status"] for r in rows}
    assert all(status[(p, m)] == "ok" for p in ("torch", "sdpa") for m in harness.MODES)
    assert status[("sdpa-cudnn", "forward")] == status[("fastlm-cuda", "full")] == "skipped"
    assert rows[0]["tflops"] > 0 and rows[0]["tokens"] < rows[0]["batch"] * rows[0]["seq"]
