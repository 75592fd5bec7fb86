"""fastlm: fused attention, softmax and masked-LM cross-entropy kernels for faster,
lighter fine-tuning of Hugging Face language models.

    import fastlm
    report = fastlm.patch(model)   # per instance, reversible: fastlm.unpatch(model)
    print(report)

    fastlm.ops.attention(q, k, v, key_padding_mask=mask)   # and softmax, cross_entropy, ...

``import fastlm`` is cheap: it loads no compiled code, no Triton, no transformers, and
queries no device.  Those happen on first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ops": ("fastlm.ops", None),
    "registry": ("fastlm.registry", None),
    "patch": ("fastlm.patching", "patch"),
    "unpatch": ("fastlm.patching", "unpatch"),
    "PatchReport": ("fastlm.patching", "PatchReport"),
    "info": ("fastlm.info", "info"),
    "BackendError": ("fastlm.registry", "BackendError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'fastlm' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
