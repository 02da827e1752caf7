"""Held-out evaluation: per-domain exact-match accuracy, greedy and/or sampled.

For each domain, every held-out prompt ([bos] + prompt tokens) is decoded by a rollout engine; the
response text (decoded up to eos) is judged by ``checker(domain, prompt, response_text)`` (for the
synthetic domains, :func:`gopd_mega.data.synthetic.check`). Besides accuracy it reports the mean
response length and the stop rate (fraction of responses that ended with a stop token rather than
running into max_new_tokens): with lambda > 1 (ExOPD) growing length and a falling stop rate are
the first signs of reward hacking, before accuracy moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from gopd_mega.data.tokenizer import Tokenizer
from gopd_mega.rollout.base import FINISH_STOP, RolloutEngine

Checker = Callable[[str, str, str], bool]


@dataclass
class EvalResult:
    """Per-domain accuracy, mean response length (tokens, stop token included) and stop rate."""

    accuracy: dict[str, float] = field(default_factory=dict)
    response_len: dict[str, float] = field(default_factory=dict)
    stop_rate: dict[str, float] = field(default_factory=dict)
    mean_response_len: float = 0.0
    """Over all evaluated prompts of all domains."""

    @property
    def mean_accuracy(self) -> float:
        """Unweighted mean over domains (each domain counts the same, as in the paper's averages)."""
        return sum(self.accuracy.values()) / max(len(self.accuracy), 1)

    def as_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Flat metric names for logging, e.g. ``eval/add/acc``."""
        out: dict[str, float] = {}
        for d in self.accuracy:
            out[f"{prefix}/{d}/acc"] = self.accuracy[d]
            out[f"{prefix}/{d}/response_len"] = self.response_len[d]
            out[f"{prefix}/{d}/stop_rate"] = self.stop_rate[d]
        out[f"{prefix}/mean_acc"] = self.mean_accuracy
        out[f"{prefix}/mean_response_len"] = self.mean_response_len
        return out


def evaluate(
    engine: RolloutEngine,
    records_by_domain: dict[str, list[dict]],
    tokenizer: Tokenizer,
    checker: Checker,
    *,
    greedy: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int,
    seed: int = 0,
    max_prompts: int | None = None,
    batch_size: int = 256,
    prompt_field: str = "prompt",
) -> EvalResult:
    """Accuracy per domain of ``engine`` on held-out records (the first ``max_prompts`` of each)."""
    result = EvalResult()
    total_len, total_n = 0, 0
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    for d_index, (domain, records) in enumerate(records_by_domain.items()):
        records = records[:max_prompts] if max_prompts is not None else records
        if not records:
            raise ValueError(f"evaluate: no held-out records for domain {domain!r}")
        correct, length, stopped = 0, 0, 0
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            prompts = [bos + list(tokenizer.encode(r[prompt_field])) for r in chunk]
            # A distinct, reproducible seed per (domain, chunk): sampled accuracy does not depend on
            # which other domains were evaluated or in what batch sizes the engine was called.
            out = engine.generate(prompts, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                  greedy=greedy, seed=seed + 1_000_003 * d_index + start)
            for i, rec in enumerate(chunk):
                text = tokenizer.decode(out.response_ids(i))
                correct += bool(checker(domain, rec[prompt_field], text))
                stopped += out.finish_reasons[i] == FINISH_STOP
            length += int(out.response_lens.sum())
        n = len(records)
        result.accuracy[domain] = correct / n
        result.response_len[domain] = length / n
        result.stop_rate[domain] = stopped / n
        total_len += length
        total_n += n
    result.mean_response_len = total_len / total_n if total_n else 0.0
    return result


def evaluate_modes(
    engine: RolloutEngine,
    records_by_domain: dict[str, list[dict]],
    tokenizer: Tokenizer,
    checker: Checker,
    eval_cfg,
    rollout_cfg,
    *,
    seed: int = 0,
    prompt_field: str = "prompt",
) -> dict[str, EvalResult]:
    """Greedy and/or sampled evaluation as :class:`gopd_mega.config.EvalConfig` asks (sampling at the
    rollout temperature/top-p): ``{"greedy": EvalResult, "sampled": EvalResult}``."""
    modes = [("greedy", True)] * bool(eval_cfg.greedy) + [("sampled", False)] * bool(eval_cfg.sampled)
    return {
        name: evaluate(engine, records_by_domain, tokenizer, checker, greedy=greedy,
                       temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p,
                       max_new_tokens=rollout_cfg.max_new_tokens, seed=seed,
                       max_prompts=eval_cfg.max_prompts, prompt_field=prompt_field)
        for name, greedy in modes
    }


def evaluate_config(
    engine: RolloutEngine,
    records_by_domain: dict[str, list[dict]],
    tokenizer: Tokenizer,
    checker: Checker,
    eval_cfg,
    rollout_cfg,
    *,
    seed: int = 0,
    prompt_field: str = "prompt",
) -> dict[str, float]:
    """:func:`evaluate_modes` as flat metrics ``eval/greedy/<domain>/acc``, ``eval/sampled/...``."""
    metrics: dict[str, float] = {}
    for name, res in evaluate_modes(engine, records_by_domain, tokenizer, checker, eval_cfg, rollout_cfg,
                                    seed=seed, prompt_field=prompt_field).items():
        metrics.update(res.as_metrics(f"eval/{name}"))
    return metrics
