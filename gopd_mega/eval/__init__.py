"""Evaluation, one layer: the synthetic domains (exact, greedy, sampled) and datasets/benchmarks in
their published formats (greedy, avg@k / pass@k, judged by the verifiers of gopd_mega.verify),
all sampled through any RolloutEngine and named by one scheme (gopd_mega/eval/metrics.py).

* gopd_mega/eval/metrics.py     the metric names (eval/<group>/<metric>, eval/mean/<metric>), avg@k, pass@k
* gopd_mega/eval/domains.py     synthetic domains: checker + reference answer; exact / greedy / sampled
* gopd_mega/eval/benchmarks.py  loaders: math (AIME/HMMT), evalplus (HumanEval+/MBPP+), LiveCodeBench
* gopd_mega/eval/harness.py     sampling + judging; evaluate_records, training_evaluator (training-time hooks)
* gopd_mega/eval/report.py      results.json, markdown table, matplotlib plot
* gopd_mega/eval/cli.py         the gopd-eval command

Names are loaded on first use, so ``python -m gopd_mega.eval.cli`` reports argument errors before
torch is imported.
"""

import importlib

_WHERE = {
    "Benchmark": "benchmarks",
    "BenchmarkError": "benchmarks",
    "DEFAULT_SAMPLES": "benchmarks",
    "load_benchmark": "benchmarks",
    "load_evalplus": "benchmarks",
    "load_livecodebench": "benchmarks",
    "load_math": "benchmarks",
    "BenchmarkResult": "harness",
    "SamplingSettings": "harness",
    "evaluate_benchmark": "harness",
    "evaluate_records": "harness",
    "judge": "harness",
    "sample_responses": "harness",
    "training_evaluator": "harness",
    "record_metrics": "harness",
    "flat_metrics": "metrics",
    "metric_name": "metrics",
    "pass_at_k": "metrics",
    "scores": "metrics",
    "EvalResult": "domains",
    "answer_probability": "domains",
    "domain_metrics": "domains",
    "evaluate": "domains",
    "evaluate_config": "domains",
    "evaluate_modes": "domains",
    "markdown_table": "report",
    "plot": "report",
    "write_report": "report",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'gopd_mega.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"gopd_mega.eval.{_WHERE[name]}"), name)
