"""Per-step metrics: a console line (every ``console_every`` training steps; evaluations always),
a JSONL file and/or TensorBoard. Only rank 0 writes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class MetricsLogger:
    """Writes ``metrics.jsonl`` (append; a resumed run continues the same file) and TensorBoard."""

    def __init__(self, out_dir: str | os.PathLike, backend: str = "jsonl", console_every: int = 1):
        self.out_dir = Path(out_dir)
        self.console_every = console_every
        self.enabled = is_rank0()
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if backend in ("jsonl", "both"):
            self._jsonl = open(self.out_dir / "metrics.jsonl", "a", buffering=1)
        if backend in ("tensorboard", "both"):
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "phase": prefix, **metrics}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
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
