"""Evaluation harness: benchmarks in their published formats, sampled through any RolloutEngine,
judged by the verifiers of gopd_mega.verify, scored as avg@k / pass@k.

* gopd_mega/eval/benchmarks.py  loaders: math (AIME/HMMT), evalplus (HumanEval+/MBPP+), LiveCodeBench
* gopd_mega/eval/metrics.py     avg@k and the unbiased pass@k estimator
* gopd_mega/eval/harness.py     sampling + judging; evaluate_records (training-time hook)
* gopd_mega/eval/report.py      results.json, markdown table, matplotlib plot
* gopd_mega/eval/cli.py         the gopd-eval command
"""

from gopd_mega.eval.benchmarks import Benchmark, BenchmarkError, load_benchmark, load_evalplus, load_livecodebench, load_math
from gopd_mega.eval.harness import (DEFAULT_SAMPLES, BenchmarkResult, SamplingSettings, evaluate_benchmark,
                                    evaluate_records, judge, sample_responses)
from gopd_mega.eval.metrics import pass_at_k, scores
from gopd_mega.eval.report import markdown_table, plot, write_report

__all__ = ["Benchmark", "BenchmarkError", "BenchmarkResult", "DEFAULT_SAMPLES", "SamplingSettings", "evaluate_benchmark",
           "evaluate_records", "judge", "load_benchmark", "load_evalplus", "load_livecodebench", "load_math",
           "markdown_table", "pass_at_k", "plot", "sample_responses", "scores", "write_report"]
