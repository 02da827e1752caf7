"""Token-chunked log-prob engine (pure torch row math; the Triton backend swaps in fused row kernels).

Shapes: hidden h [T, H], weight W [V_local, H] (rows >= vocab_valid are padding: never read by a
GEMM, their gradient is exactly 0), targets y [T] (global ids). Per token chunk c of Tc rows:

    z_c   = (h_c @ W[:vv]^T) / temperature                    [Tc, vv] fp32 (fp32 accumulation)
    stats = (max, sum-exp, sum exp*z, target logit)  per row  -> kernels.vocab_parallel.combine_stats
    logp  = z_y - lse,  entropy = lse - E_p[z]

Backward (recomputes z_c, a second pass of GEMMs):
    dz_c  = [g * (onehot(y) - p) - g_H * p * (z - E_p[z])] / temperature     (p = exp(z - lse))
    dh_c  = dz_c @ W[:vv]          dW[:vv] += dz_c^T @ h_c          (dW accumulated in fp32)
    dh is all-reduced (SUM) over the vocab-parallel group when ``reduce_dh``.

Collectives: the forward computes the local stats of all chunks, then calls combine_stats once
(one MAX + one SUM of [3, T] floats); the backward does one SUM of dh [T, H] (optional).
Memory: O(Tc * vv) fp32 transient + saved (h, W, lse, mu) + dW fp32 accumulator [V_local, H].

``RowOps`` is the seam between the GEMMs (torch.matmul / cuBLAS) and the row-wise math: this file
provides the torch version, kernels.triton_logprob the fused Triton version.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import vocab_parallel as vp

# ----------------------------------------------------------------------------------------------
# Options shared by the chunked and Triton backends


@dataclass(frozen=True)
class Plan:
    vocab_start: int
    vocab_valid: int
    group: object
    inv_temp: float
    ignore_index: int
    chunk_size: int
    reduce_dh: bool
    logits_dtype: torch.dtype


CHUNK_BUDGET_BYTES = int(1.2 * 2**30)


def default_chunk_size(
    num_tokens: int, vocab_local: int, itemsize: int = 4, budget_bytes: int = CHUNK_BUDGET_BYTES
) -> int:
    """Largest multiple of 128 tokens whose logits chunk fits ``budget_bytes`` (1.2 GiB): 2048
    tokens of fp32 logits at Qwen's 151936-row vocab (4224 of bf16), a large enough K for the dW
    GEMM to stay compute-bound while its fp32 accumulator is read and written once per chunk."""
    rows = budget_bytes // (itemsize * max(vocab_local, 1))
    rows = max(128, rows // 128 * 128)
    return max(1, min(num_tokens, rows))


def make_plan(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int = 0,
    vocab_valid: int | None = None,
    group=None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    reduce_dh: bool = True,
    logits_dtype: torch.dtype | None = None,
) -> Plan:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [T, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [T]={hidden.shape[0]}, got {tuple(targets.shape)}")
    vv = weight.shape[0] if vocab_valid is None else int(vocab_valid)
    if not 0 <= vv <= weight.shape[0]:
        raise ValueError(f"vocab_valid={vv} outside [0, {weight.shape[0]}]")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ld = acc_dtype(hidden) if logits_dtype is None else logits_dtype
    if ld not in (acc_dtype(hidden), hidden.dtype):
        raise ValueError(
            f"logits_dtype must be {acc_dtype(hidden)} (default) or the input dtype {hidden.dtype}, got {ld}"
        )
    cs = default_chunk_size(hidden.shape[0], vv, ld.itemsize) if chunk_size is None else int(chunk_size)
    if cs < 1:
        raise ValueError(f"chunk_size must be >= 1, got {cs}")
    return Plan(int(vocab_start), vv, group, 1.0 / float(temperature), int(ignore_index), cs, bool(reduce_dh), ld)


# ----------------------------------------------------------------------------------------------
# GEMM helpers: low-precision operands, fp32 results


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# op name -> whether this torch build runs it with bf16/fp16 operands and an fp32 result
OUT_DTYPE_OK: dict[str, bool] = {}


def _try_out_dtype(device_type: str, op: str, fn: Callable[[], torch.Tensor]):
    """Run a cuBLAS bf16/fp16 -> fp32 GEMM if this torch build has it (cached per op)."""
    if device_type != "cuda" or OUT_DTYPE_OK.get(op) is False:
        return None
    try:
        out = fn()
    except (RuntimeError, TypeError, NotImplementedError):
        OUT_DTYPE_OK[op] = False
        return None
    OUT_DTYPE_OK[op] = True
    return out


def mm_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 (fp64 for fp64) result."""
    dt = acc_dtype(a)
    if a.dtype == dt:
        return a @ b
    out = _try_out_dtype(a.device.type, "mm", lambda: torch.mm(a, b, out_dtype=dt))
    return out if out is not None else a.to(dt) @ b.to(dt)


def addmm_acc_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b in place, acc fp32, a/b possibly bf16/fp16 (no [M, N] transient on CUDA)."""
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    out = _try_out_dtype(a.device.type, "addmm", lambda: torch.ops.aten.addmm.dtype_out(acc, a, b, acc.dtype, out=acc))
    if out is None:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
    return acc


def chunk_logits(
    h_c: torch.Tensor, w_valid: torch.Tensor, inv_temp: float, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, float]:
    """(zc, zscale) with the logits z = zc * zscale. fp32 (fp64 for fp64) chunk: zc = h_c @ W^T
    * inv_temp, zscale = 1. Input-dtype chunk (``dtype``): zc = h_c @ W^T rounded once, like the
    plain bf16 torch path, and the row math scales it in fp32 (zscale = inv_temp), because a
    second rounding after the scaling would double the logits' error."""
    if dtype == h_c.dtype != acc_dtype(h_c):
        return h_c @ w_valid.t(), inv_temp
    z = mm_acc(h_c, w_valid.t())
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    return z, 1.0


# ----------------------------------------------------------------------------------------------
# Row-wise math on one logits chunk


class RowOps(NamedTuple):
    # Row math on a chunk zc [Tc, vv] of logits z = zc * zscale (see chunk_logits).
    # stats(zc, tgt_local [Tc], owned [Tc], zscale) -> (m, s, sz, zt) of z, each [Tc]
    stats: Callable
    # dlogits(zc, lse, mu, g, g_ent or None, tgt_local, owned, inv_temp, out_dtype, zscale)
    #   -> dz [Tc, vv] (may overwrite zc's storage)
    dlogits: Callable


def _wide(z, zscale: float):
    z = z if z.dtype in (torch.float32, torch.float64) else z.float()
    return z if zscale == 1.0 else z * zscale


def torch_row_stats(z, tgt_local, owned, zscale: float = 1.0):
    z = _wide(z, zscale)
    if z.shape[1] == 0:
        inf = z.new_full((z.shape[0],), float("-inf"))
        return inf, torch.zeros_like(inf), torch.zeros_like(inf), torch.zeros_like(inf)
    m = z.max(dim=1).values
    e = torch.exp(z - m[:, None])
    s = e.sum(1)
    sz = (e.mul_(z)).sum(1)
    zt = torch.where(owned, z.gather(1, tgt_local[:, None]).squeeze(1), torch.zeros_like(m))
    return m, s, sz, zt


def torch_dlogits(z, lse, mu, g, g_ent, tgt_local, owned, inv_temp, out_dtype, zscale: float = 1.0):
    z = _wide(z, zscale)
    p = torch.exp(z - lse[:, None])
    dz = p.mul_(-g[:, None]) if g_ent is None else p * (-g[:, None] - g_ent[:, None] * (z - mu[:, None]))
    rows = torch.nonzero(owned).squeeze(1)
    dz[rows, tgt_local[rows]] += g[rows]
    if inv_temp != 1.0:
        dz.mul_(inv_temp)
    return dz.to(out_dtype)


TORCH_ROW_OPS = RowOps(torch_row_stats, torch_dlogits)


# ----------------------------------------------------------------------------------------------
# Passes over the token chunks


def _chunks(num_tokens: int, chunk_size: int):
    for start in range(0, num_tokens, chunk_size):
        yield slice(start, min(start + chunk_size, num_tokens))


def forward_stats(hidden, weight, targets, plan: Plan, row_ops: RowOps):
    """Local stats of every chunk, combined once across the group. Returns (lse, zt, mu, tgt, owned,
    valid) [T]. Keeps only one [Tc, vv] chunk of logits alive at a time."""
    T = hidden.shape[0]
    tgt, owned, valid = vp.local_targets(targets, plan.vocab_start, plan.vocab_valid, plan.ignore_index)
    dt = acc_dtype(hidden)
    m, s, sz, zt = (torch.empty(T, dtype=dt, device=hidden.device) for _ in range(4))
    w = weight[: plan.vocab_valid]
    for sl in _chunks(T, plan.chunk_size):
        z, zscale = chunk_logits(hidden[sl], w, plan.inv_temp, plan.logits_dtype)
        m[sl], s[sl], sz[sl], zt[sl] = row_ops.stats(z, tgt[sl], owned[sl], zscale)
        del z
    lse, zt, mu = vp.combine_stats(m, s, sz, zt, plan.group)
    return lse, zt, mu, tgt, owned, valid


def grad_pass(
    hidden,
    weight,
    plan: Plan,
    row_ops: RowOps,
    lse,
    mu,
    g,
    g_ent,
    tgt,
    owned,
    need_dh: bool = True,
    need_dw: bool = True,
):
    """Recompute each chunk's logits and apply d logp (and d entropy) -> (dh, dW)."""
    T = hidden.shape[0]
    w = weight[: plan.vocab_valid]
    dh, dw_acc = grad_buffers(hidden, plan, need_dh, need_dw)
    for sl in _chunks(T, plan.chunk_size):
        z, zscale = chunk_logits(hidden[sl], w, plan.inv_temp, plan.logits_dtype)
        dz = row_ops.dlogits(
            z,
            lse[sl],
            mu[sl],
            g[sl],
            None if g_ent is None else g_ent[sl],
            tgt[sl],
            owned[sl],
            plan.inv_temp,
            hidden.dtype,
            zscale,
        )
        del z
        accumulate_grads(dz, w, hidden, sl, dh, dw_acc)
        del dz
    return finish_grads(dh, dw_acc, weight, plan)


def grad_buffers(hidden, plan: Plan, need_dh: bool, need_dw: bool, dw_acc=None):
    """(dh [T, H] or None, fp32 dW accumulator [vocab_valid, H] or None). A caller-owned
    accumulator ``dw_acc`` (e.g. megatron's fp32 main_grad) is used in place of a new one."""
    dh = torch.empty_like(hidden) if need_dh else None
    if dw_acc is not None:
        return dh, dw_acc[: plan.vocab_valid]
    dw_acc = (
        torch.zeros(plan.vocab_valid, hidden.shape[1], dtype=acc_dtype(hidden), device=hidden.device)
        if need_dw
        else None
    )
    return dh, dw_acc


def accumulate_grads(dz, w, hidden, sl: slice, dh, dw_acc) -> None:
    """One chunk's d logits -> dh[sl] = dz @ W and dW += dz^T @ h[sl] (each when wanted)."""
    if dh is not None:
        torch.matmul(dz, w, out=dh[sl])
    if dw_acc is not None:
        addmm_acc_(dw_acc, dz.t(), hidden[sl])


def finish_grads(dh, dw_acc, weight, plan: Plan):
    """All-reduce dh over the group (optional) and place dW into a [V_local, H] tensor whose padding
    rows are zero."""
    if dh is not None and plan.reduce_dh:
        vp.all_reduce_sum_(dh, plan.group)
    dw = None
    if dw_acc is not None:
        dw = torch.zeros_like(weight)
        dw[: plan.vocab_valid] = dw_acc
    return dh, dw


class LinearLogprobFunction(torch.autograd.Function):
    """logp (and entropy) from (hidden, weight); backward recomputes logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, plan: Plan, row_ops: RowOps):
        lse, zt, mu, tgt, owned, valid = forward_stats(hidden, weight, targets, plan, row_ops)
        logp, entropy = vp.finish(lse, zt, mu, valid)
        ctx.save_for_backward(hidden, weight, lse, mu, tgt, owned, valid)
        ctx.plan, ctx.row_ops = plan, row_ops
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, lse, mu, tgt, owned, valid = ctx.saved_tensors
        zero = torch.zeros_like(lse)
        g = zero if g_logp is None else torch.where(valid, g_logp.to(lse.dtype), zero)
        ge = None if g_ent is None else torch.where(valid, g_ent.to(lse.dtype), zero)
        dh, dw = grad_pass(
            hidden,
            weight,
            ctx.plan,
            ctx.row_ops,
            lse,
            mu,
            g,
            ge,
            tgt,
            owned,
            need_dh=ctx.needs_input_grad[0],
            need_dw=ctx.needs_input_grad[1],
        )
        return dh, dw, None, None, None


def linear_logprob(hidden, weight, targets, *, return_entropy=False, row_ops=TORCH_ROW_OPS, **kwargs):
    plan = make_plan(hidden, weight, targets, **kwargs)
    logp, entropy = LinearLogprobFunction.apply(hidden, weight, targets, plan, row_ops)
    return (logp, entropy) if return_entropy else logp


def linear_logprob_inference(
    hidden, weight, targets, *, return_entropy=False, row_ops=TORCH_ROW_OPS, reduce_dh=True, **kwargs
):
    """Forward only: one [Tc, vv] logits chunk alive at a time, O(T) saved nothing."""
    plan = make_plan(hidden, weight, targets, **kwargs)
    with torch.no_grad():
        lse, zt, mu, _, _, valid = forward_stats(hidden, weight, targets, plan, row_ops)
        logp, entropy = vp.finish(lse, zt, mu, valid)
    return (logp, entropy) if return_entropy else logp
