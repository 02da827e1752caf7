"""Fused student loss: log-prob, per-token loss and both gradients in ONE pass over the logits.

The per-token loss l_t(logp_t) is elementwise in logp (the G-OPD loss is), so d loss / d logp_t is
known as soon as a chunk's logp is: the gradient is formed in the forward and the backward only
scales the saved (dh, dW) by grad_output. No logits are recomputed (3 GEMMs per chunk, not 4).

Shapes: h [T, H], W [V_local, H] (rows >= vocab_valid are padding: zero gradient), y [T].
Per token chunk c (Tc rows):
    z_c          = (h_c @ W[:vv]^T) / temperature                      [Tc, vv] fp32
    m,s,sz,zt    = row stats of z_c                                    [Tc] each
    lse, zt, mu  = combine_stats(...)      collectives: all_reduce MAX [Tc], all_reduce SUM [3, Tc]
    logp_c       = zt - lse,   entropy_c = lse - mu                    (0 on ignored tokens)
    loss_c       = token_loss_fn(logp_c, slice)      -> [Tc] weighted per-token losses
    g_c          = d sum(loss_c) / d logp_c          (torch.autograd.grad on that O(Tc) graph)
    dz_c         = g_c * (onehot(y) - softmax(z_c)) / temperature      (overwrites z_c)
    dh_c         = dz_c @ W[:vv]            dW[:vv] += dz_c^T @ h_c    (dW accumulated in fp32)
After the last chunk: all_reduce SUM of dh [T, H] over the group when ``reduce_dh`` (skip it if the
caller's layer, e.g. megatron's ColumnParallelLinear input copy, already reduces dh).

loss = sum over non-ignored tokens of token_loss_fn's output (identical on every rank, because
every rank sees the same global logp). Gradients flow only to hidden and weight: whatever the
closure captures is treated as a constant.
Memory: O(Tc * vv) transient + dh [T, H] + dW [V_local, H] (+ its fp32 accumulator).

``grad_weight_acc``: an fp32 [V_local, H] buffer the caller already owns (megatron's main_grad,
as its gradient_accumulation_fusion does). dW is then ADDED into it during the forward, in fp32,
with no dW tensor and no accumulator of this call's own; autograd returns no weight gradient,
and ``loss`` must be back-propagated with grad 1 (checked; scale the loss in token_loss_fn).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import vocab_parallel as vp
from .chunked import (
    TORCH_ROW_OPS,
    Plan,
    RowOps,
    _chunks,
    acc_dtype,
    accumulate_grads,
    chunk_logits,
    finish_grads,
    grad_buffers,
    make_plan,
)

TokenLossFn = Callable[[torch.Tensor, slice], torch.Tensor]


def _loss_grad(token_loss_fn: TokenLossFn, logp_c: torch.Tensor, sl: slice, valid_c):
    """Weighted loss of one chunk and its gradient w.r.t. logp (an O(Tc) autograd graph)."""
    with torch.enable_grad():
        lp = logp_c.detach().requires_grad_(True)
        per_token = token_loss_fn(lp, sl)
        if per_token.shape != lp.shape:
            raise ValueError(f"token_loss_fn returned {tuple(per_token.shape)}, expected {tuple(lp.shape)}")
        total = torch.where(valid_c, per_token, torch.zeros_like(per_token)).sum()
        (g,) = torch.autograd.grad(total, lp, allow_unused=True)
    g = torch.zeros_like(logp_c) if g is None else g
    return total.detach(), torch.where(valid_c, g, torch.zeros_like(g)).to(logp_c.dtype)


class FusedLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_loss_fn: TokenLossFn, plan: Plan, row_ops: RowOps, grad_weight_acc):
        T = hidden.shape[0]
        dt = acc_dtype(hidden)
        dev = hidden.device
        tgt, owned, valid = vp.local_targets(targets, plan.vocab_start, plan.vocab_valid, plan.ignore_index)
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1] or grad_weight_acc is not None
        ctx.external_dw = grad_weight_acc is not None
        w = weight[: plan.vocab_valid]
        dh, dw_acc = grad_buffers(hidden, plan, need_dh, need_dw, grad_weight_acc)
        logp = torch.empty(T, dtype=dt, device=dev)
        entropy = torch.empty(T, dtype=dt, device=dev)
        loss = torch.zeros((), dtype=dt, device=dev)
        for sl in _chunks(T, plan.chunk_size):
            z, zscale = chunk_logits(hidden[sl], w, plan.inv_temp, plan.logits_dtype)
            m, s, sz, zt = row_ops.stats(z, tgt[sl], owned[sl], zscale)
            lse, zt, mu = vp.combine_stats(m, s, sz, zt, plan.group)
            logp[sl], entropy[sl] = vp.finish(lse, zt, mu, valid[sl])
            loss_c, g = _loss_grad(token_loss_fn, logp[sl], sl, valid[sl])
            loss += loss_c.to(dt)
            if need_dh or need_dw:
                dz = row_ops.dlogits(z, lse, mu, g, None, tgt[sl], owned[sl], plan.inv_temp, hidden.dtype, zscale)
                del z
                accumulate_grads(dz, w, hidden, sl, dh, dw_acc)
                del dz
        dh, dw = finish_grads(dh, None if ctx.external_dw else dw_acc, weight, plan)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (dh, dw)))
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, g_loss, _g_logp, _g_ent):
        dh, dw = ctx.saved_tensors
        # dW is already in the caller's buffer, unscaled. One host sync per call, for a clear error.
        if ctx.external_dw and float(g_loss) != 1.0:
            raise RuntimeError(f"grad_weight_acc: backpropagate the loss with gradient 1, got {float(g_loss)}")
        dh = dh * g_loss.to(dh.dtype) if ctx.needs_input_grad[0] else None
        dw = dw * g_loss.to(dw.dtype) if ctx.needs_input_grad[1] and not ctx.external_dw else None
        return dh, dw, None, None, None, None, None


def linear_logprob_loss(
    hidden,
    weight,
    targets,
    token_loss_fn: TokenLossFn,
    *,
    row_ops: RowOps = TORCH_ROW_OPS,
    grad_weight_acc=None,
    **kwargs,
):
    """(loss scalar, logp [T] detached, entropy [T] detached); loss is differentiable w.r.t.
    hidden and weight (or, with ``grad_weight_acc``, dW is added into that fp32 buffer).
    ``kwargs`` are those of :func:`kernels.chunked.make_plan`."""
    kwargs.pop("return_entropy", None)
    plan = make_plan(hidden, weight, targets, **kwargs)
    if grad_weight_acc is not None:
        want = (weight.shape, acc_dtype(hidden))
        if (grad_weight_acc.shape, grad_weight_acc.dtype) != want:
            raise ValueError(
                f"grad_weight_acc must be {tuple(want[0])} {want[1]} like the weight "
                f"shard, got {tuple(grad_weight_acc.shape)} {grad_weight_acc.dtype}"
            )
    return FusedLossFunction.apply(hidden, weight, targets, token_loss_fn, plan, row_ops, grad_weight_acc)
