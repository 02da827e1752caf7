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
import kernel_helpers  # noqa: E402
from kernel_helpers import (FLOOR, LOGPROB_NAMES, check_against_oracle,  # noqa: E402
                                  gopd_closure, quantised, rel_err, run_logprob, run_loss)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(**kw):
    """The shared random inputs, on the device the triton backend runs on here."""
    return tuple(t.to(DEV) for t in kernel_helpers.make_inputs(**kw))


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
@pytest.mark.parametrize("T,n_splits", [(37, 1), (37, 3), (150, 2)])
def test_triton_inference_dot_kernel(dtype, T, n_splits):
    """tl.dot online-logsumexp kernel; bf16 is upcast before tl.dot under the interpreter.
    T=150: several token tiles and a partial launch group."""
    from kernels import triton_logprob

    h, w, y = make_inputs(T=T, H=96, V=1000, seed=7)
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


@pytest.mark.parametrize("dtype,logits_dtype", [(torch.float32, None), (torch.float16, None),
                                                 (torch.float16, torch.float16)])
def test_triton_fused_gopd_loss(dtype, logits_dtype):
    """fp16 exercises the dlogits written over the first half of each fp32 logits row; an fp16
    logits chunk, the dlogits written in place."""
    h, w, y = make_inputs(seed=2)
    V = w.shape[0] - 24
    anchor = kernels.linear_logprob(h, w, y, vocab_valid=V, temperature=0.7, backend="torch")
    fn = gopd_closure(h.shape[0], seed=3, lam=1.25, logp_anchor=anchor.detach())

    def run(backend, hq, wq, yy, dt, **kw):
        return run_loss(backend, hq, wq, yy, dt, token_loss_fn=fn, **kw)

    check_against_oracle("triton", h, w, y, dtype, run, ("loss", "logp", "dh", "dW"),
                         vocab_valid=V, temperature=0.7, chunk_size=16, logits_dtype=logits_dtype)


def test_dlogits_narrowed_into_the_logits_rows():
    """fp32 logits -> fp16 dlogits in the same storage: values equal the torch row math's."""
    from kernels import chunked, triton_logprob

    torch.manual_seed(3)
    Tc, n = 7, 1000  # n not a multiple of the row block
    z = torch.randn(Tc, n, dtype=torch.float32, device=DEV) * 3
    lse = torch.logsumexp(z, 1)
    mu = (torch.softmax(z, 1) * z).sum(1)
    g, ge = torch.randn(Tc, device=DEV), torch.randn(Tc, device=DEV)
    tgt = torch.randint(0, n, (Tc,), device=DEV)
    owned = torch.rand(Tc, device=DEV) > 0.3
    want = chunked.torch_dlogits(z.clone(), lse, mu, g, ge, tgt, owned, 1 / 0.7, torch.float16)
    zz = z.clone()
    got = triton_logprob.triton_dlogits(zz, lse, mu, g, ge, tgt, owned, 1 / 0.7, torch.float16)
    assert got.dtype == torch.float16 and got.shape == (Tc, n)
    assert got.untyped_storage().data_ptr() == zz.untyped_storage().data_ptr()
    assert got.stride() == (2 * n, 1)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-3 * want.abs().max())
    # a non-contiguous logits view falls back to a fresh buffer
    got2 = triton_logprob.triton_dlogits(torch.cat([z, z], 1)[:, :n], lse, mu, g, ge, tgt, owned,
                                         1 / 0.7, torch.float16)
    torch.testing.assert_close(got2.float(), want.float(), rtol=0, atol=2e-3 * want.abs().max())


@pytest.mark.parametrize("backend,dtype", [("chunked", torch.float64), ("triton", torch.float16)])
def test_fused_loss_adds_dw_into_caller_accumulator(backend, dtype):
    """grad_weight_acc (megatron main_grad style): acc_after = acc_before + dW, padding rows and
    autograd's weight.grad untouched, dh unchanged; backward with a gradient != 1 is refused."""
    h, w, y = make_inputs(seed=5)
    V = w.shape[0] - 24
    anchor = kernels.linear_logprob(h, w, y, vocab_valid=V, backend="torch").detach()
    fn = gopd_closure(h.shape[0], seed=6, lam=1.25, logp_anchor=anchor)
    hq, wq = quantised(h, w, dtype)
    kw = dict(vocab_valid=V, temperature=0.7, chunk_size=16)
    hh = hq.detach().requires_grad_()
    ww = wq.detach().requires_grad_()
    loss64 = kernels.linear_logprob_loss(hh, ww, y, fn, backend="torch", **kw)[0]
    loss64.backward()
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    before = torch.randn(w.shape, dtype=acc_dtype, device=DEV)
    acc = before.clone()
    h2 = h.to(dtype).requires_grad_()
    w2 = w.to(dtype).requires_grad_()
    loss, _, _ = kernels.linear_logprob_loss(h2, w2, y, fn, backend=backend,
                                             grad_weight_acc=acc, **kw)
    loss.backward()
    assert w2.grad is None
    tol = FLOOR[dtype] * 50
    assert rel_err(acc - before, ww.grad) < tol
    assert torch.equal(acc[V:], before[V:])
    assert rel_err(h2.grad, hh.grad) < tol
    loss, _, _ = kernels.linear_logprob_loss(h2, w2, y, fn, backend=backend,
                                             grad_weight_acc=acc, **kw)
    with pytest.raises(RuntimeError, match="gradient 1"):
        (2 * loss).backward()
    with pytest.raises(ValueError, match="grad_weight_acc"):
        kernels.linear_logprob_loss(h2, w2, y, fn, backend=backend, grad_weight_acc=acc[:V], **kw)


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
    for b, low in (("triton", False), ("triton", True), ("chunked", False)):
        for ld in (None, dtype):
            lp = kernels.linear_logprob_inference(h.to(dtype), w.to(dtype), y, backend=b,
                                                  low_memory=low, logits_dtype=ld)
            assert rel_err(lp, lp64) <= 2 * rel_err(lpn, lp64) + FLOOR[dtype], (b, low, ld)
    check_against_oracle("triton", h, w, y, dtype, run_logprob, LOGPROB_NAMES, chunk_size=256)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("external_acc", [False, True])
def test_gpu_fused_loss_bf16(external_acc):
    """bf16 fused loss on the GPU (cuBLAS fp32-output GEMMs, dlogits narrowed to bf16 inside the
    fp32 logits rows, dW into an fp32 accumulator): loss, logp, dh, dW vs the fp64 oracle, no
    worse than twice the plain bf16 torch path's error."""
    torch.manual_seed(1)
    T, H, V = 1024, 1024, 18992
    h = torch.randn(T, H, device=DEV, dtype=torch.float64)
    w = torch.randn(V, H, device=DEV, dtype=torch.float64) * (3.0 / H**0.5)
    y = torch.randint(0, V, (T,), device=DEV)
    y[::17] = -100
    coef = torch.randn(T, device=DEV, dtype=torch.float64) / T

    def fn(lp, sl):
        return coef[sl].to(lp.dtype) * lp

    def run(backend, hq, wq, yy, dt, **kw):
        hh = hq.detach().to(dt).requires_grad_()
        ww = wq.detach().to(dt).requires_grad_()
        acc = (torch.zeros(ww.shape, device=DEV, dtype=torch.float32)
               if external_acc and backend == "triton" else None)
        loss, logp, _ = kernels.linear_logprob_loss(hh, ww, yy, fn, backend=backend,
                                                    grad_weight_acc=acc, **kw)
        loss.backward()
        return loss, logp, hh.grad, (acc if acc is not None else ww.grad)

    check_against_oracle("triton", h, w, y, torch.bfloat16, run, ("loss", "logp", "dh", "dW"),
                         chunk_size=384, temperature=0.9)
