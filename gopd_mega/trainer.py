"""The G-OPD driver loop.

    for each step:
        prompts   = data.next_batch()                      # each names its teacher
        rollout   = coordinator.collect(step, prompts)     # responses + sampler log-probs
        t_logp    = teacher[route].logprobs(rollout)       # every teacher, its own layout
        r_logp    = reference.logprobs(rollout)            # pi_ref (initial student by default);
                                                           # not scored at lambda = 1, where it cancels
        student.train_step(rollout, gopd_token_loss(...))  # advantage, clipped IS loss, AdamW
                                                           # (train.updates_per_rollout steps)
        coordinator.refresh(student, step + 1)             # weight sync, once, to the engine

With ``objective.kind: grpo`` the same loop does RL from a verifier instead (how the paper makes
its domain teachers): no teachers; each prompt is sampled ``samples_per_prompt`` times, every
response gets ``reward(prompt, response_ids)``, the group-normalised advantage is broadcast to its
tokens and trained with the same clipped, IS-weighted, aggregated loss (objective.advantage_token_loss).

SPMD: every rank runs this loop and holds the whole (small) rollout batch as token ids (one global
batch: a server engine is driven by rank 0 and its batch broadcast, see rollout/coordinator.py); each
model splits the rows over its own data-parallel group and all-gathers its log-probs, so models
with different TP/PP layouts can score the same batch. The G-OPD math is in objective.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from gopd_mega.checkpoint import CheckpointManager
from gopd_mega.config import RunConfig, to_dict
from gopd_mega.failures import StopRequested, StopSignals, TrainingError, on_rank0
from gopd_mega.metrics import MetricsLogger, is_rank0
from gopd_mega.model.distill import FullVocabLoss, TopK, TopKLoss
from gopd_mega.objective import (advantage_token_loss, gopd_token_loss, grpo_advantage, k3_kl, sequence_advantage, token_metrics,
                                 token_weights)
from gopd_mega.rollout.base import RolloutBatch
from gopd_mega.rollout.coordinator import RolloutCoordinator, Sampling
from gopd_mega.rollout.servers import startup_checks


@dataclass
class Models:
    """The megatron-core models of a run (gopd_mega.models.ShardedGPT each)."""

    student: object
    reference: object
    teachers: dict  # route key -> ShardedGPT (or a rollout.servers.ServerScorer: same logprobs())
    engine: object  # a RolloutEngine
    rollout: object = None  # a rollout.coordinator.RolloutCoordinator (None: one around ``engine``)
    check_copies: dict = field(default_factory=dict)  # route key -> local copy of a served teacher
    projections: dict = field(default_factory=dict)  # route key -> model.distill.Projection (full_vocab)
    reference_projection: object = None  # the reference's Projection (full_vocab, lam != 1)


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


def score_teachers_top_k(teachers: dict, batch: RolloutBatch, routes: list[str], k: int, temperature: float,
                         vocab_size: int, max_tokens: int | None = None) -> TopK:
    """Each row's teacher's top-k log-probs and the sampled token's, per position (a local model
    or an SGLang server), as the top-k estimator's K_t (``vocab_size``: the student's)."""
    N, S = batch.tokens.shape
    ids, logp, target = torch.full((N, S, k), -1, dtype=torch.long), torch.zeros(N, S, k), torch.zeros(N, S)
    for name, rows in rows_by_teacher(routes, teachers).items():
        ids[rows], logp[rows], target[rows] = teachers[name].top_k_logprobs(
            batch.tokens[rows], batch.loss_mask[rows], k, temperature, max_tokens=max_tokens)
    return TopK.from_teacher(batch.tokens, batch.loss_mask, ids, logp, target, vocab_size)


def gopd_loss_builder(
    teacher_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    sampler_logp: torch.Tensor,
    weights: torch.Tensor,
    settings,
    old_logp: torch.Tensor | None = None,
) -> Callable:
    """For ShardedGPT.train_step: per-token weighted G-OPD loss fn(logp, flat_index), where
    flat_index indexes the full batch's [N * S] tensors. ``old_logp`` [N, S]: pi_old of the batch
    (None: the student's own detached log-probs); ``ref_logp`` None at lambda = 1."""
    t, q, w = (x.reshape(-1) for x in (teacher_logp, sampler_logp, weights))
    r = None if ref_logp is None else ref_logp.reshape(-1)
    o = None if old_logp is None else old_logp.reshape(-1)

    def token_loss(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.cpu()
        loss, _, _ = gopd_token_loss(
            logp, teacher_logp=t[idx].to(logp), ref_logp=None if r is None else r[idx].to(logp), sampler_logp=q[idx].to(logp),
            old_logp=None if o is None else o[idx].to(logp), settings=settings
        )
        return loss * w[idx].to(logp)

    return token_loss


def advantage_loss_builder(
    advantage: torch.Tensor,
    ref_logp: torch.Tensor | None,
    sampler_logp: torch.Tensor,
    weights: torch.Tensor,
    settings,
    old_logp: torch.Tensor | None = None,
) -> Callable:
    """For ShardedGPT.train_step: per-token weighted policy loss of a precomputed advantage
    fn(logp, flat_index) (objective.advantage_token_loss), where flat_index indexes the full
    batch's [N * S] tensors. ``advantage`` [N, S]: GRPO's group-normalised sequence advantage on
    each response's tokens, or G-OPD's return-to-go advantage (objective.returns = 'sequence');
    ``old_logp`` [N, S] pi_old (None: the student's own detached log-probs); ``ref_logp`` only
    for GRPO's k3 term (kl_coef > 0)."""
    a, q, w = (x.reshape(-1) for x in (advantage, sampler_logp, weights))
    r = None if ref_logp is None else ref_logp.reshape(-1)
    o = None if old_logp is None else old_logp.reshape(-1)

    def token_loss(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.cpu()
        loss, _ = advantage_token_loss(logp, advantage=a[idx].to(logp), ref_logp=None if r is None else r[idx].to(logp),
                                       sampler_logp=q[idx].to(logp), old_logp=None if o is None else o[idx].to(logp),
                                       settings=settings)
        return loss * w[idx].to(logp)

    return token_loss


def _nothing_clipped(rows, logp: torch.Tensor, old) -> torch.Tensor:
    """The estimators without a ratio to clip (full_vocab, top_k): update_student's clipped_for."""
    return torch.zeros(logp.shape, dtype=torch.bool)


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
        self.settings = cfg.objective  # an ObjectiveConfig is the LossSettings of the loss functions
        self.ckpt = CheckpointManager(cfg.train.out_dir, keep_last=cfg.train.keep_last)
        # With a progress bar the console gets a metrics line every 10 steps, else every step.
        self.logger = MetricsLogger(cfg.train.out_dir, cfg.train.log_backend, console_every=10 if cfg.train.progress else 1)
        self.step = 0
        self.update_stats: list[dict[str, float]] = []
        """Per-update statistics of the last step with updates_per_rollout > 1."""
        self.rollout = models.rollout or RolloutCoordinator(models.engine)
        self._pending = None  # (prompts, data state before drawing them) of a prefetched batch
        self.skips_in_a_row = 0
        """Updates skipped in a row for a non-finite loss or gradient norm (fp16 overflows aside)."""
        self._step_skips: list[tuple[float, float]] = []  # (loss, grad_norm) of this step's skipped updates

    # ------------------------------------------------------------------ state
    def save(self):
        """Collective: a checkpoint of this step (gopd_mega.checkpoint); returns its directory."""
        # With a prefetched batch the data has already moved past its prompts: save the state
        # before them, so a resumed run draws them again.
        data_state = self._pending[1] if self._pending is not None else self.data.state_dict()
        trainer_state = {"data": data_state, "config": to_dict(self.cfg)}
        return self.ckpt.save(self.step, self.m.student, self.optimizer, trainer_state)

    def maybe_resume(self) -> bool:
        """Collective: continue from the newest checkpoint that verifies (train.resume), saying
        which newer ones were skipped and why."""
        if not self.cfg.train.resume:
            return False
        path, skipped = self.ckpt.resume_point()
        for why in skipped:
            _say(f"checkpoint skipped: {why}")
        if path is None:
            return False
        meta = self.ckpt.load(path, self.m.student, self.optimizer, verified=True)
        self.data.load_state_dict(meta["data"])
        self.step = meta["step"]
        self.sync_weights(self.step)
        _say(f"resumed from {path} at step {self.step} (verified against its manifest)")
        return True

    def sync_weights(self, version: int) -> None:
        """Weight refresh of the rollout engine (collective, once): it samples from the student,
        whose weights are ``version`` (updates applied), from now on (rollout/coordinator.py)."""
        self.rollout.refresh(self.m.student, version)

    def _sampling(self, step: int) -> Sampling:
        r = self.cfg.rollout
        return Sampling(r.temperature, r.top_p, r.max_new_tokens, seed=self.cfg.train.seed * 1_000_003 + step)

    def next_rollout(self) -> tuple[list, RolloutBatch]:
        """The prompts and the global rollout batch of this step (every rank the same); with
        rollout.overlap also starts sampling the next step's batch in the background."""
        cfg = self.cfg
        if self._pending is not None:
            prompts, self._pending = self._pending[0], None
        else:
            prompts = self.data.next_batch(cfg.train.prompts_per_step)
        spp = cfg.rollout.samples_per_prompt
        batch = self.rollout.collect(self.step, [p.ids for p in prompts], spp, self._sampling(self.step))
        if self.rollout.overlap and self.step + 1 < cfg.train.steps:
            state = self.data.state_dict()
            upcoming = self.data.next_batch(cfg.train.prompts_per_step)
            self.rollout.prefetch(self.step + 1, [p.ids for p in upcoming], spp, self._sampling(self.step + 1))
            self._pending = (upcoming, state)
        return [p for p in prompts for _ in range(spp)], batch

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        prompts, batch = self.next_rollout()
        routes = [p.teacher for p in prompts]
        t_rollout = time.perf_counter()
        if cfg.objective.kind == "grpo":
            return self._grpo_update(prompts, batch, t0, t_rollout)

        if cfg.objective.estimator == "full_vocab":  # the exact expectation over the vocabulary at each prefix
            return self._expected_step(batch, routes, self._full_vocab_update, t0, t_rollout)
        if cfg.objective.estimator == "top_k":  # the same over the teacher's top-k, the sampled token and a tail
            return self._expected_step(batch, routes, self._top_k_update, t0, t_rollout)
        temperature = cfg.rollout.temperature
        budget = cfg.train.max_tokens_per_micro_batch
        teacher_logp = score_teachers(self.m.teachers, batch, routes, temperature, budget)
        ref_logp = self._reference_logp(batch, temperature)  # None where it cancels (lambda = 1)
        loss_ref = ref_logp if cfg.objective.needs_reference() else None  # a metric alone: not in the loss
        self.rollout.before_training()
        out = self._gopd_update(batch, teacher_logp, loss_ref, temperature)
        self.sync_weights(self.step + 1)
        t_end = time.perf_counter()

        mask = batch.loss_mask
        student_logp = out["logp"]
        # Diagnostics are computed from the pre-update log-probs (pi_old; ratio = 1).
        if cfg.objective.returns == "sequence":  # the return-to-go advantage the update used
            advantage, clipped = out["advantage"], torch.zeros(mask.shape, dtype=torch.bool)
        else:
            _, advantage, clipped = gopd_token_loss(
                student_logp, teacher_logp=teacher_logp, ref_logp=loss_ref, sampler_logp=None, old_logp=None, settings=self.settings
            )
        metrics = {
            "loss": out["loss"],
            "grad_norm": out["grad_norm"],
            "lr": self.optimizer.lr,
            **{k: v for k, v in token_metrics(student_logp, mask, teacher_logp, ref_logp, advantage, clipped, self.settings.lam).items() if k != "tokens"},
            **self._run_metrics(out, batch, t0, t_rollout, t_end),
        }
        if cfg.train.updates_per_rollout > 1:  # what the clip did over the updates
            metrics.update(clip_frac=out["clip_frac"], ratio_dev=out["ratio_dev"], updates=float(len(self.update_stats)))
        for name, rows in rows_by_teacher(routes, self.m.teachers).items():
            m = mask[rows].float()
            metrics[f"reverse_kl/{name}"] = float(((student_logp[rows] - teacher_logp[rows]) * m).sum() / m.sum().clamp(min=1))
        return metrics

    def _run_metrics(self, out: dict, batch: RolloutBatch, t0: float, t_rollout: float, t_end: float) -> dict:
        """The G-OPD step's metrics that do not depend on the estimator."""
        mask = batch.loss_mask
        return {
            "entropy": out["entropy"],
            "response_len": float(batch.response_lens.float().mean()),
            "sampler_mismatch": float(((out["logp"] - batch.sampler_logp).abs() * mask).sum() / mask.sum().clamp(min=1)),
            "tokens_per_s": float(mask.sum()) / (t_end - t0),
            "rollout_s": t_rollout - t0,
            "step_s": t_end - t0,
            "policy_lag": float(self.step - min(int(v) for v in batch.weight_versions)) if all(
                v.isdigit() for v in batch.weight_versions) else 0.0,
        }

    def _expected_step(self, batch: RolloutBatch, routes: list[str], update: Callable, t0: float,
                       t_rollout: float) -> dict[str, float]:
        """The G-OPD step of the estimators that take the expectation over the next token at each
        visited prefix (full_vocab, top_k): ``update(batch, routes, temperature)`` -> the student's
        update(s) with the per-token outputs of gopd_mega.model.distill (PER_TOKEN). Metrics
        (token means over the response tokens): reverse_kl (and per teacher) = KL(pi_theta ||
        pi_T) at each prefix (exact for full_vocab; between the coarsened distributions for
        top_k), log_z, kl_target = KL(pi_theta || q_t), and the estimator-free ones."""
        cfg = self.cfg
        out = update(batch, routes, cfg.rollout.temperature)
        self.sync_weights(self.step + 1)
        t_end = time.perf_counter()
        m = batch.loss_mask.float()

        def mean(x: torch.Tensor, rows=slice(None)) -> float:
            return float((x[rows] * m[rows]).sum() / m[rows].sum().clamp(min=1))

        metrics = {
            "loss": out["loss"],
            "grad_norm": out["grad_norm"],
            "lr": self.optimizer.lr,
            "reverse_kl": mean(out["reverse_kl"]),
            "log_z": mean(out["log_z"]),
            "kl_target": mean(out["token_loss"] + out["log_z"]),
            **self._run_metrics(out, batch, t0, t_rollout, t_end),
        }
        if cfg.train.updates_per_rollout > 1:
            metrics["updates"] = float(len(self.update_stats))
        for name, rows in rows_by_teacher(routes, self.m.teachers).items():
            metrics[f"reverse_kl/{name}"] = mean(out["reverse_kl"], rows)
        return metrics

    def update_student(self, batch: RolloutBatch, loss_fn_for: Callable, clipped_for: Callable,
                       temperature: float, old_logp: torch.Tensor | None = None) -> dict:
        """The policy update(s) on one rollout batch (G-OPD and GRPO alike); the student's
        log-probs use the rollout temperature like every other model's (loss, importance weight
        and metrics alike).

        ``loss_fn_for(rows, weights, old_logp)`` -> the token-loss callback of ShardedGPT.train_step
        for the batch rows ``rows`` (aggregation ``weights`` [n, S]; ``old_logp`` [n, S] or None);
        ``clipped_for(rows, logp, old_logp)`` -> which tokens the PPO clip bound ([n, S] bool).

        ``train.updates_per_rollout`` = 1 (the paper): one optimizer step on the whole batch with
        pi_old = the student's own detached log-probs of that forward (ratio 1: the clip never
        binds). N > 1 (PPO style): pi_old = a no-grad pass of the student before the first
        update; the rows are split into N contiguous mini-batches, one optimizer step each, and
        each mini-batch's aggregation weights are normalised over that mini-batch
        (objective.token_weights), so every update's loss has the scale of a whole-batch loss.
        ``old_logp`` [N, S]: that no-grad pass when the caller has already run it (returns =
        'sequence' needs it for its advantage), so that it is not run twice; unused for N = 1.

        Returns loss, grad_norm, entropy (means over the updates), logp [N, S] (pi_old), and for
        N > 1 clip_frac and ratio_dev = mean |rho - 1| (token means over all updates, rho from each
        update's own forward); per-update values go to ``self.update_stats``.
        """
        train, mask, agg = self.cfg.train, batch.loss_mask, self.settings.aggregation
        budget = train.max_tokens_per_micro_batch
        all_rows = torch.arange(mask.shape[0])
        self._step_skips = []
        if train.updates_per_rollout == 1:
            fn = loss_fn_for(all_rows, token_weights(mask, agg), None)
            out = self.m.student.train_step(batch.tokens, mask, fn, train.micro_batch_size, temperature=temperature,
                                            max_tokens=budget)
            self._count_skip(out)
            return out
        old = old_logp if old_logp is not None else \
            self.m.student.logprobs(batch.tokens, mask, temperature, train.micro_batch_size, max_tokens=budget)
        self.update_stats = []
        per_token: dict[str, torch.Tensor] = {}
        for rows in torch.tensor_split(all_rows, train.updates_per_rollout):
            sub = mask[rows]
            fn = loss_fn_for(rows, token_weights(sub, agg), old[rows])
            out = self.m.student.train_step(batch.tokens[rows], sub, fn, train.micro_batch_size, temperature=temperature,
                                            max_tokens=budget)
            self._count_skip(out)
            clipped = clipped_for(rows, out["logp"], old[rows])
            m = sub.clone().float()
            m[:, 0] = 0
            self.update_stats.append({
                "loss": out["loss"], "grad_norm": out["grad_norm"], "entropy": out["entropy"], "tokens": float(m.sum()),
                "clipped": float((clipped.float() * m).sum()),
                "ratio_dev": float(((out["logp"] - old[rows]).exp().sub(1).abs() * m).sum()),
            })
            for k, v in out.items():  # a HiddenLoss's per-token outputs, each from its update's forward
                if isinstance(v, torch.Tensor) and k != "logp":
                    per_token.setdefault(k, torch.zeros(mask.shape))[rows] = v
        stats = self.update_stats
        n = max(1.0, sum(u["tokens"] for u in stats))
        return {"logp": old, **{k: sum(u[k] for u in stats) / len(stats) for k in ("loss", "grad_norm", "entropy")},
                "clip_frac": sum(u["clipped"] for u in stats) / n, "ratio_dev": sum(u["ratio_dev"] for u in stats) / n,
                **per_token}

    def _count_skip(self, out: dict) -> None:
        """Track updates the optimizer skipped because the loss or gradient norm was not finite
        (an fp16 overflow is the loss scaler's normal business and is not counted)."""
        if out.get("skipped") and not out.get("overflow"):
            self.skips_in_a_row += 1
            self._step_skips.append((out["loss"], out["grad_norm"]))
        elif not out.get("skipped"):
            self.skips_in_a_row = 0

    def _report_skips(self) -> None:
        """Say which updates of the step just taken were skipped; stop the run (TrainingError)
        after train.max_consecutive_skips of them in a row."""
        limit = self.cfg.train.max_consecutive_skips
        for loss, norm in self._step_skips:
            _say(f"step {self.step}: update skipped (no optimizer step): loss={loss:.4g}, grad_norm={norm:.4g} is not "
                 f"finite ({self.skips_in_a_row} in a row; train.max_consecutive_skips={limit} stops the run)")
        if self.skips_in_a_row >= limit:
            loss, norm = self._step_skips[-1]
            newest = self.ckpt.latest()
            raise TrainingError(
                f"training stopped at step {self.step}: {self.skips_in_a_row} updates in a row were skipped because the "
                f"loss or the gradient norm was not finite (last: loss={loss:.4g}, grad_norm={norm:.4g}; "
                f"train.max_consecutive_skips={limit}); the weights are those of the last finite update and were not "
                f"saved; lower optim.lr or check the inputs; newest checkpoint: {newest or 'none'}")

    def _reference_logp(self, batch: RolloutBatch, temperature: float) -> torch.Tensor | None:
        """pi_ref's log-probs of the batch [N, S] when the loss needs them or this step logs the
        metrics that need them (objective.reference_metrics_every); None otherwise (not scored)."""
        obj = self.cfg.objective
        every = obj.reference_metrics_every
        if not obj.needs_reference() and not (every and self.step % every == 0):
            return None
        return self.m.reference.logprobs(batch.tokens, batch.loss_mask, temperature,
                                         max_tokens=self.cfg.train.max_tokens_per_micro_batch)

    def _gopd_update(self, batch: RolloutBatch, teacher_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                     temperature: float) -> dict:
        """update_student with the G-OPD loss (objective.gopd_token_loss; ``ref_logp`` None at lambda = 1).

        objective.returns = 'sequence': pi_old of the whole batch from one no-grad student pass
        (the one update_student needs anyway for updates_per_rollout > 1), the return-to-go
        advantage objective.sequence_advantage (groups: one prompt's samples), and the same
        clipped, importance-weighted policy loss on it (objective.advantage_token_loss, no k3:
        kl_coef = 0 for G-OPD). The advantage used is returned as out['advantage'] [N, S]."""
        s = self.settings
        if self.cfg.objective.returns == "sequence":
            train = self.cfg.train
            old = self.m.student.logprobs(batch.tokens, batch.loss_mask, temperature, train.micro_batch_size,
                                          max_tokens=train.max_tokens_per_micro_batch)
            advantage = sequence_advantage(old, teacher_logp, ref_logp, s.lam, batch.loss_mask,
                                           self.cfg.rollout.samples_per_prompt)

            def seq_loss_fn_for(rows, weights, o):
                return advantage_loss_builder(advantage[rows], None, batch.sampler_logp[rows], weights, s, old_logp=o)

            def seq_clipped_for(rows, logp, o):
                return advantage_token_loss(logp, advantage=advantage[rows], ref_logp=None, sampler_logp=None, old_logp=o,
                                            settings=s)[1]

            out = self.update_student(batch, seq_loss_fn_for, seq_clipped_for, temperature, old_logp=old)
            return {**out, "advantage": advantage}

        def ref(rows):
            return None if ref_logp is None else ref_logp[rows]

        def loss_fn_for(rows, weights, old):
            return gopd_loss_builder(teacher_logp[rows], ref(rows), batch.sampler_logp[rows], weights, s, old_logp=old)

        def clipped_for(rows, logp, old):
            return gopd_token_loss(logp, teacher_logp=teacher_logp[rows], ref_logp=ref(rows), sampler_logp=None,
                                   old_logp=old, settings=s)[2]

        return self.update_student(batch, loss_fn_for, clipped_for, temperature)

    def _full_vocab_update(self, batch: RolloutBatch, routes: list[str], temperature: float) -> dict:
        """update_student with the exact full-vocabulary loss (model.distill.FullVocabLoss): for
        each update, every teacher's hidden states of its rows, and the reference's (lam != 1),
        are delivered to the student's ranks; the heads were re-sharded at build time."""
        lam, budget = self.settings.lam, self.cfg.train.max_tokens_per_micro_batch
        names = list(self.m.teachers)
        route = torch.tensor([names.index(r) for r in routes], dtype=torch.long)
        ref = self.m.reference_projection
        self.rollout.before_training()

        def loss_fn_for(rows, weights, old):
            tokens, mask, sub = batch.tokens[rows], batch.loss_mask[rows], route[rows]
            teachers = [(None, None)] * len(names)
            for name, own in rows_by_teacher([routes[int(i)] for i in rows], self.m.teachers).items():
                p = self.m.projections[name]
                teachers[names.index(name)] = (p.hidden(tokens, mask, own, max_tokens=budget), p.head)
            reference = None if lam == 1.0 else (ref.hidden(tokens, mask, max_tokens=budget), ref.head)
            return FullVocabLoss(teachers, sub, reference, weights, lam, tokens.shape[1])

        return self.update_student(batch, loss_fn_for, _nothing_clipped, temperature)

    def _top_k_update(self, batch: RolloutBatch, routes: list[str], temperature: float) -> dict:
        """update_student with the top-k loss (model.distill.TopKLoss): each row's teacher's top-k
        (local or served) and, at lam != 1, the reference's log-probs at those ids."""
        lam, budget = self.settings.lam, self.cfg.train.max_tokens_per_micro_batch
        top = score_teachers_top_k(self.m.teachers, batch, routes, self.cfg.objective.top_k, temperature,
                                   self.m.student.cfg.vocab_size, budget)
        if lam != 1.0:
            top.ref_logp = self.m.reference.logprobs_at(batch.tokens, batch.loss_mask, top.ids, temperature,
                                                        max_tokens=budget)
        self.rollout.before_training()

        def loss_fn_for(rows, weights, old):
            return TopKLoss(top.rows(rows), weights, lam)

        return self.update_student(batch, loss_fn_for, _nothing_clipped, temperature)

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
        ref_logp = self._reference_logp(batch, temperature)  # scored for kl_coef > 0 (or the kl_ref metric)
        metric_ref, ref_logp = ref_logp, (ref_logp if cfg.objective.needs_reference() else None)
        s = self.settings

        def loss_fn_for(rows, weights, old):
            ref = None if ref_logp is None else ref_logp[rows]
            return advantage_loss_builder(advantage[rows], ref, batch.sampler_logp[rows], weights, s, old_logp=old)

        def clipped_for(rows, logp, old):
            ref = None if ref_logp is None else ref_logp[rows]
            return advantage_token_loss(logp, advantage=advantage[rows], ref_logp=ref, sampler_logp=None, old_logp=old, settings=s)[1]

        self.rollout.before_training()
        out = self.update_student(batch, loss_fn_for, clipped_for, temperature)
        self.sync_weights(self.step + 1)
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
        if cfg.train.updates_per_rollout > 1:  # what the clip did over the updates
            metrics.update(clip_frac=out["clip_frac"], ratio_dev=out["ratio_dev"], updates=float(len(self.update_stats)))
        if metric_ref is not None:
            metrics["kl_ref"] = float((k3_kl(out["logp"], metric_ref) * m).sum() / m.sum().clamp(min=1))
        for route in sorted({str(p.teacher) for p in prompts}):
            rows = torch.tensor([i for i, p in enumerate(prompts) if str(p.teacher) == route])
            metrics[f"reward/{route}"] = float(rewards[rows].mean())
        return metrics

    # ------------------------------------------------------------------ loop
    def fit(self) -> list[dict[str, float]]:
        """Train to train.steps. SIGTERM, SIGINT or SIGUSR1 (on any rank) ends the loop after the
        current step with a checkpoint and raises failures.StopRequested; an update whose loss or
        gradient norm is not finite is skipped and reported, and too many in a row raise
        failures.TrainingError."""
        cfg = self.cfg.train
        with StopSignals() as stop:
            resumed = self.maybe_resume()
            # Rows an interrupted attempt logged after this step would appear twice.
            on_rank0(lambda: self.logger.truncate(self.step))
            if not resumed and not self.rollout.spmd:
                self.sync_weights(0)  # the servers start from exactly the trainer's student, version '0'
            if self.step < cfg.steps:
                startup_checks(self.cfg, self.m, self.rollout, self.data, fresh=not resumed)
            signum = stop.agreed()
            if signum:
                raise StopRequested(signum, self.step, None)
            start = self.step
            history = []
            bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and is_rank0()), desc="GRPO" if self.cfg.objective.kind == "grpo" else f"G-OPD lam={self.settings.lam}")
            while self.step < cfg.steps:
                metrics = self.train_step()
                self.step += 1
                metrics["skipped_updates"] = float(len(self._step_skips))
                history.append(metrics)
                on_rank0(lambda: self.logger.log(self.step, metrics))
                self._report_skips()
                bar.update(1)
                key = "reward_mean" if "reward_mean" in metrics else "reverse_kl"
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", **{key: f"{metrics[key]:.3f}"})
                signum = stop.agreed()
                if signum and self.step < cfg.steps:
                    bar.close()
                    raise StopRequested(signum, self.step, self.save())
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.evaluate is not None:
                    self._log_eval()
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
            bar.close()
            if self.step > start and cfg.eval_every and self.step % cfg.eval_every and self.evaluate is not None:
                self._log_eval()  # the final student, unless just evaluated
            if self.step > start and (not cfg.save_every or self.step % cfg.save_every):
                self.save()  # the final state, unless the loop has just saved it
            return history

    def _log_eval(self) -> None:
        result = self.evaluate()  # collective
        on_rank0(lambda: self.logger.log(self.step, result, prefix="eval"))


def _say(message: str) -> None:
    if is_rank0():
        print(message, flush=True)
