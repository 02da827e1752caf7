"""Calls that global rank 0 makes on behalf of every rank (HTTP to servers), with the outcome
broadcast so that all ranks return the same value or raise the same error (none is left waiting
in a collective while another has failed). Single-process runs need no torch.distributed.
"""

from __future__ import annotations

import torch.distributed as dist

from gopd_mega.rollout.sglang import SGLangError


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def run_on_rank0(fn, what: str):
    """Run ``fn()`` on global rank 0 and give every rank its result. An exception on rank 0 is
    raised on every rank: the same exception (type and message), with a note naming ``what``;
    one that cannot be pickled arrives as SGLangError with its message."""
    outcome: list = [None]
    if global_rank() == 0:
        try:
            outcome[0] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            exc.add_note(f"(during {what}, on global rank 0)")
            outcome[0] = ("error", exc, f"{what}: {type(exc).__name__}: {exc}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        try:
            dist.broadcast_object_list(outcome, src=0)
        except Exception:  # noqa: BLE001 - e.g. an unpicklable exception: send its message
            if outcome[0] is not None and outcome[0][0] == "error" and global_rank() == 0:
                outcome[0] = ("error", None, outcome[0][2])
            dist.broadcast_object_list(outcome, src=0)
    if outcome[0][0] == "error":
        err = outcome[0][1]
        raise err if err is not None else SGLangError(outcome[0][2])
    return outcome[0][1]
