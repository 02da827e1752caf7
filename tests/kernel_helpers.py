"""Numerical helpers of the kernel tests: inputs, runs of a backend, the fp64 oracle check.

error(backend, dtype) = relative L2 error vs fp64 on the same (rounded) inputs; a backend passes when
error <= 2 * error(plain torch reference in that dtype) + a tiny floor (FLOOR).
"""

from __future__ import annotations

import torch

import kernels
from gopd_mega.objective import LossSettings, gopd_token_loss

FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-4, torch.float16: 5e-5, torch.float64: 1e-12}


def make_inputs(T=37, H=96, V=1000, pad=24, logit_std=3.0, seed=0, n_ignored=4):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V + pad, H, generator=g, dtype=torch.float64) * (logit_std / H**0.5)
    y = torch.randint(0, V, (T,), generator=g)
    y[torch.randperm(T, generator=g)[:n_ignored]] = -100
    return h, w, y


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp(min=1e-30))


def run_logprob(backend, h, w, y, dtype, fn=kernels.linear_logprob, **kw):
    """Returns (logp, entropy, dh, dW) for a fixed random upstream gradient."""
    hh = h.detach().to(dtype).requires_grad_()
    ww = w.detach().to(dtype).requires_grad_()
    logp, ent = fn(hh, ww, y, return_entropy=True, backend=backend, **kw)
    gen = torch.Generator().manual_seed(123)
    g = torch.randn(y.shape[0], generator=gen, dtype=torch.float64).to(y.device)
    ge = torch.randn(y.shape[0], generator=gen, dtype=torch.float64).to(y.device) * 0.3
    ((logp * g.to(logp.dtype)).sum() + (ent * ge.to(ent.dtype)).sum()).backward()
    return logp, ent, hh.grad, ww.grad


def quantised(h, w, dtype):
    return h.to(dtype).double(), w.to(dtype).double()


def check_against_oracle(backend, h, w, y, dtype, run, names, **kw):
    hq, wq = quantised(h, w, dtype)
    oracle = run("torch", hq, wq, y, torch.float64, **kw)
    naive = run("torch", hq, wq, y, dtype, **kw)
    got = run(backend, hq, wq, y, dtype, **kw)
    report = {}
    for name, o, n, x in zip(names, oracle, naive, got):
        e_naive, e_got = rel_err(n, o), rel_err(x, o)
        report[name] = (e_got, e_naive)
        assert e_got <= 2 * e_naive + FLOOR[dtype], (name, e_got, e_naive)
    return report


LOGPROB_NAMES = ("logp", "entropy", "dh", "dW")


def gopd_closure(T, seed, lam, logp_anchor):
    """token_loss_fn over gopd_mega.objective.gopd_token_loss, with aggregation weights."""
    g = torch.Generator().manual_seed(seed)
    dev = logp_anchor.device

    def randn():
        return torch.randn(T, generator=g, dtype=torch.float64).to(dev)

    teacher = logp_anchor + 0.5 * randn()
    ref = logp_anchor + 0.3 * randn()
    sampler = logp_anchor + 0.2 * randn()
    # old log-probs well inside / well outside the clip range so that rounding never flips a branch
    offsets = torch.tensor([-0.5, -0.05, 0.05, 0.5, -1.5], dtype=torch.float64)
    old = logp_anchor + offsets[torch.randint(0, 5, (T,), generator=g)].to(dev)
    omega = (torch.rand(T, generator=g, dtype=torch.float64) / T).to(dev)
    settings = LossSettings(lam=lam)

    def token_loss_fn(logp, sl):
        loss, _, _ = gopd_token_loss(
            logp, teacher_logp=teacher[sl].to(logp.dtype), ref_logp=ref[sl].to(logp.dtype),
            sampler_logp=sampler[sl].to(logp.dtype), old_logp=old[sl].to(logp.dtype),
            settings=settings)
        return omega[sl].to(logp.dtype) * loss

    return token_loss_fn


def run_loss(backend, h, w, y, dtype, *, token_loss_fn, **kw):
    hh = h.detach().to(dtype).requires_grad_()
    ww = w.detach().to(dtype).requires_grad_()
    loss, logp, ent = kernels.linear_logprob_loss(hh, ww, y, token_loss_fn, backend=backend, **kw)
    assert not logp.requires_grad and not ent.requires_grad
    (loss * 1.5).backward()  # grad_output != 1 exercises the saved-gradient scaling
    return loss, logp, hh.grad, ww.grad
