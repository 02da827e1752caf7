"""benchmarks/estimators.py at toy size on CPU: it must finish, measure every (lambda, estimator)
run on the same held-out positions from the same start, and write its table, plot and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dist_utils import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_estimators_bench_smoke(tmp_path):
    env = subprocess_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    script = str(ROOT / "benchmarks" / "estimators.py")
    cmd = [sys.executable, script, "--seeds", "0", "--steps", "2", "--prompts", "8", "--kl-every", "1",
           "--kl-prompts", "4", "--eval-prompts", "8", "--no-timing", "--demo-dir", str(tmp_path / "none"),
           "--out", str(tmp_path), "base.steps=3", "teacher.steps=2", "teacher.prompts_per_step=4"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    runs = [n for n in doc["summary"] if n != "base"]
    assert len(runs) == 6 and {n.rsplit(" ", 1)[1] for n in runs} == {"sampled", "full_vocab", "top_k"}
    # every run of a seed starts from the same base, measured on the same held-out positions
    assert len({doc["summary"][n]["kl_start"][0] for n in runs}) == 1
    for n in runs:
        assert doc["summary"][n]["steps"] == [0, 1, 2] and len(doc["summary"][n]["accuracy_per_seed"]) == 1
    assert (tmp_path / "estimators.png").stat().st_size > 0 and "steps to halve it" in (tmp_path / "results.md").read_text()
    # the step-cost job (one estimator, one step) prints its measurement
    t = subprocess.run([sys.executable, script, "--time-job", "full_vocab", "--time-steps", "1", "--time-vocab", "64"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert t.returncode == 0, t.stderr[-3000:]
    cost = json.loads(t.stdout.strip().splitlines()[-1])
    assert cost["cpu_s_per_step"] > 0 and cost["peak_rss_mib"] > 0
