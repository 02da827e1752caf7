"""The step benchmark's own code path at toy size on CPU: it must finish, time every phase of a
G-OPD step, and count the computed positions consistently with the batch it sampled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dist_utils import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_bench_step_smoke(tmp_path):
    # A fresh single-process world: drop the torch.distributed variables that earlier tests in
    # this pytest process may have set (their MASTER_PORT is taken by this process's store).
    env = subprocess_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--warmup", "0", "--steps", "1",
                          "--prompts", "4", "--max-new-tokens", "6", "--updates-per-rollout", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads((tmp_path / "bench_step.json").read_text())
    for phase in ("rollout", "teachers", "reference", "student pi_old pass", "student fwd+bwd", "optimizer", "weight sync"):
        assert r["phases_s"][phase] > 0, phase
    assert abs(sum(r["phases_s"].values()) - r["step_s"]) < 1e-9
    step = r["steps"][0]
    n, s = step["batch_shape"]
    # teachers (rows split between them) + reference + pi_old pass + two half-batch updates: 4 full
    # passes, each packed without padding: a row's input stops before its last token (whose own
    # position predicts nothing), so a pass computes real tokens - n positions (model.stats).
    assert r["counter_source"] == "model.stats"
    assert r["positions"]["computed"] == 4 * (step["real_tokens"] - n)
    assert r["positions"]["padding"] == 0
    assert r["positions"]["response"] == 4 * step["response_tokens"]
    assert sum(r["positions"][k] for k in ("padding", "prompt", "response")) == r["positions"]["computed"]
    assert 0 < r["non_response_fraction"] < 1 and r["response_tokens_per_s"] > 0 and r["peak_mem_mib"] > 0
    assert "whole step" in out.stdout and "padding" in out.stdout
