"""Streaming reads and atomic, sharded writes of Hugging Face safetensors checkpoints.

Reading: :class:`CheckpointReader` opens ``model.safetensors`` or the shards listed in
``model.safetensors.index.json`` lazily with ``safe_open`` and hands out *slices* (``get_slice``),
so a rank only reads the bytes of the rows/columns it owns and never holds more than the tensor
it is building. Every error names the checkpoint file and the tensor.

Writing: :func:`write_checkpoint` streams ``(name, tensor)`` pairs into shards of at most
``shard_bytes`` under a temporary directory next to the target, writes the index and the extra
files, then renames the directory into place. A crash or exception leaves only a ``*.tmp-*``
directory (removed on exceptions), never a folder that looks like a finished checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from gopd_mega.storage import require_space, save_safetensors, storage_error

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or malformed; the message names the file and tensor."""


class CheckpointReader:
    """Name -> lazily opened safetensors slice, over a single file or a sharded checkpoint."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self._handles: dict[Path, object] = {}  # one open (memory-mapped) handle per file
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
            self.where = {name: self.dir / fname for name, fname in weight_map.items()}
        elif (self.dir / SINGLE).is_file():
            self.where = dict.fromkeys(self._open(self.dir / SINGLE).keys(), self.dir / SINGLE)
        else:
            raise CheckpointError(f"{self.dir}: no {SINGLE} or {INDEX} found")

    def _open(self, path: Path):
        if path in self._handles:
            return self._handles[path]
        if not path.is_file():
            raise CheckpointError(f"{path}: safetensors file listed in the checkpoint is missing")
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:  # noqa: BLE001 - re-raised as CheckpointError: SafetensorError, OSError, or a header parse error
            raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({exc})") from None
        self._handles[path] = handle
        return handle

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def file_of(self, name: str) -> Path:
        if name not in self.where:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        return self.where[name]

    def get_slice(self, name: str):
        """safetensors slice object: ``.get_shape()``, index with ``[a:b]`` / ``[:, a:b]``."""
        path = self.file_of(name)
        try:
            return self._open(path).get_slice(name)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised as CheckpointError, naming the tensor
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({exc})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.get_slice(name).get_shape())

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only rows [a, b) / columns [a, b) of it (read from disk, not sliced after)."""
        sl = self.get_slice(name)
        try:
            if rows is not None:
                return sl[rows[0] : rows[1]]
            if cols is not None:
                return sl[:, cols[0] : cols[1]]
            return sl[:]
        except Exception as exc:  # noqa: BLE001 - re-raised as CheckpointError, naming the tensor
            raise CheckpointError(f"{self.file_of(name)}: cannot read tensor {name!r} ({exc})") from None


def write_checkpoint(
    directory: str | os.PathLike,
    tensors: Iterable[tuple[str, torch.Tensor]],
    extra_files: Callable[[Path], None] | None = None,
    shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write ``tensors`` as a sharded safetensors checkpoint at ``directory``, atomically.

    ``extra_files(tmp_dir)`` writes config/tokenizer files into the temporary folder before the
    rename. An existing ``directory`` is replaced only after the new one is complete. Files get
    the modes the umask gives ordinary files; a full or read-only disk is a StorageError that
    names the path (and the space needed).
    """
    final = Path(directory)
    needed = sum(t.numel() * t.element_size() for _, t in tensors) if isinstance(tensors, (list, tuple)) else None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if needed is not None:
            require_space(final.parent, needed, f"checkpoint {final}")
        tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        raise (storage_error(exc, final.parent, f"checkpoint {final}") or exc) from None
    try:
        shards: list[list[str]] = []
        weight_map: dict[str, str] = {}
        current: dict[str, torch.Tensor] = {}
        size = total = 0

        def flush() -> None:
            nonlocal current, size
            if current:
                name = f"shard-{len(shards):05d}.safetensors"
                save_safetensors(current, tmp / name, metadata={"format": "pt"})
                shards.append(list(current))
                current, size = {}, 0

        for name, tensor in tensors:
            if name in weight_map or name in current:
                raise CheckpointError(f"{final}: tensor {name!r} written twice")
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > shard_bytes:
                flush()
            current[name] = tensor.detach().contiguous().cpu()
            size += nbytes
            total += nbytes
        flush()
        # HF naming: model-0000i-of-0000n.safetensors (renamed once n is known).
        n = len(shards)
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (tmp / f"shard-{i:05d}.safetensors").rename(tmp / fname)
            weight_map.update(dict.fromkeys(names, fname))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX).write_text(json.dumps(index, indent=2))
        if extra_files is not None:
            extra_files(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        err = storage_error(exc, final.parent, f"checkpoint {final}", needed)
        if err is not None:
            raise err from None
        raise
    return final
