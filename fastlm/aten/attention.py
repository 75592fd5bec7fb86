"""Attention on PyTorch's flash and memory-efficient CUDA kernels (the ``torch`` backend).

Contract: :mod:`fastlm.reference.attention` (same functions, arguments, layouts, results).

Which kernel runs: the ``torch`` row of ``fastlm/ops/attention.py`` declares both, each
with its limits; the first whose limits allow the call runs it (``kernel_for``):

* **flash** (``aten._flash_attention_forward/_backward``, FlashAttention-2): fp16/bf16,
  head dim a multiple of 8 up to 256; packed sequences through ``cum_seq_q/k`` (no
  per-sequence loop, no host read); grouped-query natively; dropout; windows as
  ``(left, right)``.  Its causal mask and its windows are aligned to the last key
  (bottom-right), so it serves top-left causal (and windows, which count positions
  from the same diagonal) only where query and key lengths are equal.  No padding mask.
* **memory-efficient** (``aten._efficient_attention_forward/_backward``, xFormers' CUTLASS
  kernel): fp32 too; the key padding mask as an additive bias broadcast from
  ``(B, 1, 1, Sk)`` (one ``(B, round_up(Sk, 16))`` buffer: no ``(B, H, Sq, Sk)`` tensor,
  no host read); causal top-left (``custom_mask_type`` 1) or bottom-right (2); packed as
  a batch of one with ``cu_seqlens``; dropout.  Equal head counts only: for grouped-query
  k/v are expanded (a copy) and dk/dv summed back.  No window.

Conventions converted here:

* Layouts: q/k/v ``(B, H, S, D)`` become ``(B, S, H, D)`` views (no copy).  Results come
  back with q's (k's, v's) strides; a copy only when a kernel's layout differs (inputs
  that are not dense; memory-efficient outputs for inputs that are not ``(B, S, H, D)``
  underneath).
* lse: flash's ``(B, H, Sq)`` / ``(H, T)`` are ours; memory-efficient pads each row of
  queries to ``round_up(Sq, 32)`` and, packed, lays it out per sequence
  ``(N, H, round_up(max_q, 32))``: gathered into ours, scattered back for the backward.
* A query with no visible key (fully padded, or bottom-right causal with more queries
  than keys): flash writes 0 and lse +inf, memory-efficient may write NaN and -inf.
  Ours: 0, lse -inf, and zero gradients.  The forward zeroes such rows (non-finite lse);
  the backward hands the kernels +inf there, which makes their probabilities
  ``exp(s - lse)`` exactly 0, hence zero gradients, never NaN.
* Dropout: both kernels draw a Philox (seed, offset) from the device's default CUDA
  generator.  The contract wants a mask that is a function of fastlm's ``seed`` alone, so
  each call runs with that generator seeded to ``seed`` (offset 0) and puts its state back
  afterwards (host-side, no device sync; the user's CUDA random stream is untouched); the
  backward hands the kernels (seed, 0).  PyTorch forbids seeding during CUDA-graph
  capture, so dropout through this backend cannot be captured.

Signatures, torch 2.11 (the GPU image) to 2.14 (here), read from the schemas: the flash
forward gained ``block_table`` and ``num_splits`` (paged-KV inference, after 2.11); its
outputs are ``(output, softmax_logsumexp, rng_state, unused, debug_attn_mask)`` since 2.7
(before: ``philox_seed, philox_offset``); the backward and both memory-efficient ops are
unchanged in what we pass.  This module passes only arguments all of them take, by
position up to ``return_debug_mask`` and by name after (``scale``, ``window_size_left/right``);
``fastlm.aten.missing_kernels`` checks the schema.  (The v2.11.0 ``native_functions.yaml``
could not be read from here; the 2.11 facts come from listings of 2.10/2.12 schemas.)
``torch.nn.attention.varlen.varlen_attn`` is not used: its dropout is fixed at 0, it
takes grouped-query heads only from ~2.12, its backward is a private op, and on sm90 2.14
routes it to cuDNN above 128 queries, so it would be a different kernel per version.
"""
from __future__ import annotations

import contextlib

import torch

from fastlm import registry

# The kernels called here.  Tests substitute CPU emulations of their documented semantics
# (tests/_aten_emulation.py); on ``meta`` tensors the real ones run PyTorch's meta kernels.
ATEN = torch.ops.aten

_MASK_TYPES = {0: 0, 1: 1, 2: 2}  # our causal code -> custom_mask_type (none, top-left, bottom-right)
_LSE_ROWS = 32  # the memory-efficient kernel pads each lse row to a multiple of this
_BIAS_ALIGN = 16  # ... and wants the bias' batch stride a multiple of 16 bytes' worth of elements


def _kernel(q, k, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window,
            dropout_p) -> str:
    """Name of the kernel the ``torch`` row's data assigns to this call."""
    from fastlm.ops.attention import problem_of

    prob = problem_of(q, k, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                      window, dropout_p)
    kernel = registry.table("attention")["torch"].kernel_for(prob)
    if kernel is None:  # select() refuses such calls before a kernel runs
        raise registry.BackendError(f"fastlm.attention: no torch kernel serves {prob}")
    return kernel.name


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index]
    return torch.default_generator  # CPU emulations in the tests draw from it (meta kernels draw nothing)


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int, dropout_p: float):
    """Run a kernel call with the device's default generator at (seed, offset 0), then put
    its state back: the kernels' dropout becomes a function of ``seed``."""
    if dropout_p == 0.0:
        yield
        return
    gen = _default_generator(device)
    state = gen.get_state()
    gen.manual_seed(seed)
    try:
        yield
    finally:
        gen.set_state(state)


def _with_strides_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` laid out as ``torch.empty_like(like)`` (the contract's result layout); a copy
    only when the kernel's layout differs."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


def _empty_rows(lse: torch.Tensor) -> torch.Tensor:
    """Rows that saw no key: +inf (flash), -inf or NaN (memory-efficient) where a row that
    saw a key has a finite logsumexp."""
    return ~torch.isfinite(lse)


def _ours(lse: torch.Tensor) -> torch.Tensor:
    """A kernel's lse with our -inf for rows that saw no key (a new tensor)."""
    return lse.masked_fill(_empty_rows(lse), float("-inf"))


def _theirs(lse: torch.Tensor) -> torch.Tensor:
    """Our lse for a kernel's backward: +inf where a row saw no key, so exp(s - lse) = 0."""
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _bshd(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)


# ------------------------------------------------------------------------------- flash
def _flash_window(causal: int, window: int) -> tuple[int, int]:
    """Our window ``w`` (keys at distance < w) as flash's (left, right); -1 = unbounded."""
    if window == 0:
        return -1, (0 if causal else -1)
    return window - 1, (0 if causal else window - 1)


def _flash_max_q(q, k, cu_seqlens_q, max_seqlen_q: int, window: int, dropout_p: float) -> int:
    """``max_seqlen_q`` for flash's varlen forward.  With one query per sequence and grouped
    heads (no window, no dropout) flash reshapes q to ``(batch, kv_heads, groups, D)``,
    which needs every sequence to hold exactly one query; an upper bound of 2 keeps it on
    the general path when some hold none (max_seqlen is only a bound)."""
    batch = cu_seqlens_q.shape[0] - 1
    if max_seqlen_q == 1 and q.shape[1] != k.shape[1] and window == 0 and dropout_p == 0.0 and q.shape[0] != batch:
        return 2
    return max_seqlen_q


def _flash_rng_state(device: torch.device, seed: int) -> torch.Tensor:
    """The (seed, offset 0) Philox state the seeded forward used, as flash's backward reads
    it: two uint64 on the device, written by fill kernels (no host-to-device copy)."""
    state = torch.full((2,), seed, dtype=torch.int64, device=device)
    state[1] = 0
    return state.view(torch.uint64)


def _flash_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window, dropout_p,
                   scale, seed):
    packed = cu_seqlens_q is not None
    left, right = _flash_window(causal, window)
    if packed:
        args = (q, k, v, cu_seqlens_q, cu_seqlens_k,
                _flash_max_q(q, k, cu_seqlens_q, max_seqlen_q, window, dropout_p), max_seqlen_k)
    else:
        args = (_bshd(q), _bshd(k), _bshd(v), None, None, q.shape[2], k.shape[2])
    with _seeded(q.device, seed, dropout_p):
        out, lse, *_ = ATEN._flash_attention_forward(*args, dropout_p, causal != 0, False, scale=scale,
                                                      window_size_left=left, window_size_right=right)
    return _with_strides_of(out if packed else _bshd(out), q), _ours(lse)


def _flash_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                    window, dropout_p, scale, seed):
    packed = cu_seqlens_q is not None
    left, right = _flash_window(causal, window)
    rng = _flash_rng_state(q.device, seed) if dropout_p > 0.0 else torch.empty(2, dtype=torch.uint64,
                                                                               device=q.device)
    if packed:
        args = (dout, q, k, v, out, _theirs(lse), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    else:
        args = (*(_bshd(t) for t in (dout, q, k, v, out)), _theirs(lse), None, None, q.shape[2], k.shape[2])
    grads = ATEN._flash_attention_backward(*args, dropout_p, causal != 0, rng, rng, scale=scale,
                                           window_size_left=left, window_size_right=right)
    return tuple(_with_strides_of(g if packed else _bshd(g), t) for g, t in zip(grads, (q, k, v)))


# -------------------------------------------------------------------- memory-efficient
def _padding_bias(key_padding_mask: torch.Tensor, dtype: torch.dtype, heads: int, seq_q: int) -> torch.Tensor:
    """The key padding mask as an additive bias (0 attend, -inf not), ``(B, H, Sq, Sk)``
    broadcast (strides 0) from one ``(B, Sk)`` row per batch whose batch stride is padded
    to the kernel's alignment.  Memory: B x round_up(Sk, 16) elements."""
    b, sk = key_padding_mask.shape
    storage = torch.zeros(b, _round_up(sk, _BIAS_ALIGN), dtype=dtype, device=key_padding_mask.device)
    bias = storage[:, :sk].masked_fill_(~key_padding_mask, float("-inf"))
    return bias[:, None, None, :].expand(b, heads, seq_q, sk)


def _expand_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(..., S, Hk, D) -> (..., S, Hk * groups, D): the kernel wants equal head counts."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=-2)


def _sum_groups(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(..., S, Hk * groups, D) -> (..., S, Hk, D): sum the gradients of a kv head's group."""
    return t if groups == 1 else t.unflatten(-2, (-1, groups)).sum(-2)


def _token_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each packed token: its sequence and its position in it (device ops, no host read)."""
    tokens = torch.arange(total, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:], tokens, right=True)
    return seq.long(), (tokens - cu_seqlens[seq]).long()


def _efficient_inputs(q, k, v, cu_seqlens_q, key_padding_mask):
    """q/k/v as the kernel takes them ((B, S, H, D), packed as a batch of one, k/v heads
    expanded to q's) and the padding bias."""
    groups = q.shape[1] // k.shape[1]
    if cu_seqlens_q is not None:
        return q[None], _expand_heads(k[None], groups), _expand_heads(v[None], groups), None
    bias = None if key_padding_mask is None else _padding_bias(key_padding_mask, q.dtype, q.shape[1], q.shape[2])
    return _bshd(q), _expand_heads(_bshd(k), groups), _expand_heads(_bshd(v), groups), bias


def _efficient_forward(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                       dropout_p, scale, seed):
    packed = cu_seqlens_q is not None
    qa, ka, va, bias = _efficient_inputs(q, k, v, cu_seqlens_q, key_padding_mask)
    sizes = (min(max_seqlen_q, q.shape[0]), min(max_seqlen_k, k.shape[0])) if packed else (None, None)
    with _seeded(q.device, seed, dropout_p):
        out, lse, philox_seed, philox_offset, *_ = ATEN._efficient_attention_forward(
            qa, ka, va, bias, cu_seqlens_q, cu_seqlens_k, *sizes, dropout_p, _MASK_TYPES[causal], True, scale=scale)
    if dropout_p > 0.0 and philox_seed.device.type == "cpu":  # host values: checking costs no sync
        if (int(philox_seed), int(philox_offset)) != (seed, 0):
            raise RuntimeError("fastlm torch backend: the memory-efficient kernel did not draw its dropout from the "
                               f"seeded generator (got seed {int(philox_seed)}, offset {int(philox_offset)})")
    if packed:
        seq, pos = _token_positions(cu_seqlens_q, q.shape[0])
        lse = lse[seq, :, pos].t()  # (N, H, R) -> (H, T)
        out = out[0]
        empty = _empty_rows(lse).t()[..., None]  # (T, H, 1)
    else:
        lse = lse[..., :q.shape[2]]
        out = _bshd(out)
        empty = _empty_rows(lse)[..., None]  # (B, H, Sq, 1)
    out = out.masked_fill_(empty, 0.0)
    return _with_strides_of(out, q), _ours(lse).contiguous()


def _efficient_backward(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k, causal, dropout_p, scale, seed):
    packed = cu_seqlens_q is not None
    groups = q.shape[1] // k.shape[1]
    qa, ka, va, bias = _efficient_inputs(q, k, v, cu_seqlens_q, key_padding_mask)
    if packed:
        seq, pos = _token_positions(cu_seqlens_q, q.shape[0])
        lse_k = lse.new_full((cu_seqlens_q.shape[0] - 1, q.shape[1], _round_up(max_seqlen_q, _LSE_ROWS)),
                             float("inf"))
        lse_k[seq, :, pos] = _theirs(lse).t()
        dout_a, out_a = dout[None], out[None].contiguous()
        sizes = (min(max_seqlen_q, q.shape[0]), min(max_seqlen_k, k.shape[0]))
    else:
        pad = _round_up(q.shape[2], _LSE_ROWS) - q.shape[2]
        lse_k = torch.nn.functional.pad(_theirs(lse), (0, pad), value=float("inf"))
        dout_a, out_a = _bshd(dout), _bshd(out).contiguous()
        sizes = (q.shape[2], k.shape[2])
    # The kernel reads ``out`` as (B, S, H, D) with rows H * D apart (its o_strideM), whatever
    # its strides say: hence the contiguous copies above when q is not laid out so underneath.
    # The forward's Philox state, on the host where this kernel's backward reads it.
    philox = (torch.tensor(seed, dtype=torch.int64), torch.tensor(0, dtype=torch.int64))
    dq, dk, dv, _ = ATEN._efficient_attention_backward(dout_a, qa, ka, va, bias, out_a, cu_seqlens_q, cu_seqlens_k,
                                                       *sizes, lse_k, dropout_p, *philox, _MASK_TYPES[causal],
                                                       False, scale=scale)
    dk, dv = _sum_groups(dk, groups), _sum_groups(dv, groups)
    grads = (dq[0], dk[0], dv[0]) if packed else (_bshd(dq), _bshd(dk), _bshd(dv))
    return tuple(_with_strides_of(g, t) for g, t in zip(grads, (q, k, v)))


# ---------------------------------------------------------------------- the contract
def _nothing_visible(q, cu_seqlens_q, max_seqlen_q: int, max_seqlen_k: int) -> bool:
    """Packed calls whose every query or every key sequence is empty (the memory-efficient
    backward refuses max_seqlen 0): every row sees nothing."""
    return cu_seqlens_q is not None and (max_seqlen_q == 0 or max_seqlen_k == 0)


def attention_forward(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      causal, window, dropout_p, scale, seed):
    """Attention output and float32 logsumexp (the contract of :mod:`fastlm.reference.attention`)."""
    if _nothing_visible(q, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
        return torch.zeros_like(q), q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32)
    kernel = _kernel(q, k, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window,
                     dropout_p)
    if kernel == "flash":
        return _flash_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window,
                              dropout_p, scale, seed)
    return _efficient_forward(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              causal, dropout_p, scale, seed)


def attention_backward(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                       max_seqlen_q, max_seqlen_k, causal, window, dropout_p, scale, seed):
    """Gradients (dq, dk, dv) of :func:`attention_forward`, from its ``out`` and ``lse``."""
    if _nothing_visible(q, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    kernel = _kernel(q, k, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window,
                     dropout_p)
    if kernel == "flash":
        return _flash_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               causal, window, dropout_p, scale, seed)
    return _efficient_backward(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, causal, dropout_p, scale, seed)
