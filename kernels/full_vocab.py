"""Exact full-vocabulary G-OPD loss from the hidden states of student, teacher and reference.

Per position t (teacher and reference constant), with every model's logits divided by the
temperature T:
    zS = h_s W_s^T / T,   zT = h_t W_t^T / T,   zR = h_r W_r^T / T             [N, V] (never held)
    c  = lam zT + (1 - lam) zR,     d = zS - c
    g  = lam log_softmax(zT) + (1 - lam) log_softmax(zR) = c - lam lse_T - (1 - lam) lse_R
    L_t   = sum_v p(v) (log p(v) - g(v)) = E_p[d] - lse_S + lam lse_T + (1 - lam) lse_R
    log Z = logsumexp_v g(v) = lse_C - lam lse_T - (1 - lam) lse_R,   lse_C = logsumexp_v c(v)
    dL_t / dzS_u = p(u) (log p(u) - g(u) - L_t) = p(u) (d(u) - E_p[d])          (times 1/T for dh)
(gopd_mega.objective.full_vocab_token_loss is the same L_t from full logits, in fp64.)
lam = 1 needs no reference (c = zT, log Z = 0), lam = 0 no teacher (c = zR, log Z = 0); a model
whose coefficient is 0 is not computed even when given.

Shapes: h_s [N, Hs], w_s [V_local, Hs]; h_t [N, Ht], w_t [>= vv, Ht]; h_r [N, Hr], w_r [>= vv, Hr]:
each model's output-layer shard on the SAME vocabulary partition, rows [vocab_start,
vocab_start + vv) of the global vocabulary, vv = vocab_valid (rows >= vv are padding: never read,
zero gradient). Hidden sizes may differ.

Pass 1 (forward). Per token and rank, online over vocabulary tiles, for each model X present:
    m_X = max_v zX,  s_X = sum_v exp(zX - m_X)      X in S, T, R and C (C only if lam not in {0, 1})
    sd  = sum_v exp(zS - m_S) d                       (p-weighted sum of d, relative to m_S)
Collectives, O(N) floats, never O(N V):
    1. all_reduce MAX of m            [k, N]   (k = 2, or 4 when both teacher and reference count)
    2. all_reduce SUM of [s a; sd a_S] [k + 1, N],   a = exp(m_rank - M)
    lse_X = M_X + log S_X,  E_p[d] = SD / S_S  ->  L_t, log Z (identical on every rank).
Pass 2 (backward, upstream gradient G [N]; only rows with G != 0): recompute the tiles of zS and c,
    dz = G p (d - E_p[d]) / T,   dh_s = dz W_s (all_reduce SUM over the group when reduce_dh),
    dW_s += dz^T h_s (this rank's rows; into ``grad_weight_acc`` when given, e.g. main_grad).

Backends: "torch" (full [N, vv] logits of each model, autograd: the oracle), "chunked" (token
chunks of torch GEMMs and row math: one [Tc, vv] block per model at a time; CPU default),
"triton" (kernels.triton_full_vocab: tl.dot tiles in registers, nothing of size N x V is ever
written; CUDA default). Memory: chunked O(Tc vv), triton O(N) beyond dh and dW.

``token_weight`` [N]: ``loss.sum().backward()`` gives d(sum_t token_weight_t L_t); the upstream
gradient must then be uniform (a scalar times loss.sum()), so a weight is never applied twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import vocab_parallel as vp
from .chunked import _chunks, acc_dtype, addmm_acc_, chunk_logits, default_chunk_size
from .reference import _AllReduceSumIdentityBackward, _CopyAllReduceBackward

BACKENDS = ("auto", "triton", "chunked", "torch")


@dataclass(frozen=True)
class FullVocabPlan:
    lam: float
    inv_temp: float
    has_t: bool  # the teacher counts (lam != 0)
    has_r: bool  # the reference counts (lam != 1)
    vocab_valid: int
    group: object
    reduce_dh: bool
    chunk_size: int | None
    n_splits: int | None

    @property
    def has_c(self) -> bool:
        """Both count, so log Z needs the lse of c = lam zT + (1 - lam) zR of its own."""
        return self.has_t and self.has_r


def _check_pair(name: str, h, w, n: int, vv: int) -> None:
    if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(
            f"full_vocab_gopd_loss: h_{name} [N, H] and w_{name} [V_local, H] expected, "
            f"got {tuple(h.shape)} and {tuple(w.shape)}"
        )
    if h.shape[0] != n:
        raise ValueError(f"full_vocab_gopd_loss: h_{name} has {h.shape[0]} rows, h_s has {n}")
    if w.shape[0] < vv:
        raise ValueError(f"full_vocab_gopd_loss: w_{name} has {w.shape[0]} rows < vocab_valid={vv}")
    if h.dtype != w.dtype:
        raise ValueError(f"full_vocab_gopd_loss: h_{name} {h.dtype} and w_{name} {w.dtype} must match")


def make_plan(
    h_s,
    w_s,
    h_t,
    w_t,
    h_r,
    w_r,
    *,
    lam,
    temperature,
    vocab_valid,
    group,
    reduce_dh,
    chunk_size,
    n_splits,
    token_weight,
    grad_weight_acc,
) -> FullVocabPlan:
    lam = float(lam)
    if not math.isfinite(lam):
        raise ValueError(f"full_vocab_gopd_loss: lam must be finite, got {lam}")
    if not temperature > 0:
        raise ValueError(f"full_vocab_gopd_loss: temperature must be > 0, got {temperature}")
    has_t, has_r = lam != 0.0, lam != 1.0
    if has_t and (h_t is None or w_t is None):
        raise ValueError(f"full_vocab_gopd_loss: lam={lam} needs the teacher (h_t, w_t)")
    if has_r and (h_r is None or w_r is None):
        raise ValueError(f"full_vocab_gopd_loss: lam={lam} needs the reference (h_r, w_r); only lam=1 may omit it")
    if h_s.dim() != 2:
        raise ValueError(f"full_vocab_gopd_loss: h_s must be [N, Hs], got {tuple(h_s.shape)}")
    vv = w_s.shape[0] if vocab_valid is None else int(vocab_valid)
    if not 0 <= vv <= w_s.shape[0]:
        raise ValueError(f"full_vocab_gopd_loss: vocab_valid={vv} outside [0, {w_s.shape[0]}]")
    n = h_s.shape[0]
    _check_pair("s", h_s, w_s, n, vv)
    if has_t:
        _check_pair("t", h_t, w_t, n, vv)
    if has_r:
        _check_pair("r", h_r, w_r, n, vv)
    if token_weight is not None and token_weight.shape != (n,):
        raise ValueError(f"full_vocab_gopd_loss: token_weight must be [N]={n}, got {tuple(token_weight.shape)}")
    if grad_weight_acc is not None:
        want = (tuple(w_s.shape), acc_dtype(h_s))
        if (tuple(grad_weight_acc.shape), grad_weight_acc.dtype) != want:
            raise ValueError(
                f"full_vocab_gopd_loss: grad_weight_acc must be {want[0]} {want[1]} "
                f"like w_s, got {tuple(grad_weight_acc.shape)} {grad_weight_acc.dtype}"
            )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"full_vocab_gopd_loss: chunk_size must be >= 1, got {chunk_size}")
    return FullVocabPlan(lam, 1.0 / float(temperature), has_t, has_r, vv, group, bool(reduce_dh), chunk_size, n_splits)


# ----------------------------------------------------------------------------------------------
# Per-token statistics: local (one rank), merged over vocab splits, combined over the group
#
# Local stats: m [k, N] (max of zS, zT?, zR?, c?), s [k, N] (sum-exp relative to m), sd [N].


def merge_splits(m, s, sd):
    """Combine partial stats [n_splits, k, N], [n_splits, k, N], [n_splits, N] on one rank."""
    M = m.max(dim=0).values
    a = vp._rescale(m, M.unsqueeze(0))
    return M, (s * a).sum(0), (sd * a[:, 0]).sum(0)


def finish_stats(m, s, sd, plan: FullVocabPlan):
    """The two collectives, then (loss, log_z, lse_S, mean_d), each [N]."""
    M = vp.all_reduce_max_(m.clone(), plan.group)
    a = vp._rescale(m, M)
    packed = torch.cat([s * a, (sd * a[0]).unsqueeze(0)])
    vp.all_reduce_sum_(packed, plan.group)
    lse = M + torch.log(packed[:-1])
    lse_s, mean_d = lse[0], packed[-1] / packed[0]
    if plan.has_c:
        lse_t, lse_r, lse_c = lse[1], lse[2], lse[3]
        offset = plan.lam * lse_t + (1.0 - plan.lam) * lse_r
        return mean_d - lse_s + offset, lse_c - offset, lse_s, mean_d
    # one model: c is its logits, the target is that model itself, log Z = 0
    return mean_d - lse_s + lse[1], torch.zeros_like(lse_s), lse_s, mean_d


# ----------------------------------------------------------------------------------------------
# The chunked engine (torch GEMMs and row math on token chunks)


def _target_logits(h_t, w_t, h_r, w_r, rows, plan: FullVocabPlan):
    """(zT or None, zR or None, c) for token rows ``rows`` (a slice or an index tensor)."""
    vv = plan.vocab_valid
    zt = chunk_logits(h_t[rows], w_t[:vv], plan.inv_temp)[0] if plan.has_t else None
    zr = chunk_logits(h_r[rows], w_r[:vv], plan.inv_temp)[0] if plan.has_r else None
    if zt is None:
        return None, zr, zr
    if zr is None:
        return zt, None, zt
    return zt, zr, plan.lam * zt + (1.0 - plan.lam) * zr


def _max_sumexp(z):
    if z.shape[1] == 0:
        inf = z.new_full((z.shape[0],), float("-inf"))
        return inf, torch.zeros_like(inf), None
    m = z.max(dim=1).values
    e = torch.exp(z - m[:, None])
    return m, e.sum(1), e


def _chunk_size(plan: FullVocabPlan, n: int) -> int:
    # up to six [Tc, vv] fp32 blocks are alive at once (zS, zT, zR, c, exp, a product)
    return plan.chunk_size or default_chunk_size(n, plan.vocab_valid, itemsize=4 * 6)


def chunked_local_stats(h_s, w_s, h_t, w_t, h_r, w_r, plan: FullVocabPlan):
    n, dt, dev = h_s.shape[0], acc_dtype(h_s), h_s.device
    k = 4 if plan.has_c else 2
    m = torch.empty(k, n, dtype=dt, device=dev)
    s = torch.empty(k, n, dtype=dt, device=dev)
    sd = torch.empty(n, dtype=dt, device=dev)
    for sl in _chunks(n, _chunk_size(plan, n)):
        zs = chunk_logits(h_s[sl], w_s[: plan.vocab_valid], plan.inv_temp)[0]
        zt, zr, c = _target_logits(h_t, w_t, h_r, w_r, sl, plan)
        m[0, sl], s[0, sl], e = _max_sumexp(zs)
        sd[sl] = 0.0 if e is None else (e * (zs - c)).sum(1)
        others = [c] if not plan.has_c else [zt, zr, c]
        for i, z in enumerate(others, start=1):
            m[i, sl], s[i, sl], _ = _max_sumexp(z)
    return m, s, sd


def chunked_grad(h_s, w_s, h_t, w_t, h_r, w_r, plan: FullVocabPlan, rows, gw, lse_s, mean_d, dh, dw_acc) -> None:
    """dh[rows] = dz W_s and dw_acc += dz^T h_s[rows] for the token rows ``rows`` (index [M])."""
    w = w_s[: plan.vocab_valid]
    for sl in _chunks(rows.numel(), _chunk_size(plan, rows.numel())):
        idx = rows[sl]
        zs = chunk_logits(h_s[idx], w, plan.inv_temp)[0]
        c = _target_logits(h_t, w_t, h_r, w_r, idx, plan)[2]
        dz = torch.exp(zs - lse_s[idx, None]).mul_(zs - c - mean_d[idx, None])
        dz.mul_((gw[sl] * plan.inv_temp)[:, None])
        dz = dz.to(h_s.dtype)
        if dh is not None:
            dh[idx] = (dz @ w).to(dh.dtype)
        if dw_acc is not None:
            addmm_acc_(dw_acc, dz.t(), h_s[idx])


CHUNKED = (chunked_local_stats, chunked_grad)


def _triton_engine():
    from . import triton_full_vocab  # lazily: triton decides at decoration time to interpret

    return triton_full_vocab.local_stats, triton_full_vocab.grad


# ----------------------------------------------------------------------------------------------
# Autograd


class FullVocabFunction(torch.autograd.Function):
    """(loss [N], log_z [N]) from the hidden states; backward recomputes the tiles (pass 2)."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, h_r, w_r, plan: FullVocabPlan, engine, grad_weight_acc):
        m, s, sd = engine[0](h_s, w_s, h_t, w_t, h_r, w_r, plan)
        loss, log_z, lse_s, mean_d = finish_stats(m, s, sd, plan)
        ctx.save_for_backward(h_s, w_s, h_t, w_t, h_r, w_r, lse_s, mean_d)
        ctx.plan, ctx.engine, ctx.grad_weight_acc = plan, engine, grad_weight_acc
        ctx.mark_non_differentiable(log_z)
        return loss, log_z

    @staticmethod
    def backward(ctx, g_loss, _g_log_z):
        h_s, w_s, h_t, w_t, h_r, w_r, lse_s, mean_d = ctx.saved_tensors
        plan, acc = ctx.plan, ctx.grad_weight_acc
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1] or acc is not None
        dh = torch.zeros_like(h_s) if need_dh else None
        dw_acc = None
        if need_dw:
            dw_acc = (
                acc[: plan.vocab_valid]
                if acc is not None
                else torch.zeros(plan.vocab_valid, h_s.shape[1], dtype=acc_dtype(h_s), device=h_s.device)
            )
        g = torch.zeros_like(lse_s) if g_loss is None else g_loss.to(lse_s.dtype)
        rows = torch.nonzero(g).squeeze(1)  # positions with no gradient cost nothing
        if rows.numel() and (need_dh or need_dw):
            ctx.engine[1](h_s, w_s, h_t, w_t, h_r, w_r, plan, rows, g[rows].contiguous(), lse_s, mean_d, dh, dw_acc)
        if dh is not None and plan.reduce_dh:
            vp.all_reduce_sum_(dh, plan.group)  # every rank calls it, even with no rows
        dw = None
        if ctx.needs_input_grad[1] and acc is None:
            dw = torch.zeros_like(w_s)
            dw[: plan.vocab_valid] = dw_acc
        return dh, dw, None, None, None, None, None, None, None


class _TokenWeightedGrad(torch.autograd.Function):
    """Identity forward; backward multiplies a UNIFORM upstream gradient by token_weight."""

    @staticmethod
    def forward(ctx, loss, token_weight):
        ctx.save_for_backward(token_weight)
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        scale = g.reshape(-1)[:1]
        if g.numel() and not bool((g == scale).all()):  # one host sync per call, for a clear error
            raise RuntimeError(
                "full_vocab_gopd_loss: token_weight was given, so backpropagate loss.sum() (a "
                "uniform upstream gradient); fold per-token factors into token_weight instead of "
                "multiplying the returned loss by them"
            )
        return w.to(g.dtype) * g, None


# ----------------------------------------------------------------------------------------------
# The oracle: full logits per shard, autograd


def _sum(x, group):
    """All-reduce SUM with identity backward (kernels.reference): every rank holds the same
    replicated loss, so d loss / d (local partial sum) = d loss / d (global sum)."""
    return _AllReduceSumIdentityBackward.apply(x, group) if vp.group_size(group) > 1 else x


def _max_shift(z, group):
    m = z.detach().max(dim=-1).values if z.shape[1] else z.new_full(z.shape[:1], float("-inf"))
    return vp.all_reduce_max_(m, group)


def torch_full_vocab(h_s, w_s, h_t, w_t, h_r, w_r, plan: FullVocabPlan):
    """Full [N, vv] logits of each model, plain torch ops, autograd for the gradient. Every
    partial vocabulary sum is all-reduced before it is used (a rank's own sum_v p (log p - g)
    would miss the other ranks' dependence on the global lse_S in its backward)."""
    vv, group = plan.vocab_valid, plan.group
    if vp.group_size(group) > 1 and plan.reduce_dh:
        h_s = _CopyAllReduceBackward.apply(h_s, group)
    dt = acc_dtype(h_s)

    def logits(h, w):  # the plain torch path: GEMM in the input dtype, then fp32 (fp64 stays)
        return (h @ w[:vv].t()).to(dt) * plan.inv_temp

    def lse(z):
        m = _max_shift(z, group)
        return m + torch.log(_sum(torch.exp(z - m[:, None]).sum(-1), group))

    with torch.no_grad():
        zt = logits(h_t, w_t) if plan.has_t else None
        zr = logits(h_r, w_r) if plan.has_r else None
        if plan.has_c:
            c = plan.lam * zt + (1.0 - plan.lam) * zr  # type: ignore[operator]  # has_c: both computed
            offset = plan.lam * lse(zt) + (1.0 - plan.lam) * lse(zr)
            log_z = lse(c) - offset
        else:
            c = zt if plan.has_t else zr
            offset = lse(c)
            log_z = torch.zeros_like(offset)
    zs = logits(h_s, w_s)
    m = _max_shift(zs, group)
    e = torch.exp(zs - m[:, None])
    s = _sum(e.sum(-1), group)
    mean_d = _sum((e * (zs - c)).sum(-1), group) / s  # E_p[zS - c]
    loss = mean_d - (m + torch.log(s)) + offset
    return loss, log_z


# ----------------------------------------------------------------------------------------------


def full_vocab_gopd_loss(
    h_s,
    w_s,
    h_t,
    w_t,
    h_r,
    w_r,
    *,
    lam: float,
    temperature: float = 1.0,
    token_weight: torch.Tensor | None = None,
    group=None,
    vocab_start: int = 0,
    vocab_valid: int | None = None,
    grad_weight_acc: torch.Tensor | None = None,
    backend: str | None = None,
    reduce_dh: bool = True,
    chunk_size: int | None = None,
    n_splits: int | None = None,
):
    """Per-position exact G-OPD loss L_t = KL(p_S || q) - log Z and log Z, each [N] (fp32; fp64
    for fp64 inputs), from final hidden states and output-layer shards (see the module docstring).

    Differentiable in ``h_s`` and ``w_s`` only. ``token_weight`` [N] (identical on every rank):
    ``loss.sum().backward()`` gives d(sum_t token_weight_t L_t), and positions of weight 0 cost
    nothing in the backward. Without it the loss is an ordinary differentiable [N] tensor.
    ``grad_weight_acc`` (fp32 [V_local, Hs], e.g. megatron's main_grad): dW_s is added into it in
    the backward instead of being returned to ``w_s.grad``. ``vocab_start`` is accepted for
    symmetry with the other kernels (every model's rows already are the same partition).
    ``reduce_dh=False`` leaves each rank its partial dh (when the caller's layer reduces it).
    """
    del vocab_start  # the shards are given already sliced to the partition; nothing to look up
    plan = make_plan(
        h_s,
        w_s,
        h_t,
        w_t,
        h_r,
        w_r,
        lam=lam,
        temperature=temperature,
        vocab_valid=vocab_valid,
        group=group,
        reduce_dh=reduce_dh,
        chunk_size=chunk_size,
        n_splits=n_splits,
        token_weight=token_weight,
        grad_weight_acc=grad_weight_acc,
    )
    if not plan.has_t:
        h_t = w_t = None
    if not plan.has_r:
        h_r = w_r = None
    b = "auto" if backend is None else backend
    if b not in BACKENDS:
        raise ValueError(f"full_vocab_gopd_loss: backend must be one of {BACKENDS}, got {backend!r}")
    if b == "auto":
        b = "triton" if h_s.is_cuda else "chunked"
    if b == "torch":
        if grad_weight_acc is not None:
            raise ValueError("full_vocab_gopd_loss: grad_weight_acc is for the chunked and triton backends")
        loss, log_z = torch_full_vocab(h_s, w_s, h_t, w_t, h_r, w_r, plan)
    else:
        engine = CHUNKED if b == "chunked" else _triton_engine()
        loss, log_z = FullVocabFunction.apply(h_s, w_s, h_t, w_t, h_r, w_r, plan, engine, grad_weight_acc)
    if token_weight is not None and loss.requires_grad:
        loss = _TokenWeightedGrad.apply(loss, token_weight.detach())
    return loss, log_z
