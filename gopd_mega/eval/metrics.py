"""avg@k and pass@k from per-problem sample verdicts.

For one problem with n samples of which c are correct:
    avg@n    = c / n                                   (mean accuracy over the samples)
    pass@k   = 1 - C(n - c, k) / C(n, k),  k <= n      (unbiased estimator of "at least one of k
                                                        samples is correct", Chen et al. 2021)
A benchmark's score is the unweighted mean over its problems. pass@1 equals avg@n.
"""

from __future__ import annotations

from math import comb
from typing import Sequence


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
