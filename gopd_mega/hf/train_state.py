"""Layout-free training state (weights + AdamW moments) with torch.distributed.checkpoint.

gopd_mega/checkpoint.py saves each rank's own shard, so a run resumes only on the same world
size. This module saves the student's state under CANONICAL names as full (unsharded) tensors, so
a run can resume with a different DP size, and also a different TP/PP layout:

    <dir>/                          written by DCP (rank 0 writes the replicated full tensors)
        .metadata, __0_0.distcp ...
        model/<canonical name>          full weight          (ShardedGPT.full_state_dict)
        exp_avg/<canonical name>        full AdamW 1st moment, gathered like the weight
        exp_avg_sq/<canonical name>     full AdamW 2nd moment
        scalars/adam_step, scalars/schedule_step

Why this works for DP: the student's AdamW state is replicated over DP (every DP rank updates
the same TP/PP shard with all-reduced gradients), so the state of one DP replica is the state of
all; the moments are gathered over TP/PP exactly like the weights (same [gate; up] per-shard
order, vocab padding rows dropped) and re-sharded with ``ShardedGPT.shard_of`` on load.
The tied output layer of the last PP stage is not stored: it equals the embedding (weight and,
since its gradient is all-reduced with the embedding's, its moments).

Cost: every rank materialises the full tensors while saving and loading (fine for models that
fit in host memory; a TB-scale model needs per-shard ShardedTensor saving instead).
Writes go to ``<dir>.tmp`` and are renamed once complete (rank 0), so a crash leaves no
directory that looks complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

MOMENTS = ("exp_avg", "exp_avg_sq")


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def _gather_like_params(model, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full canonical tensors of per-parameter tensors ``local`` (local name -> tensor shaped like
    the param), gathered by the model's own full_state_dict (collective)."""
    params = model._params
    saved = {n: p.data for n, p in params.items()}
    try:
        for n, p in params.items():
            p.data = local[n].to(p.dtype) if n in local else torch.zeros_like(p.data)
        return model.full_state_dict()
    finally:
        for n, p in params.items():
            p.data = saved[n]


def _adam(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "opt", optimizer)


def save_train_state(model, optimizer, directory: str | os.PathLike) -> Path:
    """Collective: save ``model`` (a ShardedGPT) and its ``optimizer`` (StudentOptimizer) layout-free."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    adam = _adam(optimizer)
    state: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in model.full_state_dict().items()}
    step = 0.0
    for moment in MOMENTS:
        local = {}
        for n, p in model._params.items():
            st = adam.state.get(p, {})
            if moment in st:
                local[n] = st[moment]
                step = float(st["step"])
        state.update({f"{moment}/{k}": v for k, v in _gather_like_params(model, local).items()})
    state["scalars/adam_step"] = torch.tensor(step)
    state["scalars/schedule_step"] = torch.tensor(float(getattr(optimizer, "schedule_step", 0)))
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if _rank0():
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    _barrier()
    return final


@torch.no_grad()
def load_train_state(model, optimizer, directory: str | os.PathLike) -> None:
    """Collective: load a :func:`save_train_state` directory into ``model`` / ``optimizer`` of ANY
    layout (DP, TP, PP may differ from the saving run's)."""
    template = model.full_state_dict()  # canonical names and full shapes of this architecture
    state = {f"{prefix}/{k}": torch.zeros_like(v) for prefix in ("model",) + MOMENTS for k, v in template.items()}
    state["scalars/adam_step"] = torch.tensor(0.0)
    state["scalars/schedule_step"] = torch.tensor(0.0)
    dcp.load(state, checkpoint_id=str(directory))
    model.load_full_state_dict({k: state[f"model/{k}"] for k in template})
    adam = _adam(optimizer)
    step = state["scalars/adam_step"]
    if float(step) > 0:
        for info in model.param_layout():
            p = model._params[info.local_name]
            adam.state[p] = {
                "step": step.clone(),
                **{m: model.shard_of(info, state[f"{m}/{info.canonical_name}"]).to(p.dtype).clone() for m in MOMENTS},
            }
    if hasattr(optimizer, "schedule_step"):
        optimizer.schedule_step = int(state["scalars/schedule_step"])
