"""Per-step metrics: a console line (every ``console_every`` training steps; evaluations always),
a JSONL file and/or TensorBoard. Only rank 0 writes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from gopd_mega.storage import storage_error


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class MetricsLogger:
    """Writes ``metrics.jsonl`` (append; a resumed run continues the same file) and TensorBoard.

    :meth:`truncate` (called when a run starts or resumes at a step) drops what an earlier,
    interrupted attempt logged after that step: the rows of metrics.jsonl, and in TensorBoard the
    events from the next step on (its ``purge_step``), so no step appears twice."""

    def __init__(self, out_dir: str | os.PathLike, backend: str = "jsonl", console_every: int = 1):
        self.out_dir = Path(out_dir)
        self.console_every = console_every
        self.backend = backend
        self.enabled = is_rank0()
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if backend in ("jsonl", "both"):
            self._jsonl = open(self.out_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - open for the run, closed by close()
        if backend in ("tensorboard", "both"):
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))

    def truncate(self, step: int) -> int:
        """Keep only what was logged for steps <= ``step``; returns the number of rows dropped."""
        if not self.enabled:
            return 0
        dropped = 0
        if self._jsonl is not None:
            self._jsonl.close()
            path = self.out_dir / "metrics.jsonl"
            kept = []
            for line in path.read_text().splitlines():
                try:
                    keep = int(json.loads(line)["step"]) <= step
                except (ValueError, KeyError, TypeError):
                    keep = False  # a line cut short by a kill
                if keep:
                    kept.append(line + "\n")
                else:
                    dropped += 1
            if dropped:
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(kept))
                os.replace(tmp, path)
            self._jsonl = open(path, "a", buffering=1)  # noqa: SIM115 - open for the run, closed by close()
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=step + 1)
        return dropped

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "phase": prefix, **metrics}
        if self._jsonl is not None:
            try:
                self._jsonl.write(json.dumps(record) + "\n")
            except OSError as exc:
                raise (storage_error(exc, self.out_dir, f"metrics of step {step}") or exc) from None
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)
        if self.console_every and (prefix != "train" or step % self.console_every == 0):
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if isinstance(v, (int, float)))
            print(f"[{prefix} {step}] {shown}", flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"
