"""Run a function on N gloo processes (CPU) and collect what each rank returns.

    results = run_distributed(fn, world_size=2, args=(...))   # list, one entry per rank

``fn(*args)`` runs in a fresh spawned process with torch.distributed initialised (gloo, the
platform patches applied through gopd_mega.platform.init_distributed). A failure on any rank
raises here with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    # One intra-op thread per process: 2 processes on 2 cores, and deterministic reductions.
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        from gopd_mega.platform import init_distributed

        init_distributed(timeout_s=300)
        result = fn(*args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    # The result is saved: leave without the interpreter's teardown. After a successful run, C++
    # threads of the torch.distributed machinery have aborted a worker there ("terminate called
    # without an active exception", SIGABRT, seen once in CI), failing a test whose work had passed;
    # gopd-train's ranks leave the same way (gopd_mega.cli._exit).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world_size: int = 2, args: tuple = ()) -> list:
    """Spawn ``world_size`` processes running ``fn(*args)``; return their results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_worker, args=(world_size, _free_port(), out_dir, fn, args),
                               nprocs=world_size, join=True, start_method="spawn")
        except Exception as exc:
            errors = []
            for r in range(world_size):
                path = os.path.join(out_dir, f"rank{r}.pt")
                if os.path.exists(path):
                    rec = torch.load(path, weights_only=False)
                    if not rec["ok"]:
                        errors.append(f"--- rank {r} ---\n{rec['error']}")
            raise RuntimeError("distributed test failed:\n" + "\n".join(errors)) from exc
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)["result"]
                for r in range(world_size)]


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a command a test runs as its own job: this process's, without the
    torch.distributed variables an in-process single-rank world may have set (the child would try
    to rendezvous on this process's MASTER_PORT), plus ``extra``."""
    return {k: v for k, v in os.environ.items() if k not in DIST_VARS} | extra
