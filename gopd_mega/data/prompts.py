"""Prompt datasets for rollouts, and SFT batches for training the demo's base/teacher models.

:class:`PromptDataset` turns records (dicts) into tokenised :class:`Prompt` s:
    ids = [bos] + encode(prompt)          (no bos when the tokenizer has none)
Prompts longer than ``max_prompt_len`` tokens are dropped, and the drop is COUNTED and REPORTED
(:attr:`PromptDataset.filter_summary`, logged at WARNING when anything was dropped): silently
losing the long tail of a dataset changes what is being distilled.

Order: a fresh permutation of the dataset per epoch, drawn from ``(seed, epoch)``; the position
``{epoch, index, seed}`` is the whole state, so a resumed run (``load_state_dict``) draws exactly
the batches the interrupted run would have drawn next. A batch may straddle an epoch boundary.

:func:`sft_batch` lays out ``[bos] prompt answer [eos]`` right-padded with pad; ``loss_mask`` is
True on the answer and eos tokens, marking the tokens themselves (the trainer shifts: the
prediction of token t comes from position t-1), the same convention as
:class:`gopd_mega.rollout.base.RolloutBatch`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import torch

from gopd_mega.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset is unusable; the message names the field, record or route at fault."""


@dataclass
class Prompt:
    """One tokenised prompt."""

    ids: list[int]
    """[bos] + prompt tokens."""
    text: str
    """The prompt as in the record."""
    answer: str | None
    """Reference answer (None when the record has none)."""
    teacher: str | None
    """Teacher route (None when no teachers are configured and the record names none)."""
    index: int
    """Index of the source record in the list given to :class:`PromptDataset`."""


@dataclass
class FilterSummary:
    """What prompt-length filtering did."""

    total: int
    kept: int
    dropped: int
    longest: int
    """Longest prompt in tokens (before filtering, bos included)."""
    max_prompt_len: int

    def __str__(self) -> str:
        return (
            f"prompt filter: kept {self.kept}/{self.total}, dropped {self.dropped} longer than "
            f"max_prompt_len={self.max_prompt_len} tokens (longest prompt: {self.longest} tokens)"
        )


class PromptDataset:
    """Tokenised, length-filtered, teacher-routed prompts with a resumable shuffled order."""

    def __init__(
        self,
        records: list[dict[str, Any]],
        tokenizer: Tokenizer,
        *,
        max_prompt_len: int,
        seed: int = 0,
        teachers: list[str] | None = None,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        teacher_field: str = "opd_teacher",
    ):
        """``teachers``: the configured route keys. When given, every prompt must route to one of
        them; a record without the teacher field goes to the only teacher if there is exactly one.
        When None, routes are taken from the records as they are (or None). The route is
        ``rec[teacher_field]``, else ``rec['extra_info'][teacher_field]``."""
        if not records:
            raise DataError("prompt dataset is empty: no records were given")
        self.seed = seed
        self.epoch = 0
        self.index = 0
        prompts: list[Prompt] = []
        longest = 0
        for i, rec in enumerate(records):
            if prompt_field not in rec:
                raise DataError(
                    f"record {i} has no prompt field {prompt_field!r} (its fields: {sorted(rec)}); "
                    f"set data.prompt_field"
                )
            text = rec[prompt_field]
            if not isinstance(text, str):
                raise DataError(f"record {i}: field {prompt_field!r} must be a string, got {type(text).__name__}")
            teacher = _route(rec, i, teacher_field, teachers)
            ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + list(tokenizer.encode(text))
            longest = max(longest, len(ids))
            if len(ids) > max_prompt_len:
                continue
            answer = rec.get(answer_field)
            prompts.append(Prompt(ids, text, None if answer is None else str(answer), teacher, i))
        self.filter_summary = FilterSummary(
            len(records), len(prompts), len(records) - len(prompts), longest, max_prompt_len
        )
        if not prompts:
            raise DataError(f"prompt dataset is empty after filtering: {self.filter_summary}")
        (logger.warning if self.filter_summary.dropped else logger.info)("%s", self.filter_summary)
        self.prompts = prompts
        self._order = self._permutation(self.epoch)

    @classmethod
    def from_config(
        cls, records: list[dict], tokenizer: Tokenizer, cfg, teachers: list[str] | None = None
    ) -> PromptDataset:
        """Build from a :class:`gopd_mega.config.DataConfig`."""
        return cls(
            records,
            tokenizer,
            max_prompt_len=cfg.max_prompt_len,
            seed=cfg.seed,
            teachers=teachers,
            prompt_field=cfg.prompt_field,
            answer_field=cfg.answer_field,
            teacher_field=cfg.teacher_field,
        )

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Prompt]:
        """The next ``n`` prompts of the shuffled order (crossing into the next epoch if needed)."""
        out: list[Prompt] = []
        while len(out) < n:
            if self.index >= len(self._order):
                self.epoch += 1
                self.index = 0
                self._order = self._permutation(self.epoch)
            take = min(n - len(out), len(self._order) - self.index)
            out.extend(self.prompts[j] for j in self._order[self.index : self.index + take])
            self.index += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_prompts", len(self.prompts)) != len(self.prompts):
            # The order would then differ from the interrupted run's; say so rather than hide it.
            logger.warning(
                "resuming a prompt dataset of %d prompts from a state saved with %d: the order differs",
                len(self.prompts),
                state["num_prompts"],
            )
        self.seed, self.epoch, self.index = int(state["seed"]), int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)


def _route(rec: dict, i: int, teacher_field: str, teachers: list[str] | None) -> str | None:
    route = rec.get(teacher_field)
    if route is None and isinstance(rec.get("extra_info"), dict):
        route = rec["extra_info"].get(teacher_field)  # verl-style records keep it under extra_info
    if teachers is None:
        return None if route is None else str(route)
    if route is None:
        if len(teachers) == 1:
            return teachers[0]
        raise DataError(
            f"record {i} has no teacher field {teacher_field!r} and there are several teachers "
            f"{sorted(teachers)}: each prompt must name its teacher"
        )
    if route not in teachers:
        raise DataError(
            f"record {i} routes to teacher {route!r} (field {teacher_field!r}), which is not a configured "
            f"teacher; known teachers: {sorted(teachers)}"
        )
    return str(route)


def sft_batch(
    records: list[dict],
    tokenizer: Tokenizer,
    max_len: int | None,
    *,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens [N, S] int64`` = [bos] prompt answer [eos] right-padded with pad, and
    ``loss_mask [N, S] bool`` True on the answer and eos tokens. S = longest sequence of the batch.
    A sequence longer than ``max_len`` is an error (truncating it would teach a wrong answer);
    None: no limit here (the model's own length check applies)."""
    if not records:
        raise DataError("sft_batch: no records")
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    seqs, starts = [], []
    for i, rec in enumerate(records):
        for name in (prompt_field, answer_field):
            if name not in rec:
                raise DataError(f"sft_batch: record {i} has no field {name!r}")
        prompt = bos + list(tokenizer.encode(rec[prompt_field]))
        seq = prompt + list(tokenizer.encode(str(rec[answer_field]))) + [tokenizer.eos_id]
        if max_len is not None and len(seq) > max_len:
            raise DataError(f"sft_batch: record {i} is {len(seq)} tokens long, more than max_len={max_len}")
        seqs.append(seq)
        starts.append(len(prompt))
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), tokenizer.pad_id, dtype=torch.int64)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
        loss_mask[i, start : len(seq)] = True
    return tokens, loss_mask
