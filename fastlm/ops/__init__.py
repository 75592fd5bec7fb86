"""fastlm's public ops.

Each is a ``torch.library`` op (``fastlm::<name>``) with a fake implementation and
registered autograd, dispatched per call to a backend (see :mod:`fastlm.registry`).
Importing this package registers the ops; it loads no kernel module, compiled code or
Triton (those load on the first call that needs them).
"""
# The functions are imported eagerly on purpose: a module fastlm/ops/softmax.py and a
# function softmax share a name, and only an eager import keeps ``fastlm.ops.softmax``
# the function once the submodule has been imported.
from fastlm.ops.attention import attention, varlen_attention
from fastlm.ops.cross_entropy import cross_entropy
from fastlm.ops.disentangled_attention import disentangled_attention, varlen_disentangled_attention
from fastlm.ops.linear_cross_entropy import linear_cross_entropy
from fastlm.ops.softmax import softmax

__all__ = ["attention", "varlen_attention", "softmax", "cross_entropy", "linear_cross_entropy",
           "disentangled_attention", "varlen_disentangled_attention"]

