"""Training-state checkpoints: atomic, verified on load, layout-free (resume at another DP, TP or PP size).

Layout of ``<out_dir>/checkpoints/``:
    step_000040/                 a complete checkpoint
        train_state/             student weights + AdamW moments under canonical names, full
                                 tensors, torch.distributed.checkpoint (gopd_mega.hf.train_state)
        rng_00000.safetensors    each rank's RNG state as tensors (torch, numpy, python), restored
                                 when the world size is the same (rollout seeds derive from the
                                 step, so resuming elsewhere is exact up to nothing that uses these)
        trainer_state.json       step, data position, world size, config (rank 0)
        manifest.json            written last: step, and the size and sha256 of every other file
    step_000050.partial/         a save in progress (or one that died): never loaded, removed
    step_000030.deleting/        a checkpoint being deleted by keep_last: never loaded, removed
    latest                       name of the newest complete checkpoint (for people; resume
                                 does not read it)

Saving writes everything into ``.partial``, the manifest last, then renames the directory. A
checkpoint is therefore complete exactly when its manifest exists; the step a resume continues
from is the manifest's, not the directory's name.

Resuming (:meth:`CheckpointManager.resume_point`) takes the newest checkpoint (by the step its
manifest records) whose files all have the size and sha256 the manifest lists, and says which
newer ones it skipped and why; ``.partial`` and ``.deleting`` directories and unknown names are
never candidates. Nothing read on resume runs code: the manifest and trainer state are JSON, the
RNG state safetensors, and DCP's pickled ``.metadata`` is checksummed first and then read with an
unpickler that admits only DCP's own metadata classes (gopd_mega.hf.train_state). The checksums
detect truncation and corruption, not a forger, who can rewrite the manifest too: a checkpoint
directory is trusted for its numbers, never for code.

Retention (``keep_last=N``, from ``train.keep_last``): after a save has completed, rank 0 renames
the complete checkpoints older than the N newest to ``.deleting`` (atomic), then deletes them, so
an interrupted deletion leaves only a ``.deleting`` directory, removed by the next run. The one
just written is never deleted. None or 0 keeps every checkpoint.

Every rank-0-only step runs through gopd_mega.failures.on_rank0, so a failure there (a full disk)
stops every rank with one message; a failed save removes its ``.partial`` and keeps the previous
checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open

from gopd_mega.failures import on_every_rank, on_rank0
from gopd_mega.hf.safetensors_io import CheckpointError
from gopd_mega.hf.train_state import load_train_state, save_train_state
from gopd_mega.storage import StorageError, honour_umask, require_space, save_safetensors, sha256

MANIFEST = "manifest.json"
FORMAT = "gopd-mega checkpoint 1"
_NAME = re.compile(r"step_(\d+)")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- RNG state


def save_rng_state(path: Path) -> None:
    """This process's torch, numpy and python RNG states as tensors (no pickle)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss_next = random.getstate()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),  # type: ignore[attr-defined]  # the legacy state tuple: keys is an ndarray
        "python": torch.tensor(words, dtype=torch.int64),
    }
    meta = {"numpy": json.dumps([int(pos), int(has_gauss), float(cached)]), "python": json.dumps([version, gauss_next])}
    save_safetensors(tensors, path, metadata=meta)


def load_rng_state(path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict: not iterable
        pos, has_gauss, cached = json.loads(meta["numpy"])
        version, gauss_next = json.loads(meta["python"])
    except Exception as exc:  # noqa: BLE001 - not safetensors, or not the RNG state
        raise CheckpointError(f"{path}: unreadable RNG state ({type(exc).__name__}: {exc})") from None
    torch.set_rng_state(t["torch"])
    np.random.set_state(("MT19937", t["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate((version, tuple(int(x) for x in t["python"].tolist()), gauss_next))


# ----------------------------------------------------------------------------- manifest


def write_manifest(directory: Path, step: int) -> Path:
    """Record the size and sha256 of every file under ``directory`` and the step: the last file
    of a checkpoint, written atomically (and synced) once everything else is in place."""
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(directory).as_posix()] = {"size": p.stat().st_size, "sha256": sha256(p)}
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    honour_umask(tmp)
    os.replace(tmp, directory / MANIFEST)
    return directory / MANIFEST


def read_manifest(directory: Path) -> dict:
    """The manifest of a checkpoint directory; CheckpointError when it is missing or malformed."""
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory.name}: no {MANIFEST} (an incomplete save)")
    try:
        manifest = json.loads(path.read_text())
        step, files = int(manifest["step"]), manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{directory.name}: {MANIFEST} is malformed ({exc})") from None
    return {"step": step, "files": files}


def verify(directory: Path) -> dict:
    """Check every file a checkpoint's manifest lists (size, then sha256) and the trainer state's
    step; returns the manifest, raises CheckpointError naming the first file that differs."""
    manifest = read_manifest(directory)
    files = manifest["files"]
    for needed in ("trainer_state.json", "train_state/.metadata"):
        if needed not in files:
            raise CheckpointError(f"{directory.name}: {MANIFEST} does not list {needed}")
    for rel, want in files.items():
        p = directory / rel
        if not p.is_file():
            raise CheckpointError(f"{directory.name}: {rel} is missing")
        size = p.stat().st_size
        if size != want["size"]:
            raise CheckpointError(
                f"{directory.name}: {rel} has {size} bytes, the manifest says {want['size']} (truncated or replaced)"
            )
    for rel, want in files.items():
        if sha256(directory / rel) != want["sha256"]:
            raise CheckpointError(f"{directory.name}: {rel} does not match its sha256 in the manifest (corrupt)")
    try:
        state = json.loads((directory / "trainer_state.json").read_text())
    except ValueError as exc:
        raise CheckpointError(f"{directory.name}: trainer_state.json is not valid JSON ({exc})") from None
    if state.get("step") != manifest["step"]:
        raise CheckpointError(
            f"{directory.name}: trainer_state.json says step {state.get('step')}, the manifest {manifest['step']}"
        )
    return manifest


# ----------------------------------------------------------------------------- manager


class CheckpointManager:
    def __init__(self, out_dir: str | os.PathLike, keep_last: int | None = None):
        self.root = Path(out_dir) / "checkpoints"
        self.keep_last = keep_last

    def _name(self, step: int) -> str:
        return f"step_{step:06d}"

    def save(self, step: int, model, optimizer, trainer_state: dict[str, Any]) -> Path:
        """Collective: the student ``model`` (ShardedGPT), its optimizer and rank 0's trainer state."""
        final = self.root / self._name(step)
        partial = self.root / f"{final.name}.partial"
        try:
            on_rank0(lambda: self._begin(partial, f"checkpoint {final.name}"))
            save_train_state(model, optimizer, partial / "train_state", what=f"checkpoint {final.name}")
            on_every_rank(lambda: save_rng_state(partial / f"rng_{_rank():05d}.safetensors"))
            meta = {"step": step, "world_size": _world(), **trainer_state}
            on_rank0(lambda: self._finish(step, partial, final, meta))
        except StorageError as exc:
            if _rank() == 0:
                shutil.rmtree(partial, ignore_errors=True)
            previous = self.complete()
            kept = f"the previous checkpoint {previous[-1]} is kept" if previous else "no earlier checkpoint exists"
            raise StorageError(exc.errno, f"{exc}; {kept}") from None
        except BaseException:
            if _rank() == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        return final

    def _begin(self, partial: Path, what: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean()
        previous = self.latest()
        if (
            previous is not None
        ):  # the next one takes as much room as the last (save_train_state checks its tensors too)
            require_space(self.root, sum(f["size"] for f in read_manifest(previous)["files"].values()), what)
        partial.mkdir()

    def _finish(self, step: int, partial: Path, final: Path, meta: dict) -> None:
        path = partial / "trainer_state.json"
        path.write_text(json.dumps(meta, indent=2, default=str))
        write_manifest(partial, step)
        if final.exists():  # re-saving a step after a resume: the old one goes only now
            trash = final.with_name(final.name + ".deleting")
            os.replace(final, trash)
            shutil.rmtree(trash)
        os.replace(partial, final)
        tmp = self.root / "latest.tmp"
        tmp.write_text(final.name)
        os.replace(tmp, self.root / "latest")
        _fsync_dir(self.root)
        self.prune(keep=final)

    def clean(self) -> list[Path]:
        """Remove what interrupted saves and deletions left (``.partial``, ``.deleting``; rank 0)."""
        if not self.root.is_dir():
            return []
        left = [p for p in self.root.iterdir() if p.is_dir() and p.name.endswith((".partial", ".deleting"))]
        for p in left:
            shutil.rmtree(p, ignore_errors=True)
        return left

    def complete(self) -> list[Path]:
        """Checkpoints with a manifest (saves that finished), oldest first by the step it records;
        not verified (see :func:`verify`)."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            if p.is_dir() and _NAME.fullmatch(p.name):
                try:
                    found.append((read_manifest(p)["step"], p))
                except CheckpointError:
                    continue
        return [p for _, p in sorted(found)]

    def prune(self, keep: Path | None = None) -> list[Path]:
        """Delete complete checkpoints older than the ``keep_last`` newest (rank 0, after a
        successful save); ``keep`` (the one just written) is never deleted. Returns what went."""
        if not self.keep_last:
            return []
        done = self.complete()
        newest = set(done[-self.keep_last :])
        removed = [p for p in done if p not in newest and p != keep]
        for p in removed:
            trash = p.with_name(p.name + ".deleting")
            os.replace(p, trash)  # atomic: a deletion cut short leaves only a '.deleting' directory
            shutil.rmtree(trash)
        return removed

    def latest(self) -> Path | None:
        """The newest complete checkpoint (by its manifest's step), unverified, or None."""
        complete = self.complete()
        return complete[-1] if complete else None

    def resume_point(self) -> tuple[Path | None, list[str]]:
        """Collective: the newest checkpoint that verifies (None: there is none) and, for every newer
        one skipped, why. Rank 0 reads and checks; every rank gets its answer. Leftover
        ``.partial`` / ``.deleting`` directories are removed. When checkpoints exist but none
        verifies, CheckpointError says why for each: nothing is silently started over."""
        path, skipped = on_rank0(self._resume_point)
        return (Path(path) if path is not None else None), skipped

    def _resume_point(self) -> tuple[str | None, list[str]]:
        self.clean()
        if not self.root.is_dir():
            return None, []
        candidates, skipped = [], []
        for p in sorted(self.root.iterdir()):
            if not p.is_dir() or not _NAME.fullmatch(p.name):
                continue
            try:
                candidates.append((read_manifest(p)["step"], p))
            except CheckpointError as exc:
                skipped.append((int(_NAME.fullmatch(p.name).group(1)), str(exc)))  # type: ignore[union-attr]  # listed by _NAME
        for step, p in sorted(candidates, reverse=True):
            try:
                verify(p)
            except CheckpointError as exc:
                skipped.append((step, str(exc)))
                continue
            return str(p), [why for s, why in sorted(skipped, reverse=True) if s >= step]
        if skipped:
            raise CheckpointError(
                f"no checkpoint in {self.root} verifies: "
                + "; ".join(why for _, why in sorted(skipped, reverse=True))
                + " (move them away, or set train.resume=false to start over)"
            )
        return None, []

    def load(self, path: Path, model, optimizer, verified: bool = False) -> dict[str, Any]:
        """Collective: load weights and optimizer into ``model``/``optimizer`` (any layout) and
        return the trainer state; restores the RNG state when the world size is unchanged. The
        checkpoint is verified first (rank 0) unless ``verified``."""
        path = Path(path)
        if not _NAME.fullmatch(path.name):
            raise CheckpointError(
                f"{path}: not a checkpoint directory name (step_NNNNNN); '.partial' and '.deleting' are never loaded"
            )
        if not verified:
            on_rank0(lambda: verify(path))
        meta = json.loads((path / "trainer_state.json").read_text())
        load_train_state(model, optimizer, path / "train_state")
        if meta["world_size"] == _world():
            on_every_rank(lambda: load_rng_state(path / f"rng_{_rank():05d}.safetensors"))
        return meta


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
