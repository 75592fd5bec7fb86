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


def test_dry_run_flag_means_quick_sizes_one_case_one_call(harness, tmp_path):
    args = harness.arg_parser("x").parse_args(["--dry-run"])
    assert args.dry_run and args.quick and not args.gpu_check
    kw = harness.run_kwargs(args)
    assert kw["cases_limit"] == 1 and kw["min_reps"] == kw["max_reps"] == 1 and not kw["ceilings"]
    assert not harness.arg_parser("x").parse_args(["--quick"]).dry_run
    cases = [_case(harness, 8), _case(harness, 16)]
    kw.update(results_dir=tmp_path, progress=False, print_table=False, device="cpu")
    rows = harness.run("fake", cases, [harness.Provider("torch", lambda inp: inp["x"] * 2)], **kw)
    assert {r["case"] for r in rows} == {"sq8"} and all(r["reps"] == 1 for r in rows if r["status"] == "ok")


def test_backend_skip_reason(harness):
    assert "not registered" in harness.backend_skip_reason("no-such-tier", "cpu")
    assert harness.backend_skip_reason("reference", "cpu") is None
    assert harness.backend_skip_reason("cuda", "cpu")


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
def _rec(nodeid, outcome, kernels=(), backend=None):
    return {"nodeid": nodeid, "file": nodeid.split("::")[0], "backend": backend, "outcome": outcome,
            "kernels": [list(k) for k in kernels]}


def test_gpu_verification_summary(bench_modules):
    gv = bench_modules["gpu_verification"]
    records = [
        _rec("tests/test_softmax.py::a[gpu-triton]", "passed", [("softmax", "triton", "cuda"),
                                                              ("softmax", "reference", "cpu")], "triton"),
        _rec("tests/test_softmax.py::b[gpu-cuda]", "failed", [("softmax", "cuda", "cuda")], "cuda"),
        _rec("tests/test_softmax.py::c[gpu-cuda]", "passed", [("softmax", "cuda", "cuda")], "cuda"),
        _rec("tests/test_x.py::d", "skipped"),
    ]
    records.append({"collected": [[r["nodeid"], r["backend"]] for r in records]})
    s = gv.summarize(records, "Fake GPU", date="2026-01-01")
    soft = s["ops"]["softmax"]
    assert soft["triton"]["status"] == "passed" and soft["triton"]["tests_passed"] == 1
    assert soft["cuda"]["status"] == "failed" and soft["cuda"]["failing"] == ["tests/test_softmax.py::b[gpu-cuda]"]
    assert "reference" not in soft or soft["reference"]["status"] == "not exercised"  # CPU calls are no GPU evidence
    assert soft["triton"]["device"] == "Fake GPU" and soft["triton"]["date"] == "2026-01-01"
    assert s["groups"]["tests/test_softmax.py"] == {"passed": 2, "failed": 1, "error": 0, "crashed": 0,
                                                    "skipped": 0, "not run": 0}
    assert s["complete"]
    assert "| softmax | cuda | failed | 1 | 1 |" in gv.markdown(s)
    # cut off after the first test: the cuda tests never started, so only cuda is unfinished
    cut = gv.summarize(records[:1] + records[-1:], "Fake GPU")
    assert cut["ops"]["softmax"]["triton"]["status"] == "passed" and not cut["complete"]
    assert cut["ops"]["softmax"]["cuda"]["status"] == "incomplete"
    assert cut["groups"]["tests/test_softmax.py"]["not run"] == 2
    # a selected test that declares no backend holds back every backend of its op
    undeclared = records[:1] + [{"collected": [[records[0]["nodeid"], "triton"], ["tests/test_softmax.py::z", None]]}]
    assert gv.summarize(undeclared, "Fake GPU")["ops"]["softmax"]["triton"]["status"] == "incomplete"
    # a file of another op that did not finish does not hold softmax back
    other = records[:1] + [{"collected": [[records[0]["nodeid"], "triton"], ["tests/test_attention.py::z", None]]}]
    assert gv.summarize(other, "Fake GPU")["ops"]["softmax"]["triton"]["status"] == "passed"
    # killed before any selection was recorded: nothing is final
    assert gv.summarize(records[:1], "Fake GPU", complete=False)["ops"]["softmax"]["triton"]["status"] == "incomplete"
    assert gv._op_of_file("tests/test_linear_cross_entropy.py", ["cross_entropy", "linear_cross_entropy"]) \
        == "linear_cross_entropy"


def test_gpu_verification_crash_and_declared_backend_count_as_failures(bench_modules):
    """A test that started and never finished (timeout, segfault) fails its declared backend, and
    a failing test fails its declared backend even when it never reached a recorded kernel."""
    gv = bench_modules["gpu_verification"]
    hung, early = "tests/test_softmax.py::hang[gpu-triton]", "tests/test_softmax.py::early[gpu-cuda]"
    records = [
        {"collected": [[hung, "triton"], [early, "cuda"], ["tests/test_softmax.py::ok[gpu-triton]", "triton"]]},
        {"started": hung, "backend": "triton"},  # its worker died: no final record
        {"started": early, "backend": "cuda"}, _rec(early, "failed", [], "cuda"),
        _rec("tests/test_softmax.py::ok[gpu-triton]", "passed", [("softmax", "triton", "cuda")], "triton"),
    ]
    s = gv.summarize(records, "Fake GPU")
    assert s["ops"]["softmax"]["triton"]["status"] == "failed" and s["ops"]["softmax"]["triton"]["failing"] == [hung]
    assert s["ops"]["softmax"]["cuda"]["status"] == "failed"
    assert s["groups"]["tests/test_softmax.py"]["crashed"] == 1 and not s["complete"]


def test_gpu_verification_changes_lists_exact_edits(bench_modules):
    gv = bench_modules["gpu_verification"]
    summary = {"device": "Fake GPU", "date": "2026-01-02", "complete": True, "ops": {
        "softmax": {"triton": {"status": "passed", "tests_passed": 3, "failing": []},
                    "cuda": {"status": "failed", "tests_passed": 1, "failing": ["t::x"]}},
        "cross_entropy": {"triton": {"status": "passed", "tests_passed": 2, "failing": []}}}}
    current = {("softmax", "triton"): None, ("softmax", "cuda"): None, ("cross_entropy", "triton"): "earlier",
               ("cross_entropy", "cuda"): "earlier"}
    lines = gv.verified_changes(summary, "bench/results/fake/gpu_verification.json", BENCH.parent, current)
    sets = [ln for ln in lines if ln.startswith("SET")]
    assert len(sets) == 1 and "softmax/triton" in sets[0]
    assert "verified='Fake GPU, 2026-01-02, bench/results/fake/gpu_verification.json'" in sets[0]
    source = (BENCH.parent / "fastlm/ops/softmax.py").read_text().splitlines()
    line = int(sets[0].split()[1].split(":")[1])
    assert '"triton"' in source[line - 1] and "Implementation(" in source[line - 1]
    assert any(ln.startswith("UNSET") and "cross_entropy/cuda" in ln for ln in lines)  # verified, not passed now
    assert any(ln.startswith("leave") and "softmax/cuda" in ln and "t::x" in ln for ln in lines)
    assert lines.index(sets[0]) < min(i for i, ln in enumerate(lines) if ln.startswith(("UNSET", "leave")))


def test_cuda_context_check_only_after_cuda_errors(bench_modules):
    gv = bench_modules["gpu_verification"]
    assert not gv.cuda_context_lost("AssertionError: max abs error 0.3 > 0.01")
    if not torch.cuda.is_available():  # a CUDA error text and no answering device: lost
        assert gv.cuda_context_lost("torch.AcceleratorError: CUDA error: an illegal memory access was encountered")


# ------------------------------------------------------------------- GPU test selection
def test_gpu_params_declare_backend_and_selection_keeps_one_backend():
    from _backends import declared_backend, gpu_params, split_by_gpu_backend

    params = gpu_params(["triton", "cuda"], value=lambda b: (b, "cuda"))
    assert [p.id for p in params] == ["gpu-triton", "gpu-cuda"] and params[1].values == (("cuda", "cuda"),)
    assert {m.name for m in params[0].marks} == {"gpu", "backend"}

    class Item:
        def __init__(self, marks):
            self.marks = {m.name: m for m in marks}

        def get_closest_marker(self, name):
            return self.marks.get(name)

    items = [Item(p.marks) for p in params] + [Item([pytest.mark.gpu]), Item([pytest.mark.backend("triton")])]
    assert [declared_backend(i) for i in items] == ["triton", "cuda", None, "triton"]
    kept, dropped = split_by_gpu_backend(items, ["triton"])
    assert kept == items[:1] and dropped == items[1:]  # a non-gpu test of that backend is not kept
    assert split_by_gpu_backend(items, ["cuda", "undeclared"])[0] == [items[1], items[2]]


def test_every_gpu_test_declares_its_backend():
    """The convention of tests/_backends.py, checked on the real collection: ``--gpu-backend triton``
    keeps exactly the gpu-triton cases, and no gpu test is left undeclared."""
    import os
    import subprocess

    # -P: the fastlm this suite imports (installed, or the dev loop's PYTHONPATH), not the checkout
    # that `python -m` would put first on sys.path
    out = subprocess.run([sys.executable, "-P", "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m",
                          "gpu", "--gpu-backend", "triton,undeclared", "tests"], cwd=BENCH.parent, capture_output=True,
                         text=True, env=dict(os.environ))
    ids = [ln for ln in out.stdout.splitlines() if "::" in ln]
    assert out.returncode == 0 and ids, out.stdout[-2000:] + out.stderr[-2000:]
    assert all("gpu-triton" in i for i in ids), [i for i in ids if "gpu-triton" not in i]


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


# -------------------------------------------------------------------- bench_training
@pytest.fixture
def training(bench_modules):
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("bench_training"), importlib.import_module("training_workloads")
    finally:
        sys.path.remove(str(BENCH))


def test_training_groups_isolate_each_tier_with_the_baseline(training):
    _, tw = training
    names = ["hf-sdpa", "fastlm-torch", "fastlm-triton", "fastlm-cuda", "fastlm-auto"]
    assert tw.groups(names, isolate=True) == [["hf-sdpa", "fastlm-torch", "fastlm-auto"], ["hf-sdpa", "fastlm-triton"],
                                              ["hf-sdpa", "fastlm-cuda"]]
    assert tw.groups(names, isolate=False) == [names]
    assert tw.groups(["hf-sdpa", "fastlm-auto"], isolate=True) == [["hf-sdpa", "fastlm-auto"]]


def test_training_random_batches_padding_and_labels(training):
    _, tw = training
    for task in ("mlm", "cls", "clm"):
        (b,) = tw.random_batches(task, vocab=1000, batch=16, max_length=64, padding=0.4, n=1)
        mask = b["attention_mask"]
        assert mask[0].all() and 0.25 < 1 - mask.float().mean() < 0.55  # one full row, ~40% padding
        assert bool((b["input_ids"][mask == 0] == 0).all())
        if task == "mlm":
            chosen = b["labels"] != -100
            assert chosen.any() and bool((mask[chosen] == 1).all()) and bool((b["input_ids"][chosen] == 4).all())
        elif task == "clm":
            assert torch.equal(b["labels"] == -100, mask == 0)
        else:
            assert b["labels"].shape == (16,)


def test_training_rows_ratio_spread_memory_and_failures(training):
    bt, tw = training
    base = {"status": "ok", "times_s": [0.2, 0.4, 0.3], "tokens": [10, 10, 10], "real_tokens": [10],
            "padded_tokens": [20], "first_loss": 2.0, "peak_mb": 100.0}
    fast = {**base, "times_s": [0.1, 0.1, 0.3], "first_loss": 2.001, "peak_mb": 40.0, "base_times_s": base["times_s"],
            "base_peak_mb": 100.0, "base_first_loss": 2.0}
    results = {"w": {"hf-sdpa": base, "fastlm-x": fast, "fastlm-y": {"status": "error", "reason": "timed out"}}}
    work = {"w": tw.Workload("w", "mlm", None, None, params={"batch": 2})}
    rows = {r["provider"]: r for r in bt.rows_of(results, work)}
    x = rows["fastlm-x"]
    assert x["speedup_median"] == pytest.approx(2.0) and x["speedup_min"] == pytest.approx(1.0)
    assert x["speedup_max"] == pytest.approx(4.0) and x["speedup_steps"] == 3
    assert x["tokens_per_s"] == pytest.approx(100.0) and x["memory_vs_baseline"] == pytest.approx(0.4)
    assert x["padding_share"] == pytest.approx(0.5) and x["baseline_first_loss"] == 2.0
    assert rows["fastlm-y"]["status"] == "error"
    text = bt.table(list(rows.values()))
    assert "**2.00x** [1.00-4.00]" in text and "error: timed out" in text
