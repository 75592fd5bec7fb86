"""``fastlm.patch`` on models that hold transformers models: sentence-transformers.

A ``SentenceTransformer`` (likewise ``CrossEncoder``, ``SparseEncoder``) is an ``nn.Sequential``
of modules; its ``Transformer`` module holds a transformers ``PreTrainedModel`` (``BertModel``,
``XLMRobertaModel``, ``ModernBertModel``, ...), and a ``Router`` may hold several.  Patching one
patches each transformers model inside (the outermost ones: a transformers model inside
another is its parent's business) with the same options, per instance as always; pooling,
normalisation and the other modules are untouched and read the re-padded token embeddings
(zeros at padded positions, which mean pooling masks out anyway).  Architectures fastlm does not
know are left alone and reported as such.  ``unpatch`` undoes each.

Recognised by class, without importing sentence-transformers: any ``nn.Module`` whose class
(or a base class) comes from the ``sentence_transformers`` package.
"""
from __future__ import annotations

import warnings

from fastlm.patching.report import UNSUPPORTED, PatchReport

PACKAGE = "sentence_transformers"


def is_container(model) -> bool:
    return any(cls.__module__.split(".")[0] == PACKAGE for cls in type(model).__mro__)


def inner_models(model) -> list[tuple[str, object]]:
    """``(qualified name, model)`` of the outermost transformers models inside ``model``."""
    found: list[tuple[str, object]] = []
    for name, module in model.named_modules():   # parents come before their children
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        if hasattr(module, "config") and hasattr(module, "set_attn_implementation"):
            found.append((name, module))
    return found


def patch_inside(model, patch, **options) -> PatchReport:
    """``patch(inner, **options)`` for every inner model; one report, rows prefixed by the inner
    model's name in ``model`` (e.g. ``0.auto_model``)."""
    inner = inner_models(model)
    name = type(model).__name__
    families, rows, backend = [], [], options.get("backend", "auto")
    for path, module in inner:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            part = patch(module, **options)
        for w in caught:   # re-issued here, where the caller's stack level means something
            warnings.warn(f"{name}[{path}]: {w.message}", w.category, stacklevel=3)
        families.append(part.family or "unknown")
        rows += [(f"{path} {row}", status, detail) for row, status, detail in part.entries]
        backend = part.backend
    report = PatchReport(name, ", ".join(dict.fromkeys(families)) or None, backend, rows)
    if not inner:
        report.add("model", UNSUPPORTED, "no transformers model inside")
        warnings.warn(f"fastlm.patch: {name} holds no transformers model; left unchanged", stacklevel=3)
    return report


def unpatch_inside(model, unpatch) -> None:
    for _, module in inner_models(model):
        unpatch(module)
