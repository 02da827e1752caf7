"""Teachers and the reference served by SGLang, and the start-up check of server scoring.

    teacher = ServerScorer(SGLangPool(urls, ...), name="teacher 'math'")
    t_logp = teacher.logprobs(tokens, loss_mask, temperature)     # COLLECTIVE, like ShardedGPT

Scoring is prefill-only (/generate with max_new_tokens 0, return_logprob, logprob_start_len 0;
meta_info.input_token_logprobs, entry 0 null). Global rank 0 sends the requests and broadcasts
the result. Shapes as gopd_mega.models.ShardedGPT.logprobs: tokens [N, S] int64 right-padded,
loss_mask [N, S] bool -> fp32 [N, S], entry [i, j] = log p(tokens[i, j] | tokens[i, :j]) at
temperature T where loss_mask[i, j], 0 elsewhere. Row i is sent up to its last masked position.

SGLang's prefill log-probs ignore the sampling temperature in every release (0.5.9 to 0.5.23):
they are temperature-1 log-probs whatever is asked, and nothing the server returns lets the client
rescale them exactly (that needs the full-vocabulary logits of every position). So a served
teacher or reference scores at temperature 1 only: the configuration refuses
``teachers[i].server`` / ``objective.reference_server`` with ``rollout.temperature`` != 1, and
:meth:`ServerScorer.logprobs` refuses another temperature.

A server's kernels, dtype (bf16) and weights may differ from the trainer's:
:func:`check_server_scoring` compares a few sequences both ways at the run's temperature and
refuses (or warns, per config) when the mean absolute gap per response token exceeds the
tolerance. For the rollout server the compared log-probs are the sampler's own (output
log-probs, which do apply the temperature), so the check holds at any temperature.
"""

from __future__ import annotations

import logging

import torch

from gopd_mega.rollout.collective import run_on_rank0
from gopd_mega.rollout.sglang import require_unit_temperature

logger = logging.getLogger(__name__)


class ServerScoringMismatch(RuntimeError):
    """Server-side and trainer-side log-probs of the same sequences disagree beyond tolerance."""


class ServerScorer:
    """A frozen model (teacher or reference) behind SGLang server(s); see the module docstring."""

    def __init__(self, pool, name: str):
        self.pool = pool
        self.name = name

    def _score_rank0(self, tokens: torch.Tensor, loss_mask: torch.Tensor, temperature: float) -> torch.Tensor:
        if self.pool.out:
            self.pool.readmit_frozen()  # frozen weights: a server whose probe succeeds is back
        out = torch.zeros(tokens.shape, dtype=torch.float32)
        lengths = [int(m.nonzero().max()) + 1 if m.any() else 0 for m in loss_mask]
        rows = [i for i, n in enumerate(lengths) if n > 1]
        scores = self.pool.score([tokens[i, :lengths[i]].tolist() for i in rows], temperature=temperature)
        for i, s in zip(rows, scores):
            out[i, :lengths[i]] = s
        return out * loss_mask.to(torch.float32)

    def logprobs(self, tokens: torch.Tensor, loss_mask: torch.Tensor, temperature: float = 1.0, **_) -> torch.Tensor:
        """COLLECTIVE. fp32 [N, S] on every rank (see the module docstring); temperature 1 only."""
        require_unit_temperature(temperature, f"{self.name} served by SGLang")
        tokens, loss_mask = tokens.cpu(), loss_mask.cpu().bool()
        return run_on_rank0(lambda: self._score_rank0(tokens, loss_mask, temperature), f"{self.name} scoring")


def scoring_gap(server_logp: torch.Tensor, trainer_logp: torch.Tensor, loss_mask: torch.Tensor) -> tuple[float, float]:
    """(mean, max) |server - trainer| over the masked tokens, in nats."""
    m = loss_mask.bool()
    diff = (server_logp.float().cpu() - trainer_logp.float().cpu()).abs()[m]
    if diff.numel() == 0:
        return 0.0, 0.0
    return float(diff.mean()), float(diff.max())


def check_server_scoring(name: str, server_logp: torch.Tensor, trainer_logp: torch.Tensor, loss_mask: torch.Tensor,
                         *, temperature: float, tolerance: float, action: str, urls=()) -> float:
    """Compare (see the module docstring); 'refuse' raises ServerScoringMismatch, 'warn' logs.
    Returns the mean gap."""
    mean, worst = scoring_gap(server_logp, trainer_logp, loss_mask)
    tokens = int(loss_mask.sum())
    message = (f"{name} served by SGLang ({', '.join(urls)}) scores differently from the trainer at temperature "
               f"{temperature}: mean |server - trainer| = {mean:.4f} nats per token (max {worst:.4f}) over {tokens} "
               f"tokens, tolerance {tolerance} (rollout.server_check_tolerance); check the server's weights, dtype, "
               f"and that it was not started with SGLANG_RETURN_ORIGINAL_LOGPROB=1 (which reports temperature-1 "
               f"log-probs)")
    if mean > tolerance:
        if action == "refuse":
            raise ServerScoringMismatch(message + " (set rollout.server_check=warn to run anyway)")
        if action == "warn":
            logger.warning("%s", message)
            print(f"WARNING: {message}", flush=True)
    return mean


def startup_checks(cfg, models, rollout, data, *, fresh: bool) -> dict[str, float]:
    """COLLECTIVE, before the first step. Sample ``server_check_sequences`` responses (the first
    prompts of the data order; the order is left untouched) at the run's temperature and compare
    with the trainer's log-probs at that temperature: the rollout server(s)' sampler log-probs
    (they hold the student after the initial sync) vs the student; each teacher server's scoring
    vs its local copy (when teachers[i].model.load is also set); the reference server's scoring vs
    the student when reference = 'initial' and the run starts fresh.
    Returns {name: mean gap}; nothing to check (no servers, or server_check = 'off') returns {}."""
    from gopd_mega.rollout.coordinator import Sampling

    r = cfg.rollout
    pairs = []  # (name, ServerScorer or None for the sampler's own log-probs, local model)
    if not rollout.spmd:
        pairs.append(("rollout server (student)", None, models.student))
    for name, model in models.teachers.items():
        if isinstance(model, ServerScorer) and name in models.check_copies:
            pairs.append((f"teacher '{name}'", model, models.check_copies[name]))
    if isinstance(models.reference, ServerScorer) and cfg.objective.reference == "initial" and fresh:
        pairs.append(("reference", models.reference, models.student))
    if r.server_check == "off" or not pairs:
        return {}
    state = data.state_dict()
    prompts = data.next_batch(r.server_check_sequences)
    data.load_state_dict(state)
    # Sequences from the run's own rollout engine (servers or embedded), version as it stands.
    batch = rollout.collect(-1, [p.ids for p in prompts], 1, Sampling(r.temperature, r.top_p, r.max_new_tokens, seed=0))
    gaps = {}
    for name, scorer, local in pairs:
        server_logp = batch.sampler_logp if scorer is None else scorer.logprobs(batch.tokens, batch.loss_mask, r.temperature)
        trainer_logp = local.logprobs(batch.tokens, batch.loss_mask, r.temperature)
        pool = rollout.engine if scorer is None else scorer.pool
        gaps[name] = check_server_scoring(name, server_logp, trainer_logp, batch.loss_mask, temperature=r.temperature,
                                          tolerance=r.server_check_tolerance, action=r.server_check,
                                          urls=getattr(pool, "urls", []))
    return gaps
