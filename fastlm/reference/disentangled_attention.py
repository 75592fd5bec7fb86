"""DeBERTa-v2/v3 disentangled attention in plain PyTorch: the ground truth and the fallback.

Kernel-level contract (every backend of ``fastlm::disentangled_attention`` implements exactly this)::

    disentangled_attention_forward(q, k, v, pos_key, pos_query, rel_slots, key_padding_mask,
                                   cu_seqlens, max_seqlen, dropout_p, scale, seed) -> (out, lse)
    disentangled_attention_backward(dout, q, k, v, pos_key, pos_query, rel_slots, out, lse,
                                    key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed)
        -> (dq, dk, dv, dpos_key, dpos_query)

* Padded mode (``cu_seqlens is None``): q, k, v ``(B, H, L, D)``, any strides with last-dim
  stride 1; ``key_padding_mask`` ``(B, L)`` bool (True = attend) or None; lse ``(B, H, L)``;
  query i and key j sit at positions i and j of the padded row.
* Packed mode: q, k, v ``(T, H, D)``; sequence n is rows ``cu_seqlens[n]:cu_seqlens[n+1]``
  (int32, length N + 1), positions restart at 0 in every sequence; ``key_padding_mask`` None;
  lse ``(H, T)``.  ``max_seqlen`` >= every sequence's length.
* ``pos_key`` (c2p) and ``pos_query`` (p2c): ``(H, R, D)`` or None, the relative-position
  embeddings projected by the layer's key / query projections (transformers'
  ``pos_key_layer`` / ``pos_query_layer`` of one batch element), shared by the whole batch.
* ``rel_slots``: int32 ``(2 * Lmax - 1,)``, ``Lmax`` = L (padded) or ``max_seqlen`` (packed):
  the row of ``pos_key``/``pos_query`` that distance ``d = i - j`` reads is
  ``rel_slots[d + Lmax - 1]`` (transformers' ``clamp(bucket(d) + span, 0, R - 1)``, built by
  :func:`fastlm.ops.disentangled_attention.relative_slots`).  The bucket function is odd, so
  the p2c term's ``-bucket(j - i)`` is the same slot.
* Scores: ``s_ij = scale * (q_i.k_j + q_i.pos_key[t] + k_j.pos_query[t])``, ``t = slot(i - j)``,
  each positional term only when its table is given; masked keys are excluded; softmax over
  j; dropout zeroes probabilities with probability ``dropout_p`` and scales the rest by
  ``1 / (1 - dropout_p)`` (the mask is a function of ``seed`` and the shapes only, so the
  backward regenerates it; ``seed`` is ignored when ``dropout_p == 0``); ``out = P V``.
* A query row with no visible key: out 0, lse -inf, zero gradients.
* out/dq are ``empty_like(q)``, dk/dv ``empty_like(k/v)``; ``dpos_key``/``dpos_query`` like
  their table, summed over the batch (a ``(0,)`` tensor for an absent table); lse is the
  float32 natural-log logsumexp of the scores.

Numerics: inputs are upcast to float32 (float64 stays float64).  Memory: padded mode
materialises the ``(B, H, L, L)`` scores and the ``(B, H, L, R)`` products ``q pos_key^T`` and
``k pos_query^T``; packed mode holds one sequence's at a time (reading ``cu_seqlens`` costs one
host sync on a GPU: this is the fallback, not a fast path).  The backward recomputes the
forward in the compute precision and differentiates it with autograd.
"""
from __future__ import annotations

import torch

from fastlm.ops._common import acc_dtype


def _generator(seed: int, dropout_p: float, device) -> torch.Generator | None:
    if dropout_p == 0.0:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


def _slot_matrix(rel_slots: torch.Tensor, length: int) -> torch.Tensor | None:
    """(length, length) int64: the slot of query i and key j, ``rel_slots[i - j + Lmax - 1]``
    (None without positional terms: an empty table)."""
    if rel_slots.numel() == 0:
        return None
    center = (rel_slots.shape[0] - 1) // 2
    pos = torch.arange(length, device=rel_slots.device)
    return rel_slots.long()[pos[:, None] - pos[None, :] + center]


def _scores(q, k, pos_key, pos_query, slots, scale):
    """Scaled scores (N, H, L, L) of q, k (N, H, L, D), all in the compute dtype."""
    s = torch.matmul(q, k.transpose(-1, -2))
    index = None if slots is None else slots.expand(*q.shape[:2], *slots.shape)
    if pos_key is not None:  # content -> position: q_i . pos_key[slot(i - j)]
        s = s + torch.gather(torch.matmul(q, pos_key.transpose(-1, -2)), -1, index)
    if pos_query is not None:  # position -> content: k_j . pos_query[slot(i - j)]
        p2c = torch.matmul(k, pos_query.transpose(-1, -2))  # (N, H, L_key, R)
        s = s + torch.gather(p2c, -1, index.transpose(-1, -2)).transpose(-1, -2)
    return s * scale


def _probs(q, k, pos_key, pos_query, slots, allowed, scale):
    """Softmax probabilities (N, H, L, L) and lse (N, H, L) in the compute dtype; a row with
    no visible key gets probabilities 0 and lse -inf."""
    s = _scores(q, k, pos_key, pos_query, slots, scale)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(s - finite[..., None]), lse


def _keep(shape, dropout_p, gen, device):
    """Dropout factor keep / (1 - p) drawn from ``gen`` (forward and backward draw alike), or None."""
    if dropout_p == 0.0:
        return None
    return (torch.rand(shape, generator=gen, device=device, dtype=torch.float32) >= dropout_p) / (1.0 - dropout_p)


def _block(q, k, v, pos_key, pos_query, slots, allowed, scale, dropout_p, gen):
    """One padded batch (or one packed sequence as a batch of one) -> (out, lse), compute dtype."""
    probs, lse = _probs(q, k, pos_key, pos_query, slots, allowed, scale)
    keep = _keep(probs.shape, dropout_p, gen, probs.device)
    return torch.matmul(probs if keep is None else probs * keep, v), lse


def _block_backward(dout, q, k, v, pos_key, pos_query, slots, allowed, scale, dropout_p, gen):
    """Gradients (dq, dk, dv, dpos_key, dpos_query) of :func:`_block` (tables: summed over N).

    With P the softmax and Z the dropout factor: out = (P Z) V, so dV = (P Z)^T dO,
    dP = (dO V^T) Z, dS = scale * P (dP - rowsum(P dP)) w.r.t. the unscaled sums; the
    positional terms are gathers, so their gradients scatter dS back to the slots:
    dC2P[i, t] = sum over j with slot(i - j) = t of dS_ij (dP2C likewise over i, per key j),
    then dQ = dS K + dC2P pos_key, dK = dS^T Q + dP2C pos_query, dpos_key = dC2P^T Q,
    dpos_query = dP2C^T K."""
    probs, _ = _probs(q, k, pos_key, pos_query, slots, allowed, scale)
    keep = _keep(probs.shape, dropout_p, gen, probs.device)
    dprobs = torch.matmul(dout, v.transpose(-1, -2))
    if keep is not None:
        dprobs = dprobs * keep
    dv = torch.matmul((probs if keep is None else probs * keep).transpose(-1, -2), dout)
    ds = probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True)) * scale
    dq, dk = torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), q)
    dtables = []
    for table, rows, grad, dsg in ((pos_key, q, dq, ds), (pos_query, k, dk, ds.transpose(-1, -2))):
        if table is None:
            dtables.append(None)
            continue
        index = slots.expand(*q.shape[:2], *slots.shape)
        index = index if dsg is ds else index.transpose(-1, -2)
        dslots = torch.zeros(*dsg.shape[:-1], table.shape[1], dtype=ds.dtype, device=ds.device)
        dslots.scatter_add_(-1, index, dsg)
        grad += torch.matmul(dslots, table)
        dtables.append(torch.einsum("nhlr,nhld->hrd", dslots, rows))
    return dq, dk, dv, dtables[0], dtables[1]


def _upcast(*tensors):
    return [None if t is None else t.to(acc_dtype(tensors[0].dtype)) for t in tensors]


def _sequences(cu_seqlens) -> list[tuple[int, int]]:
    cu = cu_seqlens.tolist()  # one host read
    return [(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def _as_batch(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Packed rows (T, H, D)[start:end] as a batch of one, (1, H, L, D) (a view)."""
    return t[start:end].transpose(0, 1).unsqueeze(0)


def _pieces(q, k, v, key_padding_mask, cu_seqlens):
    """(q, k, v, allowed, rows) per block: the padded batch, or each non-empty packed sequence
    with ``rows`` its token range."""
    if cu_seqlens is None:
        allowed = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        return [(q, k, v, allowed, None)]
    return [(_as_batch(q, a, b), _as_batch(k, a, b), _as_batch(v, a, b), None, (a, b))
            for a, b in _sequences(cu_seqlens) if b > a]


def disentangled_attention_forward(q, k, v, pos_key, pos_query, rel_slots, key_padding_mask, cu_seqlens,
                                   max_seqlen, dropout_p, scale, seed):
    """Attention output and float32 logsumexp (see the module docstring for the contract)."""
    gen = _generator(seed, dropout_p, q.device)
    qc, kc, vc, pk, pq = _upcast(q, k, v, pos_key, pos_query)
    out = torch.empty_like(q)
    if cu_seqlens is None:
        lse = None
    else:  # every token belongs to a sequence when cu_seqlens is right (unchecked on a GPU)
        out.zero_()
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for bq, bk, bv, allowed, rows in _pieces(qc, kc, vc, key_padding_mask, cu_seqlens):
        o, l = _block(bq, bk, bv, pk, pq, _slot_matrix(rel_slots, bq.shape[2]), allowed, scale, dropout_p, gen)
        if rows is None:
            out.copy_(o)
            lse = l.to(torch.float32).contiguous()
        else:
            out[rows[0]:rows[1]] = o[0].transpose(0, 1)
            lse[:, rows[0]:rows[1]] = l[0]
    return out, lse


def disentangled_attention_backward(dout, q, k, v, pos_key, pos_query, rel_slots, out, lse, key_padding_mask,
                                    cu_seqlens, max_seqlen, dropout_p, scale, seed):
    """Gradients ``(dq, dk, dv, dpos_key, dpos_query)`` of :func:`disentangled_attention_forward`
    (``out`` and ``lse`` are unused: the softmax is recomputed in the compute precision)."""
    gen = _generator(seed, dropout_p, q.device)
    qc, kc, vc, pk, pq, doc = _upcast(q, k, v, pos_key, pos_query, dout)
    dq, dk, dv = torch.zeros_like(qc), torch.zeros_like(kc), torch.zeros_like(vc)
    dtables = [None if t is None else torch.zeros_like(t) for t in (pk, pq)]
    for (bq, bk, bv, allowed, rows), (bdo, *_) in zip(_pieces(qc, kc, vc, key_padding_mask, cu_seqlens),
                                                     _pieces(doc, doc, doc, None, cu_seqlens)):
        g = _block_backward(bdo, bq, bk, bv, pk, pq, _slot_matrix(rel_slots, bq.shape[2]), allowed, scale,
                            dropout_p, gen)
        for grad, part in zip((dq, dk, dv), g[:3]):
            if rows is None:
                grad.copy_(part)
            else:
                grad[rows[0]:rows[1]] = part[0].transpose(0, 1)
        for total, part in zip(dtables, g[3:]):
            if total is not None:
                total += part
    grads = [torch.empty_like(t).copy_(g) for t, g in zip((q, k, v), (dq, dk, dv))]
    grads += [torch.empty(0, dtype=q.dtype, device=q.device) if t is None else g.to(t.dtype)
              for t, g in zip((pos_key, pos_query), dtables)]
    return tuple(grads)
