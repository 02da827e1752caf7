"""The G-OPD driver loop.

    for each step:
        prompts   = data.next_batch()                      # each names its teacher
        rollout   = engine.generate(prompts)               # responses + sampler log-probs
        t_logp    = teacher[route].logprobs(rollout)       # every teacher, its own layout
        r_logp    = reference.logprobs(rollout)            # pi_ref (initial student by default)
        student.train_step(rollout, gopd_token_loss(...))  # advantage, clipped IS loss, AdamW
        engine.update_weights(student)                     # weight sync to the rollout engine

With ``objective.kind: grpo`` the same loop does RL from a verifier instead (how the paper makes
its domain teachers): no teachers; each prompt is sampled ``samples_per_prompt`` times, every
response gets ``reward(prompt, response_ids)``, the group-normalised advantage is broadcast to its
tokens and trained with the same clipped, IS-weighted, aggregated loss (objective.grpo_token_loss).

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
from gopd_mega.objective import grpo_advantage, grpo_token_loss, gopd_token_loss, k3_kl, token_metrics, token_weights
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


def score_teachers(teachers: dict, batch: RolloutBatch, routes: list[str], temperature: float) -> torch.Tensor:
    """Teacher log-probs [N, S]: each row is scored by the teacher its prompt routes to."""
    out = torch.zeros(batch.tokens.shape, dtype=torch.float32)
    for name, rows in rows_by_teacher(routes, teachers).items():
        out[rows] = teachers[name].logprobs(batch.tokens[rows], batch.loss_mask[rows], temperature)
    return out


def gopd_loss_builder(
    teacher_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    weights: torch.Tensor,
    settings,
) -> Callable:
    """For ShardedGPT.train_step: rows of the full batch -> per-token weighted G-OPD loss fn."""

    def build(rows: torch.Tensor) -> Callable:
        t, r, q, w = (x[rows].reshape(-1) for x in (teacher_logp, ref_logp, sampler_logp, weights))

        def token_loss(logp: torch.Tensor, sl: slice) -> torch.Tensor:
            loss, _, _ = gopd_token_loss(
                logp, teacher_logp=t[sl], ref_logp=r[sl], sampler_logp=q[sl], old_logp=None, settings=settings
            )
            return loss * w[sl]

        return token_loss

    return build


def grpo_loss_builder(
    advantage: torch.Tensor,
    ref_logp: torch.Tensor | None,
    sampler_logp: torch.Tensor,
    weights: torch.Tensor,
    settings,
) -> Callable:
    """For ShardedGPT.train_step: rows of the full batch -> per-token weighted GRPO loss fn.
    ``advantage`` [N, S] is each sequence's group-normalised advantage on its response tokens."""

    def build(rows: torch.Tensor) -> Callable:
        a, q, w = (x[rows].reshape(-1) for x in (advantage, sampler_logp, weights))
        r = None if ref_logp is None else ref_logp[rows].reshape(-1)

        def token_loss(logp: torch.Tensor, sl: slice) -> torch.Tensor:
            loss, _ = grpo_token_loss(logp, advantage=a[sl], ref_logp=None if r is None else r[sl],
                                      sampler_logp=q[sl], old_logp=None, settings=settings)
            return loss * w[sl]

        return token_loss

    return build


RewardFn = Callable[[object, list], float]
"""GRPO's verifier hook: (Prompt, response token ids, stop token included) -> scalar reward.
gopd_mega.run.verifier_reward adapts a (record, response_text) -> reward verifier to it."""


class Distiller:
    """Runs G-OPD (or, with objective.kind='grpo', GRPO) training for a :class:`RunConfig`."""

    def __init__(self, cfg: RunConfig, models: Models, data, optimizer, evaluate: Callable | None = None,
                 reward: RewardFn | None = None):
        if cfg.objective.kind == "grpo" and reward is None:
            raise ValueError("objective.kind='grpo' needs a reward function (a verifier for the prompts' domain)")
        self.reward = reward
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
        if cfg.objective.kind == "grpo":
            return self._grpo_update(prompts, batch, t0, t_rollout)

        temperature = cfg.rollout.temperature
        teacher_logp = score_teachers(self.m.teachers, batch, routes, temperature)
        ref_logp = self.m.reference.logprobs(batch.tokens, batch.loss_mask, temperature)
        weights = token_weights(batch.loss_mask, self.settings.aggregation)
        builder = gopd_loss_builder(teacher_logp, ref_logp, batch.sampler_logp, weights, self.settings)

        out = self.m.student.train_step(batch.tokens, batch.loss_mask, builder, cfg.train.micro_batch_size)
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

    def _grpo_update(self, prompts: list, batch: RolloutBatch, t0: float, t_rollout: float) -> dict[str, float]:
        """The GRPO branch of train_step: verifier rewards -> group advantages -> one update."""
        cfg = self.cfg
        n = cfg.rollout.samples_per_prompt
        rewards = torch.tensor([float(self.reward(p, batch.response_ids(i))) for i, p in enumerate(prompts)],
                               dtype=torch.float64)
        if not torch.isfinite(rewards).all():
            bad = int((~torch.isfinite(rewards)).nonzero()[0])
            raise ValueError(f"reward function returned {float(rewards[bad])} for prompt {prompts[bad].text!r}")
        mask = batch.loss_mask
        advantage = grpo_advantage(rewards, n)[:, None] * mask.to(torch.float32)
        temperature = cfg.rollout.temperature
        ref_logp = self.m.reference.logprobs(batch.tokens, batch.loss_mask, temperature) if self.settings.kl_coef > 0 else None
        weights = token_weights(mask, self.settings.aggregation)
        builder = grpo_loss_builder(advantage, ref_logp, batch.sampler_logp, weights, self.settings)
        out = self.m.student.train_step(batch.tokens, mask, builder, cfg.train.micro_batch_size)
        self.optimizer.step_schedule()
        self.sync_weights()
        t_end = time.perf_counter()

        m = mask.float()
        groups = rewards.view(-1, n)
        metrics = {
            "loss": out["loss"],
            "grad_norm": out["grad_norm"],
            "lr": self.optimizer.lr,
            "reward_mean": float(rewards.mean()),
            # fraction of responses with a positive reward (= correct, for a 0/1 verifier)
            "success_rate": float((rewards > 0).double().mean()),
            # groups whose responses all got the same reward: zero advantage, no learning signal
            "flat_groups": float((groups.max(dim=1).values == groups.min(dim=1).values).double().mean()),
            "entropy": out["entropy"],
            "response_len": float(batch.response_lens.float().mean()),
            "sampler_mismatch": float(((out["logp"] - batch.sampler_logp).abs() * m).sum() / m.sum().clamp(min=1)),
            "tokens_per_s": float(m.sum()) / (t_end - t0),
            "rollout_s": t_rollout - t0,
            "step_s": t_end - t0,
        }
        if ref_logp is not None:
            metrics["kl_ref"] = float((k3_kl(out["logp"], ref_logp) * m).sum() / m.sum().clamp(min=1))
        for route in sorted({str(p.teacher) for p in prompts}):
            rows = torch.tensor([i for i, p in enumerate(prompts) if str(p.teacher) == route])
            metrics[f"reward/{route}"] = float(rewards[rows].mean())
        return metrics

    # ------------------------------------------------------------------ loop
    def fit(self) -> list[dict[str, float]]:
        cfg = self.cfg.train
        self.maybe_resume()
        start = self.step
        history = []
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and is_rank0()), desc="GRPO" if self.cfg.objective.kind == "grpo" else f"G-OPD lam={self.settings.lam}")
        while self.step < cfg.steps:
            metrics = self.train_step()
            self.step += 1
            history.append(metrics)
            self.logger.log(self.step, metrics)
            bar.update(1)
            key = "reward_mean" if "reward_mean" in metrics else "reverse_kl"
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", **{key: f"{metrics[key]:.3f}"})
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.evaluate is not None:
                self.logger.log(self.step, self.evaluate(), prefix="eval")
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save()
        bar.close()
        if self.step > start and (not cfg.save_every or self.step % cfg.save_every):
            self.save()  # the final state, unless the loop has just saved it
        return history
