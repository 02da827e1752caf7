"""Pure-torch reference: materialises the full local logits. Test oracle and benchmark baseline.

    z = (h @ W_local^T) / temperature      [T, V_local]   (matmul in the input dtype, then fp32;
                                                           fp64 inputs stay fp64: the oracle)
    logp_t = z[t, y_t] - logsumexp_v z[t, v],   entropy_t = lse_t - sum_v p[t, v] z[t, v]

Rows >= vocab_valid of W are padding and are dropped. Autograd does the backward. With a
vocab-parallel ``group`` the per-token max/sum-exp/target logit are combined with the collectives
of :mod:`kernels.vocab_parallel`; the all-reduces have identity backward (every rank holds the
same replicated loss, so d loss / d (local partial sum) = d loss / d (global sum)), and hidden goes
through a copy whose backward all-reduces dh (megatron's copy_to_tensor_model_parallel_region)
when ``reduce_dh``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import vocab_parallel as vp


class _AllReduceSumIdentityBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return vp.all_reduce_sum_(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _CopyAllReduceBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return vp.all_reduce_sum_(g.contiguous().clone(), ctx.group), None


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int = 0,
    vocab_valid: int | None = None,
    group=None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    reduce_dh: bool = True,
    **_ignored,
):
    """Reference log-prob (and entropy); differentiable through autograd."""
    vv = weight.shape[0] if vocab_valid is None else vocab_valid
    tp = vp.group_size(group) > 1
    if tp and reduce_dh:
        hidden = _CopyAllReduceBackward.apply(hidden, group)
    z = (hidden @ weight[:vv].t()).to(_acc_dtype(hidden)) / temperature
    tgt, owned, valid = vp.local_targets(targets, vocab_start, vv, ignore_index)
    m = z.detach().max(dim=-1).values if vv > 0 else z.new_full((z.shape[0],), float("-inf"))
    m = vp.all_reduce_max_(m, group)
    e = torch.exp(z - m[:, None])
    zt = torch.where(owned, z.gather(1, tgt[:, None]).squeeze(1), torch.zeros_like(m))
    s, sz = e.sum(-1), (e * z).sum(-1)
    if tp:
        s = _AllReduceSumIdentityBackward.apply(s, group)
        sz = _AllReduceSumIdentityBackward.apply(sz, group)
        zt = _AllReduceSumIdentityBackward.apply(zt, group)
    lse = m + torch.log(s)
    logp, entropy = vp.finish(lse, zt, sz / s, valid)
    return (logp, entropy) if return_entropy else logp


def linear_logprob_inference(hidden, weight, targets, **kwargs):
    """Forward only (no autograd state); same arguments as :func:`linear_logprob`."""
    with torch.no_grad():
        return linear_logprob(hidden, weight, targets, **kwargs)


def linear_logprob_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_loss_fn: Callable[[torch.Tensor, slice], torch.Tensor],
    *,
    ignore_index: int = -100,
    **kwargs,
):
    """loss = sum_t token_loss_fn(logp)[t] over non-ignored tokens; returns (loss, logp, entropy)."""
    kwargs.pop("return_entropy", None)
    logp, entropy = linear_logprob(hidden, weight, targets, ignore_index=ignore_index, return_entropy=True, **kwargs)
    per_token = token_loss_fn(logp, slice(0, logp.shape[0]))
    valid = targets != ignore_index
    loss = torch.where(valid, per_token, torch.zeros_like(per_token)).sum()
    return loss, logp.detach(), entropy.detach()
