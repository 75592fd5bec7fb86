"""The ``torch`` backend: fastlm's kernel contracts mapped onto PyTorch's own fused CUDA kernels.

Named after what it calls: ATen, PyTorch's operator library (``torch.ops.aten.*``: the
flash and memory-efficient attention kernels, the fused log-softmax, cuBLAS GEMMs).  No
kernel code of ours lives here, only the mapping: argument layouts, causal alignment,
windows, dropout seeding, logsumexp conventions, and the rows a kernel cannot serve.
One module per op, with the functions and contracts of ``fastlm/reference/<op>.py``.

Trust: the kernels are PyTorch's (tested by PyTorch); the mapping is what our tests
check, on CPU through emulations of each kernel's documented semantics and on ``meta``
tensors through PyTorch's own meta kernels (tests/test_aten.py), and on a GPU by the
``gpu``-marked tests of the ``torch`` target.

Nothing here touches a device at import.  :func:`unavailable_reason` is the backend's probe
(``fastlm.registry`` runs it once per process, for the first CUDA call).
"""
from __future__ import annotations

import torch

# The ATen kernels the attention mapping calls; a torch without them (or with the
# pre-2.7 flash API that returned philox_seed/philox_offset) cannot serve.
ATTENTION_OPS = ("_flash_attention_forward", "_flash_attention_backward",
                 "_efficient_attention_forward", "_efficient_attention_backward")


def missing_kernels() -> str | None:
    """Why this torch lacks the ATen kernels (or the signatures) the mapping needs, or None.
    Reads schemas only: no device is touched, so it holds for CPU-only builds too."""
    missing = [name for name in ATTENTION_OPS if not hasattr(torch.ops.aten, name)]
    if missing:
        return f"this torch has no aten.{', aten.'.join(missing)}"
    schema = torch.ops.aten._flash_attention_forward.default._schema
    arguments = {a.name for a in schema.arguments}
    returns = [r.name for r in schema.returns]
    if not {"window_size_left", "window_size_right", "scale"} <= arguments or returns[2] != "rng_state":
        return f"aten._flash_attention_forward has an older signature ({schema}); torch >= 2.7 needed"
    return None


def unavailable_reason() -> str | None:
    """Why the ``torch`` backend cannot run in this process, or None.  Reads the current
    GPU's compute capability: called only once a CUDA call arrives (CUDA is then in use)."""
    if torch.version.hip is not None:
        return "ROCm builds of torch: the mapping onto their attention kernels is unverified"
    if not torch.cuda.is_available():
        return "no CUDA device (or a CPU-only torch)"
    why = missing_kernels()
    if why:
        return why
    if not torch.backends.cuda.is_flash_attention_available():
        return "this torch was built without flash attention"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"PyTorch's flash attention needs compute capability >= 8.0 (this GPU: {major}.{minor})"
    return None
