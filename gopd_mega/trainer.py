"""The driver loop, one for every objective (G-OPD, GRPO).

    for each step:
        prompts   = data.next_batch()                      # each names its teacher
        rollout   = coordinator.collect(step, prompts)     # responses + sampler log-probs
        scores    = algorithm.score(rollout, prompts)      # G-OPD: every teacher, its own layout, and
                                                           # pi_ref (not scored at lambda = 1, where it
                                                           # cancels); GRPO: verifier rewards
        out       = algorithm.update(rollout, scores)      # update_student: clipped IS loss, AdamW
                                                           # (train.updates_per_rollout steps)
        coordinator.refresh(student, step + 1)             # weight sync, once, to the engine
        metrics   = step_metrics(out, algorithm.metrics(...))   # one schema, the algorithm's own keys

``algorithm`` is the gopd_mega.steps.Step of ``objective.kind`` (steps.STEPS): GOPDStep distils
the teachers (estimators sampled / full_vocab / top_k, returns token / sequence); GRPOStep does RL
from a verifier instead (how the paper makes its domain teachers): no teachers; each prompt is
sampled ``samples_per_prompt`` times, every response gets ``reward(prompt, response_ids)``, the
group-normalised advantage is broadcast to its tokens and trained with the same clipped,
IS-weighted, aggregated loss (objective.advantage_token_loss). Both update the student through
:meth:`Distiller.update_student`; the optimizer's step advances the LR schedule.

SPMD: every rank runs this loop and holds the whole (small) rollout batch as token ids (one global
batch: a server engine is driven by rank 0 and its batch broadcast, see rollout/coordinator.py); each
model splits the rows over its own data-parallel group and all-gathers its log-probs, so models
with different TP/PP layouts can score the same batch. The G-OPD math is in objective.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from gopd_mega.checkpoint import CheckpointManager
from gopd_mega.config import RunConfig, to_dict
from gopd_mega.failures import StopRequested, StopSignals, TrainingError, on_rank0
from gopd_mega.metrics import MetricsLogger, is_rank0
from gopd_mega.objective import token_weights
from gopd_mega.rollout.base import RolloutBatch
from gopd_mega.rollout.coordinator import RolloutCoordinator, Sampling
from gopd_mega.rollout.servers import startup_checks

if TYPE_CHECKING:
    from gopd_mega.model.distill import Projection
    from gopd_mega.models import ShardedGPT
    from gopd_mega.rollout.base import RolloutEngine

# Re-exported: the scoring helpers, loss builders and reward hook moved to gopd_mega.steps.
from gopd_mega.steps import (  # noqa: F401
    RewardFn,
    Step,
    advantage_loss_builder,
    build_step,
    gopd_loss_builder,
    rows_by_teacher,
    score_teachers,
    score_teachers_top_k,
)


@dataclass
class Models:
    """The megatron-core models of a run (gopd_mega.models.ShardedGPT each)."""

    student: ShardedGPT
    reference: Any  # a ShardedGPT, or a rollout.servers.ServerScorer (same logprobs()); None: served elsewhere
    teachers: dict  # route key -> ShardedGPT (or a rollout.servers.ServerScorer: same logprobs())
    engine: RolloutEngine
    rollout: RolloutCoordinator | None = None  # None: one around ``engine``
    check_copies: dict = field(default_factory=dict)  # route key -> local copy of a served teacher
    projections: dict = field(default_factory=dict)  # route key -> model.distill.Projection (full_vocab)
    reference_projection: Projection | None = None  # the reference's Projection (full_vocab, lam != 1)


class Distiller:
    """Runs the training of a :class:`RunConfig`: G-OPD, GRPO or any objective.kind of
    gopd_mega.steps.STEPS, all through the same loop (:meth:`train_step`)."""

    def __init__(
        self,
        cfg: RunConfig,
        models: Models,
        data,
        optimizer,
        evaluate: Callable | None = None,
        reward: RewardFn | None = None,
    ):
        self.reward = reward
        self.cfg = cfg
        self.algorithm: Step = build_step(self)
        """The per-step algorithm of objective.kind (gopd_mega.steps.STEPS); GRPO refuses a missing reward."""
        self.m = models
        self.data = data
        self.optimizer = optimizer
        self.evaluate = evaluate
        self.settings = cfg.objective  # an ObjectiveConfig is the LossSettings of the loss functions
        self.ckpt = CheckpointManager(cfg.train.out_dir, keep_last=cfg.train.keep_last)
        # With a progress bar the console gets a metrics line every 10 steps, else every step.
        self.logger = MetricsLogger(
            cfg.train.out_dir, cfg.train.log_backend, console_every=10 if cfg.train.progress else 1
        )
        self.step = 0
        self.update_stats: list[dict[str, float]] = []
        """Per-update statistics of the last step with updates_per_rollout > 1."""
        self.rollout = models.rollout or RolloutCoordinator(models.engine)
        self._pending: tuple[list, dict] | None = (
            None  # (prompts, data state before drawing them) of a prefetched batch
        )
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
        """One step of the objective's algorithm (self.algorithm, gopd_mega.steps): rollout ->
        score -> update(s) -> weight sync -> metrics (step_metrics)."""
        t0 = time.perf_counter()
        prompts, batch = self.next_rollout()
        t_rollout = time.perf_counter()
        scores = self.algorithm.score(batch, prompts)
        self.rollout.before_training()
        out = self.algorithm.update(batch, scores)
        self.sync_weights(self.step + 1)
        t_end = time.perf_counter()
        own, breakdown = self.algorithm.metrics(batch, scores, out)
        return self.step_metrics(out, batch, own, breakdown, t0, t_rollout, t_end)

    def step_metrics(
        self,
        out: dict,
        batch: RolloutBatch,
        own: dict[str, float],
        breakdown: dict[str, float],
        t0: float,
        t_rollout: float,
        t_end: float,
    ) -> dict[str, float]:
        """The metrics of a step, every objective alike: loss, grad_norm (means over the updates),
        lr (of the next update), the algorithm's ``own`` scalars, entropy, response_len,
        sampler_mismatch (token mean |pi_old - sampler| log-prob), tokens_per_s, rollout_s, step_s,
        policy_lag (steps between the weights that sampled the batch and the student's); with
        train.updates_per_rollout > 1 also clip_frac and ratio_dev (over the updates: update_student)
        and updates; then the algorithm's ``breakdown`` (per teacher, per route)."""
        mask = batch.loss_mask
        metrics = {
            "loss": out["loss"],
            "grad_norm": out["grad_norm"],
            "lr": self.optimizer.lr,
            **own,
            "entropy": out["entropy"],
            "response_len": float(batch.response_lens.float().mean()),
            "sampler_mismatch": float(
                ((out["logp"] - batch.sampler_logp).abs() * mask).sum() / mask.sum().clamp(min=1)
            ),
            "tokens_per_s": float(mask.sum()) / (t_end - t0),
            "rollout_s": t_rollout - t0,
            "step_s": t_end - t0,
            "policy_lag": float(self.step - min(int(v) for v in batch.weight_versions))
            if all(v.isdigit() for v in batch.weight_versions)
            else 0.0,
        }
        if self.cfg.train.updates_per_rollout > 1:  # what the clip did over the updates
            metrics.update(
                clip_frac=out["clip_frac"], ratio_dev=out["ratio_dev"], updates=float(len(self.update_stats))
            )
        metrics.update(breakdown)
        return metrics

    def update_student(
        self,
        batch: RolloutBatch,
        loss_fn_for: Callable,
        clipped_for: Callable,
        temperature: float,
        old_logp: torch.Tensor | None = None,
    ) -> dict:
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
            out = self.m.student.train_step(
                batch.tokens, mask, fn, train.micro_batch_size, temperature=temperature, max_tokens=budget
            )
            self._count_skip(out)
            return out
        old = (
            old_logp
            if old_logp is not None
            else self.m.student.logprobs(batch.tokens, mask, temperature, train.micro_batch_size, max_tokens=budget)
        )
        self.update_stats = []
        per_token: dict[str, torch.Tensor] = {}
        for rows in torch.tensor_split(all_rows, train.updates_per_rollout):
            sub = mask[rows]
            fn = loss_fn_for(rows, token_weights(sub, agg), old[rows])
            out = self.m.student.train_step(
                batch.tokens[rows], sub, fn, train.micro_batch_size, temperature=temperature, max_tokens=budget
            )
            self._count_skip(out)
            clipped = clipped_for(rows, out["logp"], old[rows])
            m = sub.clone().float()
            m[:, 0] = 0
            self.update_stats.append(
                {
                    "loss": out["loss"],
                    "grad_norm": out["grad_norm"],
                    "entropy": out["entropy"],
                    "tokens": float(m.sum()),
                    "clipped": float((clipped.float() * m).sum()),
                    "ratio_dev": float(((out["logp"] - old[rows]).exp().sub(1).abs() * m).sum()),
                }
            )
            for k, v in out.items():  # a HiddenLoss's per-token outputs, each from its update's forward
                if isinstance(v, torch.Tensor) and k != "logp":
                    per_token.setdefault(k, torch.zeros(mask.shape))[rows] = v
        stats = self.update_stats
        n = max(1.0, sum(u["tokens"] for u in stats))
        return {
            "logp": old,
            **{k: sum(u[k] for u in stats) / len(stats) for k in ("loss", "grad_norm", "entropy")},
            "clip_frac": sum(u["clipped"] for u in stats) / n,
            "ratio_dev": sum(u["ratio_dev"] for u in stats) / n,
            **per_token,
        }

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
            _say(
                f"step {self.step}: update skipped (no optimizer step): loss={loss:.4g}, grad_norm={norm:.4g} is not "
                f"finite ({self.skips_in_a_row} in a row; train.max_consecutive_skips={limit} stops the run)"
            )
        if self.skips_in_a_row >= limit:
            loss, norm = self._step_skips[-1]
            newest = self.ckpt.latest()
            raise TrainingError(
                f"training stopped at step {self.step}: {self.skips_in_a_row} updates in a row were skipped "
                f"because the loss or the gradient norm was not finite (last: loss={loss:.4g}, grad_norm={norm:.4g}; "
                f"train.max_consecutive_skips={limit}); the weights are those of the last finite update and were not "
                f"saved; lower optim.lr or check the inputs; newest checkpoint: {newest or 'none'}"
            )

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
            bar = tqdm(
                total=cfg.steps,
                initial=self.step,
                disable=not (cfg.progress and is_rank0()),
                desc=self.algorithm.describe(),
            )
            while self.step < cfg.steps:
                metrics = self.train_step()
                self.step += 1
                metrics["skipped_updates"] = float(len(self._step_skips))
                history.append(metrics)
                on_rank0(lambda: self.logger.log(self.step, metrics))  # noqa: B023 - called here, in this pass
                self._report_skips()
                bar.update(1)
                key = self.algorithm.progress_key
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
        assert self.evaluate is not None  # the loop calls this only when there is an evaluation
        result = self.evaluate()  # collective
        on_rank0(lambda: self.logger.log(self.step, result, prefix="eval"))


def _say(message: str) -> None:
    if is_rank0():
        print(message, flush=True)
