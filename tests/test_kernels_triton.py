"""kernels, triton backend: under TRITON_INTERPRET=1 on CPU (small shapes), and on a GPU when present.

The interpreter flag must be set before kernels.triton_logprob is imported (triton decides at
decoration time); kernels imports that module lazily, so setting it here is enough on CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

import kernels  # noqa: E402
from test_kernels_logprob import (FLOOR, LOGPROB_NAMES, check_against_oracle,  # noqa: E402
                                  gopd_closure, make_inputs, quantised, rel_err, run_logprob,
                                  run_loss)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_interpreter_is_active_on_cpu():
    from kernels import triton_logprob

    assert triton_logprob.INTERPRET or torch.cuda.is_available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_linear_logprob_matches_oracle(dtype):
    h, w, y = make_inputs(T=37, H=96, V=1000)
    V = w.shape[0] - 24
    check_against_oracle("triton", h, w, y, dtype, run_logprob, LOGPROB_NAMES, vocab_valid=V,
                         temperature=0.7, chunk_size=20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_splits", [1, 3])
def test_triton_inference_dot_kernel(dtype, n_splits):
    """tl.dot online-logsumexp kernel; bf16 is upcast before tl.dot under the interpreter."""
    from kernels import triton_logprob

    h, w, y = make_inputs(T=37, H=96, V=1000, seed=7)
    V = w.shape[0] - 24
    hq, wq = quantised(h, w, dtype)
    kw = dict(vocab_valid=V, temperature=0.7, return_entropy=True)
    lp64, ent64 = kernels.linear_logprob_inference(hq, wq, y, backend="torch", **kw)
    lpn, entn = kernels.linear_logprob_inference(h.to(dtype), w.to(dtype), y, backend="torch",
                                                  **kw)
    lp, ent = triton_logprob.linear_logprob_inference(h.to(dtype), w.to(dtype), y,
                                                       n_splits=n_splits, **kw)
    assert rel_err(lp, lp64) <= 2 * rel_err(lpn, lp64) + FLOOR[dtype]
    assert rel_err(ent, ent64) <= 2 * rel_err(entn, ent64) + FLOOR[dtype]
    ign = y == -100
    assert torch.all(lp[ign] == 0)


@pytest.mark.parametrize("lam", [1.25])
def test_triton_fused_gopd_loss(lam):
    h, w, y = make_inputs(seed=2)
    V = w.shape[0] - 24
    anchor = kernels.linear_logprob(h, w, y, vocab_valid=V, temperature=0.7, backend="torch")
    fn = gopd_closure(h.shape[0], seed=3, lam=lam, logp_anchor=anchor.detach())

    def run(backend, hq, wq, yy, dt, **kw):
        return run_loss(backend, hq, wq, yy, dt, token_loss_fn=fn, **kw)

    check_against_oracle("triton", h, w, y, torch.float32, run, ("loss", "logp", "dh", "dW"),
                         vocab_valid=V, temperature=0.7, chunk_size=16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_realistic_tiles(dtype):
    """bf16 tl.dot at real tile sizes (the interpreter cannot run bf16 dots), 18992 = 151936/8
    columns exercises tail masking."""
    torch.manual_seed(0)
    T, H, V = 1024, 1024, 18992
    h = torch.randn(T, H, device=DEV, dtype=torch.float64)
    w = torch.randn(V, H, device=DEV, dtype=torch.float64) * (3.0 / H**0.5)
    y = torch.randint(0, V, (T,), device=DEV)
    hq, wq = h.to(dtype).double(), w.to(dtype).double()
    lp64 = kernels.linear_logprob_inference(hq, wq, y, backend="torch")
    lpn = kernels.linear_logprob_inference(h.to(dtype), w.to(dtype), y, backend="torch")
    for b in ("triton", "chunked"):
        lp = kernels.linear_logprob_inference(h.to(dtype), w.to(dtype), y, backend=b)
        assert rel_err(lp, lp64) <= 2 * rel_err(lpn, lp64) + FLOOR[dtype], b
    check_against_oracle("triton", h, w, y, dtype, run_logprob, LOGPROB_NAMES, chunk_size=256)
