"""Weight refresh of SGLang servers from the trainer: disk, NCCL broadcast or CUDA IPC.

    sync = make_weight_sync(cfg.rollout, pool, source_dir=..., out_dir=...)
    sync.refresh(student, version)          # COLLECTIVE: every trainer rank calls it, once per step

Every mode, in order:
  1. every rank takes part in gathering the student's full HF-layout tensors (the converter
     gopd_mega.hf.hf_named_tensors, bf16) - collective when the student is sharded;
  2. a barrier: no server is asked to load anything before every rank has finished step 1
     (for ``disk``: before the checkpoint folder is complete and renamed into place);
  3. global rank 0 alone talks to the servers: /pause_generation, the update with
     ``weight_version = str(version)``, /continue_generation (also after a failure), then reads
     back each server's version (/get_weight_version) and requires it to equal ``version``;
  4. rank 0 broadcasts the outcome, so a failure raises the same error (naming the server URL)
     on every rank instead of leaving the others waiting.

Modes (``rollout.weight_sync``):
  disk  rank 0 writes an HF checkpoint in bf16 (atomic: a temp folder renamed into place) under
        ``weight_dir/v{version}``, and posts /update_weights_from_disk {model_path, weight_version,
        flush_cache} to every server. The previous folder is deleted only once every server has
        confirmed the new one. Works across nodes with a shared filesystem; the default.
  nccl  (disaggregated) once: /init_weights_update_group {master_address, master_port,
        rank_offset, world_size, group_name, backend} - the trainer's rank 0 is rank 0 of that
        group, server i holds ranks 1 + i*server_ranks ...; then per bucket of <= bucket_mb of
        bf16 tensors: /update_weights_from_distributed {names, dtypes, shapes, group_name,
        flush_cache, weight_version} while rank 0 broadcasts each tensor of the bucket (in order)
        from group rank 0. Only one bucket is held at a time besides the converter's output.
        ``weight_version`` and ``flush_cache`` go with the last bucket.
  ipc   (colocated, GPU only) per bucket: /update_weights_from_tensor {serialized_named_tensors
        (base64 ForkingPickler pickles of [(name, cuda tensor)], one per server TP rank),
        load_format, flush_cache, weight_version}: CUDA-IPC handles, no copy through the host.
"""

from __future__ import annotations

import base64
import datetime
import logging
import os
import shutil
import socket
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from gopd_mega.rollout.collective import barrier, global_rank, run_on_rank0
from gopd_mega.rollout.pool import SGLangPool
from gopd_mega.rollout.sglang import SGLangError

logger = logging.getLogger(__name__)

WEIGHT_SYNC_MODES = ("disk", "nccl", "ipc")
GROUP_NAME = "gopd_weight_update"


def buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs into lists of at most ``bucket_bytes`` (a larger tensor alone)."""
    bucket, size = [], 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def dtype_name(t: torch.Tensor) -> str:
    """SGLang's dtype string: getattr(torch, name) on the server side."""
    return str(t.dtype).removeprefix("torch.")


def init_custom_process_group(backend: str, address: str, port: int, rank: int, world_size: int, group_name: str,
                              timeout_s: float = 600.0):
    """A process group outside the trainer's world, built exactly as SGLang builds its side of the
    weight-update group (tcp rendezvous, the store prefixed by ``group_name``), so the two match."""
    import torch.distributed.distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(c10d.rendezvous(f"tcp://{address}:{port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], backend, store, group_name=group_name, timeout=timeout)
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def _continue_and_report(pool, rank0: bool, state: dict, what: str) -> None:
    """COLLECTIVE end of a tensor weight push: rank 0 resumes generation on every server (even
    after a failed push, so no server stays paused), then every rank raises rank 0's first error."""
    if rank0:
        try:
            pool.control_call("/continue_generation", {})
        except SGLangError as exc:
            logger.error("could not continue generation after the weight update: %s", exc)

    def outcome():
        if state["error"]:
            raise SGLangError(state["error"])

    run_on_rank0(outcome, what)

class WeightSync(ABC):
    """Pushes the student's weights to the SGLang servers of ``pool`` (see the module docstring)."""

    mode = ""

    def __init__(self, pool: SGLangPool, *, bucket_mb: int = 512, dtype: torch.dtype = torch.bfloat16, family=None):
        self.pool = pool
        self.bucket_bytes = int(bucket_mb) * 1024 * 1024
        self.dtype = dtype
        self.family = family
        self.version: int | None = None

    def named_tensors(self, student) -> Iterator[tuple[str, torch.Tensor]]:
        """The student in HF names/layout, ``self.dtype`` (collective when sharded)."""
        from gopd_mega.hf import hf_named_tensors

        return hf_named_tensors(student, family=self.family, dtype=self.dtype)

    def refresh(self, student, version: int) -> None:
        """COLLECTIVE. Make every server sample from ``student`` and report ``version``."""
        self._push(student, version)
        run_on_rank0(lambda: self._check_versions(version), f"weight refresh to version {version}")
        self.version = version
        self._after_confirmed(version)

    @abstractmethod
    def _push(self, student, version: int) -> None:
        """Collective transfer; rank 0 posts; failures raised on every rank (run_on_rank0)."""

    def _after_confirmed(self, version: int) -> None:
        """Clean-up once every server runs ``version``."""

    def _check_versions(self, version: int) -> None:
        for server in self.pool.control:
            got = server.weight_version()
            if got is not None and got != str(version):
                raise SGLangError(f"SGLang {server.url} reports weight_version {got!r} after the update to "
                                  f"{version!r}: it did not load the new weights")
            if got is None:
                logger.warning("SGLang %s does not report a weight version; the update cannot be checked", server.url)

    def _paused(self, body) -> None:
        """rank 0: pause generation on every server, run ``body``, continue (also on failure)."""
        self.pool.control_call("/pause_generation", {})
        try:
            body()
        finally:
            try:
                self.pool.control_call("/continue_generation", {})
            except SGLangError as exc:
                logger.error("could not continue generation after the weight update: %s", exc)

    def close(self) -> None:
        """Release what the mode holds (process groups)."""


class DiskSync(WeightSync):
    """``disk``: bf16 HF export on a filesystem the servers can read."""

    mode = "disk"

    def __init__(self, pool: SGLangPool, weight_dir: str | os.PathLike, *, source_dir=None, **kw):
        super().__init__(pool, **kw)
        self.weight_dir = Path(weight_dir)
        self.source_dir = source_dir
        self.loaded: Path | None = None

    def folder(self, version: int) -> Path:
        return self.weight_dir / f"v{version:06d}"

    def _push(self, student, version: int) -> None:
        from gopd_mega.hf import export_hf

        path = self.folder(version)
        if global_rank() == 0 and path.exists():
            shutil.rmtree(path)  # a stale folder of an interrupted run (never the one the server holds)
        export_hf(student, path, family=self.family, source_dir=self.source_dir, dtype=self.dtype)  # collective
        barrier()  # the folder is complete and in place before any server is told about it

        def post():
            payload = {"model_path": str(path.resolve()), "weight_version": str(version), "flush_cache": True}
            self._paused(lambda: self.pool.control_call("/update_weights_from_disk", payload))

        run_on_rank0(post, f"weight refresh from {path}")

    def _after_confirmed(self, version: int) -> None:
        if global_rank() != 0:
            return
        keep = self.folder(version)
        for old in self.weight_dir.glob("v*"):
            if old.is_dir() and old != keep:
                shutil.rmtree(old, ignore_errors=True)
        self.loaded = keep


class NcclSync(WeightSync):
    """``nccl``: broadcast over a process group shared with the servers (disaggregated GPUs)."""

    mode = "nccl"

    def __init__(self, pool: SGLangPool, *, server_ranks: int = 1, master_address: str | None = None,
                 master_port: int = 0, backend: str = "nccl", **kw):
        super().__init__(pool, **kw)
        self.server_ranks = server_ranks
        self.master_address = master_address
        self.master_port = master_port
        self.backend = backend
        self.group = None

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def _init_group(self) -> None:
        """rank 0 only: join the servers in one group; each server is told its rank offset."""
        address = self.master_address or os.environ.get("MASTER_ADDR") or socket.gethostname()
        port = self.master_port
        if not port:
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
        world = 1 + len(self.pool.control) * self.server_ranks
        answers: dict[str, str | None] = {}

        def ask(i, server):
            payload = {"master_address": address, "master_port": port, "rank_offset": 1 + i * self.server_ranks,
                       "world_size": world, "group_name": GROUP_NAME, "backend": self.backend}
            try:
                server.post_checked("/init_weights_update_group", payload)
                answers[server.url] = None
            except SGLangError as exc:
                answers[server.url] = str(exc)

        threads = [threading.Thread(target=ask, args=(i, s), daemon=True) for i, s in enumerate(self.pool.control)]
        for t in threads:
            t.start()
        try:
            self.group = init_custom_process_group(self.backend, address, port, 0, world, GROUP_NAME, timeout_s=120)
        finally:
            for t in threads:
                t.join()
        failed = [f"{u}: {e}" for u, e in answers.items() if e]
        if failed or self.group is None:
            raise SGLangError("/init_weights_update_group failed: " + "; ".join(failed))

    def _send_bucket(self, bucket: list[tuple[str, torch.Tensor]], last: bool, version: int) -> None:
        payload = {"names": [n for n, _ in bucket], "dtypes": [dtype_name(t) for _, t in bucket],
                   "shapes": [list(t.shape) for _, t in bucket], "group_name": GROUP_NAME,
                   "flush_cache": last, "weight_version": str(version) if last else None}
        errors: list[str] = []
        http = threading.Thread(target=lambda: self._post_all(payload, errors), daemon=True)
        http.start()  # each server posts its receives as it parses the request; we send meanwhile
        device = self._device()
        for _, t in bucket:
            dist.broadcast(t.to(device), group=self.group, group_src=0)
        http.join()
        if errors:
            raise SGLangError("; ".join(errors))

    def _post_all(self, payload: dict, errors: list[str]) -> None:
        try:
            self.pool.control_call("/update_weights_from_distributed", payload)
        except SGLangError as exc:
            errors.append(str(exc))

    def _push(self, student, version: int) -> None:
        if self.group is None:
            run_on_rank0(self._init_group, "NCCL weight-update group")
        rank0 = global_rank() == 0
        state: dict = {"error": None}

        def run(body):
            if rank0 and state["error"] is None:
                try:
                    body()
                except Exception as exc:  # noqa: BLE001 - keep iterating: the generator is collective
                    state["error"] = str(exc)

        if rank0:
            run(lambda: self.pool.control_call("/pause_generation", {}))
        # One bucket ahead: the last bucket must carry the version, so we hold one back.
        pending = None
        for bucket in buckets(self.named_tensors(student), self.bucket_bytes):  # collective iteration
            if pending is not None:
                run(lambda b=pending: self._send_bucket(b, False, version))
            pending = bucket if rank0 else [("", torch.empty(0))]
        if pending is not None:
            run(lambda: self._send_bucket(pending, True, version))
        _continue_and_report(self.pool, rank0, state, f"NCCL weight refresh to version {version}")

    def close(self) -> None:
        if self.group is not None and global_rank() == 0:
            try:
                self.pool.control_call("/destroy_weights_update_group", {"group_name": GROUP_NAME}, timeout=60)
            except SGLangError as exc:
                logger.warning("%s", exc)
            dist.destroy_process_group(self.group)
        self.group = None


class IpcSync(WeightSync):
    """``ipc``: CUDA-IPC handles to colocated servers (same GPUs). GPU only."""

    mode = "ipc"

    def __init__(self, pool: SGLangPool, *, server_ranks: int = 1, allow_cpu: bool = False, **kw):
        super().__init__(pool, **kw)
        self.server_ranks = server_ranks
        if not allow_cpu and not torch.cuda.is_available():
            raise RuntimeError("rollout.weight_sync='ipc' passes CUDA-IPC handles and needs GPUs colocated with "
                               "the SGLang servers; use 'disk' or 'nccl' here")

    @staticmethod
    def serialize(named: list[tuple[str, torch.Tensor]]) -> str:
        """SGLang's MultiprocessingSerializer.serialize(..., output_str=True): base64 of a
        ForkingPickler pickle (torch registers CUDA-IPC reductions for CUDA tensors)."""
        import io
        from multiprocessing.reduction import ForkingPickler

        import torch.multiprocessing  # noqa: F401 - registers torch's reductions

        buf = io.BytesIO()
        ForkingPickler(buf).dump(named)
        return base64.b64encode(buf.getvalue()).decode("ascii")

    def _push(self, student, version: int) -> None:
        rank0 = global_rank() == 0
        state: dict = {"error": None}
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        if rank0:
            try:
                self.pool.control_call("/pause_generation", {})
            except SGLangError as exc:
                state["error"] = str(exc)
        all_buckets = buckets(self.named_tensors(student), self.bucket_bytes)
        pending = None
        for bucket in all_buckets:
            if pending is not None and rank0 and state["error"] is None:
                self._post(pending, False, version, state)
            pending = [(n, t.to(device)) for n, t in bucket] if rank0 else None
        if pending is not None and rank0 and state["error"] is None:
            self._post(pending, True, version, state)
        _continue_and_report(self.pool, rank0, state, f"IPC weight refresh to version {version}")

    def _post(self, bucket, last: bool, version: int, state: dict) -> None:
        blob = self.serialize(bucket)
        payload = {"serialized_named_tensors": [blob] * self.server_ranks, "load_format": None,
                   "flush_cache": last, "weight_version": str(version) if last else None}
        try:
            self.pool.control_call("/update_weights_from_tensor", payload)
        except SGLangError as exc:
            state["error"] = str(exc)


def make_weight_sync(cfg, pool: SGLangPool, *, out_dir: str | os.PathLike, source_dir=None, family=None) -> WeightSync:
    """The :class:`WeightSync` for ``cfg`` (a gopd_mega.config.RolloutConfig)."""
    kw = dict(bucket_mb=cfg.bucket_mb, family=family)
    if cfg.weight_sync == "disk":
        return DiskSync(pool, cfg.weight_dir or Path(out_dir) / "rollout_weights", source_dir=source_dir, **kw)
    if cfg.weight_sync == "nccl":
        return NcclSync(pool, server_ranks=cfg.server_ranks, master_address=cfg.weight_sync_address,
                        master_port=cfg.weight_sync_port, backend=cfg.weight_sync_backend, **kw)
    if cfg.weight_sync == "ipc":
        return IpcSync(pool, server_ranks=cfg.server_ranks, **kw)
    raise ValueError(f"rollout.weight_sync must be one of {WEIGHT_SYNC_MODES}, got {cfg.weight_sync!r}")
