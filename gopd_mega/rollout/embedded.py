"""In-process rollout engine (the default): sample with the model the trainer already holds.

The model object offers
    next_token_logits(tokens [N, S] int64, lengths [N] int64) -> fp32 [N, V]
the logits at position lengths-1 of each row (right-padded input); every rank of a model returns
the same logits (the megatron wrapper gathers the vocab shards). V must be the REAL vocabulary
(padded rows sliced off), otherwise the full-softmax log-prob below would include padding ids.
The engine passes CPU tensors (the model moves them to its device); the logits may come back on
any device and sampling happens there. For ``update_weights`` it offers
``copy_weights_from(student)``.

Decoding (``kv_cache=True``, the default, for a megatron ShardedGPT): a KV cache, batched
(gopd_mega.rollout.kv_decode.CachedDecoder): one prefill over the prompts, then one token per
active row per step, O(context) per step; by default through the plain-torch fast path
(gopd_mega.model.inference; ``fast_decode=False``: megatron's own forward). With
``kv_cache=False``, or for any other model
object, each step re-runs ``next_token_logits`` on the whole [N_active, prompt + generated]
batch (quadratic in the response length; the reference the cached path is tested against).
Either way finished rows are dropped from later steps, and both paths feed the same logits (to
fp32 rounding) to the same sampler below, so seeds, tokens and reported log-probs are the same.

Sampling (per step, fp32): logp = log_softmax(logits / T); greedy takes argmax(logits);
otherwise probabilities are restricted to the top-p nucleus (the smallest prefix of tokens, by
descending probability, whose mass reaches top_p; the top token always kept), renormalised, and a
token is drawn by inverse-CDF with one uniform number per active row from a ``torch.Generator``
seeded with ``seed``. Same seed + same logits => same tokens on every rank (no collective needed;
the lead may still broadcast rank 0's tokens as a guard). The reported log-prob is logp at the
sampled token: the full-softmax value before top-p (see gopd_mega.rollout.base).
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch

from gopd_mega.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutBatch, RolloutEngine, check_prompts, pack_rollouts
from gopd_mega.rollout.kv_decode import CachedDecoder, supports_kv_cache


class LogitsModel(Protocol):
    def next_token_logits(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor: ...


def sample_tokens(
    logits: torch.Tensor, *, temperature: float, top_p: float, greedy: bool, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [N] int64, logp [N] fp32) for one decoding step; see the module docstring."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use greedy=True for argmax)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    if greedy:
        tokens = logits.argmax(dim=-1)
    else:
        probs = logp.exp()
        if top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # top token: mass_before 0
        else:
            sorted_probs, order = probs, None
        cdf = sorted_probs.cumsum(dim=-1)
        # u scaled by the total kept mass: no renormalisation pass, and u < cdf[-1] so the index is
        # always a kept token (zero-probability entries never start a new CDF step).
        u = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device, dtype=cdf.dtype) * cdf[:, -1:]
        idx = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
        tokens = (order.gather(-1, idx) if order is not None else idx).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


class EmbeddedEngine(RolloutEngine):
    """Samples in-process from ``model`` (see the module docstring for what the model offers)."""

    def __init__(
        self, model: LogitsModel, *, pad_id: int, stop_ids: list[int], kv_cache: bool = True, fast_decode: bool = True
    ):
        self.model = model
        self.pad_id = pad_id
        self.stop_ids = list(stop_ids)
        self.kv_cache = kv_cache
        """Decode with a KV cache when the model supports it (a ShardedGPT); False: re-run the
        whole prefix every step (the reference path)."""
        self.fast_decode = fast_decode
        """With the KV cache: the plain-torch decode of gopd_mega.model.inference where it
        supports the model (same tokens); False: megatron's own forward and inference context."""

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        *,
        temperature: float,
        top_p: float = 1.0,
        max_new_tokens: int,
        greedy: bool = False,
        seed: int = 0,
    ) -> RolloutBatch:
        check_prompts(prompts)
        n = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
        tokens = torch.full((n, int(lengths.max()) + max_new_tokens), self.pad_id, dtype=torch.int64)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.as_tensor(p, dtype=torch.int64)
        responses: list[list[int]] = [[] for _ in range(n)]
        logps: list[list[float]] = [[] for _ in range(n)]
        finish = [FINISH_LENGTH] * n
        active = list(range(n))
        stop = torch.tensor(self.stop_ids, dtype=torch.int64)
        generator = None
        cached = None
        if self.kv_cache and supports_kv_cache(self.model):
            cached = CachedDecoder(
                self.model, tokens[:, : int(lengths.max())], lengths, max_new_tokens, fast=self.fast_decode
            )
        with cached if cached is not None else contextlib.nullcontext():
            for step in range(max_new_tokens):
                if not active:
                    break
                rows = torch.tensor(active, dtype=torch.int64)
                lens = lengths[rows]
                if cached is None:
                    logits = self.model.next_token_logits(tokens[rows, : int(lens.max())], lens)
                elif step == 0:
                    logits = cached.prefill()
                else:  # feed each active row its newest token
                    logits = cached.step(rows, tokens[rows, lens - 1])
                if generator is None:  # on the logits' device, so sampling never leaves it
                    generator = torch.Generator(device=logits.device).manual_seed(seed)
                new, lp = sample_tokens(
                    logits, temperature=temperature, top_p=top_p, greedy=greedy, generator=generator
                )
                new, lp = new.cpu(), lp.cpu()
                tokens[rows, lens] = new
                lengths[rows] = lens + 1
                is_stop = torch.isin(new, stop)
                still = []
                for j, i in enumerate(active):
                    responses[i].append(int(new[j]))
                    logps[i].append(float(lp[j]))
                    if is_stop[j]:
                        finish[i] = FINISH_STOP
                    else:
                        still.append(i)
                active = still
        return pack_rollouts(prompts, responses, logps, finish, self.pad_id)

    def update_weights(self, source: Any = None) -> None:
        """Copy the student's weights into the rollout model; a no-op when the engine samples
        from the student object itself (``source`` is None or the model)."""
        if source is None or source is self.model:
            return
        self.model.copy_weights_from(source)  # type: ignore[attr-defined]  # the student models have it
