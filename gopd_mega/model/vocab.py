"""Vocabulary-parallel log-probs at chosen ids, in plain torch: what the top-k estimator
(gopd_mega.objective.top_k_token_loss) needs of each model.

    z   = (h @ W_local^T) / T       [Rc, V_local] fp32, one chunk of Rc positions at a time;
                                    W_local = this TP rank's rows [start, start + valid) of the vocab
    lse = log sum_v exp z           all_reduce MAX, then SUM, of [Rc] over the TP group
    log p(v) = z[v] - lse           for the ids asked for (each owned by one TP rank: SUM of [Rc, K])

- :func:`top_k_logprobs`: a teacher's k most likely ids per position (local top-k, all_gather of
  [Rc, tp * k] candidates, top-k again), their log-probs and the log-prob of each target.
- :func:`logprobs_at`: log-probs at given ids [R, K]; differentiable for the student (megatron's
  autograd-aware TP mappings: the hidden states' gradient is summed over TP as the output layer's
  input copy would, the weight shard gets its own rows' gradient through autograd), with each
  chunk's logits recomputed in the backward (torch.utils.checkpoint) so that memory stays one
  [Rc, V_local] chunk, never [R, V_local].

These are memory-safe, not fast (two GEMMs per chunk forward-only, three with the backward plus
the recompute); the full-vocabulary estimator has its own fused kernel (kernels).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 24
"""Logits per chunk (64 MiB in fp32): Rc = max(1, CHUNK_ELEMENTS // V_local) positions."""


def _chunk_rows(rows: int, vocab_local: int) -> int:
    return max(1, min(rows, CHUNK_ELEMENTS // max(vocab_local, 1)))


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _logits(h: torch.Tensor, w: torch.Tensor, valid: int, inv_t: float) -> torch.Tensor:
    return (h.float() @ w[:valid].float().t()) * inv_t


def _max(z: torch.Tensor, group) -> torch.Tensor:
    """Row max over the whole vocabulary (no gradient: it only shifts the logsumexp)."""
    with torch.no_grad():
        m = z.amax(dim=-1) if z.shape[-1] else torch.full(z.shape[:-1], float("-inf"), device=z.device)
        if _group_size(group) > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    return m


def _sum(x: torch.Tensor, group, differentiable: bool) -> torch.Tensor:
    """SUM over the TP group (forward all-reduce, backward identity when differentiable)."""
    if _group_size(group) == 1:
        return x
    if differentiable:
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

        return reduce_from_tensor_model_parallel_region(x, group=group)
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x


def _at(z: torch.Tensor, ids: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z at the global ``ids`` [Rc, K] that this shard owns (0 elsewhere), and the ownership mask."""
    valid = z.shape[-1]
    owned = (ids >= start) & (ids < start + valid)
    if not valid:
        return torch.zeros(ids.shape, device=z.device), owned
    local = (ids - start).clamp(0, valid - 1)
    return torch.where(owned, z.gather(-1, local), torch.zeros((), device=z.device)), owned


def _chunk_logprobs_at(h, w, ids, start: int, valid: int, inv_t: float, group, differentiable: bool):
    z = _logits(h, w, valid, inv_t)
    m = _max(z, group)
    lse = m + _sum(torch.exp(z - m[:, None]).sum(dim=-1), group, differentiable).log()
    zi, _ = _at(z, ids, start)
    return _sum(zi, group, differentiable) - lse[:, None]


def logprobs_at(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    vocab_start: int = 0,
    vocab_valid: int | None = None,
    group=None,
    temperature: float = 1.0,
    reduce_dh: bool = True,
    **_unused,
) -> torch.Tensor:
    """fp32 [R, K] log p(ids[r, k] | position r) for hidden [R, H], this rank's weight shard
    [V_local, H] and global ids [R, K] (entries < 0 give 0: mask them). Differentiable w.r.t.
    hidden and weight when they require grad (the hidden states' gradient is summed over the TP
    group unless ``reduce_dh`` is False, e.g. under sequence parallelism)."""
    valid = weight.shape[0] if vocab_valid is None else vocab_valid
    inv_t = 1.0 / temperature
    differentiable = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if differentiable and reduce_dh and _group_size(group) > 1:
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        hidden = copy_to_tensor_model_parallel_region(hidden, group=group)
    ids = ids.to(hidden.device).long()
    out = []
    step = _chunk_rows(hidden.shape[0], valid)
    for lo in range(0, hidden.shape[0], step):
        sl = slice(lo, lo + step)
        args = (hidden[sl], weight, ids[sl], vocab_start, valid, inv_t, group, differentiable)
        if differentiable:
            out.append(checkpoint(_chunk_logprobs_at, *args, use_reentrant=False))
        else:
            with torch.no_grad():
                out.append(_chunk_logprobs_at(*args))
    if not out:
        return torch.zeros(ids.shape, device=hidden.device)
    lp = torch.cat(out)
    return torch.where(ids >= 0, lp, torch.zeros((), device=lp.device))


@torch.no_grad()
def top_k_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    k: int,
    *,
    vocab_start: int = 0,
    vocab_valid: int | None = None,
    group=None,
    temperature: float = 1.0,
    **_unused,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [R, k] long, logp [R, k] fp32, target_logp [R] fp32): the k most likely ids per
    position over the whole (vocab-parallel) vocabulary, descending, and the log-prob of each
    target id. Where the vocabulary has fewer than k ids, the extra entries are id -1, logp -inf."""
    valid = weight.shape[0] if vocab_valid is None else vocab_valid
    inv_t = 1.0 / temperature
    tp = _group_size(group)
    R, dev = hidden.shape[0], hidden.device
    ids_out = torch.full((R, k), -1, dtype=torch.long, device=dev)
    lp_out = torch.full((R, k), float("-inf"), device=dev)
    tgt_out = torch.zeros(R, device=dev)
    step = _chunk_rows(R, valid)
    for lo in range(0, R, step):
        sl = slice(lo, lo + step)
        z = _logits(hidden[sl], weight, valid, inv_t)
        n = z.shape[0]
        kk = min(k, valid)
        vals = torch.full((n, k), float("-inf"), device=dev)
        idx = torch.full((n, k), -1, dtype=torch.long, device=dev)
        if kk:
            v, i = z.topk(kk, dim=-1)
            vals[:, :kk], idx[:, :kk] = v, i + vocab_start
        if tp > 1:
            all_vals = [torch.empty_like(vals) for _ in range(tp)]
            all_idx = [torch.empty_like(idx) for _ in range(tp)]
            dist.all_gather(all_vals, vals, group=group)
            dist.all_gather(all_idx, idx, group=group)
            vals, pick = torch.cat(all_vals, dim=-1).topk(k, dim=-1)
            idx = torch.cat(all_idx, dim=-1).gather(-1, pick)
        m = _max(z, group)
        lse = m + _sum(torch.exp(z - m[:, None]).sum(dim=-1), group, False).log()
        zt, _ = _at(z, targets[sl, None].to(dev).long(), vocab_start)
        tgt_out[sl] = _sum(zt[:, 0], group, False) - lse
        lp_out[sl] = vals - lse[:, None]
        ids_out[sl] = torch.where(torch.isfinite(vals), idx, torch.full_like(idx, -1))
    return ids_out, lp_out, tgt_out
