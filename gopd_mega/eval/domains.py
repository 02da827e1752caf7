"""Held-out evaluation of the synthetic domains (or any task with a checker and one reference
answer per prompt): per-domain accuracy, greedy, sampled and/or exact.

For each domain, every held-out prompt ([bos] + prompt tokens) is decoded by a rollout engine; the
response text (decoded up to eos) is judged by ``checker(domain, prompt, response_text)`` (for the
synthetic domains, :func:`gopd_mega.data.synthetic.check`). Besides accuracy it reports the mean
response length and the stop rate (fraction of responses that ended with a stop token rather than
running into max_new_tokens): with lambda > 1 (ExOPD) growing length and a falling stop rate are
the first signs of reward hacking, before accuracy moves.

"exact" (:func:`answer_probability`) needs no sampling: for a task whose checker accepts one
reference answer, the expected accuracy of temperature sampling is the probability the model gives
that answer followed by a stop token, one teacher-forced forward. It is the sampled accuracy of
infinitely many samples, so comparisons between systems carry no sampling noise (on 200 prompts a
single sampled pass has a binomial std of about 3 points).

Metric names (gopd_mega.eval.metrics, the one scheme shared with the datasets): per domain
``exact``, ``greedy`` (+ ``greedy_response_len``, ``greedy_stop_rate``) and, for "sampled" (one
sample per prompt), ``avg@1``, ``pass@1``, ``response_len``, ``stop_rate``; ``eval/mean/...``
over the domains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gopd_mega.data.prompts import sft_batch
from gopd_mega.data.tokenizer import Tokenizer
from gopd_mega.eval.metrics import flat_metrics
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


MODE_METRICS = {"exact": "exact", "greedy": "greedy", "sampled": "avg@1"}
"""The metric name of each mode's accuracy (gopd_mega.eval.metrics)."""


def domain_metrics(results: dict[str, EvalResult]) -> dict[str, dict[str, float]]:
    """``{mode: EvalResult}`` (:func:`evaluate_modes`) -> ``{domain: {metric: value}}`` in the
    names of gopd_mega.eval.metrics: "exact" -> ``exact``; "greedy" -> ``greedy``,
    ``greedy_response_len``, ``greedy_stop_rate``; "sampled" (one sample per prompt) -> ``avg@1``,
    ``pass@1``, ``response_len``, ``stop_rate``."""
    out: dict[str, dict[str, float]] = {}
    for mode, res in results.items():
        for d, acc in res.accuracy.items():
            m = out.setdefault(d, {})
            m[MODE_METRICS[mode]] = acc
            if mode == "sampled":
                m["pass@1"] = acc
            if d in res.response_len:
                extra = "greedy_" if mode == "greedy" else ""
                m[f"{extra}response_len"] = res.response_len[d]
                m[f"{extra}stop_rate"] = res.stop_rate[d]
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
            chunk = records[start : start + batch_size]
            prompts = [bos + list(tokenizer.encode(r[prompt_field])) for r in chunk]
            # A distinct, reproducible seed per (domain, chunk): sampled accuracy does not depend on
            # which other domains were evaluated or in what batch sizes the engine was called.
            out = engine.generate(
                prompts,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                greedy=greedy,
                seed=seed + 1_000_003 * d_index + start,
            )
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


def answer_probability(
    model,
    records_by_domain: dict[str, list[dict]],
    tokenizer: Tokenizer,
    answer_of: Callable[[str, str], str],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_prompts: int | None = None,
    prompt_field: str = "prompt",
) -> EvalResult:
    """Exact expected accuracy of sampling at ``temperature``, per domain: the mean over prompts of
    p(answer tokens, then the tokenizer's eos | [bos] + prompt), by one forward of ``model`` (a
    :class:`gopd_mega.models.ShardedGPT`, or anything with its ``logprobs``).

    ``answer_of(domain, prompt)`` is the reference answer; its tokens are ``tokenizer.encode(answer)``
    (exact for tokenizers that encode a concatenation piecewise, as the character tokenizer does).
    For an exact-match checker this equals the accuracy of sampling averaged over all draws; it is a
    lower bound when the checker also accepts other texts (e.g. with surrounding whitespace). Only
    ``accuracy`` is filled (no lengths: nothing is generated). Needs top_p = 1: nucleus sampling
    changes the distribution."""
    if top_p != 1.0:
        raise ValueError(
            "answer_probability: exact evaluation samples from the full distribution; "
            f"rollout.top_p must be 1, got {top_p}"
        )
    result = EvalResult()
    for domain, records in records_by_domain.items():
        records = records[:max_prompts] if max_prompts is not None else records
        if not records:
            raise ValueError(f"answer_probability: no held-out records for domain {domain!r}")
        pairs = [{"prompt": r[prompt_field], "answer": answer_of(domain, r[prompt_field])} for r in records]
        tokens, mask = sft_batch(pairs, tokenizer, None)  # [bos] prompt answer [eos], scored on answer + eos
        logp = model.logprobs(tokens, mask, temperature)
        result.accuracy[domain] = float((logp.double() * mask).sum(1).exp().mean())
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
    model=None,
    answer_of: Callable[[str, str], str] | None = None,
) -> dict[str, EvalResult]:
    """Exact, greedy and/or sampled evaluation as :class:`gopd_mega.config.EvalConfig` asks
    (sampling at the rollout temperature/top-p): ``{"exact": ..., "greedy": ..., "sampled": ...}``.
    "exact" (:func:`answer_probability`) needs the ``model`` and the reference ``answer_of``."""
    results: dict[str, EvalResult] = {}
    if eval_cfg.exact:
        if model is None or answer_of is None:
            raise ValueError(
                "eval.exact needs the model and a reference answer per prompt (synthetic domains); "
                "set eval.exact=false for this dataset"
            )
        results["exact"] = answer_probability(
            model,
            records_by_domain,
            tokenizer,
            answer_of,
            temperature=rollout_cfg.temperature,
            top_p=rollout_cfg.top_p,
            max_prompts=eval_cfg.max_prompts,
            prompt_field=prompt_field,
        )
    modes = [("greedy", True)] * bool(eval_cfg.greedy) + [("sampled", False)] * bool(eval_cfg.sampled)
    for name, greedy in modes:
        results[name] = evaluate(
            engine,
            records_by_domain,
            tokenizer,
            checker,
            greedy=greedy,
            temperature=rollout_cfg.temperature,
            top_p=rollout_cfg.top_p,
            max_new_tokens=rollout_cfg.max_new_tokens,
            seed=seed,
            max_prompts=eval_cfg.max_prompts,
            prompt_field=prompt_field,
        )
    return results


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
    model=None,
    answer_of: Callable[[str, str], str] | None = None,
) -> dict[str, float]:
    """:func:`evaluate_modes` as flat metrics (gopd_mega.eval.metrics): ``eval/<domain>/exact``,
    ``eval/<domain>/greedy``, ``eval/<domain>/avg@1`` (sampled), ..., and ``eval/mean/<metric>``."""
    return flat_metrics(
        domain_metrics(
            evaluate_modes(
                engine,
                records_by_domain,
                tokenizer,
                checker,
                eval_cfg,
                rollout_cfg,
                seed=seed,
                prompt_field=prompt_field,
                model=model,
                answer_of=answer_of,
            )
        )
    )
