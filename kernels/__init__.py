"""gopd-mega kernels: log-prob of the sampled token straight from hidden states, without ever
holding the [T, V] logits (student fwd+bwd, teacher forward-only, fused G-OPD loss).

    logp_t = z[t, y_t] - logsumexp_v z[t, v],   z = (h @ W^T) / temperature  (fp32 accumulation)

Public API (same arguments for every backend):
    linear_logprob(hidden, weight, targets, *, vocab_start=0, vocab_valid=None, group=None,
                   temperature=1.0, ignore_index=-100, return_entropy=False, reduce_dh=True,
                   backend="auto", chunk_size=None, logits_dtype=None)
        -> logp [T] (, entropy [T])
    linear_logprob_inference(...same...)  forward only, no autograd state
    linear_logprob_loss(hidden, weight, targets, token_loss_fn, ..., grad_weight_acc=None)
        -> (loss, logp, entropy)
    full_vocab_gopd_loss(h_s, w_s, h_t, w_t, h_r, w_r, *, lam, temperature=1.0,
                         token_weight=None, group=None, vocab_start=0, vocab_valid=None,
                         grad_weight_acc=None, backend=None, reduce_dh=True)
        -> (loss [N], log_z [N])   the exact full-vocabulary G-OPD loss (kernels.full_vocab)

``logits_dtype`` (chunked / triton backends): the dtype of the one logits chunk they keep. None =
fp32: logits accurate to fp32 (logp ~1e-6 relative error with bf16 inputs). The input dtype
(bf16) rounds the logits like megatron's own bf16 output layer and the plain torch path (logp
~4e-4), halves the chunk buffer, and so doubles the token chunk in the same memory.

Backends: "torch" (kernels.reference: full logits, the oracle), "chunked" (token chunks, torch row
math), "triton" (cuBLAS GEMMs + fused Triton row kernels; with ``low_memory`` the forward-only
path uses a tl.dot online-logsumexp kernel instead, O(T) memory), "auto" = triton on CUDA
tensors, chunked otherwise.

Tensor parallelism (vocab-parallel output layer): pass the TP ``group`` (a plain
torch.distributed ProcessGroup), this rank's first global vocab id ``vocab_start`` and the number
of real rows ``vocab_valid`` of its weight shard; see kernels.vocab_parallel.

This package imports only torch, triton and the standard library (Triton lazily, on first use of
the triton backend). Its import name clashes with the HF hub package ``kernels``; the marker below
tells them apart.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import chunked, fused_loss, reference
from .full_vocab import full_vocab_gopd_loss

__gopd_mega_kernels__ = True

BACKENDS = ("auto", "triton", "chunked", "torch")

__all__ = [
    "BACKENDS",
    "full_vocab_gopd_loss",
    "linear_logprob",
    "linear_logprob_inference",
    "linear_logprob_loss",
]


def _resolve(backend: str, hidden: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if hidden.is_cuda else "chunked"
    return backend


def _triton():
    # Imported lazily: triton decides at decoration time whether kernels run in the interpreter.
    from . import triton_logprob

    return triton_logprob


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int = 0,
    vocab_valid: int | None = None,
    group=None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    reduce_dh: bool = True,
    backend: str = "auto",
    chunk_size: int | None = None,
    logits_dtype: torch.dtype | None = None,
):
    """Per-token log-prob (fp32 [T]; entropy too if asked), differentiable w.r.t. hidden and
    weight. Ignored tokens get logp 0, entropy 0 and zero gradient. With a TP group each rank gets
    its own dW slice and (``reduce_dh``) the full dh; set ``reduce_dh=False`` when the caller's
    layer already all-reduces the input gradient."""
    kw = {
        "vocab_start": vocab_start,
        "vocab_valid": vocab_valid,
        "group": group,
        "temperature": temperature,
        "ignore_index": ignore_index,
        "reduce_dh": reduce_dh,
        "chunk_size": chunk_size,
        "return_entropy": return_entropy,
        "logits_dtype": logits_dtype,
    }
    b = _resolve(backend, hidden)
    if b == "torch":
        return reference.linear_logprob(hidden, weight, targets, **kw)
    row_ops = _triton().TRITON_ROW_OPS if b == "triton" else chunked.TORCH_ROW_OPS
    return chunked.linear_logprob(hidden, weight, targets, row_ops=row_ops, **kw)


def linear_logprob_inference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int = 0,
    vocab_valid: int | None = None,
    group=None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    reduce_dh: bool = True,
    backend: str = "auto",
    chunk_size: int | None = None,
    logits_dtype: torch.dtype | None = None,
    low_memory: bool = False,
):
    """Forward-only log-prob for teachers / the reference model: no autograd graph, nothing
    saved. Extra memory: one logits chunk (chunked; triton: cuBLAS GEMM + Triton row stats), or
    O(T) with ``low_memory`` on the triton backend (tl.dot kernel that never writes logits,
    slower on an H200: benchmarks/RESULTS.md)."""
    kw = {
        "vocab_start": vocab_start,
        "vocab_valid": vocab_valid,
        "group": group,
        "temperature": temperature,
        "ignore_index": ignore_index,
        "return_entropy": return_entropy,
    }
    b = _resolve(backend, hidden)
    with torch.no_grad():
        if b == "torch":
            return reference.linear_logprob_inference(hidden, weight, targets, **kw)
        if b == "triton" and low_memory:
            return _triton().linear_logprob_inference(hidden, weight, targets, **kw)
        row_ops = _triton().TRITON_ROW_OPS if b == "triton" else chunked.TORCH_ROW_OPS
        return chunked.linear_logprob_inference(
            hidden, weight, targets, chunk_size=chunk_size, logits_dtype=logits_dtype, row_ops=row_ops, **kw
        )


def linear_logprob_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_loss_fn: Callable[[torch.Tensor, slice], torch.Tensor],
    *,
    vocab_start: int = 0,
    vocab_valid: int | None = None,
    group=None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduce_dh: bool = True,
    backend: str = "auto",
    chunk_size: int | None = None,
    grad_weight_acc: torch.Tensor | None = None,
    logits_dtype: torch.dtype | None = None,
):
    """Fused student loss: returns (loss scalar, logp [T] detached, entropy [T] detached) with
    loss = sum_t token_loss_fn(logp_chunk, slice)[t] over non-ignored tokens. The gradient is
    formed during the forward (one pass over the logits); backward scales the saved dh/dW.
    ``grad_weight_acc`` (fp32, the weight shard's shape, e.g. megatron's main_grad): dW is added
    into it in the forward instead of being returned through autograd (see kernels.fused_loss)."""
    kw = {
        "vocab_start": vocab_start,
        "vocab_valid": vocab_valid,
        "group": group,
        "temperature": temperature,
        "ignore_index": ignore_index,
        "reduce_dh": reduce_dh,
        "chunk_size": chunk_size,
        "logits_dtype": logits_dtype,
    }
    b = _resolve(backend, hidden)
    if b == "torch":
        if grad_weight_acc is not None:
            raise ValueError("grad_weight_acc is for the chunked and triton backends")
        return reference.linear_logprob_loss(hidden, weight, targets, token_loss_fn, **kw)
    row_ops = _triton().TRITON_ROW_OPS if b == "triton" else chunked.TORCH_ROW_OPS
    return fused_loss.linear_logprob_loss(
        hidden, weight, targets, token_loss_fn, row_ops=row_ops, grad_weight_acc=grad_weight_acc, **kw
    )
