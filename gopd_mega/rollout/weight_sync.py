"""Weight refresh of SGLang servers from the trainer: disk, NCCL broadcast or CUDA IPC.

    sync = make_weight_sync(cfg.rollout, pool, source_dir=..., out_dir=...)
    sync.refresh(student, version)          # COLLECTIVE: every trainer rank calls it, once per step

Every mode, in order:
  1. global rank 0 picks the targets: the pool's live control servers, plus out servers whose
     real /generate probe succeeds now (they rejoin only once this sync has brought them to
     ``version``: gopd_mega.rollout.pool);
  2. every rank takes part in gathering the student's full HF-layout tensors (the converter
     gopd_mega.hf.hf_named_tensors, bf16) - collective when the student is sharded;
  3. a barrier: no server is asked to load anything before every rank has finished step 2
     (for ``disk``: before the checkpoint folder is complete and renamed into place);
  4. rank 0 alone talks to the targets: /pause_generation; for releases >= 0.5.21 and the tensor
     modes /begin_weight_update; the update with ``weight_version = str(version)``;
     /end_weight_update; /continue_generation (also after a failure); then reads back each
     server's version (/model_info) and requires it to equal ``version``;
  5. a server that fails any of that is taken out of every list (a warning names it and why);
     the others carry on. When none is left, rank 0's error (naming every server and its
     failure) is raised on every rank, so none is left waiting.

Modes (``rollout.weight_sync``):
  disk  rank 0 writes an HF checkpoint in bf16 (atomic: a temp folder renamed into place) under
        ``weight_dir/v{version}``, and posts /update_weights_from_disk {model_path, weight_version,
        flush_cache} to every target. The previous folder is deleted only once a server has
        confirmed the new one. Works across nodes with a shared filesystem; the default.
  nccl  (disaggregated) a group of trainer rank 0 and the targets: /init_weights_update_group
        {master_address, master_port, rank_offset, world_size, group_name, backend} - rank 0 is
        rank 0 of the group, target i holds ranks 1 + i*server_ranks ...; then per bucket of
        <= bucket_mb of bf16 tensors: /update_weights_from_distributed {names, dtypes, shapes,
        group_name, flush_cache, weight_version} while rank 0 broadcasts each tensor of the
        bucket (in order). ``weight_version`` and ``flush_cache`` go with the last bucket. When
        the targets change (a server died or came back), or a push breaks, the group is
        destroyed and a new one (new name; port + 1 when the port is fixed) is built with the
        targets of the moment, and the push is redone.
  ipc   (colocated, GPU only) per bucket: /update_weights_from_tensor {serialized_named_tensors,
        load_format, flush_cache, weight_version}, with ONE payload per TP rank of each server.
        Server i's TP rank j shares the GPU of trainer rank i * server_ranks + j (the colocated
        launcher's layout): that rank copies the bucket to its own GPU and pickles it with
        ForkingPickler, the device given by its UUID (as SGLang's own senders do), which the
        server's unpickler maps to the index its process sees; rank 0 gathers the payloads.
"""

from __future__ import annotations

import base64
import copyreg
import datetime
import io
import logging
import os
import shutil
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from gopd_mega.rollout.collective import barrier, global_rank, run_on_rank0
from gopd_mega.rollout.http import SGLangError, shared_http
from gopd_mega.rollout.pool import SGLangPool
from gopd_mega.rollout.sglang import SGLangServer

logger = logging.getLogger(__name__)

WEIGHT_SYNC_MODES = ("disk", "nccl", "ipc")
GROUP_NAME = "gopd_weight_update"
CUDA_DEVICE_ARG = 6
"""Index of the device in torch's reduce_tensor arguments for a CUDA tensor (SGLang's
patch_torch replaces the same entry)."""


def buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs into lists of at most ``bucket_bytes`` (a larger tensor alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
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


def init_custom_process_group(
    backend: str, address: str, port: int, rank: int, world_size: int, group_name: str, timeout_s: float = 600.0
):
    """A process group outside the trainer's world, built as SGLang builds its side of the
    weight-update group (a TCPStore at address:port, prefixed by ``group_name``), so the two match.
    The store is made directly, not through c10d.rendezvous: under torchrun
    (TORCHELASTIC_USE_AGENT_STORE=True) rendezvous would make rank 0 a client of a store that the
    agent hosts only for the trainer's own world, and nobody would listen at ``port``."""
    import torch.distributed.distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    store = c10d.PrefixStore(group_name, store)  # type: ignore[assignment]  # a Store either way
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], backend, store, group_name=group_name, timeout=timeout)  # type: ignore[arg-type]  # GroupName is a str NewType
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def with_device_uuid(args: tuple, uuid_of: Callable[[int], str]) -> tuple:
    """torch's CUDA reduce_tensor arguments with the device index replaced by that device's UUID."""
    return (*args[:CUDA_DEVICE_ARG], uuid_of(args[CUDA_DEVICE_ARG]), *args[CUDA_DEVICE_ARG + 1 :])


def _device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _reduce_tensor_by_uuid(tensor: torch.Tensor):
    from torch.multiprocessing import reductions

    fn, args = reductions.reduce_tensor(tensor)
    if tensor.is_cuda:
        args = with_device_uuid(args, _device_uuid)
    return fn, args


def serialize_named_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's MultiprocessingSerializer.serialize(named, output_str=True) as its patched senders
    produce it: base64 of a ForkingPickler pickle in which a CUDA tensor is a CUDA-IPC handle
    whose device is its UUID (SGLang's receiver maps it to its own device index)."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # registers torch's reductions

    buf = io.BytesIO()
    pickler = ForkingPickler(buf)
    pickler.dispatch_table = dict(pickler.dispatch_table or copyreg.dispatch_table)
    pickler.dispatch_table[torch.Tensor] = _reduce_tensor_by_uuid
    pickler.dump(named)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class WeightSync(ABC):
    """Pushes the student's weights to the SGLang servers of ``pool`` (see the module docstring)."""

    mode = ""
    retries_after_break = False
    """Whether a broken push (not one server's failure) is redone with the servers still in."""

    def __init__(self, pool: SGLangPool, *, bucket_mb: int = 512, dtype: torch.dtype = torch.bfloat16, family=None):
        self.pool = pool
        self.bucket_bytes = int(bucket_mb) * 1024 * 1024
        self.dtype = dtype
        self.family = family
        self.version: int | None = None
        self.failed: dict[str, str] = {}  # rank 0, during a push: URL -> why it failed
        self.broken = False  # rank 0, during a push: the transfer itself broke (retry with the rest)

    def named_tensors(self, student) -> Iterator[tuple[str, torch.Tensor]]:
        """The student in HF names/layout, ``self.dtype`` (collective when sharded)."""
        from gopd_mega.hf import hf_named_tensors

        return hf_named_tensors(student, family=self.family, dtype=self.dtype)

    def refresh(self, student, version: int) -> None:
        """COLLECTIVE. Make every live server (and every out server that answers a probe) sample
        from ``student`` and report ``version``."""
        attempts = len(self.pool.control) + 1
        for attempt in range(attempts):
            targets: list[SGLangServer] = []
            if global_rank() == 0:
                self.failed, self.broken = {}, False
                try:
                    targets = self.pool.live_control() + self.pool.probe_out()
                except SGLangError as exc:  # reported by _settle
                    logger.warning("%s", exc)
            self._push(student, version, targets)
            if not run_on_rank0(
                lambda: self._settle(version, targets, attempt + 1 < attempts),  # noqa: B023 - called at once
                f"weight refresh to version {version}",
            ):
                break
        self.version = version
        self._after_confirmed(version)

    @abstractmethod
    def _push(self, student, version: int, targets: list[SGLangServer]) -> None:
        """Collective transfer; rank 0 posts to ``targets``, records failures in ``self.failed``."""

    def _after_confirmed(self, version: int) -> None:  # noqa: B027 - optional hook
        """Clean-up once the servers in the pool run ``version``."""

    def _settle(self, version: int, targets: list[SGLangServer], may_retry: bool) -> bool:
        """rank 0: take out the servers that failed, check the others' versions, readmit the
        recovered ones. Returns whether to push again (a broken push, servers left to retry)."""
        pool = self.pool
        for server in targets:
            if server.url in self.failed:
                pool.take_out(server, f"weight refresh to version {version}: {self.failed[server.url]}")
        ok = [s for s in targets if s.url not in self.failed]
        versions = shared_http().gather([s.aweight_version() for s in ok], return_exceptions=True)
        stale = []
        for server, got in zip(ok, versions):
            if isinstance(got, BaseException):
                pool.take_out(server, f"weight version check after the update to {version}: {got}")
            elif got is not None and got != str(version):
                stale.append((server, got))
            else:
                if got is None:
                    logger.warning(
                        "SGLang %s does not report a weight version; the update cannot be checked", server.url
                    )
                pool.readmit(server)
        if self.broken and self.retries_after_break and stale and may_retry:
            for server, got in stale:  # still in: the push is redone with them
                logger.warning("SGLang %s still reports version %r after a broken push; pushing again", server.url, got)
            return True
        for server, got in stale:
            pool.take_out(
                server,
                f"reports weight_version {got!r} after the update to {version!r}: it did not load the new weights",
            )
        if not pool.live_control():
            raise pool._why_none(f"weight refresh to version {version}")
        return False

    # ------------------------------------------------------------------ rank 0 helpers

    def _post(
        self,
        path: str,
        targets: list[SGLangServer],
        payload: dict | Callable[[SGLangServer], dict],
        timeout: float | None = None,
    ) -> list[SGLangServer]:
        """POST to every target not yet failed; record failures; the targets that succeeded."""
        live = [s for s in targets if s.url not in self.failed]

        async def one(s: SGLangServer):
            return await s.apost_checked(path, payload(s) if callable(payload) else payload, timeout)

        answers = shared_http().gather([one(s) for s in live], return_exceptions=True)
        for s, a in zip(live, answers):
            if isinstance(a, BaseException):
                self.failed[s.url] = str(a)
        return [s for s in live if s.url not in self.failed]

    def _open(self, targets: list[SGLangServer], session: bool) -> None:
        """Pause generation; open a weight-update session where the release needs one."""
        self._post("/pause_generation", targets, {})
        if not session:
            return
        live = [s for s in targets if s.url not in self.failed and self._needs_session(s)]
        answers = shared_http().gather(
            [s.apost_checked("/begin_weight_update", {}) for s in live], return_exceptions=True
        )
        for s, a in zip(live, answers):
            if isinstance(a, BaseException) and "already open" in str(a):
                try:  # a session left open (an earlier run died mid-sync): close it, open ours
                    s.post_checked("/end_weight_update", {})
                    s.post_checked("/begin_weight_update", {})
                    continue
                except SGLangError as exc:
                    a = exc
            if isinstance(a, BaseException):
                self.failed[s.url] = str(a)

    def _close(self, targets: list[SGLangServer], session: bool) -> None:
        """Close the session where one was opened; continue generation (also after a failure)."""
        for path, wanted in (("/end_weight_update", session), ("/continue_generation", True)):
            if not wanted:
                continue
            servers = [s for s in targets if path != "/end_weight_update" or self._needs_session(s)]

            async def quiet(s: SGLangServer):
                try:
                    await s.apost_checked(path, {})  # noqa: B023 - gathered in this iteration
                except SGLangError as exc:
                    if s.url not in self.failed:
                        self.failed[s.url] = str(exc)

            shared_http().gather([quiet(s) for s in servers])

    @staticmethod
    def _needs_session(server: SGLangServer) -> bool:
        try:
            return server.protocol().weight_update_session
        except SGLangError:
            return False  # reported when its loads fail

    def close(self) -> None:  # noqa: B027 - optional hook
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

    def _push(self, student, version: int, targets: list[SGLangServer]) -> None:
        from gopd_mega.hf import export_hf

        path = self.folder(version)
        if global_rank() == 0 and path.exists() and path != self.loaded:
            shutil.rmtree(path)  # a stale folder of an interrupted run (never the one the servers hold)
        if path != self.loaded:
            export_hf(student, path, family=self.family, source_dir=self.source_dir, dtype=self.dtype)  # collective
        barrier()  # the folder is complete and in place before any server is told about it
        if global_rank() != 0:
            return
        payload = {"model_path": str(path.resolve()), "weight_version": str(version), "flush_cache": True}
        self._open(targets, session=False)
        try:
            self._post("/update_weights_from_disk", targets, payload)
        finally:
            self._close(targets, session=False)

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
    retries_after_break = True

    def __init__(
        self,
        pool: SGLangPool,
        *,
        server_ranks: int = 1,
        master_address: str | None = None,
        master_port: int = 0,
        backend: str = "nccl",
        timeout_s: float = 600.0,
        **kw,
    ):
        super().__init__(pool, **kw)
        self.server_ranks = server_ranks
        self.master_address = master_address
        self.master_port = master_port
        self.backend = backend
        self.timeout_s = timeout_s
        self.group = None
        self.members: list[str] = []  # URLs in the group, in rank order
        self.builds = 0
        self.group_name = GROUP_NAME

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def _init_group(self, targets: list[SGLangServer]) -> None:
        """rank 0 only: join ``targets`` in a new group; each is told its rank offset."""
        self._drop_group()
        address = self.master_address or os.environ.get("MASTER_ADDR") or socket.gethostname()
        port = self.master_port + self.builds if self.master_port else 0
        if not port:
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
        self.group_name = GROUP_NAME if not self.builds else f"{GROUP_NAME}_{self.builds}"
        self.builds += 1
        world = 1 + len(targets) * self.server_ranks
        errors: dict[str, str] = {}

        def ask():
            answers = shared_http().gather(
                [
                    s.apost_checked(
                        "/init_weights_update_group",
                        {
                            "master_address": address,
                            "master_port": port,
                            "rank_offset": 1 + i * self.server_ranks,
                            "world_size": world,
                            "group_name": self.group_name,
                            "backend": self.backend,
                        },
                        timeout=self.timeout_s,
                    )
                    for i, s in enumerate(targets)
                ],
                return_exceptions=True,
            )
            errors.update({s.url: str(a) for s, a in zip(targets, answers) if isinstance(a, BaseException)})

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()  # the servers join the rendezvous while rank 0 waits in it
        try:
            self.group = init_custom_process_group(
                self.backend, address, port, 0, world, self.group_name, timeout_s=min(self.timeout_s, 120.0)
            )
        except Exception as exc:  # noqa: BLE001 - every target failed to join
            asker.join()
            self.group = None
            for server in targets:
                self.failed.setdefault(server.url, errors.get(server.url) or f"/init_weights_update_group: {exc}")
            self.broken = True
            return
        asker.join()
        if errors:  # the group cannot work without every member
            self.failed.update(errors)
            self.broken = True
            self._drop_group()
            return
        self.members = [s.url for s in targets]

    def _drop_group(self) -> None:
        """rank 0: leave the current group (and ask its members to, best effort)."""
        if self.group is None:
            return
        members = [s for s in self.pool.control if s.url in self.members and s.url not in self.pool.out]

        async def quiet(s):
            try:
                await s.apost_checked("/destroy_weights_update_group", {"group_name": self.group_name}, timeout=60)
            except SGLangError as exc:
                logger.warning("%s", exc)

        shared_http().gather([quiet(s) for s in members])
        try:
            dist.destroy_process_group(self.group)
        except Exception as exc:  # noqa: BLE001 - a group with a dead member
            logger.warning("could not destroy the weight-update group: %s", exc)
        self.group, self.members = None, []

    def _send_bucket(
        self, bucket: list[tuple[str, torch.Tensor]], last: bool, version: int, targets: list[SGLangServer]
    ) -> None:
        payload = {
            "names": [n for n, _ in bucket],
            "dtypes": [dtype_name(t) for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket],
            "group_name": self.group_name,
            "flush_cache": last,
            "weight_version": str(version) if last else None,
        }
        http = threading.Thread(
            target=lambda: self._post("/update_weights_from_distributed", targets, payload, timeout=self.timeout_s),
            daemon=True,
        )
        http.start()  # each server posts its receives as it parses the request; we send meanwhile
        device = self._device()
        try:
            for _, t in bucket:
                dist.broadcast(t.to(device), group=self.group, group_src=0)
        except Exception as exc:  # noqa: BLE001 - a member died: the group is broken
            self.broken = True
            logger.warning("weight broadcast failed: %s", exc)
        http.join()
        if self.failed:
            self.broken = True

    def _push(self, student, version: int, targets: list[SGLangServer]) -> None:
        rank0 = global_rank() == 0
        if rank0 and targets:
            if self.group is None or self.members != [s.url for s in targets]:
                self._init_group(targets)
            if self.group is not None:
                self._open(targets, session=True)
                if self.failed:  # a member that cannot take part breaks the group
                    self.broken = True
        sending = lambda: rank0 and self.group is not None and not self.broken  # noqa: E731
        pending = None
        try:
            # One bucket ahead: the last bucket must carry the version, so we hold one back.
            for bucket in buckets(self.named_tensors(student), self.bucket_bytes):  # collective iteration
                if pending is not None and sending():
                    self._send_bucket(pending, False, version, targets)
                pending = bucket if rank0 else None
            if pending is not None and sending():
                self._send_bucket(pending, True, version, targets)
        finally:
            if rank0 and targets and self.group is not None:
                self._close(targets, session=True)
            if rank0 and self.broken:
                self._drop_group()

    def close(self) -> None:
        if global_rank() == 0:
            self._drop_group()


class IpcSync(WeightSync):
    """``ipc``: CUDA-IPC handles to colocated servers (same GPUs). GPU only."""

    mode = "ipc"

    def __init__(self, pool: SGLangPool, *, server_ranks: int = 1, allow_cpu: bool = False, **kw):
        super().__init__(pool, **kw)
        self.server_ranks = server_ranks
        self.allow_cpu = allow_cpu
        if not allow_cpu and not torch.cuda.is_available():
            raise RuntimeError(
                "rollout.weight_sync='ipc' passes CUDA-IPC handles and needs GPUs colocated with "
                "the SGLang servers; use 'disk' or 'nccl' here"
            )
        world = dist.get_world_size() if dist.is_initialized() else 1
        need = len(pool.control) * server_ranks
        if need > world:
            raise ValueError(
                f"rollout.weight_sync='ipc': {len(pool.control)} server(s) x {server_ranks} GPU(s) need "
                f"{need} colocated trainer ranks (server i's TP rank j on the GPU of trainer rank "
                f"i * server_ranks + j), the job has {world}"
            )

    def _device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def payloads(self, bucket: list[tuple[str, torch.Tensor]] | None) -> list[list[str]] | None:
        """COLLECTIVE. Trainer rank i * server_ranks + j serializes its own GPU copy of ``bucket``
        (every rank holds the full tensors) for TP rank j of server i; rank 0 gets
        [server i][tp rank j] -> payload, the others None."""
        rank = global_rank()
        mine = None
        if rank < len(self.pool.control) * self.server_ranks and bucket is not None:
            mine = serialize_named_tensors([(n, t.to(self._device())) for n, t in bucket])
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list | None = [None] * dist.get_world_size() if rank == 0 else None
            dist.gather_object(mine, gathered, dst=0)
        else:
            gathered = [mine]
        if rank != 0:
            return None
        r = self.server_ranks
        return [gathered[i * r : (i + 1) * r] for i in range(len(self.pool.control))]  # type: ignore[index]  # rank 0 gathered

    def _push(self, student, version: int, targets: list[SGLangServer]) -> None:
        rank0 = global_rank() == 0
        if rank0 and targets:
            self._open(targets, session=True)
        index = {s.url: i for i, s in enumerate(self.pool.control)}
        pending = None
        try:
            for bucket in buckets(self.named_tensors(student), self.bucket_bytes):  # collective iteration
                if pending is not None:
                    self._send(self.payloads(pending), False, version, targets, index)
                pending = bucket
            if pending is not None:
                self._send(self.payloads(pending), True, version, targets, index)
        finally:
            if rank0 and targets:
                self._close(targets, session=True)

    def _send(self, payloads, last: bool, version: int, targets: list[SGLangServer], index: dict[str, int]) -> None:
        if payloads is None:
            return

        def body(server: SGLangServer) -> dict:
            return {
                "serialized_named_tensors": payloads[index[server.url]],
                "load_format": None,
                "flush_cache": last,
                "weight_version": str(version) if last else None,
            }

        self._post("/update_weights_from_tensor", targets, body)


def make_weight_sync(cfg, pool: SGLangPool, *, out_dir: str | os.PathLike, source_dir=None, family=None) -> WeightSync:
    """The :class:`WeightSync` for ``cfg`` (a gopd_mega.config.RolloutConfig)."""
    kw = {"bucket_mb": cfg.bucket_mb, "family": family}
    if cfg.weight_sync == "disk":
        return DiskSync(pool, cfg.weight_dir or Path(out_dir) / "rollout_weights", source_dir=source_dir, **kw)
    if cfg.weight_sync == "nccl":
        return NcclSync(
            pool,
            server_ranks=cfg.server_ranks,
            master_address=cfg.weight_sync_address,
            master_port=cfg.weight_sync_port,
            backend=cfg.weight_sync_backend,
            **kw,
        )
    if cfg.weight_sync == "ipc":
        return IpcSync(pool, server_ranks=cfg.server_ranks, **kw)
    raise ValueError(f"rollout.weight_sync must be one of {WEIGHT_SYNC_MODES}, got {cfg.weight_sync!r}")
