"""How a run stops: exit codes, errors printed once, signals that save, and naming a lost rank.

Exit codes of ``gopd-train`` (the same on every rank):
    0    finished.
    2    refused or stopped by a failure that its one-line message names: a config field, an
         input file, a checkpoint, a full or read-only disk, non-finite training, a dead or
         stopped rank.
    75   stopped by SIGTERM, SIGINT or SIGUSR1 after saving a checkpoint: run the same command
         again to resume (75 is sysexits' EX_TEMPFAIL, "try again later").
    130  interrupted (Ctrl-C) before the training loop began: nothing was saved.
    1    a bug: Python's traceback.

Printed once. An error that every rank meets alike (a config field, a file every rank reads) is
printed by rank 0. Work that only some ranks do runs through :func:`on_rank0` or
:func:`on_every_rank`, which tell every rank whether it failed anywhere: the lowest failing rank
prints its error, the others raise :class:`PeerFailed` and exit quietly.

Signals (:class:`StopSignals`). Inside the training loop SIGTERM, SIGINT and SIGUSR1 only set a
flag; at the end of each step the ranks agree (an all-reduce, since a signal may reach only some
of them), save a checkpoint and raise :class:`StopRequested`. Repeated signals change nothing
(torchrun forwards the one it got, Slurm may send its own): SIGKILL abandons the step.

Lost ranks (:func:`start_heartbeat`, :func:`diagnose`). Every rank publishes its host and pid in
the job's TCPStore and bumps a counter there every 2 s. When a collective fails (a peer's socket
closed, or ``train.dist_timeout_s`` passed), the ranks that still run read the counters twice and
name the ranks whose counter stood still: dead or stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

EXIT_ERROR = 2
EXIT_STOPPED = 75
EXIT_INTERRUPTED = 130
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
HEARTBEAT_S = 2.0


class TrainingError(RuntimeError):
    """Training cannot go on (updates skipped for non-finite values, non-finite weights); the
    message says what was found and where."""


class PeerFailed(RuntimeError):
    """Another rank failed in work this rank shared and reports it itself: exit quietly."""

    report_here = False


class StopRequested(Exception):
    """A stop signal reached the job: every rank has saved ``checkpoint`` after ``step``."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        saved = f"checkpoint {checkpoint} saved" if checkpoint is not None else "nothing new to save"
        super().__init__(f"stopped by {name} after step {step}: {saved}; run the same command again to resume")


def rank() -> int:
    """This process's global rank: torchrun's RANK (also what init_distributed sets), else the world's."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def report_here(exc: BaseException) -> bool:
    """Whether this rank prints ``exc``: the rank :func:`on_every_rank` chose, else rank 0."""
    return getattr(exc, "report_here", rank() == 0)


def _device():
    from gopd_mega.platform import device

    return device()


def _failed_ranks(failed: bool) -> list[int]:
    flags = torch.zeros(world(), dtype=torch.float32, device=_device())
    flags[dist.get_rank()] = float(failed)
    dist.all_reduce(flags)
    return [r for r, f in enumerate(flags.tolist()) if f]


def on_every_rank(fn):
    """Collective: ``fn()`` on every rank, then every rank learns whether it failed anywhere. A
    failing rank re-raises its own error (the lowest one is marked to print it), the others
    raise PeerFailed. Returns this rank's value."""
    err, value = None, None
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the others know
        err = exc
    if world() > 1:
        failed = _failed_ranks(err is not None)
        if failed and err is None:
            raise PeerFailed(f"rank {failed[0]} failed")
        if err is not None:
            with contextlib.suppress(AttributeError):
                err.report_here = dist.get_rank() == failed[0]
    if err is not None:
        raise err
    return value


def on_rank0(fn):
    """Collective: ``fn()`` on global rank 0 only; its value (picklable) on every rank, or its
    error on rank 0 and PeerFailed on the others."""
    if world() == 1:
        return fn()
    box, err = [True, None], None
    if dist.get_rank() == 0:
        try:
            box = [True, fn()]
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others know
            err, box = exc, [False, None]
    dist.broadcast_object_list(box, src=0)
    if err is not None:
        raise err
    if not box[0]:
        raise PeerFailed("rank 0 failed")
    return box[1]


# ----------------------------------------------------------------------------- signals


class StopSignals:
    """``with StopSignals() as stop:`` SIGTERM, SIGINT and SIGUSR1 set ``stop.received`` (the
    first signal's number) instead of ending the process; :meth:`agreed` (collective) is the
    signal any rank got. Handlers are installed only from the main thread and restored on exit."""

    def __init__(self):
        self.received = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.received:
            return
        self.received = signum
        if rank() == 0:  # os.write: safe wherever the handler interrupts (print may be mid-write)
            os.write(
                1,
                f"got {signal.Signals(signum).name}: the run stops after this step, with a checkpoint "
                "(SIGKILL abandons the step)\n".encode(),
            )

    def agreed(self) -> int:
        """Collective: the signal number some rank received, else 0."""
        if world() == 1:
            return self.received
        t = torch.tensor([float(self.received)], device=_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


# ----------------------------------------------------------------------------- lost ranks

_beat: dict = {}


def _prefix() -> str:
    # torchrun keeps its store over restarts: keys of an earlier attempt must not count
    return f"gopd/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def _store(timeout_s: float = 10.0):
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def start_heartbeat() -> None:
    """Publish this rank's host and pid and bump its counter every HEARTBEAT_S seconds in the
    job's store (a daemon thread; once per process, multi-rank jobs only)."""
    if _beat or world() == 1:
        return
    try:
        store = _store()
        if store is None:
            return
        me = rank()
        store.set(f"{_prefix()}who/{me}", json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        store.add(f"{_prefix()}beat/{me}", 1)
    except Exception:  # noqa: BLE001 - without a reachable store, lost ranks are not named
        return

    def beat():
        while True:
            time.sleep(HEARTBEAT_S)
            try:
                store.add(f"{_prefix()}beat/{me}", 1)
            except Exception:  # noqa: BLE001 - the store went away: the job is ending
                return

    _beat["thread"] = threading.Thread(target=beat, name="gopd-heartbeat", daemon=True)
    _beat["thread"].start()


def mark_failed(message: str, printed: bool) -> None:
    """Leave this rank's error in the store, so the ranks it leaves behind do not report it as lost."""
    if world() == 1 or not _beat:
        return
    try:
        store = _store(timeout_s=5)
        store.set(f"{_prefix()}failed/{rank()}", json.dumps({"message": message, "printed": printed}))
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


def is_collective_failure(exc: BaseException) -> bool:
    """A torch.distributed collective or store failed (a peer closed its connection, a timeout)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, dist.DistError):
            return True
        text = str(exc)
        if isinstance(exc, RuntimeError) and any(
            s in text
            for s in (
                "gloo/transport",
                "Connection reset by peer",
                "Connection closed by peer",
                "Timed out waiting",
                "NCCL communicator",
                "ProcessGroupNCCL",
            )
        ):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]  # the loop ends on None
    return False


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if "] " in text and text.startswith("["):  # gloo: '[.../pair.cc:537] Read error ...'
        text = text.split("] ", 1)[1]
    return text.split(". ")[0][:200]


def diagnose(exc: BaseException, timeout_s: float | None = None) -> tuple[str, bool]:
    """After a collective failed on this rank: (one-line message, whether this rank prints it).

    Ranks that left their own error (:func:`mark_failed`) are not blamed, and when they printed it
    nothing more is said. Of the others, those whose heartbeat stood still over 2.5 beats are
    named by rank, host and pid. The lowest rank still running prints."""
    me, n = rank(), world()
    cause = _first_line(exc)
    waited = f" (train.dist_timeout_s={timeout_s:g})" if timeout_s and "imed out" in cause else ""
    if not _beat:
        return f"rank {me}: a collective operation failed: {cause}", me == 0
    try:
        store = _store(timeout_s=5)
        p = _prefix()
        failed = {}
        for r in range(n):
            if r != me and store.check([f"{p}failed/{r}"]):
                failed[r] = json.loads(store.get(f"{p}failed/{r}"))
        before = {r: store.add(f"{p}beat/{r}", 0) for r in range(n)}
        time.sleep(2.5 * HEARTBEAT_S)
        after = {r: store.add(f"{p}beat/{r}", 0) for r in range(n)}
        who = {}
        for r in range(n):
            if store.check([f"{p}who/{r}"]):
                who[r] = json.loads(store.get(f"{p}who/{r}"))
    except Exception:  # noqa: BLE001 - the store is gone with the process that held it
        host = os.environ.get("MASTER_ADDR", "?")
        return (
            f"rank {me}: lost the job's store at {host}:{os.environ.get('MASTER_PORT', '?')}, held by rank 0 "
            f"(or torchrun) on {host}: it is dead or stopped ({cause})"
        ), me == 1
    lost = [r for r in range(n) if r != me and r not in failed and after[r] == before[r]]
    running = [r for r in range(n) if r not in failed and r not in lost]
    here = bool(running) and me == running[0]
    unprinted = [f"rank {r}: {f['message']}" for r, f in sorted(failed.items()) if not f["printed"]]
    if failed and not lost:
        return ("; ".join(unprinted) if unprinted else ""), here and bool(unprinted)
    if not lost:
        return f"rank {me}: a collective operation failed{waited}, yet every rank still beats: {cause}", here

    def name(r):
        w = who.get(r, {})
        return f"rank {r} (host {w.get('host', '?')}, pid {w.get('pid', '?')})"

    verb = "is" if len(lost) == 1 else "are"
    return (
        f"{', '.join(name(r) for r in lost)} {verb} dead or stopped: no heartbeat for {2.5 * HEARTBEAT_S:g} s after a "
        f"collective failed on rank {me}{waited}: {cause}"
    ), here
