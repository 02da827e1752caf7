"""kernels, vocab-parallel: 2 and 3 gloo processes with uneven shards and padding rows.

Every rank must reproduce the full-vocab reference: logp (and entropy) everywhere, its own slice of
dW (zero on its padding rows), and the full dh. Checked for linear_logprob, the forward-only
variant and the fused G-OPD loss, for the chunked and torch backends, and once for triton under
the interpreter.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

os.environ.setdefault("TRITON_INTERPRET", "1") if not torch.cuda.is_available() else None

V, T, H = 1000, 29, 64
SPLITS = {2: [501, 499], 3: [334, 333, 333]}
PAD = 5  # every shard has max(split) + PAD rows: the tail rows of each shard are padding


def _inputs():
    g = torch.Generator().manual_seed(11)
    h = torch.randn(T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * (3.0 / H**0.5)
    y = torch.randint(0, V, (T,), generator=g)
    y[[2, 17]] = -100
    return h, w, y


def _loss_fn():
    from gopd_mega.objective import LossSettings, gopd_token_loss

    g = torch.Generator().manual_seed(12)
    teacher = -3.0 + torch.randn(T, generator=g, dtype=torch.float64)
    ref = -3.0 + torch.randn(T, generator=g, dtype=torch.float64)
    omega = torch.rand(T, generator=g, dtype=torch.float64) / T
    settings = LossSettings(lam=1.25)

    def fn(logp, sl):
        loss, _, _ = gopd_token_loss(logp, teacher_logp=teacher[sl].to(logp.dtype),
                                     ref_logp=ref[sl].to(logp.dtype), sampler_logp=None,
                                     old_logp=None, settings=settings)
        return omega[sl].to(logp.dtype) * loss

    return fn


def _close(a, b, what, rank, tol=2e-5):
    a, b = a.detach().double(), b.detach().double()
    err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
    assert err < tol, f"rank {rank}: {what} rel err {err}"


def _worker(rank: int, world: int, init_file: str, backends: tuple[str, ...]):
    import kernels

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        sizes = SPLITS[world]
        start, n = sum(sizes[:rank]), sizes[rank]
        rows = max(sizes) + PAD
        h64, w64, y = _inputs()
        h, w = h64.float(), w64.float()
        shard = torch.randn(rows, H) * 7.0  # padding rows hold garbage: must never be read
        shard[:n] = w[start:start + n]
        fn = _loss_fn()
        common = dict(temperature=0.7, chunk_size=8)
        tp = dict(vocab_start=start, vocab_valid=n, group=group, **common)

        # full-vocab reference on this rank (fp64)
        hr, wr = h64.clone().requires_grad_(), w64.clone().requires_grad_()
        lp_ref, ent_ref = kernels.linear_logprob(hr, wr, y, return_entropy=True,
                                                 backend="torch", **common)
        up = torch.linspace(-1, 1, T, dtype=torch.float64)
        (lp_ref * up).sum().backward()
        hr2, wr2 = h64.clone().requires_grad_(), w64.clone().requires_grad_()
        loss_ref, _, _ = kernels.linear_logprob_loss(hr2, wr2, y, fn, backend="torch", **common)
        loss_ref.backward()

        for backend in backends:
            hh, ww = h.clone().requires_grad_(), shard.clone().requires_grad_()
            lp, ent = kernels.linear_logprob(hh, ww, y, return_entropy=True, backend=backend,
                                             **tp)
            (lp * up.float()).sum().backward()
            _close(lp, lp_ref, f"{backend} logp", rank)
            _close(ent, ent_ref, f"{backend} entropy", rank)
            _close(hh.grad, hr.grad, f"{backend} dh", rank)
            _close(ww.grad[:n], wr.grad[start:start + n], f"{backend} dW slice", rank)
            assert torch.all(ww.grad[n:] == 0), f"rank {rank}: padding rows got gradient"

            lpi, enti = kernels.linear_logprob_inference(h, shard, y, return_entropy=True,
                                                         backend=backend, **tp)
            _close(lpi, lp_ref, f"{backend} inference logp", rank)
            _close(enti, ent_ref, f"{backend} inference entropy", rank)
            if backend == "triton":  # the O(T)-memory tl.dot kernel
                lpi, enti = kernels.linear_logprob_inference(h, shard, y, return_entropy=True,
                                                             backend=backend, low_memory=True,
                                                             **tp)
                _close(lpi, lp_ref, "triton low_memory inference logp", rank)
                _close(enti, ent_ref, "triton low_memory inference entropy", rank)

            hh, ww = h.clone().requires_grad_(), shard.clone().requires_grad_()
            loss, lpl, _ = kernels.linear_logprob_loss(hh, ww, y, fn, backend=backend, **tp)
            loss.backward()
            _close(loss, loss_ref, f"{backend} loss", rank)
            _close(lpl, lp_ref, f"{backend} loss logp", rank)
            _close(hh.grad, hr2.grad, f"{backend} loss dh", rank)
            _close(ww.grad[:n], wr2.grad[start:start + n], f"{backend} loss dW slice", rank)
            assert torch.all(ww.grad[n:] == 0)

            # reduce_dh=False: each rank keeps its partial dh; their sum is the full dh
            hh = h.clone().requires_grad_()
            lp = kernels.linear_logprob(hh, shard, y, backend=backend, reduce_dh=False, **tp)
            (lp * up.float()).sum().backward()
            total = hh.grad.clone()
            dist.all_reduce(total, group=group)
            _close(total, hr.grad, f"{backend} partial dh sum", rank)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, backends: tuple[str, ...]):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "init"), backends), nprocs=world,
                 join=True)


@pytest.mark.distributed
def test_vocab_parallel_two_ranks():
    _spawn(2, ("chunked", "torch"))


@pytest.mark.distributed
def test_vocab_parallel_three_ranks_uneven_with_triton():
    _spawn(3, ("chunked", "torch", "triton"))
