"""fastlm's public ops.  Each is a ``torch.library`` op (``fastlm::<name>``) with a
fake implementation and registered autograd, dispatched per call to a backend
(see :mod:`fastlm.registry`)."""
from fastlm.ops.attention import attention, varlen_attention
from fastlm.ops.cross_entropy import cross_entropy
from fastlm.ops.linear_cross_entropy import linear_cross_entropy
from fastlm.ops.softmax import softmax

__all__ = ["attention", "varlen_attention", "softmax", "cross_entropy", "linear_cross_entropy"]
