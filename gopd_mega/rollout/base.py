"""The rollout-engine interface and the batch it returns.

An engine samples responses for token-id prompts and receives the student's new weights after
each policy update. Two implementations: :mod:`gopd_mega.rollout.embedded` (in-process, default)
and :mod:`gopd_mega.rollout.sglang` (an SGLang server over HTTP, GPU clusters).

RolloutBatch layout (N sequences, S = longest prompt + response of the batch):
    tokens        [N, S] int64   prompt then response, right-padded with pad_id
    prompt_lens   [N]    int64
    response_lens [N]    int64   response tokens, the stop token included when one was produced
    loss_mask     [N, S] bool    True at the positions of response tokens (stop token included)
    sampler_logp  [N, S] fp32    at each response-token position: the log-prob the sampler gave
                                 that token; 0 elsewhere
    finish_reasons list[str]     'stop' (a stop id was produced) or 'length' (max_new_tokens)
    sample_ids     list[str]     unique id of each sample, 's{step}-p{prompt}-n{sample}' (the
                                 SGLang request id 'rid'; a retried request keeps it)
    weight_versions list[str]    the policy version each sample was drawn with ('0' = initial
                                 weights, k = after k updates); a server reports its own
Masks and log-probs mark the token's own position; the prediction of the token at position t
comes from the logits at position t-1 (the trainer does that shift).

Which log-prob is ``sampler_logp``: log softmax(logits / T) of the FULL vocabulary at the
sampling temperature T, before top-p truncation and renormalisation. That is what the trainer
recomputes for the student (and for teacher/reference), so exp(trainer - sampler) measures only the
engine mismatch; with top_p < 1 the true sampling probability of a kept token is larger by the
nucleus renormalisation, which the objective deliberately does not model (top-p 1.0 in the paper).
With greedy decoding the reported value is the same quantity at temperature T of the chosen token
(SGLang reports it at T=1 for greedy, see that engine).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclass
class RolloutBatch:
    """Sampled sequences (see the module docstring for shapes and conventions)."""

    tokens: torch.Tensor
    prompt_lens: torch.Tensor
    response_lens: torch.Tensor
    loss_mask: torch.Tensor
    sampler_logp: torch.Tensor
    finish_reasons: list[str]
    sample_ids: list[str] = field(default_factory=list)
    weight_versions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.tokens.shape[0]
        if not self.sample_ids:
            self.sample_ids = [str(i) for i in range(n)]
        if not self.weight_versions:
            self.weight_versions = [""] * n
        if not (len(self.finish_reasons) == len(self.sample_ids) == len(self.weight_versions) == n):
            raise ValueError(
                f"RolloutBatch: {n} rows but {len(self.finish_reasons)} finish reasons, "
                f"{len(self.sample_ids)} sample ids, {len(self.weight_versions)} weight versions"
            )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def response_ids(self, i: int) -> list[int]:
        """Response tokens of sequence ``i`` (stop token included when produced)."""
        start = int(self.prompt_lens[i])
        return self.tokens[i, start : start + int(self.response_lens[i])].tolist()

    def to(self, device: torch.device | str) -> RolloutBatch:
        return RolloutBatch(
            self.tokens.to(device),
            self.prompt_lens.to(device),
            self.response_lens.to(device),
            self.loss_mask.to(device),
            self.sampler_logp.to(device),
            list(self.finish_reasons),
            list(self.sample_ids),
            list(self.weight_versions),
        )


def pack_rollouts(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    logps: Sequence[Sequence[float]],
    finish_reasons: Sequence[str],
    pad_id: int,
    sample_ids: Sequence[str] | None = None,
    weight_versions: Sequence[str] | None = None,
) -> RolloutBatch:
    """Lay out per-sequence prompts, responses and response log-probs as a :class:`RolloutBatch`."""
    n = len(prompts)
    if not (len(responses) == len(logps) == len(finish_reasons) == n):
        raise ValueError("pack_rollouts: prompts, responses, logps and finish_reasons differ in length")
    prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
    response_lens = torch.tensor([len(r) for r in responses], dtype=torch.int64)
    width = int((prompt_lens + response_lens).max()) if n else 0
    tokens = torch.full((n, width), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros((n, width), dtype=torch.bool)
    sampler_logp = torch.zeros((n, width), dtype=torch.float32)
    for i, (p, r, lp) in enumerate(zip(prompts, responses, logps)):
        if len(lp) != len(r):
            raise ValueError(f"pack_rollouts: sequence {i} has {len(r)} response tokens but {len(lp)} log-probs")
        lp_, lr = len(p), len(r)
        tokens[i, :lp_] = torch.as_tensor(list(p), dtype=torch.int64)
        if lr:
            tokens[i, lp_ : lp_ + lr] = torch.as_tensor(list(r), dtype=torch.int64)
            loss_mask[i, lp_ : lp_ + lr] = True
            sampler_logp[i, lp_ : lp_ + lr] = torch.as_tensor(list(lp), dtype=torch.float32)
    return RolloutBatch(
        tokens,
        prompt_lens,
        response_lens,
        loss_mask,
        sampler_logp,
        list(finish_reasons),
        list(sample_ids or []),
        list(weight_versions or []),
    )


def check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    """The input check every engine's ``generate`` starts with."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: needs at least one prompt and no empty prompt")


class RolloutEngine(ABC):
    """Samples responses; receives new student weights after each update."""

    spmd = True
    """Every rank runs the engine collectively and gets the same batch (in-process engines);
    False for server engines, which global rank 0 alone drives (gopd_mega.rollout.coordinator)."""

    @abstractmethod
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
        """One response per prompt (repeat prompts for several samples). Stops at a stop id or after
        ``max_new_tokens``. The same seed (and weights) gives the same samples."""

    @abstractmethod
    def update_weights(self, source: Any = None) -> None:
        """Make the engine sample from the student's current weights (what ``source`` is depends on
        the engine: the student model in-process, a checkpoint path for SGLang)."""

    def close(self) -> None:  # noqa: B027 - optional hook: engines that hold nothing keep it
        """Release resources (connections, servers)."""

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
