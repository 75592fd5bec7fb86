"""A patch that never makes a model slower: per device and dtype, who serves each fastlm op.

``fastlm.patch(model)`` (``backend="auto"``) cannot know where the model will run: models
are moved (``.to("cuda")``, ``.bfloat16()``) after patching.  So at the first forward on
each ``(device type, dtype)`` (the autocast dtype when autocast is on) a forward pre-hook
asks the registry which backend ``auto`` would pick for the model's attention and loss
(:func:`fastlm.registry.select`).  When that is the ``reference`` backend (pure PyTorch,
the ground truth: slower than transformers' own kernels, e.g. on a GPU while fastlm's GPU
kernels are unverified), the feature goes back to transformers' own path for that
device and dtype:

* attention, as the family's :class:`AttentionTier` row says: for the families on
  transformers' attention interface (:data:`INTERFACE`), the implementation the model had
  before :func:`fastlm.patch` is set again (``set_attn_implementation``), which also turns
  the unpadding off (packed tokens need fastlm's attention: :mod:`fastlm.patching.unpad`
  checks the live implementation); a family patcher's row (DeBERTa's
  ``disentangled_attention``: :mod:`fastlm.patching.deberta`) switches its own layers back
  to transformers' code, unpadding included;
* the causal-LM head: transformers' forward (logits + its loss) instead of the fused
  linear cross-entropy;
* the sparse masked-LM head stays: running the head on the ~15% labelled rows wins with
  any backend.

One warning per model and device/dtype says what went back; the model's report
(``print(report)``) gets a line per device/dtype naming who serves each op.  Running on a
device/dtype where fastlm's kernels are the fastest again resumes them.  The decision is
cached per ``(device type, dtype)``: later forwards cost a dictionary lookup, no host
synchronisation.  Under ``torch.compile`` / ``torch.export`` tracing no new decision is
made (the last one stays).  ``set_attn_implementation`` by the user wins over this rule,
and an explicit ``backend=`` keeps fastlm's kernels everywhere (no hook).
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from fastlm.patching import binding
from fastlm.patching.masks import tracing

HOOK = "_fastlm_tiers_hook"          # id of the forward pre-hook
DECISIONS = "_fastlm_tiers"          # {(device type, dtype): {op: backend}}
ACTIVE = "_fastlm_tier_active"       # the (device type, dtype) whose decision is applied
USER_CHOICE = "_fastlm_user_attn"    # set_attn_implementation(...) by the user after patch
HEAD_OFF = "_fastlm_head_off"        # the causal-LM head runs transformers' forward
TRANSFORMERS = "transformers"


def attach(model) -> None:
    """Register the per-device decision on a patched ``model`` (backend ``"auto"``)."""
    handle = model.register_forward_pre_hook(_before_forward, with_kwargs=True)
    binding.set_attr(model, HOOK, handle.id)
    for name, value in ((DECISIONS, {}), (ACTIVE, None), (USER_CHOICE, None), (HEAD_OFF, False)):
        binding.set_attr(model, name, value)  # (plain values: copied with the model, removed by unpatch)


def detach(model) -> None:
    """Remove the hook (:func:`fastlm.unpatch`); the attributes go with ``binding.restore``."""
    hook = model.__dict__.get(HOOK)
    if hook is not None:
        model._forward_pre_hooks.pop(hook, None)
        model._forward_pre_hooks_with_kwargs.pop(hook, None)


def user_chose(model, implementation: str) -> None:
    """``set_attn_implementation`` called on the patched model: the user's choice wins; choosing
    ``"fastlm"`` again hands the decision back to this rule (re-applied at the next forward)."""
    from fastlm.patching.attention import NAME

    if HOOK in model.__dict__:
        model.__dict__[USER_CHOICE] = None if implementation == NAME else implementation
        model.__dict__[ACTIVE] = None


def _where(model) -> tuple[str, torch.dtype]:
    param = next(model.parameters())
    device = param.device.type
    if torch.is_autocast_enabled(device):
        return device, torch.get_autocast_dtype(device)
    return device, param.dtype


def _before_forward(model, args, kwargs):
    where = _where(model)
    if model.__dict__.get(ACTIVE) == where or tracing():
        return None
    decisions = model.__dict__[DECISIONS]
    fresh = where not in decisions
    if fresh:
        decisions[where] = _decide(model, *where)
    _apply(model, where, decisions[where], warn=fresh)
    return None


# ------------------------------------------------------------------------- decisions
def _auto(op: str, problem) -> str:
    """The backend ``auto`` picks for ``op`` on ``problem`` (``"none"`` if no backend can)."""
    from fastlm import registry

    try:
        return registry.select(op, problem, "auto").backend
    except registry.BackendError:
        return "none"


def _attention_problem(model, device: str, dtype: torch.dtype):
    """The attention op's problem for this model's layers (``fastlm.ops.attention.problem`` on
    stand-in q/k of the model's head counts and head dim, its longest position)."""
    from fastlm.ops.attention import problem
    from fastlm.patching.architectures import family_of

    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    # shape-only stand-ins (meta: nothing allocated on the device), asked about ``device``
    q = torch.empty((1, heads, 1, head_dim), dtype=dtype, device="meta")
    k = torch.empty((1, kv_heads, 1, head_dim), dtype=dtype, device="meta")
    causal = family_of(model).causal_lm is not None or getattr(config, "is_decoder", False)
    window = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    unpadded = isinstance(model.base_model.__dict__.get("forward"), binding.Method)
    # Unpadded encoders call the packed kernel without a mask, and their queries and keys are
    # the same tokens (self-attention: no alignment question); padded models may pass a mask.
    return problem(q, k, padding=not unpadded, packed=unpadded, causal=2 if causal else 0,
                   window=1 if window else 0, dropout_p=0.0, same_lengths=True,
                   max_seqlen=getattr(config, "max_position_embeddings", None) or 512)._replace(device=device)


def _serve_interface(model, implementation: str | None) -> None:
    from fastlm.patching.attention import NAME

    wanted = implementation or NAME
    if model.config._attn_implementation != wanted:
        binding.original(model, "set_attn_implementation")(wanted)


@dataclass(frozen=True)
class AttentionTier:
    """How a family's fused attention is judged on a device and handed back (a row of the table).

    ``op``: the registry op its layers call; ``problem(model, device type, dtype)``: that op's
    :class:`fastlm.registry.Problem` for the model's layers (stand-in tensors, nothing
    allocated); ``serve(model, implementation)``: ``None``, fastlm's kernels serve attention
    (and the unpadding that needs them), else transformers' own ``implementation`` does."""

    op: str
    problem: Callable
    serve: Callable


# Families on transformers' attention interface; a family ``patcher`` module brings its own
# row as ``ATTENTION_TIER`` (DeBERTa: fastlm.patching.deberta).
INTERFACE = AttentionTier("attention", _attention_problem, _serve_interface)


def attention_tier(model) -> AttentionTier:
    """The row of ``model``'s family."""
    from fastlm.patching.architectures import family_of

    family = family_of(model)
    if family is not None and family.patcher:
        return importlib.import_module(family.patcher).ATTENTION_TIER
    return INTERFACE


def _decide(model, device: str, dtype: torch.dtype) -> dict:
    from fastlm.ops.cross_entropy import problem
    from fastlm.patching.architectures import family_of, task_of
    from fastlm.patching.attention import ORIGINAL

    ops = {}
    if ORIGINAL in model.__dict__:  # fastlm's attention was patched in
        tier = attention_tier(model)
        ops[tier.op] = _auto(tier.op, tier.problem(model, device, dtype))
    task = task_of(model)
    if model.__dict__.get("forward") is not None and task in ("causal_lm", "masked_lm"):
        family = family_of(model)
        head = family.causal_lm.head(model) if task == "causal_lm" else family.masked_lm.decoder(model)
        # linear_cross_entropy's chunks run on the cross_entropy backends
        ops["linear_cross_entropy"] = _auto("cross_entropy", problem(torch.device(device), dtype, head.weight.shape[0]))
    return ops


def _apply(model, where, ops: dict, warn: bool) -> None:
    """Serve ``ops`` as decided for ``where``: hand features whose best fastlm backend is the
    reference back to transformers (or resume fastlm's), update the report, warn (``warn``)."""
    from fastlm.patching.architectures import task_of
    from fastlm.patching.attention import ORIGINAL

    report = model.__dict__.get("_fastlm_report")
    label = f"{where[0]}/{str(where[1]).replace('torch.', '')}"
    served, handed_back = {}, []
    tier = attention_tier(model)
    if tier.op in ops and model.__dict__.get(USER_CHOICE) is None:
        original = model.__dict__[ORIGINAL]
        slow = ops[tier.op] in ("reference", "none")
        tier.serve(model, original if slow else None)
        why = (f"on {label} fastlm's fastest {tier.op} is the {ops[tier.op]} backend: transformers' "
               f"{original!r} serves it") if slow else None
        if report is not None:
            report.hand_back("attention", why)
            report.hand_back("unpad", why and f"off on {label} (with transformers' attention)")
        served[tier.op] = f"{TRANSFORMERS} {original!r}" if slow else ops[tier.op]
        if slow:
            handed_back.append(f"attention (transformers' {original!r}; unpadding off)")
    if "linear_cross_entropy" in ops:
        slow = ops["linear_cross_entropy"] in ("reference", "none") and task_of(model) == "causal_lm"
        model.__dict__[HEAD_OFF] = slow
        if report is not None:
            report.hand_back("head", f"on {label} fastlm's fastest linear_cross_entropy is the "
                                     f"{ops['linear_cross_entropy']} backend: transformers' head and loss"
                                     if slow else None)
        served["linear_cross_entropy"] = TRANSFORMERS if slow else ops["linear_cross_entropy"]
        if slow:
            handed_back.append("the causal-LM head (transformers' logits + loss)")
    if report is not None:
        report.tiers[label] = served
    model.__dict__[ACTIVE] = where
    if handed_back and warn:
        warnings.warn(f"fastlm.patch({type(model).__name__}): on {label} fastlm's fastest backend is the reference "
                      f"(slower than transformers), so these run as transformers has them there: "
                      f"{'; '.join(handed_back)}", stacklevel=3)
