"""kernels: chunked backend vs the fp64 oracle, judged against plain torch's own error in a dtype.

error(backend, dtype) = relative L2 error vs fp64 on the same (rounded) inputs; a backend passes when
error <= 2 * error(plain torch reference in that dtype) + a tiny floor.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernel_helpers import (FLOOR, LOGPROB_NAMES, check_against_oracle, gopd_closure, make_inputs, quantised, rel_err,
                            run_logprob, run_loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,chunk", [(1.0, 16), (0.7, 10), (0.7, 1000)])
def test_chunked_linear_logprob_matches_oracle(dtype, temperature, chunk):
    h, w, y = make_inputs()
    V = w.shape[0] - 24
    check_against_oracle("chunked", h, w, y, dtype, run_logprob, LOGPROB_NAMES, vocab_valid=V,
                         temperature=temperature, chunk_size=chunk)


def test_ignored_tokens_and_padding_rows():
    h, w, y = make_inputs()
    V = w.shape[0] - 24
    logp, ent, dh, dw = run_logprob("chunked", h, w, y, torch.float32, vocab_valid=V,
                                    chunk_size=7)
    ign = y == -100
    assert torch.all(logp[ign] == 0) and torch.all(ent[ign] == 0)
    assert torch.all(dh[ign] == 0)
    assert torch.all(dw[V:] == 0)
    assert torch.all(logp[~ign] < 0) and torch.all(ent[~ign] > 0)


def test_plain_log_softmax_agrees():
    """Sanity check of the oracle itself against torch.log_softmax."""
    h, w, y = make_inputs(pad=0, n_ignored=0)
    z = (h @ w.t()) / 0.7
    want = torch.log_softmax(z, -1).gather(1, y[:, None]).squeeze(1)
    got = kernels.linear_logprob(h, w, y, temperature=0.7, backend="torch")
    assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("backend", ["chunked", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_matches_oracle(backend, dtype):
    h, w, y = make_inputs(seed=1)
    V = w.shape[0] - 24
    hq, wq = quantised(h, w, dtype)
    kw = dict(vocab_valid=V, temperature=0.7, return_entropy=True)
    lp64, ent64 = kernels.linear_logprob_inference(hq, wq, y, backend="torch", **kw)
    lpn, entn = kernels.linear_logprob_inference(h.to(dtype), w.to(dtype), y, backend="torch",
                                                  **kw)
    lp, ent = kernels.linear_logprob_inference(h.to(dtype), w.to(dtype), y, backend=backend,
                                                chunk_size=11, **kw)
    assert lp.dtype == torch.float32 and not lp.requires_grad
    assert rel_err(lp, lp64) <= 2 * rel_err(lpn, lp64) + FLOOR[dtype]
    assert rel_err(ent, ent64) <= 2 * rel_err(entn, ent64) + FLOOR[dtype]


# ---------------------------------------------------------------------------------------------
# Fused loss with the real G-OPD objective


@pytest.mark.parametrize("lam", [0.0, 1.0, 1.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gopd_loss_matches_oracle(lam, dtype):
    h, w, y = make_inputs(seed=2)
    V = w.shape[0] - 24
    anchor = kernels.linear_logprob(h, w, y, vocab_valid=V, temperature=0.7, backend="torch")
    fn = gopd_closure(h.shape[0], seed=3, lam=lam, logp_anchor=anchor.detach())

    def run(backend, hq, wq, yy, dt, **kw):
        return run_loss(backend, hq, wq, yy, dt, token_loss_fn=fn, **kw)

    rep = check_against_oracle("chunked", h, w, y, dtype, run, ("loss", "logp", "dh", "dW"),
                               vocab_valid=V, temperature=0.7, chunk_size=10)
    assert rep["loss"][0] < 1e-2


def test_fused_loss_equals_autograd_through_gopd_loss_fp64():
    """Fused (gradient formed in the forward) == autograd through full logits + gopd_token_loss,
    in fp64 to round-off."""
    h, w, y = make_inputs(seed=4)
    V = w.shape[0] - 24
    anchor = kernels.linear_logprob(h, w, y, vocab_valid=V, backend="torch").detach()
    fn = gopd_closure(h.shape[0], seed=5, lam=1.25, logp_anchor=anchor)
    kw = dict(vocab_valid=V, temperature=0.7)
    ref = run_loss("torch", h, w, y, torch.float64, token_loss_fn=fn, **kw)
    got = run_loss("chunked", h, w, y, torch.float64, token_loss_fn=fn, chunk_size=8, **kw)
    for r, x in zip(ref, got):
        assert torch.allclose(x, r, rtol=1e-10, atol=1e-12)


def test_default_backend_and_errors():
    h, w, y = make_inputs(T=5, H=8, V=30, pad=0, n_ignored=0)
    a = kernels.linear_logprob(h.float(), w.float(), y)  # auto -> chunked on CPU
    b = kernels.linear_logprob(h.float(), w.float(), y, backend="torch")
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError):
        kernels.linear_logprob(h, w, y, backend="cuda")
    with pytest.raises(ValueError):
        kernels.linear_logprob(h, w, y, vocab_valid=31)


@pytest.mark.parametrize("kind", ["logprob", "loss"])
def test_bf16_logits_chunk(kind):
    """logits_dtype = the input dtype (bf16 logits chunk, as megatron's bf16 output layer): no
    worse than twice the plain bf16 torch path, which rounds its logits the same way."""
    h, w, y = make_inputs(seed=8)
    V = w.shape[0] - 24
    kw = dict(vocab_valid=V, temperature=0.7, chunk_size=12, logits_dtype=torch.bfloat16)
    if kind == "logprob":
        check_against_oracle("chunked", h, w, y, torch.bfloat16, run_logprob, LOGPROB_NAMES, **kw)
        return
    anchor = kernels.linear_logprob(h, w, y, vocab_valid=V, temperature=0.7, backend="torch")
    fn = gopd_closure(h.shape[0], seed=9, lam=1.25, logp_anchor=anchor.detach())

    def run(backend, hq, wq, yy, dt, **kw):
        if dt == torch.float64:
            kw.pop("logits_dtype")
        return run_loss(backend, hq, wq, yy, dt, token_loss_fn=fn, **kw)

    check_against_oracle("chunked", h, w, y, torch.bfloat16, run, ("loss", "logp", "dh", "dW"),
                         **kw)


def test_logits_dtype_is_checked():
    h, w, y = make_inputs(T=5, H=8, V=30, pad=0, n_ignored=0)
    with pytest.raises(ValueError, match="logits_dtype"):
        kernels.linear_logprob(h.bfloat16(), w.bfloat16(), y, logits_dtype=torch.float16)
