"""Benchmark: log-prob of the sampled token from hidden states (student fwd+bwd, teacher fwd-only).

Measures, in one run on one CUDA GPU: the bf16 matmul floor (8192^3, before and after the cases;
the faster is the floor), naive torch, token-chunked torch + checkpoint, Liger fused linear CE
(reduction='none', if installed), Apple CCE exact and filtered (if installed), and this project's
kernels, for T in {8192, 32768}, H = 4096 and V_local in {151936, 75968, 37984, 18992}
(TP 1/2/4/8). Reports the median CUDA-event time, the multiple of the floor (FLOPs: 2THV
forward, +4THV backward), the peak extra memory (max_memory_allocated minus the inputs, after one
warm-up call), and the error vs fp64 at T=1024, H=1024, V=32000. Prints a table last; writes CSV,
JSON and a PNG to --out. Results and their reading: benchmarks/RESULTS.md.

Our rows:
  ours chunked / triton             linear_logprob (autograd; backward recomputes the logits)
  ours fused-loss chunked / triton  linear_logprob_loss (gradient formed in the forward); dW is
                                    returned through autograd (fp32 accumulator + bf16 output)
  ... -> main_grad                  the same with dW added into a preallocated fp32 main_grad
                                    (an input, like megatron's gradient buffer, so not "extra")
  ..., bf16 logits                  logits_dtype = the input dtype (the plain torch path's rounding)
  teacher: ours triton              cuBLAS GEMM + Triton row stats; low_memory: the tl.dot kernel

Full-vocabulary G-OPD (kernels.full_vocab_gopd_loss), mode "full-vocab G-OPD lam=..": student
fwd+bwd with a teacher (hidden 5120) and, at lam != 1, a reference (4096), each model's logits
over the whole vocabulary (V_local per rank). Floor FLOPs: 2TV(Hs + Ht [+ Hr]) forward + 4TVHs
backward; the two-pass kernels recompute the forward GEMMs in the backward, so 1.6x is their
best case at lam != 1 with equal hidden sizes. Rows: naive torch (three full fp32 logits
matrices, autograd), Liger's fused linear JSD with beta = 1 (reverse KL to the teacher: the
lam = 1 peer, if installed), ours chunked, ours triton (tl.dot tiles, no logits), and ours
triton -> main_grad. Accuracy (loss, dh, dW vs fp64) is reported for each at the accuracy shape.

    python benchmarks/bench_logprob.py --out bench_out          # one GPU, ~2.5 min on an H200
    python benchmarks/bench_logprob.py --smoke --out /tmp/bench # tiny CPU run of the same code
    bash benchmarks/gpu_check.sh                                # GPU kernel tests + this script

The student upstream gradient is a random per-token vector (the G-OPD advantage stand-in); Liger
is driven with loss.sum() (its reduction='none' backward does not take per-token weights).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402

H_FULL, V_FULL = 4096, 151936
TP_SIZES = (1, 2, 4, 8)


# ----------------------------------------------------------------------------------------------
# Implementations. Each student fn(h, w, y, g, acc) runs forward + backward and returns (dh, dW)
# (acc: a preallocated fp32 [V, H] main_grad, used only by the "-> main_grad" variant, which
# returns dW = None and leaves it in acc); each teacher fn(h, w, y) returns logp.


def naive_logp(h, w, y):
    return torch.log_softmax((h @ w.t()).float(), dim=-1).gather(1, y[:, None]).squeeze(1)


def chunked_ckpt_logp(h, w, y, chunk=4096):
    from torch.utils.checkpoint import checkpoint

    outs = [checkpoint(naive_logp, h[i:i + chunk], w, y[i:i + chunk], use_reentrant=False)
            for i in range(0, h.shape[0], chunk)]
    return torch.cat(outs)


def _grads(out_scalar, h, w):
    return torch.autograd.grad(out_scalar, [h, w])


def student_impls(device: str, chunk_size: int | None) -> dict[str, Callable | str]:
    impls: dict[str, Callable | str] = {
        "naive torch": lambda h, w, y, g, acc: _grads((naive_logp(h, w, y) * g).sum(), h, w),
        "chunked torch + ckpt": lambda h, w, y, g, acc: _grads(
            (chunked_ckpt_logp(h, w, y) * g).sum(), h, w),
    }
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as lce

        def liger(h, w, y, g, acc):
            out = lce(h, w, y, reduction="none")
            out = out[0] if isinstance(out, tuple) else out
            return _grads(out.sum(), h, w)

        impls["liger FLCE (none)"] = liger
    except ImportError as e:
        impls["liger FLCE (none)"] = f"skipped: {e}"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        impls["CCE exact"] = lambda h, w, y, g, acc: _grads(
            (cce(h, w, y, reduction="none", filter_eps=None) * -g).sum(), h, w)
        impls["CCE filtered"] = lambda h, w, y, g, acc: _grads(
            (cce(h, w, y, reduction="none") * -g).sum(), h, w)
    except ImportError as e:
        impls["CCE exact"] = impls["CCE filtered"] = f"skipped: {e}"

    backends = ["chunked"]
    if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        backends.append("triton")
    else:
        impls["ours triton"] = impls["ours fused-loss triton"] = "skipped: no CUDA"
    for b in backends:
        impls[f"ours {b}"] = (lambda b: lambda h, w, y, g, acc: _grads(
            (kernels.linear_logprob(h, w, y, backend=b, chunk_size=chunk_size) * g).sum(),
            h, w))(b)
        impls[f"ours fused-loss {b}"] = (lambda b: lambda h, w, y, g, acc: _grads(
            kernels.linear_logprob_loss(h, w, y, lambda lp, sl: g[sl] * lp, backend=b,
                                        chunk_size=chunk_size)[0], h, w))(b)
    impls[f"ours fused-loss {backends[-1]} -> main_grad"] = (
        lambda h, w, y, g, acc: fused_into(h, w, y, g, acc, backends[-1], chunk_size))
    impls[f"ours fused-loss {backends[-1]} -> main_grad, {BF16_LOGITS}"] = (
        lambda h, w, y, g, acc: fused_into(h, w, y, g, acc, backends[-1], chunk_size,
                                           logits_dtype=h.dtype))
    return impls


BF16_LOGITS = "bf16 logits"  # marks the variants with an input-dtype logits chunk


def fused_into(h, w, y, g, acc, backend, chunk_size, logits_dtype=None):
    """The trainer-side variant: dW is added into the caller's fp32 main_grad ``acc``."""
    loss = kernels.linear_logprob_loss(h, w, y, lambda lp, sl: g[sl] * lp, backend=backend,
                                       chunk_size=chunk_size, grad_weight_acc=acc,
                                       logits_dtype=logits_dtype)[0]
    (dh,) = torch.autograd.grad(loss, [h])
    return dh, None


def teacher_impls(device: str, chunk_size: int | None) -> dict[str, Callable | str]:
    impls: dict[str, Callable | str] = {
        "naive torch": naive_logp,
        "chunked torch": lambda h, w, y: torch.cat(
            [naive_logp(h[i:i + 4096], w, y[i:i + 4096]) for i in range(0, h.shape[0], 4096)]),
    }
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        impls["CCE"] = lambda h, w, y: -cce(h, w, y, reduction="none", filter_eps=None)
    except ImportError as e:
        impls["CCE"] = f"skipped: {e}"
    impls["ours chunked"] = lambda h, w, y: kernels.linear_logprob_inference(
        h, w, y, backend="chunked", chunk_size=chunk_size)
    if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        impls["ours triton (cuBLAS + triton rows)"] = lambda h, w, y: (
            kernels.linear_logprob_inference(h, w, y, backend="triton", chunk_size=chunk_size))
        impls[f"ours triton, {BF16_LOGITS}"] = lambda h, w, y: kernels.linear_logprob_inference(
            h, w, y, backend="triton", chunk_size=chunk_size, logits_dtype=h.dtype)
        impls["ours triton low_memory (tl.dot)"] = lambda h, w, y: (
            kernels.linear_logprob_inference(h, w, y, backend="triton", low_memory=True))
    else:
        impls["ours triton"] = "skipped: no CUDA"
    return impls


# ----------------------------------------------------------------------------------------------
# Full-vocabulary G-OPD: each fn(h_s, w_s, h_t, w_t, h_r, w_r, weight, lam, acc) runs forward +
# backward of sum_t weight_t L_t and returns (dh_s, dW_s) (dW None when it went into acc).

FV_HIDDEN_T = 5120  # a teacher wider than the student (hidden sizes may differ)
FV_LAMS = (1.0, 1.25)


def naive_full_vocab(h_s, w_s, h_t, w_t, h_r, w_r, weight, lam, acc):
    """Three full [T, V] fp32 logits matrices, log_softmax, autograd: what plain torch does."""
    log_p = torch.log_softmax((h_s @ w_s.t()).float(), -1)
    with torch.no_grad():
        g = lam * torch.log_softmax((h_t @ w_t.t()).float(), -1)
        if lam != 1.0:
            g += (1.0 - lam) * torch.log_softmax((h_r @ w_r.t()).float(), -1)
    loss = (log_p.exp() * (log_p - g)).sum(-1)
    return _grads((loss * weight).sum(), h_s, w_s)


def full_vocab_impls(device: str, chunk_size: int | None, lam: float) -> dict[str, Callable | str]:
    impls: dict[str, Callable | str] = {"naive torch (3 full logits)": naive_full_vocab}
    if lam == 1.0:
        try:
            from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

            jsd = LigerFusedLinearJSD(jsd_beta=1.0)  # beta = 1: reverse KL(student || teacher)

            def liger(h_s, w_s, h_t, w_t, h_r, w_r, weight, lam, acc):
                return _grads(jsd(h_s, w_s, h_t, w_t), h_s, w_s)  # mean over tokens

            impls["liger fused linear JSD (beta=1)"] = liger
        except ImportError as e:
            impls["liger fused linear JSD (beta=1)"] = f"skipped: {e}"

    def ours(backend, into_acc=False):
        def fn(h_s, w_s, h_t, w_t, h_r, w_r, weight, lam, acc):
            loss, _ = kernels.full_vocab_gopd_loss(
                h_s, w_s, h_t, w_t, h_r if lam != 1.0 else None, w_r if lam != 1.0 else None,
                lam=lam, token_weight=weight, backend=backend, chunk_size=chunk_size,
                grad_weight_acc=acc if into_acc else None)
            if into_acc:
                return torch.autograd.grad(loss.sum(), [h_s])[0], None
            return _grads(loss.sum(), h_s, w_s)
        return fn

    impls["ours full-vocab chunked"] = ours("chunked")
    if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        impls["ours full-vocab triton"] = ours("triton")
        impls["ours full-vocab triton -> main_grad"] = ours("triton", into_acc=True)
    else:
        impls["ours full-vocab triton"] = "skipped: no CUDA"
    return impls


def full_vocab_inputs(T, H, V, device, dtype, seed=0):
    """(h_s, w_s, h_t, w_t, h_r, w_r, weight): student/reference hidden H, teacher FV_HIDDEN_T
    scaled like H (so the smoke shapes stay small); token weights 1/T with every 16th token 0."""
    ht = max(16, H * FV_HIDDEN_T // H_FULL)
    h_s, w_s, _, _ = make_inputs(T, H, V, device, dtype, seed=seed, requires_grad=True)
    h_t, w_t, _, _ = make_inputs(T, ht, V, device, dtype, seed=seed + 1)
    h_r, w_r, _, _ = make_inputs(T, H, V, device, dtype, seed=seed + 2)
    w_t.mul_(1.5)  # a peakier teacher
    weight = torch.full((T,), 1.0 / T, device=device)
    weight[::16] = 0.0
    return h_s, w_s, h_t, w_t, h_r, w_r, weight


def full_vocab_flops(T, H, V, lam) -> int:
    ht = max(16, H * FV_HIDDEN_T // H_FULL)
    return 2 * T * V * (H + ht + (H if lam != 1.0 else 0)) + 4 * T * V * H


def full_vocab_call(fn, T, H, V, device, dtype, lam, name):
    """A zero-argument call of one full-vocab implementation on fresh inputs (for measure)."""
    h_s, w_s, h_t, w_t, h_r, w_r, weight = full_vocab_inputs(T, H, V, device, dtype)
    acc = (torch.zeros(V, H, device=device, dtype=torch.float32)
           if "main_grad" in name else None)  # the optimizer's buffer: an input, not extra
    return lambda: fn(h_s, w_s, h_t, w_t, h_r, w_r, weight, lam, acc)


def accuracy_full_vocab(device, T, H, V, chunk_size) -> list[dict]:
    """Loss (value of sum_t w_t L_t), dh and dW rel. error vs fp64 on the same bf16 inputs."""
    rows = []
    for lam in FV_LAMS:
        h_s, w_s, h_t, w_t, h_r, w_r, weight = full_vocab_inputs(T, H, V, device, torch.bfloat16,
                                                                 seed=3)
        up = [x.double() for x in (h_s, w_s, h_t, w_t, h_r, w_r)]
        up[0].requires_grad_()
        up[1].requires_grad_()
        loss64, _ = kernels.full_vocab_gopd_loss(*up[:4], *(up[4:] if lam != 1.0 else (None, None)),
                                                 lam=lam, backend="torch")
        dh64, dw64 = torch.autograd.grad((loss64 * weight.double()).sum(), up[:2])
        for name, fn in full_vocab_impls(device, chunk_size, lam).items():
            if isinstance(fn, str) or name.startswith("liger"):
                continue  # Liger's loss is a mean reverse KL, not this weighted sum
            hh, ww = h_s.detach().clone().requires_grad_(), w_s.detach().clone().requires_grad_()
            acc = torch.zeros(w_s.shape, dtype=torch.float32, device=device)
            try:
                dh, dw = fn(hh, ww, h_t, w_t, h_r, w_r, weight, lam, acc)
                dw = acc if dw is None else dw
                rows.append({"impl": f"full-vocab lam={lam}: {name}", "dh_rel_err": rel(dh, dh64),
                             "dW_rel_err": rel(dw, dw64)})
            except Exception as e:
                rows.append({"impl": f"full-vocab lam={lam}: {name}",
                             "note": f"error: {type(e).__name__}: {e}"[:200]})
    return rows


# ----------------------------------------------------------------------------------------------
# Measurement


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, budget_s: float, max_reps: int) -> float:
    """Median time of fn in ms; two warm-up calls (Triton compiles on the first)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    once = time.perf_counter() - t0
    reps = int(max(3, min(max_reps, budget_s / max(once, 1e-6))))
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# the "before" of the Triton row kernels (torch row math): measured at the full vocab only
TP1_ONLY = {"ours chunked", "ours fused-loss chunked", "chunked torch + ckpt", "chunked torch"}


def sweep_chunks(T: int, v_local: int, chunk: int | None) -> list[int]:
    from kernels.chunked import default_chunk_size

    default = chunk or default_chunk_size(T, v_local)
    return [c for c in (default // 2, default * 2) if 0 < c <= T]


def measure(mode, name, fn, T, H, v_local, tp, flops, tflops, device, dtype, budget, max_reps,
            t_deadline, make_call=None) -> dict:
    """One timed case: median ms, multiple of the matmul floor, peak extra GiB (a note instead when
    skipped or failed). ``make_call()`` -> a zero-argument call on its own inputs (default: the
    log-prob cases' (h, w, y, g) inputs)."""
    floor_ms = flops / (tflops * 1e12) * 1e3
    row = {"mode": mode, "impl": name, "T": T, "H": H, "V_local": v_local, "tp": tp,
           "flops": flops, "floor_ms": floor_ms}
    student = mode.startswith(("student", "full-vocab"))
    if isinstance(fn, str):
        row["note"] = fn
    elif time.perf_counter() > t_deadline:
        row["note"] = "skipped: time limit"
    else:
        call = (make_call or (lambda: logprob_call(fn, student, T, H, v_local, device, dtype,
                                                   name)))()
        try:
            with torch.set_grad_enabled(student):
                call()  # compile / autotune / cuBLAS workspace outside the peak
                mem = peak_extra_gib(call, device)
                ms = time_ms(call, device, budget, max_reps)
            row.update(ms=ms, x_floor=ms / floor_ms, peak_extra_gib=mem)
        except torch.cuda.OutOfMemoryError:
            row["note"] = "skipped: OOM"
        except Exception as e:  # an optional library failing must not stop the benchmark
            row["note"] = f"error: {type(e).__name__}: {e}"[:200]
        del call
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"  {mode:16s} T={T:6d} V={v_local:6d} {name:50s} "
          f"{row.get('ms', float('nan')):9.2f} ms {row.get('x_floor', float('nan')):6.2f}x "
          f"{row.get('peak_extra_gib', float('nan')):6.2f} GiB {row.get('note', '')}", flush=True)
    return row


def logprob_call(fn, student, T, H, v_local, device, dtype, name):
    """A zero-argument call of one log-prob implementation on fresh inputs (for measure)."""
    h, w, y, g = make_inputs(T, H, v_local, device, dtype, requires_grad=student)
    acc = (torch.zeros(v_local, H, device=device, dtype=torch.float32)
           if "main_grad" in name else None)  # the optimizer's buffer: an input, not extra
    return (lambda: fn(h, w, y, g, acc)) if student else (lambda: fn(h, w, y))


def peak_extra_gib(fn: Callable[[], object], device: str) -> float:
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def matmul_tflops(device: str, n: int) -> float:
    """bf16 n^3 matmul rate on random data, after ~0.5 s of the same work (clocks up)."""
    dt = torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < (0.5 if device == "cuda" else 0.0):
        a @ b
        sync(device)
    ms = time_ms(lambda: a @ b, device, budget_s=1.0, max_reps=100)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def make_inputs(T, H, V, device, dtype, seed=0, requires_grad=False):
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(T, H, device=device, dtype=dtype, generator=g)
    w = (torch.randn(V, H, device=device, dtype=torch.float32, generator=g) * (3.0 / H**0.5))
    w = w.to(dtype)
    y = torch.randint(0, V, (T,), device=device, generator=g)
    gup = torch.randn(T, device=device, dtype=torch.float32, generator=g)
    if requires_grad:
        h.requires_grad_()
        w.requires_grad_()
    return h, w, y, gup


def rel(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp(min=1e-30))


def accuracy(device, T, H, V, chunk_size) -> list[dict]:
    """Rel. error vs fp64 (same bf16-rounded inputs), upstream gradient -1 (i.e. d sum(CE))."""
    h, w, y, _ = make_inputs(T, H, V, device, torch.bfloat16, seed=1)
    minus1 = -torch.ones(T, device=device)
    h64 = h.double().requires_grad_()
    w64 = w.double().requires_grad_()
    lp64 = kernels.linear_logprob(h64, w64, y, backend="torch")
    dh64, dw64 = torch.autograd.grad((lp64 * minus1.double()).sum(), [h64, w64])
    rows = []
    for name, fn in student_impls(device, chunk_size).items():
        if isinstance(fn, str):
            rows.append({"impl": name, "note": fn})
            continue
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        acc = torch.zeros(w.shape, dtype=torch.float32, device=device)
        try:
            dh, dw = fn(hh, ww, y, minus1, acc)
            dw = acc if dw is None else dw
            lp = (kernels.linear_logprob_inference(h, w, y, backend="torch")
                  if name.startswith(("liger", "CCE")) else None)
            if name.startswith("CCE"):
                from cut_cross_entropy import linear_cross_entropy as cce

                lp = -cce(h, w, y, reduction="none", filter_eps=None)
            elif name.startswith("liger"):
                from liger_kernel.transformers.functional import \
                    liger_fused_linear_cross_entropy as lce

                out = lce(h, w, y, reduction="none")
                lp = -(out[0] if isinstance(out, tuple) else out)
            elif "fused" in name:
                lp = kernels.linear_logprob_loss(
                    h, w, y, lambda l, s: l, backend=name.split()[2], chunk_size=chunk_size,
                    logits_dtype=h.dtype if BF16_LOGITS in name else None)[1]
            elif name.startswith("ours"):
                lp = kernels.linear_logprob(h, w, y, backend=name.split()[-1],
                                            chunk_size=chunk_size)
            elif name.startswith("chunked"):
                lp = chunked_ckpt_logp(h, w, y)
            else:
                lp = naive_logp(h, w, y)
            rows.append({"impl": name, "logp_rel_err": rel(lp, lp64), "dh_rel_err": rel(dh, dh64),
                         "dW_rel_err": rel(dw, dw64)})
        except Exception as e:  # an optional library failing must not stop the benchmark
            rows.append({"impl": name, "note": f"error: {type(e).__name__}: {e}"[:200]})
    for name, fn in teacher_impls(device, chunk_size).items():  # forward only: logp
        if isinstance(fn, str):
            continue
        try:
            with torch.no_grad():
                rows.append({"impl": f"teacher: {name}", "logp_rel_err": rel(fn(h, w, y), lp64)})
        except Exception as e:
            rows.append({"impl": f"teacher: {name}", "note": f"error: {type(e).__name__}: {e}"[:200]})
    return rows


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code path")
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="token chunk for our backends (default: fp32 logits chunk <= 2 GiB)")
    ap.add_argument("--tokens", type=int, nargs="*", default=None)
    ap.add_argument("--tp", type=int, nargs="*", default=list(TP_SIZES),
                    help="tensor-parallel sizes whose per-rank vocab is measured")
    ap.add_argument("--time-limit", type=float, default=240.0,
                    help="seconds for the timed cases; the rest are skipped with a note")
    args = ap.parse_args(argv)

    if args.smoke:
        device, dtype, H, V, tokens = "cpu", torch.bfloat16, 64, 1000, args.tokens or [96]
        mm_n, acc_shape, budget, max_reps = 256, (64, 64, 500), 0.05, 3
        chunk = args.chunk_size or 40
    else:
        if not torch.cuda.is_available():
            sys.exit("needs a CUDA GPU (use --smoke for a CPU check of the script)")
        device, dtype, H, V, tokens = "cuda", torch.bfloat16, H_FULL, V_FULL, args.tokens or [
            8192, 32768]
        mm_n, acc_shape, budget, max_reps = 8192, (1024, 1024, 32000), 1.0, 10
        chunk = args.chunk_size
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    tflops = tflops_start = matmul_tflops(device, mm_n)
    print(f"bf16 matmul {mm_n}^3: {tflops:.1f} TFLOP/s on {device}", flush=True)
    acc_rows = accuracy(device, *acc_shape, chunk) + accuracy_full_vocab(device, *acc_shape, chunk)

    rows: list[dict] = []
    t_deadline = time.perf_counter() + args.time_limit
    # The target shape first (T max, full vocab), so that a time limit cuts the least useful cases.
    cases = sorted(((T, tp) for T in tokens for tp in args.tp), key=lambda c: (c[1] > 1, -c[0]))
    for T, tp in cases:
        v_local = V // tp if not args.smoke else V // tp + (tp > 1)  # odd sizes on CPU too
        for mode, impls, flops in (
            ("student fwd+bwd", student_impls(device, chunk), 6 * T * H * v_local),
            ("teacher fwd", teacher_impls(device, chunk), 2 * T * H * v_local),
        ):
            for name, fn in impls.items():
                if tp > 1 and device == "cuda" and name in TP1_ONLY:
                    continue
                rows.append(measure(mode, name, fn, T, H, v_local, tp, flops, tflops, device,
                                    dtype, budget, max_reps, t_deadline))
        if T == max(tokens) and tp == 1:  # token-chunk sweep of the student path we ship
            for cs in sweep_chunks(T, v_local, chunk):
                name = f"ours fused-loss -> main_grad, chunk {cs}"
                fn = (lambda cs: lambda h, w, y, g, acc: fused_into(
                    h, w, y, g, acc, "triton" if device == "cuda" else "chunked", cs))(cs)
                rows.append(measure("student fwd+bwd", name, fn, T, H, v_local, tp,
                                    6 * T * H * v_local, tflops, device, dtype, budget,
                                    max_reps, t_deadline))

    # Full-vocabulary G-OPD, after the log-prob cases (a time limit cuts these first)
    for T, tp in cases:
        v_local = V // tp if not args.smoke else V // tp + (tp > 1)
        for lam in FV_LAMS[-1:] if args.smoke else FV_LAMS:  # the smoke run: lam = 1.25 only
            for name, fn in full_vocab_impls(device, chunk, lam).items():
                make = (lambda fn, name, lam: lambda: full_vocab_call(
                    fn, T, H, v_local, device, dtype, lam, name))(fn, name, lam)
                rows.append(measure(f"full-vocab G-OPD lam={lam}", name, fn, T, H, v_local, tp,
                                    full_vocab_flops(T, H, v_local, lam), tflops, device, dtype,
                                    budget, max_reps, t_deadline, make_call=make))

    # The floor is the faster of the matmul rates measured before and after the cases (the
    # stricter floor; the two differ by the card's clock and thermal state).
    tflops_end = matmul_tflops(device, mm_n)
    tflops = max(tflops_start, tflops_end)
    for r in rows:
        r["floor_ms"] = r["flops"] / (tflops * 1e12) * 1e3
        if "ms" in r:
            r["x_floor"] = r["ms"] / r["floor_ms"]
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "matmul_tflops": tflops, "smoke": args.smoke,
            "matmul_tflops_start": tflops_start, "matmul_tflops_end": tflops_end,
            "wall_s": time.perf_counter() - t_start, "accuracy_shape": acc_shape,
            "triton": _version("triton"), "liger": _version("liger_kernel"),
            "cce": _version("cut_cross_entropy"), "lse_dot_autotune": _autotuned(),
            "fp32_out_gemms": dict(kernels.chunked.OUT_DTYPE_OK)}
    print(f"bf16 -> fp32 cuBLAS GEMMs available: {meta['fp32_out_gemms']}")
    print(f"\nlse_dot autotune choice per key: {meta['lse_dot_autotune']}")
    (out_dir / "bench_logprob.json").write_text(
        json.dumps({"meta": meta, "timings": rows, "accuracy": acc_rows}, indent=1,
                   default=float))
    keys = ["mode", "impl", "T", "H", "V_local", "tp", "ms", "floor_ms", "x_floor",
            "peak_extra_gib", "note"]
    with open(out_dir / "bench_logprob.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)
    plot(rows, out_dir / "bench_logprob.png")

    print(f"\naccuracy vs fp64, T,H,V={acc_shape}, bf16 inputs:")
    for r in acc_rows:
        if "note" in r:
            print(f"  {r['impl']:50s} {r['note']}")
        else:
            grads = (f"  dh {r['dh_rel_err']:.2e}  dW {r['dW_rel_err']:.2e}"
                     if "dh_rel_err" in r else "")
            logp = f"logp {r['logp_rel_err']:.2e}" if "logp_rel_err" in r else " " * 13
            print(f"  {r['impl']:60s} {logp}{grads}")
    print(f"\n{meta['device']}, bf16 matmul floor {tflops:.0f} TFLOP/s (before the cases "
          f"{tflops_start:.0f}, after {tflops_end:.0f}), wall {meta['wall_s']:.0f} s")
    print(f"{'mode':16s} {'impl':50s} {'T':>6s} {'V_local':>7s} {'ms':>9s} {'x floor':>8s} "
          f"{'GiB':>6s}")
    for r in rows:
        if "ms" in r:
            print(f"{r['mode']:16s} {r['impl']:50s} {r['T']:6d} {r['V_local']:7d} "
                  f"{r['ms']:9.2f} {r['x_floor']:8.2f} {r['peak_extra_gib']:6.2f}")
        else:
            print(f"{r['mode']:16s} {r['impl']:50s} {r['T']:6d} {r['V_local']:7d}  {r['note']}")
    return rows


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.replace("_", "-"))
    except PackageNotFoundError:
        return None


def _autotuned() -> dict:
    try:
        from kernels import triton_logprob
    except ImportError:
        return {}
    return {str(k): str(v) for k, v in getattr(triton_logprob._lse_dot_kernel, "cache", {}).items()}


def plot(rows, path: Path) -> None:
    """One panel per (mode, T): time / floor against the per-rank vocabulary, one line per
    implementation (the chunk-size sweep is left out)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib missing: no {path}")
        return
    sel = [r for r in rows if "ms" in r and ", chunk " not in r["impl"]]
    panels = sorted({(r["mode"], r["T"]) for r in sel}, key=lambda p: (p[0] != "student fwd+bwd",
                                                                       -p[1]))
    if not panels:
        return
    impls = sorted({r["impl"] for r in sel})
    colors = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5), squeeze=False)
    for ax, (mode, T) in zip(axes[0], panels):
        for i, impl in enumerate(impls):
            pts = sorted((r["V_local"], r["x_floor"]) for r in sel
                         if r["impl"] == impl and r["mode"] == mode and r["T"] == T)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^vD"[i % 5],
                        color=colors(i % 20), label=impl)
        ax.set_xscale("log")
        ax.set_xlabel("V_local (vocab rows per TP rank)")
        ax.set_ylabel("time / bf16 matmul floor")
        ax.set_title(f"{mode}, T={T}")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_ylim(bottom=1.0)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
