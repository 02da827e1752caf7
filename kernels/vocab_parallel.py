"""Vocab-parallel stage functions: the only place where ranks talk to each other.

Every backend reduces its local vocab shard to four floats per token, then combines them here:

    m_r[t]  = max_v z[t, v]                                   (local max over real rows)
    s_r[t]  = sum_v exp(z[t, v] - m_r[t])                     (local sum-exp)
    sz_r[t] = sum_v exp(z[t, v] - m_r[t]) * z[t, v]           (for the entropy)
    zt_r[t] = z[t, y_t] if this rank owns y_t else 0          (target logit)

Collective sequence per call (or per token chunk for the fused loss), O(T) floats, never O(T*V):
    1. all_reduce MAX  of m                          [T]
    2. all_reduce SUM  of stack(s*a, sz*a, zt)       [3, T],  a = exp(m_r - M)
Then  lse = M + log S,  logp = zt - lse,  mu = SZ / S = E_p[z],  entropy = lse - mu.

The backward of a vocab-parallel layer needs no logits from other ranks: with the global lse (and
mu), dz_r = g * (onehot_r(y) - p_r) - g_H * p_r * (z_r - mu) is local. dW_r is this rank's slice;
dh_r = dz_r @ W_r is a partial sum that is all-reduced (SUM) over the group, exactly like
megatron's ColumnParallelLinear backward (optional, see ``reduce_dh``).

``group`` is a plain torch.distributed ProcessGroup, or None for a single rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    """World size of ``group``; 1 when there is no group or torch.distributed is not initialised."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def all_reduce_max_(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def all_reduce_sum_(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def local_targets(
    targets: torch.Tensor, vocab_start: int, vocab_valid: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map global target ids to this shard.

    Returns (tgt_local int64 [T] clamped to a safe index, owned bool [T], valid bool [T]):
    ``owned`` marks tokens whose target lies in [vocab_start, vocab_start + vocab_valid);
    ``valid`` marks tokens that are not ``ignore_index``.
    """
    targets = targets.long()
    valid = targets != ignore_index
    local = targets - vocab_start
    owned = valid & (local >= 0) & (local < vocab_valid)
    tgt_local = torch.where(owned, local, torch.zeros_like(local))
    return tgt_local, owned, valid


def _rescale(m: torch.Tensor, m_global: torch.Tensor) -> torch.Tensor:
    # exp(m_r - M), with 0 where this rank saw no real column (m_r = -inf).
    finite = torch.isfinite(m)
    return torch.where(finite, torch.exp(torch.where(finite, m, m_global) - m_global), 0.0)


def merge_stats(m, s, sz, zt, dim: int = 0):
    """Combine partial stats along ``dim`` on one rank (e.g. Triton vocab splits)."""
    M = m.max(dim=dim).values
    a = _rescale(m, M.unsqueeze(dim))
    return M, (s * a).sum(dim), (sz * a).sum(dim), zt.sum(dim)


def combine_stats(m, s, sz, zt, group):
    """The two collectives: global (lse [T], target logit [T], mu = E_p[z] [T])."""
    M = all_reduce_max_(m.clone(), group)
    a = _rescale(m, M)
    packed = torch.stack([s * a, sz * a, zt])
    all_reduce_sum_(packed, group)
    S, SZ, ZT = packed.unbind(0)
    lse = M + torch.log(S)
    return lse, ZT, SZ / S


def finish(lse, zt, mu, valid):
    """logp = z_y - lse and entropy = lse - E_p[z]; both 0 on ignored tokens."""
    zero = torch.zeros_like(lse)
    return torch.where(valid, zt - lse, zero), torch.where(valid, lse - mu, zero)
