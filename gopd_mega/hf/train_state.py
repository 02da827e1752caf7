"""Layout-free training state (fp32 master weights + Adam moments) with torch.distributed.checkpoint.

gopd_mega/checkpoint.py stores the student's training state through this module (its
``train_state/`` folder): under CANONICAL names as full (unsharded) tensors, so a run can resume
with a different DP size, and also a different TP/PP layout:

    <dir>/                          written by DCP (rank 0 writes the replicated full tensors)
        .metadata, __0_0.distcp ...
        model/<canonical name>          full fp32 MASTER weight (the optimizer's, not the bf16 copy)
        exp_avg/<canonical name>        full Adam 1st moment, gathered like the weight
        exp_avg_sq/<canonical name>     full Adam 2nd moment
        scalars/adam_step, scalars/schedule_step
        scalars/scale, scalars/growth_tracker, scalars/hysteresis_tracker   (fp16 dynamic loss scale)

How: ``StudentOptimizer.master_weights()/moments()`` (gopd_mega.optim) give per-local-parameter
fp32 tensors, complete on every DP rank (the distributed optimizer's DP shards are summed into
place; without it the state is replicated over DP). They are gathered over TP/PP exactly like the
weights (same [gate; up] per-shard order, vocab padding rows dropped) and re-sharded with
``ShardedGPT.shard_of`` on load, where ``load_master_state`` sets masters, model weights and
moments of any layout. The tied output layer of the last PP stage is not stored: it equals the
embedding (weight and, since its gradient is all-reduced with the embedding's, its moments).

Cost: every rank materialises the full tensors while saving and loading (fine for models that
fit in host memory; a TB-scale model needs per-shard ShardedTensor saving instead).
Writes go to ``<dir>.tmp`` and are renamed once complete (rank 0), so a crash leaves no
directory that looks complete. Nothing non-finite is written (a NaN or inf in a weight or moment
refuses the save, naming the tensor), and there must be room for it (checked on rank 0 first).

Reading runs no code from the directory. DCP's ``.metadata`` is a pickle, and its stock reader
unpickles any class; :class:`SafeFileSystemReader` (a FileSystemReader whose public
``read_metadata`` is replaced) admits only DCP's own metadata classes, torch sizes and dtypes and
plain containers, and every entry must describe a tensor. DCP would read an entry declared as
bytes with ``torch.load(weights_only=False)``; the load planner refuses bytes as well. The tensor
data themselves are read by DCP with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from gopd_mega.failures import TrainingError, is_collective_failure, on_rank0
from gopd_mega.hf.safetensors_io import CheckpointError
from gopd_mega.model.weights import first_nonfinite
from gopd_mega.optim import MOMENTS, gather_like_params
from gopd_mega.storage import require_space, storage_error

_DCP_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self.path}: refusing to unpickle {module}.{name}: a checkpoint's DCP metadata holds "
            "only DCP metadata classes"
        )


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader with a ``read_metadata`` that unpickles only DCP metadata (see the module docstring)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f, path).load()
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated or not a pickle at all
            raise CheckpointError(f"{path}: unreadable DCP metadata ({type(exc).__name__}: {exc})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
        for key, entry in metadata.state_dict_metadata.items():
            if not isinstance(entry, TensorStorageMetadata):
                raise CheckpointError(
                    f"{path}: entry {key!r} is a {type(entry).__name__}; a training state holds only tensors"
                )
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # type: ignore[union-attr]  # set by DCP before this
        return metadata


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(
            f"DCP entry {read_item.dest_index.fqn!r} is stored as bytes (a pickle); refusing to load it"
        )


_SCALER = ("scale", "growth_tracker", "hysteresis_tracker")


def _dcp_inner(exc: BaseException) -> BaseException:
    """The error behind a DCP CheckpointException (the first failing rank's), else ``exc``."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        return inner[0] if isinstance(inner, tuple) else inner
    return exc


def _dcp_cause(exc: BaseException) -> str:
    inner = _dcp_inner(exc)
    return f"{type(inner).__name__}: {' '.join(str(inner).split())[:300]}"


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_train_state(model, optimizer, directory: str | os.PathLike, what: str | None = None) -> Path:
    """Collective: save ``model`` (a ShardedGPT) and its ``optimizer`` (StudentOptimizer) layout-free.
    ``what`` names the save in errors (default: the directory)."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    state: dict[str, torch.Tensor] = {
        f"model/{k}": v for k, v in gather_like_params(model, optimizer.master_weights()).items()
    }
    moments, step = optimizer.moments()
    for moment in MOMENTS:
        state.update({f"{moment}/{k}": v for k, v in gather_like_params(model, moments[moment]).items()})
    state["scalars/adam_step"] = torch.tensor(step)
    state["scalars/schedule_step"] = torch.tensor(float(optimizer.schedule_step))
    if optimizer.scaler is not None:
        sd = optimizer.scaler.state_dict()
        state.update({f"scalars/{k}": torch.tensor(float(sd[k])) for k in _SCALER if k in sd})
    what = what or f"training state {final}"
    bad = first_nonfinite(state)
    if bad is not None:
        raise TrainingError(f"{what}: not saved: {bad} holds NaN or inf")
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    on_rank0(lambda: require_space(final.parent, nbytes, what))
    try:
        dcp.save(state, checkpoint_id=str(tmp))
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - converted below; DCP's CheckpointException is a BaseException
        err = storage_error(exc, final.parent, what, nbytes)
        if _rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        if err is not None:
            raise err from None
        raise RuntimeError(f"{what}: DCP could not save it: {_dcp_cause(exc)}") from _dcp_inner(exc)
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
    layout (DP, TP, PP, distributed optimizer or not may differ from the saving run's)."""
    template = model.full_state_dict()  # canonical names and full shapes of this architecture
    state = {
        f"{prefix}/{k}": torch.zeros(v.shape, dtype=torch.float32)
        for prefix in ("model", *MOMENTS)
        for k, v in template.items()
    }
    state["scalars/adam_step"] = torch.tensor(0.0)
    state["scalars/schedule_step"] = torch.tensor(0.0)
    dynamic = optimizer.scaler is not None and bool(optimizer.scaler.state_dict())
    if dynamic:
        state.update({f"scalars/{k}": torch.tensor(0.0) for k in _SCALER})
    reader = SafeFileSystemReader(str(directory))
    reader.read_metadata()  # its errors come out as they are, before DCP wraps them
    try:
        dcp.load(state, storage_reader=reader, planner=_TensorsOnlyPlanner())
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - converted below
        if is_collective_failure(_dcp_inner(exc)):  # a peer is gone: not the checkpoint's fault
            raise RuntimeError(f"{directory}: loading stopped: {_dcp_cause(exc)}") from _dcp_inner(exc)
        raise CheckpointError(f"{directory}: the training state does not load: {_dcp_cause(exc)}") from None
    bad = first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(f"{directory}: {bad} holds NaN or inf; refusing to load it")
    layout = model.param_layout()

    def local(prefix):
        return {i.local_name: model.shard_of(i, state[f"{prefix}/{i.canonical_name}"]) for i in layout}

    step = float(state["scalars/adam_step"])
    optimizer.load_master_state(local("model"), {m: local(m) for m in MOMENTS}, step)
    optimizer.schedule_step = int(state["scalars/schedule_step"])
    if dynamic:
        optimizer.scaler.load_state_dict(
            {
                "scale": state["scalars/scale"].reshape(1).float(),
                "growth_tracker": int(state["scalars/growth_tracker"]),
                "hysteresis_tracker": int(state["scalars/hysteresis_tracker"]),
            }
        )
