"""Patched vs unpatched twins under FSDP2 and DDP (run by tests/test_distributed.py under
``torchrun``, CPU, gloo).

    torchrun --standalone --nproc_per_node 2 tests/_distributed_twins.py OUT_DIR

For a BERT masked LM and a Llama causal LM, twins (same seed) are sharded the same way,
``fully_shard`` on every layer and on the root, one twin patched before sharding.  Each rank
trains on its own half of every batch.  Per step both twins' losses and their gathered
(full) gradients are recorded, and the same under DDP; then a sharded checkpoint (``torch.distributed.checkpoint``)
of the patched model and its optimizer is saved and loaded into a fresh patched, sharded
model, which must continue exactly like the original; its full state dict is saved with
``save_pretrained`` for plain transformers.  Also recorded: collectives and host reads
(``aten::_local_scalar_dense``) per step, patched vs unpatched and sharded vs a single
process, and the losses of ``torch.compile`` of the sharded patched model.  Every rank's
record is gathered and rank 0 writes them to ``OUT_DIR/twins.pt`` for the test to judge.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastlm  # noqa: E402
from _patch_models import decoder, encoder, mlm_labels, padded_batch  # noqa: E402

STEPS, LR = 3, 0.1
out_dir = sys.argv[1]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)


def build(kind: str, patched: bool, wrap: str | None = "fsdp2"):
    """A fresh model (same weights every call), patched or not, then ``wrap``ped: FSDP2 (every
    layer and the root), DDP, or nothing."""
    torch.manual_seed(0)
    model = encoder("bert", "ForMaskedLM") if kind == "bert" else decoder("llama")
    model.train()
    if patched:
        fastlm.patch(model)
    if wrap == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if wrap == "fsdp2":
        for layer in (model.bert.encoder.layer if kind == "bert" else model.model.layers):
            fully_shard(layer)
        fully_shard(model)
    return model


def batches(kind: str):
    """Full batches (every rank makes the same ones) of 4 rows; rank r trains on rows 2r, 2r+1."""
    torch.manual_seed(1)
    out = []
    for _ in range(STEPS + 1):
        ids, mask = padded_batch([9, 4, 7, 9], seq=9)
        labels = mlm_labels(ids, mask) if kind == "bert" else ids.masked_fill(mask == 0, -100)
        rows = slice(2 * rank, 2 * rank + 2)
        out.append(dict(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]))
    return out


def counted(fn):
    """``fn()``'s result, with the number of collectives and of host reads it made."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    names = [e.name for e in prof.events()]
    collectives = sum(1 for n in names if n.startswith(("c10d::", "gloo:", "nccl:")))
    return result, {"collectives": collectives, "host_reads": names.count("aten::_local_scalar_dense")}


def step(model, optimizer, batch):
    def run():
        loss = model(**batch).loss
        loss.backward()
        return loss.detach()

    loss, counts = counted(run)
    grads = {n.removeprefix("module."): getattr(p.grad, "full_tensor", p.grad.clone)()   # DTensor shards gathered
             for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    optimizer.zero_grad()
    return loss, grads, counts


def run(kind: str) -> dict:
    data = batches(kind)
    record = {}
    models = {label: build(kind, label == "fastlm") for label in ("unpatched", "fastlm")}
    optimizers = {label: torch.optim.SGD(m.parameters(), lr=LR) for label, m in models.items()}
    for label, model in models.items():
        record[label] = [step(model, optimizers[label], batch) for batch in data[:STEPS]]
    for label in ("unpatched", "fastlm"):
        ddp = build(kind, label == "fastlm", wrap="ddp")
        optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
        record[f"ddp {label}"] = [step(ddp, optimizer, batch) for batch in data[:STEPS]]
    fast = models["fastlm"]
    record["bindings_survive"] = all("_fastlm_originals" in m.__dict__ for m in
                                     ([fast, fast.bert.encoder] if kind == "bert" else [fast]))

    # host reads of the same patched model in one process, unsharded, on this rank's batch
    single = build(kind, True, wrap=None)
    record["single_process_counts"] = counted(lambda: single(**data[0]).loss.backward())[1]

    # sharded checkpoint of the patched model + optimizer, loaded into a fresh patched sharded model
    checkpoint = os.path.join(out_dir, f"{kind}-dcp")
    model_sd, optim_sd = get_state_dict(fast, optimizers["fastlm"])
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    fresh = build(kind, True)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=LR)
    state = dict(zip(("model", "optim"), get_state_dict(fresh, fresh_optimizer)))
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(fresh, fresh_optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    record["continued"] = step(fast, optimizers["fastlm"], data[STEPS])[:2]
    record["reloaded"] = step(fresh, fresh_optimizer, data[STEPS])[:2]

    # torch.compile of the sharded patched model: same losses as eager over the same steps
    compiled_model = build(kind, True)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    compiled_optimizer = torch.optim.SGD(compiled_model.parameters(), lr=LR)
    compiled_losses = []
    for batch in data[:STEPS]:
        loss = compiled(**batch).loss
        loss.backward()
        compiled_optimizer.step()
        compiled_optimizer.zero_grad()
        compiled_losses.append(loss.detach())
    record["compiled_losses"] = compiled_losses

    # the final model, gathered, saved for plain transformers (rank 0 writes)
    full = get_model_state_dict(fresh, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        plain = encoder("bert", "ForMaskedLM") if kind == "bert" else decoder("llama")
        plain.load_state_dict(full)
        plain.save_pretrained(os.path.join(out_dir, f"{kind}-final"))
        probe = data[0]
        with torch.no_grad():
            record["final_logits"] = plain.eval()(input_ids=probe["input_ids"],
                                                  attention_mask=probe["attention_mask"]).logits
        record["probe"] = probe
    return record


results = {kind: run(kind) for kind in ("bert", "llama")}
gathered = [None] * world
dist.all_gather_object(gathered, results)
if rank == 0:
    torch.save(gathered, os.path.join(out_dir, "twins.pt"))
dist.barrier()
dist.destroy_process_group()
