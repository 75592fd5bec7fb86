"""``fastlm.patch(model)``: faster, lighter fine-tuning of Hugging Face models, per instance.

    report = fastlm.patch(model)   # in place; print(report) says what was patched and why not
    fastlm.unpatch(model)          # back to transformers' behaviour, bit for bit

Mechanisms (each its own module), chosen per family by the table in
:mod:`fastlm.patching.architectures`:

* :mod:`~fastlm.patching.attention`: the ``"fastlm"`` implementation registered in
  transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (its mask builder:
  :mod:`~fastlm.patching.masks`; 2D padding masks, packed batches, causal with left padding,
  dropout, grouped-query), switched on with the model's own ``set_attn_implementation``;
* :mod:`~fastlm.patching.unpad`: BERT-family encoders (ModernBERT included, sliding-window
  layers too) run on packed real tokens, padding removed once before the layers and
  restored once at the end (zeros at padded positions);
* :mod:`~fastlm.patching.mlm_head`: masked LM in training with labels: head and loss on the
  labelled rows only (``fastlm.ops.linear_cross_entropy``), ``logits=None``;
* :mod:`~fastlm.patching.causal_lm`: causal LM in training with labels: fused linear
  cross-entropy over shifted labels honouring ``num_items_in_batch``, ``logits=None``;
* :mod:`~fastlm.patching.tiers`: never slower: per device/dtype, a feature whose best fastlm
  backend is the reference goes back to transformers' own path.
* :mod:`~fastlm.patching.deberta`: DeBERTa-v2/v3, whose attention is outside the interface:
  fused disentangled attention on unpadded tokens (a family ``patcher``).

Everything is bound on the model INSTANCE (:mod:`~fastlm.patching.binding`; originals kept
on the instance, so copies and pickles of a patched model stay patched and independent):
transformers' classes and module globals are untouched except for the additive ``"fastlm"``
registration in its two interfaces, so other models in the process are unaffected (the
config object, which transformers shares with models built from it, says ``"fastlm"``, as
``set_attn_implementation`` would make it).  No parameter or buffer is added:
``state_dict``/``save_pretrained`` are those of the unpatched model.  transformers is
imported at the first ``patch`` call, never by ``import fastlm``.
"""
from __future__ import annotations

import importlib
import warnings
import weakref

from fastlm.patching import architectures, binding, containers, tiers
from fastlm.patching.report import NOT_APPLICABLE, PATCHED, UNSUPPORTED, PatchReport

__all__ = ["patch", "unpatch", "PatchReport"]

_REPORT = "_fastlm_report"
_PADDED_WHEN_TRACED = "padded under torch.compile / torch.export tracing"


def _target(model):
    """The transformers model inside ``model`` (a PEFT wrapper is looked through)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(inner, "config") and hasattr(inner, "set_attn_implementation")):
        raise TypeError(f"fastlm.patch expects a transformers PreTrainedModel (or a PEFT model wrapping one), "
                        f"got {type(model).__name__}")
    return inner


def _check_backend(backend: str) -> str:
    from fastlm import registry

    backend = registry.check_backend_name(backend)
    if backend != "auto":
        why = registry.BACKENDS[backend].unavailable_reason()
        if why:
            raise registry.BackendError(f"fastlm.patch: backend {backend!r} is unavailable: {why}")
    return backend


def patch(model, *, attention: bool = True, cross_entropy: bool = True, unpad: bool = True,
          backend: str = "auto") -> PatchReport:
    """Patch ``model`` in place (see the module docstring); returns a :class:`PatchReport`.

    Args:
        attention: use fastlm's fused attention through transformers' attention interface.
        cross_entropy: fused (sparse) head + loss for masked-LM / causal-LM training.
        unpad: run BERT-family encoders on unpadded tokens (needs ``attention``).
        backend: ``"auto"`` or a backend name for every fastlm op the model calls.

    A family or feature fastlm cannot serve is left as it was, listed in the report, with
    one warning naming it.  An unavailable ``backend`` or a non-transformers model raises.
    Patching a patched model first undoes the previous patch.  A sentence-transformers model
    gets each transformers model inside it patched (:mod:`fastlm.patching.containers`).
    """
    if containers.is_container(model):
        return containers.patch_inside(model, patch, attention=attention, cross_entropy=cross_entropy,
                                       unpad=unpad, backend=backend)
    target = _target(model)
    backend = _check_backend(backend)
    if binding.is_bound(target):
        unpatch(model)
    family = architectures.family_of(target)
    name = type(target).__name__
    report = PatchReport(name, family.name if family else None, backend)
    if family is None:
        model_type = getattr(target.config, "model_type", "?")
        report.add("model", UNSUPPORTED, f"model type {model_type!r} is not in fastlm's architecture table")
        warnings.warn(f"fastlm.patch: {name} (model type {model_type!r}) is not supported; left unchanged",
                      stacklevel=2)
        return report

    if backend != "auto":  # read per call by every fastlm op the model runs (fastlm.patching.attention.backend_of)
        for module in target.modules():
            binding.set_attr(module, "_fastlm_backend", backend)
    if family.patcher:  # attention outside transformers' interface: the family's own module
        importlib.import_module(family.patcher).patch(target, backend, report, attention=attention, unpad=unpad)
    else:
        if attention:
            _patch_attention(target, report)
        else:
            report.add("attention", NOT_APPLICABLE, "attention=False")
        _patch_unpad(target, family, unpad, attention, report)
    if "attention" in report.patched:  # the user's choice of implementation hands fastlm's back (or resumes it)
        binding.bind(target, "set_attn_implementation", _set_attn_implementation)
    _patch_head(target, family, cross_entropy, report)
    binding.set_attr(target, _REPORT, report)  # kept current by later changes (set_attn_implementation, tiers)
    if backend == "auto" and report.patched:
        tiers.attach(target)  # per device/dtype: hand back what only the reference backend could serve

    unsupported = [f"{part} ({detail})" for part, status, detail in report.entries if status == UNSUPPORTED]
    if unsupported:
        warnings.warn(f"fastlm.patch({name}): left as transformers has it: {'; '.join(unsupported)}", stacklevel=2)
    return report


def _patch_attention(target, report) -> None:
    from fastlm.patching.attention import NAME, ORIGINAL, ensure_registered

    ensure_registered()
    original = _implementation_before_fastlm(target)
    target.set_attn_implementation(NAME)
    if target.config._attn_implementation != NAME:
        report.add("attention", UNSUPPORTED, f"{type(target).__name__} cannot switch its attention implementation")
        return
    key = id(target.config)
    _BEFORE[key] = (weakref.ref(target.config, lambda _, key=key: _BEFORE.pop(key, None)), original)
    for module in target.modules():  # the attention function reads it from the layer it serves
        binding.set_attr(module, ORIGINAL, original)
    report.add("attention", PATCHED, f"transformers attention interface 'fastlm' (was {original!r})")


# id(config) -> (weak reference to it, its attention implementation before fastlm.patch switched it).
# transformers models share the config object they are built from, and set_attn_implementation
# switches that object: a second model built from it says "fastlm" from birth.
_BEFORE: dict = {}


def _implementation_before_fastlm(target) -> str:
    """The model's attention implementation, or for a model built from the (shared) config of a
    patched one, the implementation that config had before (else transformers' default)."""
    from fastlm.patching.attention import NAME

    current = target.config._attn_implementation
    if current != NAME:
        return current
    ref, before = _BEFORE.get(id(target.config), (None, None))
    return before if ref is not None and ref() is target.config else target.get_correct_attn_implementation(None)


def _set_attn_implementation(self, attn_implementation, *args, **kwargs):
    """A patched model's ``set_attn_implementation``: transformers' own, then the report follows.

    Switching a patched model to another implementation hands attention back to it, and
    with it the unpadding (packed tokens need fastlm's varlen attention; the encoders check
    the live implementation per call); switching back to ``"fastlm"`` resumes both.  A family
    whose attention is outside transformers' interface (DeBERTa) has one implementation of
    its own, which its config keeps naming (transformers does not switch it): any other
    request hands fastlm's attention back to it, ``"fastlm"`` resumes fastlm's."""
    from fastlm.patching.attention import NAME

    binding.original(self, "set_attn_implementation")(attn_implementation, *args, **kwargs)
    current = NAME if attn_implementation == NAME else self.config._attn_implementation
    tiers.attention_tier(self).serve(self, None if current == NAME else current)
    tiers.user_chose(self, current)
    report = self.__dict__.get(_REPORT)
    if report is None:
        return
    why = None if current == NAME else (f"set_attn_implementation({current!r}) after patch: transformers' "
                                         f"{current!r} serves attention")
    report.hand_back("attention", why)
    report.hand_back("unpad", why and f"off while attention is {current!r} (packed tokens need fastlm's attention)")


def _patch_unpad(target, family, unpad, attention, report) -> None:
    from fastlm.patching.unpad import patch_encoder, patch_packed_body

    if not unpad:
        report.add("unpad", NOT_APPLICABLE, "unpad=False")
    elif family.encoder is None and not family.packed_body:
        report.add("unpad", NOT_APPLICABLE, "decoder family: padding served by the attention's key-padding mask")
    elif not attention:
        report.add("unpad", UNSUPPORTED, "needs attention=True (the packed layers run fastlm's varlen attention)")
    elif family.packed_body:
        patch_packed_body(target.base_model)
        report.add("unpad", PATCHED, f"{type(target.base_model).__name__} runs on packed tokens "
                                     f"(padding removed once, positions kept; {_PADDED_WHEN_TRACED})")
    else:
        encoder = getattr(target.base_model, family.encoder, None)
        if encoder is None:
            report.add("unpad", UNSUPPORTED, f"no encoder at base_model.{family.encoder}")
            return
        patch_encoder(target.base_model, family.encoder)
        report.add("unpad", PATCHED, f"{type(encoder).__name__} runs on packed tokens (padding removed once; "
                                     f"{_PADDED_WHEN_TRACED})")


def _patch_head(target, family, cross_entropy, report) -> None:
    from fastlm.patching.causal_lm import patch_causal_lm
    from fastlm.patching.mlm_head import patch_masked_lm

    task = architectures.task_of(target)
    name = type(target).__name__
    if task == "body":
        report.add("head", NOT_APPLICABLE, f"{name}: head unchanged, reads the body's output")
    elif not cross_entropy:
        report.add("head", NOT_APPLICABLE, "cross_entropy=False")
    elif task == "masked_lm" and family.masked_lm is not None:
        patch_masked_lm(target)
        report.add("head", PATCHED, "sparse masked-LM head + fused linear cross-entropy in training "
                                    "(logits=None when training with labels)")
    elif task == "causal_lm" and family.causal_lm is not None:
        patch_causal_lm(target)
        report.add("head", PATCHED, "fused linear cross-entropy over shifted labels in training "
                                    "(logits=None when training with labels)")
    else:
        report.add("head", UNSUPPORTED, f"no fused loss for {name}")


def unpatch(model) -> None:
    """Restore everything :func:`patch` changed on ``model`` (a no-op on an unpatched model).

    The attention implementation goes back to the one before :func:`patch`, unless it was
    changed since (``set_attn_implementation`` on the patched model): that choice stays."""
    from fastlm.patching.attention import NAME, ORIGINAL

    if containers.is_container(model):
        return containers.unpatch_inside(model, unpatch)
    target = _target(model)
    original = target.__dict__.get(ORIGINAL)
    tiers.detach(target)
    for module in target.modules():
        binding.restore(module)
    if original is not None and target.config._attn_implementation == NAME:
        target.set_attn_implementation(original)
