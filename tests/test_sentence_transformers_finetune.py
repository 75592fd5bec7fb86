"""``fastlm finetune --task embed``: sentence-transformers training from text pairs.

A tiny random BERT as a SentenceTransformer, pairs from JSONL and CSV, ``--compare`` (both
runs on the same batches, interleaved), the output loadable by sentence-transformers without
fastlm, the docstring pairs of the offline default, and the input errors.
"""
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")
pytest.importorskip("matplotlib")

from _finetune_runs import run_leaving_environ  # noqa: E402
from fastlm import finetune  # noqa: E402
from fastlm.finetune import data  # noqa: E402

TINY = ["--task", "embed", "--tiny-random-model", "--batch-size", "4", "--max-steps", "3", "--max-length", "32"]
WORDS = ("parse the given file path and return a list of values raise an error when the input string is "
         "empty open read write close socket thread lock queue").split()


def _text(rng, low, high) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    rng = random.Random(5)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"anchor": _text(rng, 3, 8), "positive": _text(rng, 6, 30)}) + "\n"
                            for _ in range(40)))
    return path


@pytest.fixture(scope="module")
def embed_run(pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "embed"
    outcome = run_leaving_environ([*TINY, "--data", str(pairs_file), "--compare"], out)
    return outcome, out


def test_embed_compare_report_and_output(embed_run):
    outcome, out = embed_run
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["task"] == "embed" and set(report["runs"]) == {"fastlm", "unpatched"}
    assert report["examples"]["train"] + report["examples"]["eval"] == 40
    assert "SentenceTransformer" in report["patch"] and "0.model unpad" in report["patch"]
    for run in report["runs"].values():
        assert run["steps"] == 3 and run["eval_loss"] > 0 and run["peak_memory_mib"] > 0
        assert "perplexity" not in run and "accuracy" not in run
        assert 0 < run["padding_fraction"] < 1            # unsorted pairs: real padding
    # same start, same batches: step 0 eval loss and the batches' padding agree
    fast, base = report["runs"]["fastlm"], report["runs"]["unpatched"]
    assert fast["eval_loss_before"] == pytest.approx(base["eval_loss_before"], rel=1e-5)
    assert fast["curves"]["tokens"] == base["curves"]["tokens"]
    assert report["comparison"]["step_speedup"]["steps"] == 2
    assert (out / "finetune_plot.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "modules.json").is_file()


def test_embed_output_loads_without_fastlm_same_embeddings(embed_run, tmp_path):
    outcome, out = embed_run
    sentences = ["parse the file", "open a socket and read the values from the queue", "lock"]
    outcome.model.eval()
    with torch.no_grad():
        expected = outcome.model.encode(sentences, convert_to_tensor=True)
    script = textwrap.dedent(f"""
        import sys, torch
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer({str(out)!r}, device="cpu")
        torch.save(model.encode({sentences!r}, convert_to_tensor=True), {str(tmp_path / "emb.pt")!r})
        assert not any(m == "fastlm" or m.startswith("fastlm.") for m in sys.modules), "fastlm was imported"
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "emb.pt"), expected, rtol=1e-5, atol=1e-6)


def test_embed_csv_columns(tmp_path):
    rng = random.Random(6)
    path = tmp_path / "pairs.csv"
    path.write_text("question,answer,id\n" + "".join(f"{_text(rng, 2, 5)},{_text(rng, 4, 12)},{i}\n"
                                                      for i in range(12)))
    outcome = finetune.run([*TINY, "--data", str(path), "--text-column", "question", "--pair-column", "answer",
                            "--output-dir", str(tmp_path / "out")])
    assert set(outcome.report["runs"]) == {"fastlm"}           # --compare is off with --data
    assert outcome.report["runs"]["fastlm"]["steps"] == 3


def test_docstring_pairs_summary_and_rest():
    docs = ["Return the thing.\n\nThe thing is computed from the arguments given, in order, and cached.",
            "Open a file. Reads everything into memory at once and returns it as one string of text.",
            "Too short.\n\nBut the rest is long enough to count as a description of something here.",
            "Return the thing.\n\nA repeated summary is kept once only, whatever its rest may say here.",
            "One line only, nothing to pair it with."]
    assert data.docstring_pairs(docs) == [
        {"anchor": "Return the thing.",
         "positive": "The thing is computed from the arguments given, in order, and cached."},
        {"anchor": "Open a file",
         "positive": "Reads everything into memory at once and returns it as one string of text."}]


def test_embed_bad_inputs(tmp_path, capsys):
    (tmp_path / "one.jsonl").write_text('{"anchor": "a b c", "other": "d e f"}\n')
    (tmp_path / "notext.jsonl").write_text('{"anchor": "a b c", "positive": 3}\n')
    (tmp_path / "folder").mkdir()
    cases = {
        "missing pair column": (["--data", str(tmp_path / "one.jsonl")], "unknown column 'positive'"),
        "pair not a string": (["--data", str(tmp_path / "notext.jsonl")], "column 'positive' is not a string"),
        "folder": (["--data", str(tmp_path / "folder")], "got a folder"),
        "one pair per batch": (["--batch-size", "1"], "in-batch negatives"),
        "not a model": (["--model", str(tmp_path / "folder"), "--data", str(tmp_path / "one.jsonl")],
                        "no config.json"),
    }
    for name, (argv, fragment) in cases.items():
        args = ["--task", "embed", *(["--tiny-random-model"] if "--model" not in argv else []), *argv,
                "--output-dir", str(tmp_path / "out")]
        assert finetune.main(args) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, (name, err)
        assert not (tmp_path / "out").exists(), name
