"""Triton kernels of the full-vocabulary G-OPD loss (math, shapes and collectives:
kernels.full_vocab). Nothing of size N x V is ever written: every logits tile lives in registers.

1. ``_stats_kernel`` (pass 1, forward). Grid (cdiv(N, BT), n_splits); a program owns BT tokens
   and a contiguous range of its rank's vocabulary, tiled by BV columns. Per tile it computes the
   student's, teacher's and reference's logits with tl.dot over their own hidden sizes (BK at a
   time, fp32 accumulators), and updates per-row online statistics with rescaling:
       (m_S, s_S, sd), (m_T, s_T), (m_R, s_R), (m_C, s_C)      c = lam zT + (1 - lam) zR,
                                                               d = zS - c, sd = sum e^(zS-m_S) d
   Partial stats [n_splits, 4, N] are merged on the host (full_vocab.merge_splits) and then
   across the TP group (full_vocab.finish_stats: all_reduce MAX [k, N], SUM [k + 1, N]).
2. ``_grad_kernel`` (pass 2, backward). Grid (cdiv(M, BT), n_splits) over the M token rows with a
   non-zero upstream gradient G (their indices ``rows``). Per tile it recomputes zS and c, forms
       dz = G p (d - E_p[d]) / T,   p = exp(zS - lse_S)                       [BT, BV] registers
   and, for each BK block of the student's hidden size, adds dz @ W_s[tile] into dh[rows] and
   dz^T @ h_s[rows] into dW[tile] with fp32 atomic adds (dh: fp32 [N, Hs] buffer; dW: the
   caller's fp32 main_grad or a fresh fp32 buffer). Atomic adds make the summation order, and so
   the last bits of dh and dW, vary from run to run on a GPU (the interpreter is sequential).

Interpreter (TRITON_INTERPRET=1): bf16 tl.dot operands are multiplied as raw bits there (triton
issue 11584), so bf16 tiles are upcast to fp32 before tl.dot; fp32 uses input_precision="ieee"
(no TF32). fp16 dz would underflow for small token weights, so fp16 inputs form dz @ W in fp32.
Tile sizes are fixed (no autotuning: pass 2 adds into caller-owned buffers, which an autotuner's
repeated launches would corrupt); the GPU tiles below are untuned first choices.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .chunked import acc_dtype
from .full_vocab import merge_splits

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (BT, BV, BK, num_warps, num_stages). The interpreter's cost is per program and loop iteration.
TILES = (32, 128, 64, 4, 1) if INTERPRET else (64, 128, 64, 8, 2)


def _check(t: torch.Tensor) -> None:
    if not t.is_cuda and not INTERPRET:
        raise RuntimeError(
            "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set "
            "before kernels.triton_full_vocab is imported)"
        )
    if t.dtype == torch.float64:
        raise TypeError("the triton backend takes fp32/bf16/fp16 inputs (use chunked for fp64)")


@triton.jit
def _tile_logits(
    h_ptr,
    stride_h,
    w_ptr,
    stride_w,
    rows,
    rmask,
    cols,
    cmask,
    K,
    inv_temp,
    BT: tl.constexpr,
    BV: tl.constexpr,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """z = h[rows] @ w[cols]^T * inv_temp, fp32 [BT, BV] (0 where masked)."""
    acc = tl.zeros([BT, BV], tl.float32)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        a = tl.load(h_rows + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_cols + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc * inv_temp


@triton.jit
def _online(m, s, x):
    """One tile of an online logsumexp: x [BT, BV] with -inf on masked columns."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no column yet
    alpha = tl.exp(m - m_safe)
    e = tl.exp(x - m_safe[:, None])
    return m_new, s * alpha + tl.sum(e, axis=1), alpha, e


@triton.jit
def _target_tile(
    ht,
    s_ht,
    wt,
    s_wt,
    Ht,
    hr,
    s_hr,
    wr,
    s_wr,
    Hr,
    rows,
    rmask,
    cols,
    cmask,
    inv_temp,
    lam,
    HAS_T: tl.constexpr,
    HAS_R: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """(zT, zR, c) tiles; an absent model's tile is the other one's (never used)."""
    if HAS_T:
        zt = _tile_logits(ht, s_ht, wt, s_wt, rows, rmask, cols, cmask, Ht, inv_temp, BT, BV, BK, UPCAST, IEEE)
    if HAS_R:
        zr = _tile_logits(hr, s_hr, wr, s_wr, rows, rmask, cols, cmask, Hr, inv_temp, BT, BV, BK, UPCAST, IEEE)
    if HAS_T and HAS_R:
        c = lam * zt + (1.0 - lam) * zr
    elif HAS_T:
        zr = zt
        c = zt
    else:
        zt = zr
        c = zr
    return zt, zr, c


@triton.jit
def _stats_kernel(
    hs,
    s_hs,
    ws,
    s_ws,
    Hs,
    ht,
    s_ht,
    wt,
    s_wt,
    Ht,
    hr,
    s_hr,
    wr,
    s_wr,
    Hr,
    m_ptr,
    s_ptr,
    sd_ptr,
    N,
    n_cols,
    cols_per_split,
    inv_temp,
    lam,
    HAS_T: tl.constexpr,
    HAS_R: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    rmask = rows < N
    v_lo = pid_s * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, n_cols)
    ninf = tl.full([BT], float("-inf"), tl.float32)
    zero = tl.zeros([BT], tl.float32)
    m_s = ninf
    s_s = zero
    sd = zero
    m_t = ninf
    s_t = zero
    m_r = ninf
    s_r = zero
    m_c = ninf
    s_c = zero
    for v0 in range(v_lo, v_hi, BV):
        cols = v0 + tl.arange(0, BV)
        cmask = cols < v_hi
        zt, zr, c = _target_tile(
            ht,
            s_ht,
            wt,
            s_wt,
            Ht,
            hr,
            s_hr,
            wr,
            s_wr,
            Hr,
            rows,
            rmask,
            cols,
            cmask,
            inv_temp,
            lam,
            HAS_T,
            HAS_R,
            BT,
            BV,
            BK,
            UPCAST,
            IEEE,
        )
        if HAS_T:
            m_t, s_t, _, _ = _online(m_t, s_t, tl.where(cmask[None, :], zt, float("-inf")))
        if HAS_R:
            m_r, s_r, _, _ = _online(m_r, s_r, tl.where(cmask[None, :], zr, float("-inf")))
        if HAS_T and HAS_R:
            m_c, s_c, _, _ = _online(m_c, s_c, tl.where(cmask[None, :], c, float("-inf")))
        zs = _tile_logits(hs, s_hs, ws, s_ws, rows, rmask, cols, cmask, Hs, inv_temp, BT, BV, BK, UPCAST, IEEE)
        m_s, s_s, alpha, e = _online(m_s, s_s, tl.where(cmask[None, :], zs, float("-inf")))
        sd = sd * alpha + tl.sum(e * tl.where(cmask[None, :], zs - c, 0.0), axis=1)
    # layout [n_splits, 4, N]: slot 0 student, 1 teacher, 2 reference, 3 c
    base = pid_s * 4 * N + rows
    tl.store(m_ptr + base, m_s, mask=rmask)
    tl.store(s_ptr + base, s_s, mask=rmask)
    tl.store(m_ptr + base + N, m_t, mask=rmask)
    tl.store(s_ptr + base + N, s_t, mask=rmask)
    tl.store(m_ptr + base + 2 * N, m_r, mask=rmask)
    tl.store(s_ptr + base + 2 * N, s_r, mask=rmask)
    tl.store(m_ptr + base + 3 * N, m_c, mask=rmask)
    tl.store(s_ptr + base + 3 * N, s_c, mask=rmask)
    tl.store(sd_ptr + pid_s * N + rows, sd, mask=rmask)


@triton.jit
def _grad_kernel(
    hs,
    s_hs,
    ws,
    s_ws,
    Hs,
    ht,
    s_ht,
    wt,
    s_wt,
    Ht,
    hr,
    s_hr,
    wr,
    s_wr,
    Hr,
    rows_ptr,
    g_ptr,
    lse_ptr,
    mean_ptr,
    dh_ptr,
    s_dh,
    dw_ptr,
    s_dw,
    M,
    n_cols,
    cols_per_split,
    inv_temp,
    lam,
    HAS_T: tl.constexpr,
    HAS_R: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    DZ_FP32: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    r = pid_t * BT + tl.arange(0, BT)
    rmask = r < M
    rows = tl.load(rows_ptr + r, mask=rmask, other=0)
    g = tl.load(g_ptr + r, mask=rmask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
    v_lo = pid_s * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, n_cols)
    h_rows = hs + rows.to(tl.int64)[:, None] * s_hs
    dh_rows = dh_ptr + rows.to(tl.int64)[:, None] * s_dh
    for v0 in range(v_lo, v_hi, BV):
        cols = v0 + tl.arange(0, BV)
        cmask = cols < v_hi
        _, _, c = _target_tile(
            ht,
            s_ht,
            wt,
            s_wt,
            Ht,
            hr,
            s_hr,
            wr,
            s_wr,
            Hr,
            rows,
            rmask,
            cols,
            cmask,
            inv_temp,
            lam,
            HAS_T,
            HAS_R,
            BT,
            BV,
            BK,
            UPCAST,
            IEEE,
        )
        zs = _tile_logits(hs, s_hs, ws, s_ws, rows, rmask, cols, cmask, Hs, inv_temp, BT, BV, BK, UPCAST, IEEE)
        p = tl.exp(zs - lse[:, None])
        dz = (g * inv_temp)[:, None] * p * (zs - c - mean[:, None])
        dz = tl.where(rmask[:, None] & cmask[None, :], dz, 0.0)
        if DZ_FP32:
            dz_op = dz
        else:
            dz_op = dz.to(hs.dtype.element_ty)
        w_cols = ws + cols.to(tl.int64)[:, None] * s_ws
        dw_cols = dw_ptr + cols.to(tl.int64)[:, None] * s_dw
        for k0 in range(0, Hs, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < Hs
            if DH:
                wb = tl.load(w_cols + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
                if DZ_FP32:
                    part = tl.dot(dz_op, wb.to(tl.float32), input_precision="ieee")
                else:
                    part = tl.dot(dz_op, wb)
                tl.atomic_add(dh_rows + ks[None, :], part, mask=rmask[:, None] & kmask[None, :])
            if DW:
                hb = tl.load(h_rows + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                if DZ_FP32:
                    part = tl.dot(tl.trans(dz_op), hb.to(tl.float32), input_precision="ieee")
                else:
                    part = tl.dot(tl.trans(dz_op), hb)
                tl.atomic_add(dw_cols + ks[None, :], part, mask=cmask[:, None] & kmask[None, :])


def _flags(h: torch.Tensor):
    """(UPCAST, IEEE, DZ_FP32) for the input dtype: bf16 tiles upcast under the interpreter; fp32
    operands without TF32; dz @ W and dz^T @ h in fp32 for fp32, fp16 and upcast inputs (bf16 dz
    on a GPU, where bf16 keeps fp32's range)."""
    upcast = INTERPRET and h.dtype == torch.bfloat16
    return upcast, h.dtype == torch.float32 or upcast, h.dtype != torch.bfloat16 or upcast


def _splits(plan, n_rows: int, vocab: int, bt: int, bv: int, dev) -> tuple[int, int]:
    """(n_splits, cols_per_split): about two waves of programs on a GPU, one split interpreted."""
    if plan.n_splits is not None:
        want = plan.n_splits
    elif INTERPRET or dev.type != "cuda":
        want = 1
    else:
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        want = triton.cdiv(2 * sms, triton.cdiv(max(n_rows, 1), bt))
    want = max(1, min(want, triton.cdiv(max(vocab, 1), bv)))
    cols = triton.cdiv(triton.cdiv(max(vocab, 1), want), bv) * bv
    return triton.cdiv(max(vocab, 1), cols), cols


def _models(h_s, w_s, h_t, w_t, h_r, w_r):
    """Kernel arguments of the three (h, w) pairs; an absent model passes the student's tensors
    (never read: HAS_T / HAS_R are constexpr)."""
    out = []
    for h, w in ((h_s, w_s), (h_t, w_t), (h_r, w_r)):
        h, w = (h_s, w_s) if h is None else (h, w)
        _check(h)
        if h.dtype != h_s.dtype:  # one set of dot flags (UPCAST, IEEE) serves all three models
            raise TypeError(
                f"the triton backend needs one dtype for the three models, got "
                f"{h.dtype} beside the student's {h_s.dtype} (cast, or use chunked)"
            )
        if h.stride(1) != 1:
            h = h.contiguous()
        if w.stride(1) != 1:
            w = w.contiguous()
        out += [h, h.stride(0), w, w.stride(0), h.shape[1]]
    return out


def local_stats(h_s, w_s, h_t, w_t, h_r, w_r, plan):
    """Pass 1 on this rank: m, s [k, N] and sd [N] merged over the vocab splits."""
    n, vv, dev = h_s.shape[0], plan.vocab_valid, h_s.device
    bt, bv, bk, warps, stages = TILES
    n_splits, cols = _splits(plan, n, vv, bt, bv, dev)
    m = torch.full((n_splits, 4, n), float("-inf"), dtype=torch.float32, device=dev)
    s = torch.zeros((n_splits, 4, n), dtype=torch.float32, device=dev)
    sd = torch.zeros((n_splits, n), dtype=torch.float32, device=dev)
    if n > 0 and vv > 0:
        upcast, ieee, _ = _flags(h_s)
        _stats_kernel[(triton.cdiv(n, bt), n_splits)](
            *_models(h_s, w_s, h_t, w_t, h_r, w_r),
            m,
            s,
            sd,
            n,
            vv,
            cols,
            plan.inv_temp,
            plan.lam,
            HAS_T=plan.has_t,
            HAS_R=plan.has_r,
            BT=bt,
            BV=bv,
            BK=bk,
            UPCAST=upcast,
            IEEE=ieee,
            num_warps=warps,
            num_stages=stages,
        )
    keep = [0, 1, 2, 3] if plan.has_c else [0, 1 if plan.has_t else 2]
    m, s, sd = merge_splits(m[:, keep], s[:, keep], sd)
    assert m.dtype == acc_dtype(h_s)
    return m, s, sd


def grad(h_s, w_s, h_t, w_t, h_r, w_r, plan, rows, gw, lse_s, mean_d, dh, dw_acc) -> None:
    """Pass 2: dh[rows] (into ``dh``) and dW (added into the fp32 ``dw_acc`` [vv, Hs])."""
    n, hs_dim = h_s.shape
    vv, dev = plan.vocab_valid, h_s.device
    if vv == 0 or rows.numel() == 0:
        return
    bt, bv, bk, warps, stages = TILES
    n_splits, cols = _splits(plan, rows.numel(), vv, bt, bv, dev)
    dh32 = torch.zeros(n, hs_dim, dtype=torch.float32, device=dev) if dh is not None else None
    upcast, ieee, dz_fp32 = _flags(h_s)
    dummy = lse_s  # a valid pointer for an output that is not wanted (DH / DW constexpr False)
    dwb = dw_acc if dw_acc is not None else dummy
    if dw_acc is not None:
        assert dw_acc.dtype == torch.float32 and dw_acc.stride(1) == 1
    _grad_kernel[(triton.cdiv(rows.numel(), bt), n_splits)](
        *_models(h_s, w_s, h_t, w_t, h_r, w_r),
        rows.to(torch.int32),
        gw.float().contiguous(),
        lse_s.float().contiguous(),
        mean_d.float().contiguous(),
        dh32 if dh32 is not None else dummy,
        dh32.stride(0) if dh32 is not None else 0,
        dwb,
        dw_acc.stride(0) if dw_acc is not None else 0,
        rows.numel(),
        vv,
        cols,
        plan.inv_temp,
        plan.lam,
        HAS_T=plan.has_t,
        HAS_R=plan.has_r,
        DH=dh is not None,
        DW=dw_acc is not None,
        BT=bt,
        BV=bv,
        BK=bk,
        UPCAST=upcast,
        IEEE=ieee,
        DZ_FP32=dz_fp32,
        num_warps=warps,
        num_stages=stages,
    )
    if dh is not None:
        dh.copy_(dh32)
