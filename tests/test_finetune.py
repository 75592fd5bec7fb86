"""``fastlm finetune`` end to end on a tiny corpus and a tiny random BERT (seconds per run).

Covers the mlm and classify tasks (embed: tests/test_sentence_transformers_finetune.py), the
output folder (model reloads without fastlm with the same logits, JSON report, PNG plot), the
interleaved comparison and its memory phase, every bad input (exit code 2, one line naming the
problem, output dir untouched), Ctrl-C (exit code 130, no partial output), and that a run
leaves the process as it found it (environment variables).
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

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from _finetune_runs import run_leaving_environ  # noqa: E402
from fastlm import finetune  # noqa: E402
from fastlm.finetune import data, model, train  # noqa: E402

TINY = ["--tiny-random-model", "--batch-size", "4", "--max-steps", "3", "--max-length", "48"]
WORDS = ("the function returns a list of values from the given iterable and raises an error when "
         "input is empty parse string path file object default argument optional").split()


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A folder with a text file (blank-line paragraphs) and a JSONL file."""
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "notes.txt").write_text("\n\n".join(_sentences(30, 1)))
    (folder / "more.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                                               for i, t in enumerate(_sentences(20, 2))))
    return folder


@pytest.fixture(scope="module")
def mlm_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mlm"
    outcome = run_leaving_environ([*TINY, "--data", str(corpus), "--compare"], out)
    return outcome, out


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_mlm_run_writes_model_report_and_plot(mlm_run):
    outcome, out = mlm_run
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "finetune_report.json",
                 "finetune_plot.png"):
        assert (out / name).is_file(), name
    assert (out / "finetune_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _leftovers(out.parent) == []
    report = json.loads((out / "finetune_report.json").read_text())
    assert report == json.loads(json.dumps(outcome.report))
    assert {"task", "model", "data", "examples", "settings", "environment", "patch", "runs", "comparison",
            "table"} <= set(report)
    assert set(report["runs"]) == {"fastlm", "unpatched"}
    for run in report["runs"].values():
        assert run["steps"] == 3
        assert len(run["curves"]["loss"]) == 3 and len(run["curves"]["step_time_s"]) == 3
        for key in ("tokens_per_s", "step_time_s", "train_loss", "eval_loss", "perplexity"):
            assert run[key] is not None and run[key] > 0, key
        assert [e[0] for e in run["curves"]["eval"]][0] == 0   # evaluated before training
        assert 0 < run["padding_fraction"] < 1                 # dynamic padding: mixed lengths
    assert report["comparison"]["tokens_per_s_ratio"] > 0
    # interleaved timing: per-step ratios of the same steps, summarised with their spread
    spread = report["comparison"]["step_speedup"]
    assert spread["steps"] == 2                                # 3 steps, the first left out
    ratios = [u / f for u, f in zip(report["runs"]["unpatched"]["curves"]["step_time_s"][1:],
                                    report["runs"]["fastlm"]["curves"]["step_time_s"][1:])]
    assert (spread["min"], spread["max"]) == pytest.approx((min(ratios), max(ratios)))
    assert f"median {spread['median']:.2f}x" in report["table"]
    # memory in its own phase, one fresh process per model
    assert "fresh process" in report["memory_measure"] and "fresh process" in report["table"]
    assert all(run["peak_memory_mib"] > 0 for run in report["runs"].values())
    # Same starting weights, eval mode, fixed eval masks: the step-0 eval loss must agree.
    before = [run["eval_loss_before"] for run in report["runs"].values()]
    assert before[0] == pytest.approx(before[1], rel=1e-5)


def test_saved_model_reloads_without_fastlm_same_logits(mlm_run, tmp_path):
    outcome, out = mlm_run
    assert "fastlm" not in (out / "config.json").read_text().lower()
    ids = torch.tensor([[2, 10, 11, 12, 13, 3, 0, 0], [2, 14, 15, 16, 17, 18, 19, 3]])
    mask = (torch.arange(8) < torch.tensor([[6], [8]])).long()
    outcome.model.eval()
    with torch.no_grad():
        expected = outcome.model(input_ids=ids, attention_mask=mask).logits
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForMaskedLM
        model = AutoModelForMaskedLM.from_pretrained({str(out)!r}).eval()
        ids = torch.tensor({ids.tolist()}); mask = torch.tensor({mask.tolist()})
        with torch.no_grad():
            torch.save(model(input_ids=ids, attention_mask=mask).logits, {str(tmp_path / "logits.pt")!r})
        assert not any(m == "fastlm" or m.startswith("fastlm.") for m in sys.modules), "fastlm was imported"
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env, timeout=300)
    reloaded = torch.load(tmp_path / "logits.pt")
    real = mask.bool()
    torch.testing.assert_close(reloaded[real], expected[real], rtol=1e-5, atol=1e-5)


def test_classify_csv_names_from_saved_model_replaces_previous_output(mlm_run, tmp_path):
    _, mlm_out = mlm_run
    rows = [("text", "label")] + [(t, ("good", "bad", "meh")[i % 3]) for i, t in enumerate(_sentences(24, 3))]
    data = tmp_path / "reviews.csv"
    data.write_text("\n".join(f'"{t}",{lb}' for t, lb in rows))
    out = tmp_path / "clf"
    (out).mkdir()
    (out / "finetune_report.json").write_text("{}")   # a previous fastlm finetune output: replaced
    (out / "stale.bin").write_text("old")
    outcome = finetune.run(["--task", "classify", "--model", str(mlm_out), "--data", str(data),
                            "--batch-size", "4", "--max-steps", "2", "--dtype", "bf16", "--output-dir", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "bad", "1": "good", "2": "meh"}
    assert not (out / "stale.bin").exists() and _leftovers(tmp_path) == []
    run = outcome.report["runs"]["fastlm"]
    assert set(outcome.report["runs"]) == {"fastlm"}          # --compare is off with --data
    assert 0 <= run["accuracy"] <= 1 and run["steps"] == 2
    assert any(k.startswith("classifier.") for k in outcome.report["newly_initialised"])


def test_classify_jsonl_integer_labels(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"body": t, "y": i % 2}) + "\n" for i, t in enumerate(_sentences(20, 4))))
    outcome = finetune.run(["--tiny-random-model", "--batch-size", "4", "--epochs", "1", "--task", "classify",
                            "--data", str(data), "--text-column", "body", "--label-column", "y",
                            "--output-dir", str(tmp_path / "out")])
    assert outcome.report["labels"] == ["0", "1"]
    assert outcome.model.config.num_labels == 2
    assert outcome.report["examples"] == {"train": 18, "eval": 2, "mean_tokens": pytest.approx(
        outcome.report["examples"]["mean_tokens"]), "max_length": 128}
    assert outcome.report["runs"]["fastlm"]["steps"] == 5     # one epoch: ceil(18 / 4)


def test_default_corpus_and_mlm_examples():
    corpus = data.stdlib_corpus()
    assert len(corpus.texts) > 500 and all(len(t.split()) >= data.MIN_DOC_WORDS for t in corpus.texts)
    texts = corpus.texts[:300]
    tokenizer = model.random_bert(texts, "tiny", "test").tokenizer
    examples = data.mlm_examples(texts, tokenizer, 64)
    lengths = [len(e["input_ids"]) for e in examples]
    assert max(lengths) <= 64 and min(lengths) < 48            # a mix of lengths, not all max
    for e in examples:
        assert e["input_ids"][0] == tokenizer.cls_token_id and e["input_ids"][-1] == tokenizer.sep_token_id
        assert e["special_tokens_mask"][0] == e["special_tokens_mask"][-1] == 1
        assert sum(e["special_tokens_mask"]) == 2 + e["input_ids"][1:-1].count(tokenizer.sep_token_id)
    train_a, eval_a = data.split(examples, 7, 10)
    train_b, eval_b = data.split(examples, 7, 10)
    assert (train_a, eval_a) == (train_b, eval_b) and len(eval_a) == 10
    assert len(train_a) + len(eval_a) == len(examples)


def _bad_inputs(tmp: Path) -> dict:
    """name -> (arguments, expected fragment of the message)."""
    from transformers import GPT2Config, GPT2Model

    (tmp / "empty.txt").write_text("\n\n  \n")
    (tmp / "nofiles").mkdir()
    (tmp / "nofiles" / "image.png").write_bytes(b"\x89PNG")
    (tmp / "x.jsonl").write_text('{"body": "some text here"}\n')
    (tmp / "mixed.csv").write_text("text,label\n" + "".join(f"{t},{lb}\n" for t, lb in
                                                             zip(_sentences(6, 5), [0, 1, 1, "spam", 0, 1])))
    (tmp / "nolabel.csv").write_text("text,stars\nhello there,1\nbye now,2\n")
    GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0)).save_pretrained(tmp / "gpt2")
    (tmp / "file_out").write_text("not a folder")
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "thesis.tex").write_text("precious")
    good = str(tmp / "x.jsonl")
    return {
        "missing file": (["--data", str(tmp / "nope.txt")], "data not found"),
        "empty corpus": (["--data", str(tmp / "empty.txt")], "empty corpus"),
        "folder without text": (["--data", str(tmp / "nofiles")], "empty corpus"),
        "unknown column": (["--data", good], "unknown column 'text'"),
        "unknown label column": (["--task", "classify", "--data", str(tmp / "nolabel.csv")], "unknown column 'label'"),
        "non-numeric label": (["--task", "classify", "--data", str(tmp / "mixed.csv")], "non-numeric label 'spam'"),
        "no supported head": (["--model", str(tmp / "gpt2"), "--data", good, "--text-column", "body"],
                              "has no masked-LM head"),
        "model missing": (["--model", str(tmp / "no-model"), "--data", good], "model not found"),
        "output is a file": (["--data", good, "--output-dir", str(tmp / "file_out")], "is a file"),
        "output is foreign": (["--data", good, "--output-dir", str(tmp / "foreign")], "not empty"),
        "classify without data": (["--task", "classify"], "needs --data"),
        "bad option value": (["--batch-size", "0"], "--batch-size 0"),
    }


def test_bad_inputs_one_line_error_nothing_written(tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    for name, (argv, fragment) in cases.items():
        if "--output-dir" not in argv:
            argv = [*argv, "--output-dir", str(tmp_path / "out")]
        if "--model" not in argv:
            argv = ["--tiny-random-model", *argv]
        assert finetune.main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, (name, err)
        assert not (tmp_path / "out").exists(), name
        assert _snapshot(tmp_path) == before, name
        assert _leftovers(tmp_path) == [], name


def test_ctrl_c_mid_training_leaves_previous_output(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "finetune_report.json").write_text('{"previous": true}')
    steps = []

    def interrupt(self, args, state, control, **kwargs):
        steps.append(state.global_step)
        if len(steps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train._Meter, "on_step_end", interrupt)
    code = finetune.main([*TINY, "--data", str(corpus), "--max-steps", "50", "--output-dir", str(out)])
    assert code == 130 and len(steps) == 2
    assert "interrupted" in capsys.readouterr().err
    assert _snapshot(out) == {Path("finetune_report.json"): b'{"previous": true}'}
    assert _leftovers(tmp_path) == []


def test_help_and_cli_dispatch(capsys):
    from fastlm.cli import main as cli

    assert cli(["finetune", "--help"]) == 0
    assert "--mlm-probability" in capsys.readouterr().out
