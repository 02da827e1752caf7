"""Evaluation metrics: their names (one scheme for the synthetic domains, datasets and benchmarks),
avg@k and pass@k.

Names. Every evaluation result is a flat ``{name: value}`` dict, logged by the trainer under
phase 'eval' and written by gopd-eval:

    eval/<group>/exact                  expected accuracy of sampling at the rollout temperature,
                                        exactly: p(reference answer, then eos | prompt), one
                                        teacher-forced forward (eval.exact; synthetic domains only)
    eval/<group>/greedy                 accuracy of greedy decoding, one response per prompt (eval.greedy)
    eval/<group>/greedy_response_len    its mean response length (tokens, stop token included)
    eval/<group>/greedy_stop_rate       its fraction of responses ended by a stop token
    eval/<group>/avg@k                  mean accuracy of k samples per prompt at the rollout (or
                                        gopd-eval's) temperature and top-p (eval.sampled: k = 1)
    eval/<group>/pass@k                 unbiased pass@k of those samples (pass@1 = avg@k)
    eval/<group>/response_len           the samples' mean response length
    eval/<group>/stop_rate              the samples' fraction ended by a stop token
    eval/mean/<metric>                  the unweighted mean of <metric> over the groups (each group
                                        counts the same, as in the paper's averages)

A <group> is a synthetic domain (add, mul, sort, ...), a verifier kind of a dataset (math, code,
synthetic) or a benchmark's name; 'mean' is reserved. :func:`metric_name` and
:func:`flat_metrics` are the only places these names are written.

Scores. For one problem with n samples of which c are correct:
    avg@n    = c / n                                   (mean accuracy over the samples)
    pass@k   = 1 - C(n - c, k) / C(n, k),  k <= n      (unbiased estimator of "at least one of k
                                                        samples is correct", Chen et al. 2021)
A benchmark's score is the unweighted mean over its problems. pass@1 equals avg@n.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import comb

PREFIX = "eval"
MEAN = "mean"
"""The group name of the means over groups."""


def metric_name(group: str, metric: str, prefix: str = PREFIX) -> str:
    """``eval/<group>/<metric>`` (see the module docstring for the metrics)."""
    return f"{prefix}/{group}/{metric}"


def flat_metrics(
    by_group: Mapping[str, Mapping[str, float]], prefix: str = PREFIX, means: bool = True
) -> dict[str, float]:
    """``{group: {metric: value}}`` -> flat names, plus (``means``) ``eval/mean/<metric>`` for
    every metric that all groups have (the unweighted mean over groups)."""
    if MEAN in by_group:
        raise ValueError(f"evaluation group name {MEAN!r} is reserved for the means over groups")
    out = {metric_name(g, m, prefix): v for g, metrics in by_group.items() for m, v in metrics.items()}
    if means and by_group:
        groups = list(by_group.values())
        for m in groups[0]:
            if all(m in g for g in groups):
                out[metric_name(MEAN, m, prefix)] = sum(g[m] for g in groups) / len(groups)
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem (exact, in integer arithmetic up to the final division)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def scores(correct: Sequence[Sequence[bool]], ks: Sequence[int] = (1,)) -> dict[str, float]:
    """``{"avg@n": ..., "pass@k": ...}`` over problems; ``correct[i]`` = verdicts of problem i's samples
    (every problem must have the same number n of samples). pass@k for k > n is left out."""
    if not correct:
        raise ValueError("scores: no problems")
    n = len(correct[0])
    if n == 0 or any(len(c) != n for c in correct):
        raise ValueError("scores: every problem needs the same, non-zero number of samples")
    counts = [sum(bool(x) for x in c) for c in correct]
    out = {f"avg@{n}": sum(c / n for c in counts) / len(counts)}
    for k in sorted(set(ks)):
        if k <= n:
            out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in counts) / len(counts)
    return out
