"""Training-state checkpoints: atomic, per rank, resumable.

Layout of ``<out_dir>/checkpoints/``:
    step_000040/                 a complete checkpoint
        rank_00000.pt ...        each rank's model shard, optimizer, scheduler and RNG state
        trainer_state.json       step, data position, world size, config (rank 0)
        COMPLETE                 written last; a directory without it is never loaded
    step_000050.partial/         a save in progress (or one that died): ignored, removed on retry
    latest                       name of the newest complete checkpoint (atomically replaced)

A run killed mid-save leaves only a ``.partial`` directory, which nothing mistakes for a good
checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class CheckpointManager:
    def __init__(self, out_dir: str | os.PathLike):
        self.root = Path(out_dir) / "checkpoints"

    def save(self, step: int, rank_state: dict[str, Any], trainer_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it with its own ``rank_state``."""
        final = self.root / f"step_{step:06d}"
        partial = self.root / f"step_{step:06d}.partial"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
        _barrier()
        torch.save({**rank_state, "rng": rng_state()}, partial / f"rank_{_rank():05d}.pt")
        _barrier()
        if _rank() == 0:
            meta = {"step": step, "world_size": _world(), **trainer_state}
            (partial / "trainer_state.json").write_text(json.dumps(meta, indent=2, default=str))
            (partial / COMPLETE).write_text("ok\n")
            if final.exists():  # re-saving the same step after a resume
                shutil.rmtree(final)
            os.replace(partial, final)
            tmp = self.root / "latest.tmp"
            tmp.write_text(final.name)
            os.replace(tmp, self.root / "latest")
        _barrier()
        return final

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        if not self.root.is_dir():
            return None
        complete = sorted(p for p in self.root.glob("step_*") if p.is_dir() and (p / COMPLETE).exists())
        return complete[-1] if complete else None

    def load(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Returns (this rank's state, trainer_state); restores the RNG state."""
        if not (path / COMPLETE).exists():
            raise RuntimeError(f"checkpoint {path} is incomplete (no {COMPLETE} marker); refusing to load it")
        meta = json.loads((path / "trainer_state.json").read_text())
        if meta["world_size"] != _world():
            raise RuntimeError(
                f"checkpoint {path} was written by {meta['world_size']} ranks, this run has {_world()}; "
                "resume with the same world size"
            )
        state = torch.load(path / f"rank_{_rank():05d}.pt", weights_only=False)
        set_rng_state(state.pop("rng"))
        return state, meta
