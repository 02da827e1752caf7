"""Teachers and the reference served by SGLang, and the start-up check of server scoring.

    teacher = ServerScorer(SGLangPool(urls, ...), name="teacher 'math'")
    t_logp = teacher.logprobs(tokens, loss_mask, temperature)     # COLLECTIVE, like ShardedGPT

Scoring is prefill-only (/generate with max_new_tokens 0, return_logprob, logprob_start_len 0;
meta_info.input_token_logprobs, entry 0 null); with top_logprobs_num k also the server's top-k per
position (meta_info.input_top_logprobs: :meth:`ServerScorer.top_k_logprobs`, the top-k estimator).
Global rank 0 sends the requests and broadcasts the result.
Shapes as gopd_mega.models.ShardedGPT.logprobs: tokens [N, S] int64 right-padded,
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

import asyncio
import logging
from typing import Any

import torch

from gopd_mega.rollout.collective import run_on_rank0
from gopd_mega.rollout.sglang import SGLangError, require_unit_temperature, score_body

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
        scores = self.pool.score([tokens[i, : lengths[i]].tolist() for i in rows], temperature=temperature)
        for i, s in zip(rows, scores):
            out[i, : lengths[i]] = s
        return out * loss_mask.to(torch.float32)

    def logprobs(self, tokens: torch.Tensor, loss_mask: torch.Tensor, temperature: float = 1.0, **_) -> torch.Tensor:
        """COLLECTIVE. fp32 [N, S] on every rank (see the module docstring); temperature 1 only."""
        require_unit_temperature(temperature, f"{self.name} served by SGLang")
        tokens, loss_mask = tokens.cpu(), loss_mask.cpu().bool()
        return run_on_rank0(lambda: self._score_rank0(tokens, loss_mask, temperature), f"{self.name} scoring")

    def _top_k_rank0(self, tokens: torch.Tensor, loss_mask: torch.Tensor, k: int, temperature: float):
        N, S = tokens.shape
        ids, logp, target = torch.full((N, S, k), -1, dtype=torch.long), torch.zeros(N, S, k), torch.zeros(N, S)
        lengths = [int(m.nonzero().max()) + 1 if m.any() else 0 for m in loss_mask]
        rows = [i for i, n in enumerate(lengths) if n > 1]
        seqs = [tokens[i, : lengths[i]].tolist() for i in rows]

        async def job(server, chunk: list[int]):
            sub = [seqs[r] for r in chunk]
            if server.batched:
                outputs = await server.acall("/generate", top_k_request(sub, k, batched=True))
            else:  # a router: one request per sequence
                outputs = await asyncio.gather(
                    *[server.acall("/generate", top_k_request([q], k, batched=False)) for q in sub]
                )
            return parse_top_k(outputs, sub, k, server.url)

        for i, (t_ids, t_lp, t_tgt) in zip(rows, self.pool.dispatch(len(seqs), job, "top-k scoring")):
            ids[i, : lengths[i]], logp[i, : lengths[i]], target[i, : lengths[i]] = t_ids, t_lp, t_tgt
        scored = loss_mask.clone()
        scored[:, 0] = False
        ids[~scored] = -1
        return ids, torch.where(scored[..., None], logp, torch.zeros(())), target * scored

    def top_k_logprobs(self, tokens: torch.Tensor, loss_mask: torch.Tensor, k: int, temperature: float = 1.0, **_):
        """COLLECTIVE. (ids [N, S, k] long, logp [N, S, k], target_logp [N, S]) on every rank, as
        gopd_mega.models.ShardedGPT.top_k_logprobs: the server's k most likely tokens at each
        scored position and the log-prob of the token there, from one prefill request per chunk
        (:func:`top_k_request`); temperature 1 only, as :meth:`logprobs`."""
        require_unit_temperature(temperature, f"{self.name} served by SGLang")
        tokens, loss_mask = tokens.cpu(), loss_mask.cpu().bool()
        return run_on_rank0(lambda: self._top_k_rank0(tokens, loss_mask, k, temperature), f"{self.name} top-k scoring")


def top_k_request(sequences: list[list[int]], k: int, *, batched: bool) -> dict:
    """The /generate body of prefill-only top-k scoring: the scoring body (sglang.score_body:
    return_logprob, logprob_start_len 0, every input position) plus top_logprobs_num k."""
    return {**score_body(sequences, batched=batched), "top_logprobs_num": int(k)}


def parse_top_k(outputs, sequences: list[list[int]], k: int, url: str = "") -> list[tuple]:
    """Each output's (ids [L, k] long, logp [L, k], target_logp [L]) for a sequence of L tokens.

    SGLang (0.5.x, tokenizer_manager.add_logprob_to_meta_info with logprob_start_len 0) answers
    ``meta_info.input_token_logprobs``: L entries [logprob, token_id, text|null], entry 0's logprob
    null; ``meta_info.input_top_logprobs``: L entries, entry 0 null, entry t a list of [logprob,
    token_id, text|null] for the next-token distribution after tokens[:t]. Fewer than k entries
    (a small vocabulary) leave id -1, logp -inf; position 0 is all -1 / 0."""
    if isinstance(outputs, dict):
        outputs = [outputs]
    if not isinstance(outputs, list) or len(outputs) != len(sequences):
        raise SGLangError(f"SGLang {url}/generate (top-k scoring): expected {len(sequences)} outputs")
    result = []
    for n, (seq, out) in enumerate(zip(sequences, outputs)):
        where = f"SGLang {url}/generate (top-k scoring) output {n}"
        try:
            tokens, top = out["meta_info"]["input_token_logprobs"], out["meta_info"]["input_top_logprobs"]
        except (KeyError, TypeError) as exc:
            raise SGLangError(f"{where}: missing field {exc} (does the server support top_logprobs_num?)") from None
        L = len(seq)
        if len(tokens) != L or len(top) != L:
            raise SGLangError(f"{where}: {len(tokens)} token and {len(top)} top-k entries for {L} tokens")
        ids = torch.full((L, k), -1, dtype=torch.long)
        logp = torch.full((L, k), float("-inf"))
        logp[0] = 0.0
        target = torch.zeros(L)
        for t in range(1, L):
            if tokens[t][0] is None or top[t] is None or len(top[t]) > k:
                raise SGLangError(f"{where}: position {t} has no log-prob or more than {k} top entries")
            target[t] = float(tokens[t][0])
            for c, entry in enumerate(top[t]):
                logp[t, c], ids[t, c] = float(entry[0]), int(entry[1])
        result.append((ids, logp, target))
    return result


def scoring_gap(server_logp: torch.Tensor, trainer_logp: torch.Tensor, loss_mask: torch.Tensor) -> tuple[float, float]:
    """(mean, max) |server - trainer| over the masked tokens, in nats."""
    m = loss_mask.bool()
    diff = (server_logp.float().cpu() - trainer_logp.float().cpu()).abs()[m]
    if diff.numel() == 0:
        return 0.0, 0.0
    return float(diff.mean()), float(diff.max())


def check_server_scoring(
    name: str,
    server_logp: torch.Tensor,
    trainer_logp: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    temperature: float,
    tolerance: float,
    action: str,
    urls=(),
) -> float:
    """Compare (see the module docstring); 'refuse' raises ServerScoringMismatch, 'warn' logs.
    Returns the mean gap."""
    mean, worst = scoring_gap(server_logp, trainer_logp, loss_mask)
    tokens = int(loss_mask.sum())
    message = (
        f"{name} served by SGLang ({', '.join(urls)}) scores differently from the trainer at temperature "
        f"{temperature}: mean |server - trainer| = {mean:.4f} nats per token (max {worst:.4f}) over {tokens} "
        f"tokens, tolerance {tolerance} (rollout.server_check_tolerance); check the server's weights, dtype, "
        f"and that it was not started with SGLANG_RETURN_ORIGINAL_LOGPROB=1 (which reports temperature-1 "
        f"log-probs)"
    )
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
    pairs: list[
        tuple[str, ServerScorer | None, Any]
    ] = []  # (name, ServerScorer or None for the sampler's own log-probs, local model)
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
        server_logp = (
            batch.sampler_logp if scorer is None else scorer.logprobs(batch.tokens, batch.loss_mask, r.temperature)
        )
        trainer_logp = local.logprobs(batch.tokens, batch.loss_mask, r.temperature)
        pool = rollout.engine if scorer is None else scorer.pool
        gaps[name] = check_server_scoring(
            name,
            server_logp,
            trainer_logp,
            batch.loss_mask,
            temperature=r.temperature,
            tolerance=r.server_check_tolerance,
            action=r.server_check,
            urls=getattr(pool, "urls", []),
        )
    return gaps
