"""fastlm's public ops.

Each is a ``torch.library`` op (``fastlm::<name>``) with a fake implementation and
registered autograd, dispatched per call to a backend (see :mod:`fastlm.registry`).
Op modules are imported on first use, so ``import fastlm.ops`` stays cheap.
"""
import importlib

# public function -> the module that defines and registers it
OPS = {
    "attention": "fastlm.ops.attention",
    "varlen_attention": "fastlm.ops.attention",
    "softmax": "fastlm.ops.softmax",
    "cross_entropy": "fastlm.ops.cross_entropy",
    "linear_cross_entropy": "fastlm.ops.linear_cross_entropy",
}

__all__ = list(OPS)


def load_all() -> None:
    """Import every op module, registering every op and its backend table."""
    for module in sorted(set(OPS.values())):
        importlib.import_module(module)


def __getattr__(name: str):
    if name not in OPS:
        raise AttributeError(f"module 'fastlm.ops' has no attribute {name!r}")
    value = getattr(importlib.import_module(OPS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(OPS))
