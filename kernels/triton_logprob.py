"""Triton kernels for the log-prob of the sampled token.

1. ``_row_stats_kernel`` (one program per token row of a logits chunk zc [Tc, vv]; the logits
   are z = zc * zscale: an fp32 chunk already holds z/temperature (zscale 1), a bf16 chunk holds
   the unscaled GEMM output, scaled here in fp32): online max / sum-exp / sum exp*z over vocab
   blocks of BLOCK, plus
   the target logit:  m = max_v z,  s = sum_v e^(z-m),  sz = sum_v e^(z-m) z,  zt = z[y] (if owned).
2. ``_dlogits_kernel`` (one program per row): dz = [g (onehot(y) - p) - g_H p (z - mu)] / temp,
   p = e^(z - lse), written in the GEMM dtype into z's own storage (in place when that is fp32;
   for a bf16/fp16 GEMM into the first half of each fp32 row, see _dlogits_out): the fused loss
   keeps one [Tc, vv] fp32 buffer per chunk and nothing else of that size.
   (1) and (2) sit between cuBLAS GEMMs in the chunked engine (kernels.chunked / fused_loss):
   they replace ~6 plain-torch elementwise passes over the chunk by one read (stats) and one
   read + write (dlogits).
3. ``_lse_dot_kernel`` (forward only, teachers / reference): never materialises logits. Grid
   cdiv(T, BT) x n_splits programs in grouped order; each owns BT tokens and a contiguous vocab
   range, tiles it by BV columns and H by BK with tl.dot (fp32 accumulator), and keeps per-row
   online (m, s, sz, zt).
   Partial stats [n_splits, T] are merged on the host (vocab_parallel.merge_stats), then combined
   across the TP group (all_reduce MAX [T], all_reduce SUM [3, T]). Extra memory O(n_splits * T).

Shapes: h [T, H], W [V_local, H] (rows >= vocab_valid are padding: masked, never read), y [T].
Interpreter note (TRITON_INTERPRET=1, CPU): bf16 tl.dot operands are multiplied as raw bits by
the interpreter (triton issue 11584), so bf16 tiles are upcast to fp32 before tl.dot there.
The interpreter also truncates fp32 -> bf16 stores (the GPU rounds to nearest), so the bf16 dlogits
of (2) carry ~2x the rounding error there; CPU tests of the triton path use fp32 and fp16.
fp32 operands use input_precision="ieee" (no TF32) so fp32 results match torch's fp32 matmul.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import vocab_parallel as vp
from .chunked import RowOps, acc_dtype, make_plan

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_device(t: torch.Tensor) -> None:
    if not t.is_cuda and not INTERPRET:
        raise RuntimeError(
            "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set "
            "before kernels.triton_logprob is imported)"
        )


def _row_block(n_cols: int) -> int:
    return max(16, min(4096 if not INTERPRET else 1024, triton.next_power_of_2(max(n_cols, 1))))


# ----------------------------------------------------------------------------------------------
# 1. Row stats


@triton.jit
def _row_stats_kernel(
    z_ptr, stride_z, tgt_ptr, owned_ptr, m_ptr, s_ptr, sz_ptr, zt_ptr, n_cols, zscale, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * stride_z
    offs = tl.arange(0, BLOCK)
    # per-lane online accumulators, merged once at the end
    m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
    s_vec = tl.zeros([BLOCK], tl.float32)
    sz_vec = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32) * zscale
        m_new = tl.maximum(m_vec, x)
        # lanes that have seen no column yet keep m = -inf: shift by 0 there (exp(-inf) = 0)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_vec - m_safe)
        e = tl.exp(x - m_safe)
        s_vec = s_vec * alpha + e
        sz_vec = sz_vec * alpha + e * tl.where(mask, x, 0.0)
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    scale = tl.exp(m_vec - m)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, tl.sum(s_vec * scale, axis=0))
    tl.store(sz_ptr + row, tl.sum(sz_vec * scale, axis=0))
    owned = tl.load(owned_ptr + row)
    tgt = tl.load(tgt_ptr + row)
    zt = tl.load(base + tgt).to(tl.float32) * zscale
    tl.store(zt_ptr + row, tl.where(owned != 0, zt, 0.0))


def triton_row_stats(z, tgt_local, owned, zscale: float = 1.0):
    _check_device(z)
    Tc, n = z.shape
    outs = [torch.empty(Tc, dtype=torch.float32, device=z.device) for _ in range(4)]
    if Tc == 0:
        return tuple(outs)
    if n == 0:
        return (outs[0].fill_(float("-inf")), *(o.zero_() for o in outs[1:]))
    assert z.stride(1) == 1
    _row_stats_kernel[(Tc,)](
        z, z.stride(0), tgt_local, owned.to(torch.int8), *outs, n, float(zscale), BLOCK=_row_block(n)
    )
    return tuple(outs)


# ----------------------------------------------------------------------------------------------
# 2. logits -> dlogits


@triton.jit
def _dlogits_kernel(
    z_ptr,
    stride_z,
    d_ptr,
    stride_d,
    lse_ptr,
    mu_ptr,
    g_ptr,
    ge_ptr,
    tgt_ptr,
    owned_ptr,
    n_cols,
    inv_temp,
    zscale,
    HAS_GE: tl.constexpr,
    NARROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    zb = z_ptr + row.to(tl.int64) * stride_z
    db = d_ptr + row.to(tl.int64) * stride_d
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    tgt = tl.load(tgt_ptr + row)
    owned = tl.load(owned_ptr + row) != 0
    offs = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        x = tl.load(zb + cols, mask=mask, other=0.0).to(tl.float32) * zscale
        p = tl.exp(x - lse)
        d = -g * p
        if HAS_GE:
            d -= tl.load(ge_ptr + row) * p * (x - tl.load(mu_ptr + row))
        d = tl.where((cols == tgt) & owned, d + g, d) * inv_temp
        if NARROW:
            # the stores below overwrite fp32 columns that OTHER threads of this program loaded,
            # in this block or an earlier one: every load of blocks <= this one must be done
            # first (seen on an H200 without this barrier: a few dlogits read half-overwritten)
            tl.debug_barrier()
        tl.store(db + cols, d.to(d_ptr.dtype.element_ty), mask=mask)


def _dlogits_out(z: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Where the dlogits go: into z itself (same dtype), or, for a 2-byte GEMM dtype and an fp32
    z, into the first half of each fp32 row of z's own storage (a [Tc, n] view with row stride
    2n). No second [Tc, n] buffer either way.

    The in-row narrowing: one program owns a row and walks it left to right; block b stores over
    bytes [2bB, 2bB + 2B) of the row, i.e. fp32 columns [bB/2, (b+1)B/2), all of which blocks
    <= b load, and none of which a later block reads (a pipelined early load of block b+1 reads
    columns >= (b+1)B only). Those columns were loaded by other threads of the program, so the
    kernel puts a barrier between each block's loads and its stores (NARROW)."""
    if out_dtype == z.dtype:
        return z
    if (
        z.dtype == torch.float32
        and out_dtype.itemsize == 2
        and z.stride(1) == 1
        and z.stride(0) == z.shape[1]
        and z.storage_offset() == 0
    ):
        n = z.shape[1]
        return z.view(out_dtype)[:, :n]  # [Tc, 2n] view of the fp32 rows, first half
    return torch.empty(z.shape, dtype=out_dtype, device=z.device)


def triton_dlogits(z, lse, mu, g, g_ent, tgt_local, owned, inv_temp, out_dtype, zscale: float = 1.0):
    _check_device(z)
    Tc, n = z.shape
    out = _dlogits_out(z, out_dtype)
    if Tc == 0 or n == 0:
        return out
    f32 = torch.float32
    ge = g.to(f32) if g_ent is None else g_ent.to(f32).contiguous()
    _dlogits_kernel[(Tc,)](
        z,
        z.stride(0),
        out,
        out.stride(0),
        lse.to(f32).contiguous(),
        mu.to(f32).contiguous(),
        g.to(f32).contiguous(),
        ge,
        tgt_local,
        owned.to(torch.int8),
        n,
        float(inv_temp),
        float(zscale),
        HAS_GE=g_ent is not None,
        NARROW=out.data_ptr() == z.data_ptr() and out.dtype != z.dtype,
        BLOCK=_row_block(n),
    )
    return out


TRITON_ROW_OPS = RowOps(triton_row_stats, triton_dlogits)


# ----------------------------------------------------------------------------------------------
# 3. Forward-only online logsumexp over (vocab x H) tiles


def _lse_configs():
    if INTERPRET:  # big tiles: the interpreter's cost is per program / per loop iteration
        return [triton.Config({"BT": 64, "BV": 128, "BK": 64, "GROUP_T": 4}, num_warps=4, num_stages=1)]
    # (BT, BV, BK, GROUP_T, warps, stages): Hopper bf16 tiles, timed once per (H, vocab)
    shapes = [
        (128, 256, 64, 8, 8, 3),
        (128, 256, 64, 4, 8, 3),
        (128, 256, 64, 8, 8, 4),
        (128, 128, 64, 8, 8, 4),
        (256, 128, 64, 4, 8, 3),
        (64, 256, 64, 8, 4, 4),
    ]
    return [
        triton.Config({"BT": bt, "BV": bv, "BK": bk, "GROUP_T": g}, num_warps=w, num_stages=st)
        for bt, bv, bk, g, w, st in shapes
    ]


MAX_BV = 256  # vocab splits are multiples of every config's BV


@triton.autotune(configs=_lse_configs(), key=["H", "n_cols", "UPCAST", "IEEE"])
@triton.heuristics({"EVEN_K": lambda a: a["H"] % a["BK"] == 0})
@triton.jit
def _lse_dot_kernel(
    h_ptr,
    w_ptr,
    tgt_ptr,
    owned_ptr,
    m_ptr,
    s_ptr,
    sz_ptr,
    zt_ptr,
    T,
    H,
    n_cols,
    cols_per_split,
    n_splits,
    stride_h,
    stride_w,
    inv_temp,
    BT: tl.constexpr,
    BV: tl.constexpr,
    BK: tl.constexpr,
    GROUP_T: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    # Grouped launch order: the programs resident at one time cover GROUP_T token tiles x all
    # vocab splits, so their GROUP_T hidden panels [BT, H] stay in L2 while each W tile they
    # stream is shared by GROUP_T programs (token-tile-major order re-read every hidden panel
    # from HBM for each vocab tile: 1.57x the floor on an H200).
    pid = tl.program_id(0)
    n_t = tl.cdiv(T, BT)
    per_group = GROUP_T * n_splits
    first_t = (pid // per_group) * GROUP_T
    group_rows = tl.minimum(n_t - first_t, GROUP_T)
    pid_t = first_t + (pid % per_group) % group_rows
    pid_s = (pid % per_group) // group_rows
    rows = pid_t * BT + tl.arange(0, BT)
    rmask = rows < T
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=0)
    owned = tl.load(owned_ptr + rows, mask=rmask, other=0) != 0
    tgt = tl.where(owned, tgt, -1)
    v_lo = pid_s * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, n_cols)
    m = tl.full([BT], float("-inf"), tl.float32)
    s = tl.zeros([BT], tl.float32)
    sz = tl.zeros([BT], tl.float32)
    zt = tl.zeros([BT], tl.float32)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    for v0 in range(v_lo, v_hi, BV):
        cols = v0 + tl.arange(0, BV)
        cmask = cols < v_hi
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w
        acc = tl.zeros([BT, BV], tl.float32)
        for k0 in range(0, H, BK):
            ks = k0 + tl.arange(0, BK)
            if EVEN_K:
                a = tl.load(h_rows + ks[None, :], mask=rmask[:, None], other=0.0)
                b = tl.load(w_cols + ks[:, None], mask=cmask[None, :], other=0.0)
            else:
                kmask = ks < H
                a = tl.load(h_rows + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                b = tl.load(w_cols + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        x = tl.where(cmask[None, :], acc * inv_temp, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past T: no NaN from inf-inf
        alpha = tl.exp(m - m_safe)
        e = tl.exp(x - m_safe[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        sz = sz * alpha + tl.sum(e * tl.where(cmask[None, :], x, 0.0), axis=1)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], x, 0.0), axis=1)
        m = m_new
    out = pid_s * T + rows
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(s_ptr + out, s, mask=rmask)
    tl.store(sz_ptr + out, sz, mask=rmask)
    tl.store(zt_ptr + out, zt, mask=rmask)


def local_stats_dot(hidden, weight, tgt_local, owned, vocab_valid: int, inv_temp: float, n_splits: int | None = None):
    """Local (m, s, sz, zt) [T] of z = h @ W[:vocab_valid]^T * inv_temp, without logits."""
    _check_device(hidden)
    T, H = hidden.shape
    dev = hidden.device
    if hidden.dtype == torch.float64:
        raise TypeError("the triton backend takes fp32/bf16/fp16 inputs (use chunked for fp64)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden {hidden.dtype} and weight {weight.dtype} must match")
    max_splits = max(1, triton.cdiv(vocab_valid, 4 * MAX_BV))
    if n_splits is None:
        # GPU: ~16 vocab splits, so that GROUP_T token tiles x the splits fill the SMs, and more
        # when there are few token tiles (~2 waves of programs)
        n_splits = 1 if INTERPRET else max(16, triton.cdiv(2 * _num_sms(dev), triton.cdiv(T, 128)))
    n_splits = max(1, min(n_splits, max_splits))
    cols_per_split = triton.cdiv(triton.cdiv(max(vocab_valid, 1), n_splits), MAX_BV) * MAX_BV
    n_splits = triton.cdiv(max(vocab_valid, 1), cols_per_split)
    parts = [torch.empty(n_splits, T, dtype=torch.float32, device=dev) for _ in range(4)]
    if T > 0 and vocab_valid > 0:
        hidden = hidden.contiguous()
        weight = weight if weight.stride(1) == 1 else weight.contiguous()
        upcast = INTERPRET and hidden.dtype == torch.bfloat16
        ieee = hidden.dtype == torch.float32 or upcast
        grid = lambda meta: (triton.cdiv(T, meta["BT"]) * n_splits,)  # noqa: E731
        _lse_dot_kernel[grid](
            hidden,
            weight,
            tgt_local,
            owned.to(torch.int8),
            *parts,
            T,
            H,
            vocab_valid,
            cols_per_split,
            n_splits,
            hidden.stride(0),
            weight.stride(0),
            float(inv_temp),
            UPCAST=upcast,
            IEEE=ieee,
        )
    elif T > 0:
        parts[0].fill_(float("-inf"))
        for p in parts[1:]:
            p.zero_()
    return vp.merge_stats(*parts, dim=0)  # type: ignore[misc, arg-type]  # parts is [m, s, sz, zt]


def _num_sms(dev) -> int:
    return torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1


def linear_logprob_inference(
    hidden, weight, targets, *, return_entropy=False, reduce_dh=True, n_splits: int | None = None, **kwargs
):
    """Forward-only log-prob (and entropy) with the tl.dot online-logsumexp kernel."""
    plan = make_plan(hidden, weight, targets, **kwargs)
    with torch.no_grad():
        tgt, owned, valid = vp.local_targets(targets, plan.vocab_start, plan.vocab_valid, plan.ignore_index)
        m, s, sz, zt = local_stats_dot(hidden, weight, tgt, owned, plan.vocab_valid, plan.inv_temp, n_splits)
        lse, zt, mu = vp.combine_stats(m, s, sz, zt, plan.group)
        logp, entropy = vp.finish(lse, zt, mu, valid)
    assert logp.dtype == acc_dtype(hidden)
    return (logp, entropy) if return_entropy else logp
