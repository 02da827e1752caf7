"""benchmarks/bench_peers.py at toy size on CPU: both sides run in their own processes, give the
same greedy tokens, and every phase of the step comparison is accounted for. The step comparison
needs TRL (the optional ``bench`` extra): skipped without it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from dist_utils import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_bench_peers_smoke(tmp_path):
    only = "decode,step" if importlib.util.find_spec("trl") else "decode"
    env = subprocess_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_peers.py"), "--model", "tiny", "--only", only,
                          "--runs", "1", "--steps", "1", "--warmup", "0", "--prompts", "2", "--prompt-len", "4",
                          "--new", "4", "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    r = json.loads((tmp_path / "peers_tiny.json").read_text())
    assert r["decode"]["same_tokens"] and r["decode"]["ours_ms_per_token"] > 0 and r["decode"]["peer_ms_per_token"] > 0
    assert "decode" in out.stdout and (tmp_path / "peers.png").stat().st_size > 1000
    if "step" in only:
        for side in ("ours", "peer"):
            ph = r["step"][side]["phases"]
            assert ph["generation"] > 0 and ph["student fwd+bwd"] > 0 and ph["teacher forward"] > 0, (side, ph)
            assert abs(sum(ph.values()) - r["step"][side]["cpu_s"]) < 1e-6
        assert r["step"]["ours"]["phases"].get("reference forward", 0.0) == 0.0  # lambda = 1: not scored
