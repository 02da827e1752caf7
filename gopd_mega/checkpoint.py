"""Training-state checkpoints: atomic and layout-free (resume at another DP, TP or PP size).

Layout of ``<out_dir>/checkpoints/``:
    step_000040/                 a complete checkpoint
        train_state/             student weights + AdamW moments under canonical names, full
                                 tensors, torch.distributed.checkpoint (gopd_mega.hf.train_state)
        rng_00000.pt ...         each rank's RNG state (restored when the world size is the same;
                                 rollout seeds derive from the step, so resuming elsewhere is exact
                                 up to nothing that depends on these)
        trainer_state.json       step, data position, world size, config (rank 0)
        COMPLETE                 written last; a directory without it is never loaded
    step_000050.partial/         a save in progress (or one that died): ignored, removed on retry
    latest                       name of the newest complete checkpoint (atomically replaced)

A run killed mid-save leaves only a ``.partial`` directory, which nothing mistakes for a good
checkpoint.

Retention (``keep_last=N``, from ``train.keep_last``): after a save has completed, rank 0 deletes
the complete checkpoints older than the N newest. The one just written is never deleted (so the
only complete checkpoint survives too), nor anything incomplete or ``.partial``. None or 0 keeps
every checkpoint.
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

from gopd_mega.hf.train_state import load_train_state, save_train_state

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
    def __init__(self, out_dir: str | os.PathLike, keep_last: int | None = None):
        self.root = Path(out_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, step: int, model, optimizer, trainer_state: dict[str, Any]) -> Path:
        """Collective: the student ``model`` (ShardedGPT), its optimizer and rank 0's trainer state."""
        final = self.root / f"step_{step:06d}"
        partial = self.root / f"step_{step:06d}.partial"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
        _barrier()
        save_train_state(model, optimizer, partial / "train_state")
        torch.save(rng_state(), partial / f"rng_{_rank():05d}.pt")
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
            self.prune(keep=final)
        _barrier()
        return final

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (by step)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if p.is_dir() and (p / COMPLETE).exists())

    def prune(self, keep: Path | None = None) -> list[Path]:
        """Delete complete checkpoints older than the ``keep_last`` newest (rank 0, after a
        successful save); ``keep`` (the one just written) is never deleted. Returns what went."""
        if not self.keep_last:
            return []
        done = self.complete()
        newest = set(done[-self.keep_last:])
        removed = [p for p in done if p not in newest and p != keep]
        for p in removed:
            # Take the COMPLETE marker away first: a deletion interrupted half-way leaves a
            # directory that is never mistaken for a good checkpoint.
            (p / COMPLETE).unlink()
            shutil.rmtree(p)
        return removed

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        complete = self.complete()
        return complete[-1] if complete else None

    def load(self, path: Path, model, optimizer) -> dict[str, Any]:
        """Collective: load weights and optimizer into ``model``/``optimizer`` (any layout) and
        return the trainer state; restores the RNG state when the world size is unchanged."""
        if not (path / COMPLETE).exists():
            raise RuntimeError(f"checkpoint {path} is incomplete (no {COMPLETE} marker); refusing to load it")
        meta = json.loads((path / "trainer_state.json").read_text())
        load_train_state(model, optimizer, path / "train_state")
        if meta["world_size"] == _world():
            set_rng_state(torch.load(path / f"rng_{_rank():05d}.pt", weights_only=False))
        return meta
