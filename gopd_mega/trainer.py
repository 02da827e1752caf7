"""The G-OPD driver loop.

    for each step:
        prompts   = data.next_batch()                      # each names its teacher
        rollout   = engine.generate(prompts)               # responses + sampler log-probs
        t_logp    = teacher[route].logprobs(rollout)       # every teacher, its own layout
        r_logp    = reference.logprobs(rollout)            # pi_ref (initial student by default)
        student.train_step(rollout, gopd_token_loss(...))  # advantage, clipped IS loss, AdamW
        engine.update_weights(student)                     # weight sync to the rollout engine

SPMD: every rank runs this loop and holds the whole (small) rollout batch as token ids; each
model splits the rows over its own data-parallel group and all-gathers its log-probs, so models
with different TP/PP layouts can score the same batch. The G-OPD math is in objective.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from gopd_mega.checkpoint import CheckpointManager
from gopd_mega.config import RunConfig, to_dict
from gopd_mega.metrics import MetricsLogger, is_rank0
from gopd_mega.objective import gopd_token_loss, token_metrics, token_weights
from gopd_mega.rollout.base import RolloutBatch
from gopd_mega.rollout.embedded import EmbeddedEngine


@dataclass
class Models:
    """The megatron-core models of a run (gopd_mega.models.ShardedGPT each)."""

    student: object
    reference: object
    teachers: dict  # route key -> ShardedGPT
    engine: object  # a RolloutEngine


def rows_by_teacher(routes: list[str], teachers: dict) -> dict[str, torch.Tensor]:
    """Batch rows routed to each teacher (teachers with no rows in this batch are left out)."""
    rows = {name: torch.tensor([i for i, r in enumerate(routes) if r == name], dtype=torch.long) for name in teachers}
    return {name: r for name, r in rows.items() if r.numel()}


def score_teachers(teachers: dict, batch: RolloutBatch, routes: list[str], temperature: float,
                   max_tokens: int | None = None) -> torch.Tensor:
    """Teacher log-probs [N, S]: each row is scored by the teacher its prompt routes to
    (micro-batches of at most ``max_tokens`` packed positions)."""
    out = torch.zeros(batch.tokens.shape, dtype=torch.float32)
    for name, rows in rows_by_teacher(routes, teachers).items():
        out[rows] = teachers[name].logprobs(batch.tokens[rows], batch.loss_mask[rows], temperature, max_tokens=max_tokens)
    return out


def gopd_loss_builder(
    teacher_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    weights: torch.Tensor,
    settings,
) -> Callable:
    """For ShardedGPT.train_step: per-token weighted G-OPD loss fn(logp, flat_index), where
    flat_index indexes the full batch's [N * S] tensors."""
    t, r, q, w = (x.reshape(-1) for x in (teacher_logp, ref_logp, sampler_logp, weights))

    def token_loss(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.cpu()
        loss, _, _ = gopd_token_loss(
            logp, teacher_logp=t[idx].to(logp), ref_logp=r[idx].to(logp), sampler_logp=q[idx].to(logp),
            old_logp=None, settings=settings
        )
        return loss * w[idx].to(logp)

    return token_loss


class Distiller:
    """Runs G-OPD training for a :class:`RunConfig` over a prompt dataset."""

    def __init__(self, cfg: RunConfig, models: Models, data, optimizer, evaluate: Callable | None = None):
        self.cfg = cfg
        self.m = models
        self.data = data
        self.optimizer = optimizer
        self.evaluate = evaluate
        self.settings = cfg.objective.loss_settings()
        self.ckpt = CheckpointManager(cfg.train.out_dir)
        # With a progress bar the console gets a metrics line every 10 steps, else every step.
        self.logger = MetricsLogger(cfg.train.out_dir, cfg.train.log_backend, console_every=10 if cfg.train.progress else 1)
        self.step = 0

    # ------------------------------------------------------------------ state
    def save(self) -> None:
        trainer_state = {"data": self.data.state_dict(), "config": to_dict(self.cfg)}
        self.ckpt.save(self.step, self.m.student, self.optimizer, trainer_state)

    def maybe_resume(self) -> bool:
        path = self.ckpt.latest() if self.cfg.train.resume else None
        if path is None:
            return False
        meta = self.ckpt.load(path, self.m.student, self.optimizer)
        self.data.load_state_dict(meta["data"])
        self.step = meta["step"]
        self.sync_weights()
        if is_rank0():
            print(f"resumed from {path} at step {self.step}", flush=True)
        return True

    def sync_weights(self) -> None:
        """Weight refresh of the rollout engine after an update."""
        if isinstance(self.m.engine, EmbeddedEngine):
            self.m.engine.update_weights(self.m.student)
            return
        # A server engine (SGLang) loads an exported Hugging Face checkpoint from disk.
        from gopd_mega.hf import export_hf

        path = Path(self.cfg.train.out_dir) / "rollout_weights"
        export_hf(self.m.student, path, source_dir=self.cfg.student.load)
        self.m.engine.update_weights(str(path))

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        prompts = self.data.next_batch(cfg.train.prompts_per_step)
        prompts = [p for p in prompts for _ in range(cfg.rollout.samples_per_prompt)]
        routes = [p.teacher for p in prompts]
        batch = self.m.engine.generate(
            [p.ids for p in prompts],
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.rollout.max_new_tokens,
            seed=cfg.train.seed * 1_000_003 + self.step,
        )
        t_rollout = time.perf_counter()

        temperature = cfg.rollout.temperature
        budget = cfg.train.max_tokens_per_micro_batch
        teacher_logp = score_teachers(self.m.teachers, batch, routes, temperature, budget)
        ref_logp = self.m.reference.logprobs(batch.tokens, batch.loss_mask, temperature, max_tokens=budget)
        weights = token_weights(batch.loss_mask, self.settings.aggregation)
        builder = gopd_loss_builder(teacher_logp, ref_logp, batch.sampler_logp, weights, self.settings)

        out = self.m.student.train_step(batch.tokens, batch.loss_mask, builder, cfg.train.micro_batch_size,
                                        max_tokens=budget)
        self.optimizer.step_schedule()
        self.sync_weights()
        t_end = time.perf_counter()

        mask = batch.loss_mask
        student_logp = out["logp"]
        # Diagnostics are computed from the pre-update log-probs the loss used (ratio = 1).
        _, advantage, clipped = gopd_token_loss(
            student_logp, teacher_logp=teacher_logp, ref_logp=ref_logp, sampler_logp=None, old_logp=None, settings=self.settings
        )
        metrics = {
            "loss": out["loss"],
            "grad_norm": out["grad_norm"],
            "lr": self.optimizer.lr,
            **{k: v for k, v in token_metrics(student_logp, mask, teacher_logp, ref_logp, advantage, clipped, self.settings.lam).items() if k != "tokens"},
            "entropy": out["entropy"],
            "response_len": float(batch.response_lens.float().mean()),
            "sampler_mismatch": float(((student_logp - batch.sampler_logp).abs() * mask).sum() / mask.sum().clamp(min=1)),
            "tokens_per_s": float(mask.sum()) / (t_end - t0),
            "rollout_s": t_rollout - t0,
            "step_s": t_end - t0,
        }
        for name, rows in rows_by_teacher(routes, self.m.teachers).items():
            m = mask[rows].float()
            metrics[f"reverse_kl/{name}"] = float(((student_logp[rows] - teacher_logp[rows]) * m).sum() / m.sum().clamp(min=1))
        return metrics

    # ------------------------------------------------------------------ loop
    def fit(self) -> list[dict[str, float]]:
        cfg = self.cfg.train
        self.maybe_resume()
        start = self.step
        history = []
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and is_rank0()), desc=f"G-OPD lam={self.settings.lam}")
        while self.step < cfg.steps:
            metrics = self.train_step()
            self.step += 1
            history.append(metrics)
            self.logger.log(self.step, metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", rkl=f"{metrics['reverse_kl']:.3f}")
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.evaluate is not None:
                self.logger.log(self.step, self.evaluate(), prefix="eval")
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save()
        bar.close()
        if self.step > start and (not cfg.save_every or self.step % cfg.save_every):
            self.save()  # the final state, unless the loop has just saved it
        return history
