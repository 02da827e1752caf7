"""gopd-eval's outputs: results.json, a markdown table (results.md) and a bar chart (results.png).

One row per benchmark: problems, samples per problem (k), its scores (greedy, avg@k, pass@k: the
names of gopd_mega/eval/metrics.py), mean response length and stop rate of the samples. The plot
shows avg@k per benchmark (pass@k of the largest k as a lighter bar).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from gopd_mega.eval.harness import BenchmarkResult


def markdown_table(results: Sequence[BenchmarkResult], title: str = "") -> str:
    metrics: list[str] = []
    for r in results:
        metrics += [m for m in r.scores if m not in metrics]
    head = ["benchmark", "problems", "k", *metrics, "response len", "stop rate"]
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [
            r.name,
            str(r.problems),
            str(r.samples),
            *(f"{100 * r.scores[m]:.1f}" if m in r.scores else "-" for m in metrics),
            f"{r.mean_response_len:.1f}",
            f"{r.stop_rate:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        "\n\nScores in percent; avg@k = mean accuracy over k samples; pass@k unbiased"
        + ("; greedy = one greedy response" if "greedy" in metrics else "")
        + ".\n"
    )


def plot(results: Sequence[BenchmarkResult], path: str | os.PathLike, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in results]
    avg = [100 * r.scores[f"avg@{r.samples}"] for r in results]
    best = [100 * max((v for m, v in r.scores.items() if m.startswith("pass@")), default=0.0) for r in results]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(results) + 2), 3.5))
    x = range(len(results))
    ax.bar(x, best, color="#c6dbef", label="pass@k (largest k)")
    ax.bar(x, avg, color="#2171b5", width=0.5, label="avg@k")
    for i, v in zip(x, avg):
        ax.text(i, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    ax.set_xticks(list(x), [f"{n}\n(k={r.samples})" for n, r in zip(names, results)], fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("score (%)")
    ax.set_title(title or "gopd-eval")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(
    results: Sequence[BenchmarkResult], out_dir: str | os.PathLike, title: str = "", extra: dict | None = None
) -> dict[str, Path]:
    """Write results.json, results.md and results.png to ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "results.png"}
    payload = {**(extra or {}), "benchmarks": [r.to_json() for r in results]}
    tmp = paths["json"].with_suffix(".json.partial")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, paths["json"])
    paths["markdown"].write_text(markdown_table(results, title))
    plot(results, paths["plot"], title)
    return paths
