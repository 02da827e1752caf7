"""The per-step algorithms: what one Distiller step does between the rollout and the weight sync.

A :class:`Step` is one training objective's part of the loop (gopd_mega.trainer.Distiller):

    scores  = step.score(batch, prompts)   # teachers / reference / verifier rewards of the rollout
    rollout.before_training()              # (the driver) colocated servers give their memory back
    out     = step.update(batch, scores)   # the student's update(s), through Distiller.update_student
    sync weights                           # (the driver)
    own, by = step.metrics(batch, scores, out)   # this objective's own metric keys

and the driver adds the metrics every objective shares (Distiller.step_metrics). ``objective.kind``
picks the class from :data:`STEPS`. A new objective is one subclass here, one entry in
:data:`STEPS` and its name in gopd_mega.config.OBJECTIVE_KINDS (tests/test_steps.py checks that
the two agree); the driver loop does not change.

The loss builders (callbacks of ShardedGPT.train_step) and the teacher-scoring helpers live here
too; gopd_mega.trainer re-exports them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gopd_mega.model.distill import FullVocabLoss, TopK, TopKLoss
from gopd_mega.objective import (
    advantage_token_loss,
    gopd_token_loss,
    grpo_advantage,
    k3_kl,
    sequence_advantage,
    token_metrics,
)
from gopd_mega.rollout.base import RolloutBatch

if TYPE_CHECKING:
    from gopd_mega.trainer import Distiller


RewardFn = Callable[[object, list], float]
"""GRPO's verifier hook: (Prompt, response token ids, stop token included) -> scalar reward.
gopd_mega.run.verifier_reward adapts a (record, response_text) -> reward verifier to it."""


# ----------------------------------------------------------------------------- scoring helpers


def rows_by_teacher(routes: list[str], teachers: dict) -> dict[str, torch.Tensor]:
    """Batch rows routed to each teacher (teachers with no rows in this batch are left out)."""
    rows = {name: torch.tensor([i for i, r in enumerate(routes) if r == name], dtype=torch.long) for name in teachers}
    return {name: r for name, r in rows.items() if r.numel()}


def score_teachers(
    teachers: dict, batch: RolloutBatch, routes: list[str], temperature: float, max_tokens: int | None = None
) -> torch.Tensor:
    """Teacher log-probs [N, S]: each row is scored by the teacher its prompt routes to
    (micro-batches of at most ``max_tokens`` packed positions)."""
    out = torch.zeros(batch.tokens.shape, dtype=torch.float32)
    for name, rows in rows_by_teacher(routes, teachers).items():
        out[rows] = teachers[name].logprobs(
            batch.tokens[rows], batch.loss_mask[rows], temperature, max_tokens=max_tokens
        )
    return out


def score_teachers_top_k(
    teachers: dict,
    batch: RolloutBatch,
    routes: list[str],
    k: int,
    temperature: float,
    vocab_size: int,
    max_tokens: int | None = None,
) -> TopK:
    """Each row's teacher's top-k log-probs and the sampled token's, per position (a local model
    or an SGLang server), as the top-k estimator's K_t (``vocab_size``: the student's)."""
    N, S = batch.tokens.shape
    ids, logp, target = torch.full((N, S, k), -1, dtype=torch.long), torch.zeros(N, S, k), torch.zeros(N, S)
    for name, rows in rows_by_teacher(routes, teachers).items():
        ids[rows], logp[rows], target[rows] = teachers[name].top_k_logprobs(
            batch.tokens[rows], batch.loss_mask[rows], k, temperature, max_tokens=max_tokens
        )
    return TopK.from_teacher(batch.tokens, batch.loss_mask, ids, logp, target, vocab_size)


# ----------------------------------------------------------------------------- loss builders


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
            logp,
            teacher_logp=t[idx].to(logp),
            ref_logp=None if r is None else r[idx].to(logp),
            sampler_logp=q[idx].to(logp),
            old_logp=None if o is None else o[idx].to(logp),
            settings=settings,
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
        loss, _ = advantage_token_loss(
            logp,
            advantage=a[idx].to(logp),
            ref_logp=None if r is None else r[idx].to(logp),
            sampler_logp=q[idx].to(logp),
            old_logp=None if o is None else o[idx].to(logp),
            settings=settings,
        )
        return loss * w[idx].to(logp)

    return token_loss


def _nothing_clipped(rows, logp: torch.Tensor, old) -> torch.Tensor:
    """The estimators without a ratio to clip (full_vocab, top_k): update_student's clipped_for."""
    return torch.zeros(logp.shape, dtype=torch.bool)


# ----------------------------------------------------------------------------- the interface


class Step(ABC):
    """One objective's part of a Distiller step (module docstring). Built once per Distiller
    with the Distiller itself (its config, models, settings, step counter and update_student)."""

    progress_key: str = "loss"
    """The metric shown beside the loss on the progress bar."""

    def __init__(self, distiller: Distiller):
        self.d = distiller

    @property
    def cfg(self):
        return self.d.cfg

    @property
    def settings(self):
        """The policy-loss settings (objective.LossSettings: the run's ObjectiveConfig)."""
        return self.d.cfg.objective

    def describe(self) -> str:
        """Progress-bar title."""
        return type(self).__name__

    @abstractmethod
    def score(self, batch: RolloutBatch, prompts: list) -> object:
        """Everything the update needs from models other than the student, or from a verifier
        (teacher / reference log-probs, rewards and the advantages that do not depend on the
        student), for the batch whose row i answers ``prompts[i]``; runs before the rollout
        engine hands its memory to training."""

    @abstractmethod
    def update(self, batch: RolloutBatch, scores) -> dict:
        """The student's update(s) on the batch (through Distiller.update_student); returns its
        output (loss, grad_norm, entropy, logp = pi_old [N, S], per-token outputs, ...)."""

    @abstractmethod
    def metrics(self, batch: RolloutBatch, scores, out: dict) -> tuple[dict[str, float], dict[str, float]]:
        """This objective's own metrics: (scalars, logged after lr; breakdowns such as per
        teacher or per route, logged last). The shared ones come from Distiller.step_metrics."""

    def reference_logp(self, batch: RolloutBatch) -> torch.Tensor | None:
        """pi_ref's log-probs of the batch [N, S] when the loss needs them or this step logs the
        metrics that need them (objective.reference_metrics_every); None otherwise (not scored)."""
        obj = self.cfg.objective
        every = obj.reference_metrics_every
        if not obj.needs_reference() and not (every and self.d.step % every == 0):
            return None
        return self.d.m.reference.logprobs(
            batch.tokens,
            batch.loss_mask,
            self.cfg.rollout.temperature,
            max_tokens=self.cfg.train.max_tokens_per_micro_batch,
        )


# ----------------------------------------------------------------------------- G-OPD


@dataclass
class GOPDScores:
    """What G-OPD's update needs besides the student, per estimator."""

    routes: list[str]
    """Each row's teacher (route key)."""
    teacher_logp: torch.Tensor | None = None
    """sampled: the routed teacher's log-probs of the sampled tokens [N, S]."""
    ref_logp: torch.Tensor | None = None
    """sampled: pi_ref's [N, S] when scored (for the loss, or for the metrics alone)."""
    top: TopK | None = None
    """top_k: the teachers' top-k (and at lam != 1 the reference's log-probs at those ids)."""


class GOPDStep(Step):
    """G-OPD: distil each prompt's teacher with the lambda-scaled implicit reward
    (objective.gopd_token_loss), by objective.estimator: 'sampled' (returns 'token' or
    'sequence'), 'full_vocab' or 'top_k' (the expectation over the next token at each prefix)."""

    progress_key = "reverse_kl"

    def describe(self) -> str:
        return f"G-OPD lam={self.settings.lam}"

    def _loss_ref(self, scores: GOPDScores) -> torch.Tensor | None:
        """The reference log-probs the loss uses (None where it cancels, at lambda = 1: then a
        scored reference is a metric alone)."""
        return scores.ref_logp if self.cfg.objective.needs_reference() else None

    # -- score
    def score(self, batch: RolloutBatch, prompts: list) -> GOPDScores:
        cfg, m = self.cfg, self.d.m
        routes = [p.teacher for p in prompts]
        temperature, budget = cfg.rollout.temperature, cfg.train.max_tokens_per_micro_batch
        estimator = cfg.objective.estimator
        if estimator == "full_vocab":  # the teachers' hidden states are delivered per update, in the loss
            return GOPDScores(routes)
        if estimator == "top_k":
            top = score_teachers_top_k(
                m.teachers, batch, routes, cfg.objective.top_k, temperature, m.student.cfg.vocab_size, budget
            )
            if self.settings.lam != 1.0:
                top.ref_logp = m.reference.logprobs_at(
                    batch.tokens, batch.loss_mask, top.ids, temperature, max_tokens=budget
                )
            return GOPDScores(routes, top=top)
        teacher_logp = score_teachers(m.teachers, batch, routes, temperature, budget)
        return GOPDScores(routes, teacher_logp=teacher_logp, ref_logp=self.reference_logp(batch))

    # -- update
    def update(self, batch: RolloutBatch, scores: GOPDScores) -> dict:
        estimator = self.cfg.objective.estimator
        if estimator == "full_vocab":  # the exact expectation over the vocabulary at each prefix
            return self._full_vocab_update(batch, scores)
        if estimator == "top_k":  # the same over the teacher's top-k, the sampled token and a tail
            return self._top_k_update(batch, scores)
        return self._sampled_update(batch, scores)

    def _sampled_update(self, batch: RolloutBatch, scores: GOPDScores) -> dict:
        """update_student with the G-OPD loss (objective.gopd_token_loss; no reference at lambda = 1).

        objective.returns = 'sequence': pi_old of the whole batch from one no-grad student pass
        (the one update_student needs anyway for updates_per_rollout > 1), the return-to-go
        advantage objective.sequence_advantage (groups: one prompt's samples), and the same
        clipped, importance-weighted policy loss on it (objective.advantage_token_loss, no k3:
        kl_coef = 0 for G-OPD). The advantage used is returned as out['advantage'] [N, S]."""
        s, teacher_logp, ref_logp = self.settings, scores.teacher_logp, self._loss_ref(scores)
        assert teacher_logp is not None  # score() scores the teachers for the sampled estimator
        temperature = self.cfg.rollout.temperature
        if self.cfg.objective.returns == "sequence":
            train = self.cfg.train
            old = self.d.m.student.logprobs(
                batch.tokens,
                batch.loss_mask,
                temperature,
                train.micro_batch_size,
                max_tokens=train.max_tokens_per_micro_batch,
            )
            advantage = sequence_advantage(
                old, teacher_logp, ref_logp, s.lam, batch.loss_mask, self.cfg.rollout.samples_per_prompt
            )

            def seq_loss_fn_for(rows, weights, o):
                return advantage_loss_builder(advantage[rows], None, batch.sampler_logp[rows], weights, s, old_logp=o)

            def seq_clipped_for(rows, logp, o):
                return advantage_token_loss(
                    logp, advantage=advantage[rows], ref_logp=None, sampler_logp=None, old_logp=o, settings=s
                )[1]

            out = self.d.update_student(batch, seq_loss_fn_for, seq_clipped_for, temperature, old_logp=old)
            return {**out, "advantage": advantage}

        def ref(rows):
            return None if ref_logp is None else ref_logp[rows]

        def loss_fn_for(rows, weights, old):
            return gopd_loss_builder(teacher_logp[rows], ref(rows), batch.sampler_logp[rows], weights, s, old_logp=old)

        def clipped_for(rows, logp, old):
            return gopd_token_loss(
                logp, teacher_logp=teacher_logp[rows], ref_logp=ref(rows), sampler_logp=None, old_logp=old, settings=s
            )[2]

        return self.d.update_student(batch, loss_fn_for, clipped_for, temperature)

    def _full_vocab_update(self, batch: RolloutBatch, scores: GOPDScores) -> dict:
        """update_student with the exact full-vocabulary loss (model.distill.FullVocabLoss): for
        each update, every teacher's hidden states of its rows, and the reference's (lam != 1),
        are delivered to the student's ranks; the heads were re-sharded at build time."""
        m, routes = self.d.m, scores.routes
        lam, budget = self.settings.lam, self.cfg.train.max_tokens_per_micro_batch
        names = list(m.teachers)
        route = torch.tensor([names.index(r) for r in routes], dtype=torch.long)
        ref = m.reference_projection

        def loss_fn_for(rows, weights, old):
            tokens, mask, sub = batch.tokens[rows], batch.loss_mask[rows], route[rows]
            teachers = [(None, None)] * len(names)
            for name, own in rows_by_teacher([routes[int(i)] for i in rows], m.teachers).items():
                p = m.projections[name]
                teachers[names.index(name)] = (p.hidden(tokens, mask, own, max_tokens=budget), p.head)
            reference = None if lam == 1.0 else (ref.hidden(tokens, mask, max_tokens=budget), ref.head)
            return FullVocabLoss(teachers, sub, reference, weights, lam, tokens.shape[1])

        return self.d.update_student(batch, loss_fn_for, _nothing_clipped, self.cfg.rollout.temperature)

    def _top_k_update(self, batch: RolloutBatch, scores: GOPDScores) -> dict:
        """update_student with the top-k loss (model.distill.TopKLoss): each row's teacher's top-k
        (local or served) and, at lam != 1, the reference's log-probs at those ids."""
        top, lam = scores.top, self.settings.lam

        def loss_fn_for(rows, weights, old):
            return TopKLoss(top.rows(rows), weights, lam)

        return self.d.update_student(batch, loss_fn_for, _nothing_clipped, self.cfg.rollout.temperature)

    # -- metrics
    def metrics(self, batch: RolloutBatch, scores: GOPDScores, out: dict) -> tuple[dict, dict]:
        if self.cfg.objective.estimator != "sampled":
            return self._expected_metrics(batch, scores, out)
        mask, teacher_logp, student_logp = batch.loss_mask, scores.teacher_logp, out["logp"]
        assert teacher_logp is not None  # score() scores the teachers for the sampled estimator
        # Diagnostics are computed from the pre-update log-probs (pi_old; ratio = 1).
        if self.cfg.objective.returns == "sequence":  # the return-to-go advantage the update used
            advantage, clipped = out["advantage"], torch.zeros(mask.shape, dtype=torch.bool)
        else:
            _, advantage, clipped = gopd_token_loss(
                student_logp,
                teacher_logp=teacher_logp,
                ref_logp=self._loss_ref(scores),
                sampler_logp=None,
                old_logp=None,
                settings=self.settings,
            )
        own = {
            k: v
            for k, v in token_metrics(
                student_logp, mask, teacher_logp, scores.ref_logp, advantage, clipped, self.settings.lam
            ).items()
            if k != "tokens"
        }
        per_teacher = {}
        for name, rows in rows_by_teacher(scores.routes, self.d.m.teachers).items():
            m = mask[rows].float()
            per_teacher[f"reverse_kl/{name}"] = float(
                ((student_logp[rows] - teacher_logp[rows]) * m).sum() / m.sum().clamp(min=1)
            )
        return own, per_teacher

    def _expected_metrics(self, batch: RolloutBatch, scores: GOPDScores, out: dict) -> tuple[dict, dict]:
        """The estimators that take the expectation over the next token at each visited prefix
        (full_vocab, top_k), from the per-token outputs of gopd_mega.model.distill (PER_TOKEN);
        token means over the response tokens: reverse_kl (and per teacher) = KL(pi_theta || pi_T)
        at each prefix (exact for full_vocab; between the coarsened distributions for top_k),
        log_z, kl_target = KL(pi_theta || q_t)."""
        m = batch.loss_mask.float()

        def mean(x: torch.Tensor, rows=slice(None)) -> float:
            return float((x[rows] * m[rows]).sum() / m[rows].sum().clamp(min=1))

        own = {
            "reverse_kl": mean(out["reverse_kl"]),
            "log_z": mean(out["log_z"]),
            "kl_target": mean(out["token_loss"] + out["log_z"]),
        }
        per_teacher = {
            f"reverse_kl/{name}": mean(out["reverse_kl"], rows)
            for name, rows in rows_by_teacher(scores.routes, self.d.m.teachers).items()
        }
        return own, per_teacher


# ----------------------------------------------------------------------------- GRPO


@dataclass
class GRPOScores:
    """GRPO's verifier rewards and what follows from them."""

    prompts: list
    """The prompt of each row."""
    rewards: torch.Tensor
    """[N] float64, one per response."""
    advantage: torch.Tensor
    """[N, S] the group-normalised advantage on each response's tokens."""
    ref_logp: torch.Tensor | None
    """pi_ref's [N, S] when scored (kl_coef > 0, or the kl_ref metric alone)."""


class GRPOStep(Step):
    """GRPO (objective.kind = 'grpo'; how the paper makes its domain teachers): verifier rewards
    -> group-normalised advantages -> the clipped, importance-weighted policy loss with the
    optional k3 term (objective.advantage_token_loss). Needs the Distiller's ``reward``."""

    progress_key = "reward_mean"

    def __init__(self, distiller: Distiller):
        if distiller.reward is None:
            raise ValueError("objective.kind='grpo' needs a reward function (a verifier for the prompts' domain)")
        super().__init__(distiller)
        self.reward: RewardFn = distiller.reward

    def describe(self) -> str:
        return "GRPO"

    def score(self, batch: RolloutBatch, prompts: list) -> GRPOScores:
        reward = self.reward
        rewards = torch.tensor(
            [float(reward(p, batch.response_ids(i))) for i, p in enumerate(prompts)], dtype=torch.float64
        )
        if not torch.isfinite(rewards).all():
            bad = int((~torch.isfinite(rewards)).nonzero()[0])
            raise ValueError(f"reward function returned {float(rewards[bad])} for prompt {prompts[bad].text!r}")
        advantage = grpo_advantage(rewards, self.cfg.rollout.samples_per_prompt)[:, None] * batch.loss_mask.to(
            torch.float32
        )
        # scored for kl_coef > 0 (or the kl_ref metric)
        return GRPOScores(prompts, rewards, advantage, self.reference_logp(batch))

    def update(self, batch: RolloutBatch, scores: GRPOScores) -> dict:
        s, advantage = self.settings, scores.advantage
        ref_logp = scores.ref_logp if self.cfg.objective.needs_reference() else None

        def loss_fn_for(rows, weights, old):
            ref = None if ref_logp is None else ref_logp[rows]
            return advantage_loss_builder(advantage[rows], ref, batch.sampler_logp[rows], weights, s, old_logp=old)

        def clipped_for(rows, logp, old):
            ref = None if ref_logp is None else ref_logp[rows]
            return advantage_token_loss(
                logp, advantage=advantage[rows], ref_logp=ref, sampler_logp=None, old_logp=old, settings=s
            )[1]

        return self.d.update_student(batch, loss_fn_for, clipped_for, self.cfg.rollout.temperature)

    def metrics(self, batch: RolloutBatch, scores: GRPOScores, out: dict) -> tuple[dict, dict]:
        rewards, prompts = scores.rewards, scores.prompts
        m = batch.loss_mask.float()
        groups = rewards.view(-1, self.cfg.rollout.samples_per_prompt)
        own = {
            "reward_mean": float(rewards.mean()),
            # fraction of responses with a positive reward (= correct, for a 0/1 verifier)
            "success_rate": float((rewards > 0).double().mean()),
            # groups whose responses all got the same reward: zero advantage, no learning signal
            "flat_groups": float((groups.max(dim=1).values == groups.min(dim=1).values).double().mean()),
        }
        rest = {}
        if scores.ref_logp is not None:
            rest["kl_ref"] = float((k3_kl(out["logp"], scores.ref_logp) * m).sum() / m.sum().clamp(min=1))
        for route in sorted({str(p.teacher) for p in prompts}):
            rows = torch.tensor([i for i, p in enumerate(prompts) if str(p.teacher) == route])
            rest[f"reward/{route}"] = float(rewards[rows].mean())
        return own, rest


STEPS: dict[str, type[Step]] = {"gopd": GOPDStep, "grpo": GRPOStep}
"""objective.kind -> its Step class (gopd_mega.config.OBJECTIVE_KINDS lists the same names)."""


def build_step(distiller: Distiller) -> Step:
    """The Step of ``distiller.cfg.objective.kind``."""
    return STEPS[distiller.cfg.objective.kind](distiller)
