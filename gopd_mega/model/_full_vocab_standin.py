"""PRIVATE STAND-IN for ``kernels.full_vocab_gopd_loss`` (issue 18 part A, written in parallel by
another engineer): the same signature and semantics, in plain torch with full logits per
vocabulary shard ([N, V_local] per model, the oracle's memory). Used only while kernels lacks the
function (gopd_mega.model.distill imports it in one place); delete it at merge.

Per position (teacher and reference detached, all logits / temperature):
    log p = log_softmax(z_S);  g = lam log_softmax(z_T) + (1 - lam) log_softmax(z_R)
    log Z = logsumexp(g);      L = sum_v p (log p - g);   dL/dz_S(u) = p(u) (log p(u) - g(u) - L)
Autograd: ``loss`` [N] is differentiable in h_s and w_s; backward with upstream ones gives the
gradient of sum_t token_weight_t * L_t (token_weight None: 1). With ``grad_weight_acc`` (fp32,
w_s's shape) dW is added into it in the forward and the upstream gradient must be exactly ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _lse(z: torch.Tensor, group) -> torch.Tensor:
    m = z.amax(-1) if z.shape[-1] else torch.full(z.shape[:-1], float("-inf"), dtype=z.dtype, device=z.device)
    if _group_size(group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    s = torch.exp(z - m[:, None]).sum(-1)
    if _group_size(group) > 1:
        dist.all_reduce(s, group=group)
    return m + s.log()


def _allsum(x: torch.Tensor, group) -> torch.Tensor:
    if _group_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


class _FullVocab(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, h_r, w_r, lam, temperature, token_weight, group, vocab_start, valid,
                acc, reduce_dh):
        f = torch.float32
        z = lambda h, w: (h.to(f) @ w[:valid].to(f).t()) / temperature  # noqa: E731
        zs = z(h_s, w_s)
        ls = zs - _lse(zs, group)[:, None]
        lt = z(h_t, w_t)
        lt = lt - _lse(lt, group)[:, None]
        if h_r is not None:
            lr = z(h_r, w_r)
            g = lam * lt + (1.0 - lam) * (lr - _lse(lr, group)[:, None])
        else:
            g = lt
        log_z = _lse(g, group)
        p = ls.exp()
        loss = _allsum((p * (ls - g)).sum(-1), group)
        ctx.acc = acc is not None
        dh = dw = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or acc is not None:
            c = torch.ones_like(loss) if token_weight is None else token_weight.to(f)
            dz = c[:, None] * p * (ls - g - loss[:, None]) / temperature
            dh = dz @ w_s[:valid].to(f)
            if reduce_dh:
                dh = _allsum(dh, group)
            dw = torch.zeros(w_s.shape, dtype=f, device=w_s.device)
            dw[:valid] = dz.t() @ h_s.to(f)
            if acc is not None:
                acc += dw
                dw = None
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (dh, dw)))
        ctx.dtypes = (h_s.dtype, w_s.dtype)
        return loss, log_z

    @staticmethod
    def backward(ctx, g_loss, _g_logz):
        dh, dw = ctx.saved_tensors
        uniform = bool((g_loss == g_loss[0]).all()) if g_loss.numel() else True
        if ctx.acc and not bool((g_loss == 1).all()):
            raise RuntimeError("full_vocab_gopd_loss with grad_weight_acc: backpropagate loss with gradient ones")
        gh = (dh * g_loss[:, None]).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1] and not ctx.acc:
            if not uniform:
                raise RuntimeError("full_vocab_gopd_loss stand-in: the weight gradient needs a uniform upstream gradient")
            gw = (dw * (g_loss[0] if g_loss.numel() else 0.0)).to(ctx.dtypes[1])
        return gh, gw, None, None, None, None, None, None, None, None, None, None, None, None


def full_vocab_gopd_loss(h_s, w_s, h_t, w_t, h_r, w_r, *, lam, temperature=1.0, token_weight=None, group=None,
                         vocab_start=0, vocab_valid=None, grad_weight_acc=None, backend=None, reduce_dh=True):
    """(loss [N] fp32, log_z [N] fp32); see the module docstring."""
    if (h_r is None) != (w_r is None) or (h_r is None and lam != 1.0):
        raise ValueError("full_vocab_gopd_loss: the reference (h_r, w_r) is needed unless lam == 1")
    valid = w_s.shape[0] if vocab_valid is None else vocab_valid
    return _FullVocab.apply(h_s, w_s, h_t.detach(), w_t.detach(), None if h_r is None else h_r.detach(),
                            None if w_r is None else w_r.detach(), float(lam), float(temperature),
                            None if token_weight is None else token_weight.detach(), group, vocab_start, valid,
                            grad_weight_acc, reduce_dh)
