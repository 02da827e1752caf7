"""Supervised fine-tuning with the same megatron-core student and train_step as G-OPD.

The demo uses it to make its mediocre base models, briefly, on every domain (the base that the
domain teachers start from, and strong-to-weak's smaller student base); its domain teachers are
then made from that base by GRPO (the Distiller with objective.kind='grpo'), not by SFT. The
optimizer's step advances the LR schedule, once per SFT step.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from tqdm import tqdm

from gopd_mega.data.prompts import sft_batch
from gopd_mega.metrics import is_rank0
from gopd_mega.objective import token_weights


def nll_loss_builder(weights: torch.Tensor) -> Callable:
    """Token loss fn(logp, flat_index): -log p(y_t) weighted (token mean over the batch)."""
    w = weights.reshape(-1)
    return lambda logp, idx: -logp * w[idx.cpu()].to(logp)


def train_sft(
    model,
    optimizer,
    records: list[dict],
    tokenizer,
    *,
    steps: int,
    batch_size: int,
    micro_batch_size: int | None,
    max_len: int,
    seed: int,
    desc: str = "SFT",
    max_tokens: int | None = None,
    progress: bool = True,
) -> list[float]:
    """``steps`` updates on batches drawn (seeded) from ``records``; returns the losses."""
    rng = random.Random(seed)
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not (progress and is_rank0()))
    for _ in bar:
        batch = [records[rng.randrange(len(records))] for _ in range(batch_size)]
        tokens, mask = sft_batch(batch, tokenizer, max_len)
        out = model.train_step(
            tokens, mask, nll_loss_builder(token_weights(mask, "token-mean")), micro_batch_size, max_tokens=max_tokens
        )
        losses.append(out["loss"])
        bar.set_postfix(loss=f"{out['loss']:.3f}")
    return losses
