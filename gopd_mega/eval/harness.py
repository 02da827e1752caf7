"""Sample k responses per problem through any RolloutEngine, judge them with a verifier, score.

    prompt text --(chat template, optional)--> [bos] + ids --engine.generate (each prompt repeated
    k times, temperature / top-p as set)--> response ids --tokenizer.decode--> text
    --verifier(record, text)--> verdicts [problems, k] --> avg@k, pass@k (gopd_mega.eval.metrics)

The paper's settings are the defaults: temperature 1.0, top-p 1.0, k = 32 samples per math problem
and 4 per code problem; ``greedy`` decodes one response per problem instead (temperature ignored).
:func:`evaluate_records` is the entry point for evaluation during training (engine + records +
verifier -> flat metrics dict, named as gopd_mega.eval.metrics says); :func:`evaluate_benchmark`
adds the per-problem detail that gopd-eval reports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from gopd_mega.eval.benchmarks import DEFAULT_SAMPLES, Benchmark
from gopd_mega.eval.metrics import flat_metrics, scores
from gopd_mega.rollout.base import FINISH_STOP, RolloutEngine
from gopd_mega.verify.base import Verifier, verify_batch

__all__ = [
    "DEFAULT_SAMPLES",
    "BenchmarkResult",
    "SamplingSettings",
    "encode_prompt",
    "evaluate_benchmark",
    "evaluate_records",
    "judge",
    "record_metrics",
    "sample_responses",
    "training_evaluator",
]


@dataclass
class SamplingSettings:
    """How responses are sampled for evaluation."""

    samples: int = 1
    """Responses per problem (k of avg@k)."""
    temperature: float = 1.0
    """Sampling temperature (paper: 1.0)."""
    top_p: float = 1.0
    """Nucleus mass (paper: 1.0)."""
    max_new_tokens: int = 1024
    """Longest response; a response cut here is usually wrong (no final answer)."""
    seed: int = 0
    """Base seed; each engine call gets seed + the index of its first sequence."""
    batch_size: int = 64
    """Sequences per engine.generate call."""
    chat_template: bool = True
    """Wrap the prompt in the tokenizer's chat template when it has one."""
    greedy: bool = False
    """Greedy decoding: one response per problem (samples must be 1), temperature and top-p ignored."""

    def validate(self) -> None:
        if self.samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"SamplingSettings: samples, max_new_tokens and batch_size must be >= 1, got {self}")
        if self.greedy and self.samples != 1:
            raise ValueError(
                f"SamplingSettings: greedy decoding gives one response per problem, got samples={self.samples}"
            )
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"SamplingSettings: need temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}"
            )


@dataclass
class BenchmarkResult:
    """Scores of one benchmark."""

    name: str
    kind: str
    problems: int
    samples: int
    scores: dict[str, float]
    """avg@k and pass@k (see gopd_mega.eval.metrics)."""
    mean_response_len: float
    """Tokens per response (stop token included)."""
    stop_rate: float
    """Fraction of responses that ended with a stop token (not cut at max_new_tokens)."""
    per_problem: list[dict] = field(default_factory=list)
    """``{"id", "correct", "samples"}`` per problem."""
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def encode_prompt(tokenizer, text: str, chat_template: bool) -> list[int]:
    """[bos] + ids of the (chat-formatted) prompt; a bos the template writes itself is not doubled."""
    if chat_template and hasattr(tokenizer, "apply_chat_template"):
        text = tokenizer.apply_chat_template(text)
        bos = getattr(tokenizer, "bos_token", None)
        if bos and text.startswith(bos):
            text = text[len(bos) :]
    bos_ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return bos_ids + list(tokenizer.encode(text))


def sample_responses(
    engine: RolloutEngine, tokenizer, prompts: Sequence[str], settings: SamplingSettings
) -> tuple[list[list[str]], list[int], list[bool]]:
    """(texts [problems][samples], response lengths, stopped flags) -- the last two flat, in the
    same problem-major order."""
    settings.validate()
    k = settings.samples
    ids = [encode_prompt(tokenizer, p, settings.chat_template) for p in prompts]
    flat = [p for p in ids for _ in range(k)]
    texts: list[str] = []
    lens: list[int] = []
    stopped: list[bool] = []
    for start in range(0, len(flat), settings.batch_size):
        chunk = flat[start : start + settings.batch_size]
        out = engine.generate(
            chunk,
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_new_tokens=settings.max_new_tokens,
            greedy=settings.greedy,
            seed=settings.seed + start,
        )
        if len(out) != len(chunk):
            raise RuntimeError(f"engine returned {len(out)} sequences for {len(chunk)} prompts")
        for i in range(len(chunk)):
            texts.append(tokenizer.decode(out.response_ids(i)))
            lens.append(int(out.response_lens[i]))
            stopped.append(out.finish_reasons[i] == FINISH_STOP)
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))], lens, stopped


def judge(records: Sequence[dict], responses: Sequence[Sequence[str]], verifier: Verifier) -> list[list[bool]]:
    """Verdicts [problems][samples] (all responses go to the verifier as one batch)."""
    flat_recs = [r for r, rs in zip(records, responses) for _ in rs]
    flat_resp = [s for rs in responses for s in rs]
    verdicts = verify_batch(verifier, flat_recs, flat_resp)
    out, i = [], 0
    for rs in responses:
        out.append([v.passed for v in verdicts[i : i + len(rs)]])
        i += len(rs)
    return out


def _ks(samples: int, pass_ks: Sequence[int] | None) -> list[int]:
    return sorted({1, samples, *(k for k in (pass_ks or ()) if k <= samples)})


def evaluate_benchmark(
    engine: RolloutEngine,
    tokenizer,
    bench: Benchmark,
    settings: SamplingSettings,
    pass_ks: Sequence[int] | None = None,
    prompt_field: str = "prompt",
) -> BenchmarkResult:
    """Sample ``settings.samples`` responses per record of ``bench`` and score them."""
    texts, lens, stopped = sample_responses(engine, tokenizer, [r[prompt_field] for r in bench.records], settings)
    correct = judge(bench.records, texts, bench.verifier)
    per = [
        {"id": r.get("id", str(i)), "correct": sum(c), "samples": len(c)}
        for i, (r, c) in enumerate(zip(bench.records, correct))
    ]
    return BenchmarkResult(
        name=bench.name,
        kind=bench.kind,
        problems=len(bench.records),
        samples=settings.samples,
        scores=scores(correct, _ks(settings.samples, pass_ks)),
        mean_response_len=sum(lens) / len(lens),
        stop_rate=sum(stopped) / len(stopped),
        per_problem=per,
        settings=asdict(settings),
    )


def record_metrics(
    engine: RolloutEngine,
    tokenizer,
    records: Sequence[dict],
    verifier: Verifier,
    *,
    samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 1024,
    seed: int = 0,
    chat_template: bool = False,
    batch_size: int = 64,
    pass_ks: Sequence[int] | None = None,
    name: str = "data",
    prompt_field: str = "prompt",
    greedy: bool = False,
    sampled: bool = True,
) -> dict[str, float]:
    """One group's metrics, unprefixed (gopd_mega.eval.metrics): with ``greedy`` ``greedy``,
    ``greedy_response_len``, ``greedy_stop_rate`` (one greedy response per record, decoded first);
    with ``sampled`` ``avg@k``, ``pass@k``, ``response_len``, ``stop_rate`` of ``samples`` samples."""
    if not records:
        raise ValueError(f"evaluate_records: no records for {name!r}")
    bench = Benchmark(name, "custom", list(records), verifier)
    out: dict[str, float] = {}
    base: dict[str, Any] = {
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "batch_size": batch_size,
        "chat_template": chat_template,
    }
    if greedy:
        res = evaluate_benchmark(
            engine, tokenizer, bench, SamplingSettings(samples=1, greedy=True, **base), prompt_field=prompt_field
        )
        out.update(
            greedy=res.scores["avg@1"], greedy_response_len=res.mean_response_len, greedy_stop_rate=res.stop_rate
        )
    if sampled:
        res = evaluate_benchmark(
            engine, tokenizer, bench, SamplingSettings(samples=samples, **base), pass_ks, prompt_field=prompt_field
        )
        out.update(res.scores)
        out.update(response_len=res.mean_response_len, stop_rate=res.stop_rate)
    return out


def evaluate_records(
    engine: RolloutEngine,
    tokenizer,
    records: Sequence[dict],
    verifier: Verifier,
    *,
    name: str = "data",
    prefix: str = "eval",
    **settings: Any,
) -> dict[str, float]:
    """Evaluation during training for any dataset with a verifier: :func:`record_metrics` (its
    keyword arguments in ``settings``: samples, temperature, greedy, ...) as flat metrics
    ``{prefix}/{name}/avg@k``, ``.../pass@k``, ``.../response_len``, ``.../stop_rate`` (and
    ``.../greedy``, ... with ``greedy``).

    ``records[i][prompt_field]`` is the prompt text (with ``chat_template=False``, exactly what the
    model is conditioned on after [bos]); the verifier reads the rest of the record."""
    metrics = record_metrics(engine, tokenizer, records, verifier, name=name, **settings)
    return flat_metrics({name: metrics}, prefix, means=False)


def training_evaluator(
    engine: RolloutEngine,
    tokenizer,
    datasets: Mapping[str, tuple[Sequence[dict], Verifier]],
    *,
    samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 1024,
    seed: int = 0,
    chat_template: bool = False,
    max_prompts: int | None = None,
    prefix: str = "eval",
    prompt_field: str = "prompt",
    greedy: bool = False,
    sampled: bool = True,
) -> Callable[[], dict[str, float]]:
    """The trainer's ``evaluate`` callable: :func:`record_metrics` on every ``name -> (records,
    verifier)`` dataset (its first ``max_prompts`` records), plus ``{prefix}/mean/<metric>`` over
    the datasets. E.g. held-out paper-mix records with
    ``{"math": (math_records, MathVerifier()), "code": (code_records, CodeVerifier(tests_field="answer"))}``."""
    if not datasets:
        raise ValueError("training_evaluator: no datasets")
    if not (greedy or sampled):
        raise ValueError("training_evaluator: nothing to evaluate (neither greedy nor sampled)")

    def evaluate() -> dict[str, float]:
        by_group = {}
        for name, (records, verifier) in datasets.items():
            recs = list(records)[:max_prompts] if max_prompts is not None else list(records)
            by_group[name] = record_metrics(
                engine,
                tokenizer,
                recs,
                verifier,
                samples=samples,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                seed=seed,
                chat_template=chat_template,
                name=name,
                prompt_field=prompt_field,
                greedy=greedy,
                sampled=sampled,
            )
        return flat_metrics(by_group, prefix)

    return evaluate
