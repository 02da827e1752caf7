"""The kernel benchmark's own code path, at toy size on CPU (the GPU run is benchmarks/gpu_check.sh):
it must finish, cover every implementation (the full-vocabulary G-OPD entry too), and write its
CSV / JSON / PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_logprob.py"), "--smoke",
                          "--tokens", "48", "--tp", "1", "3", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "bench_logprob.json").read_text())
    timed = {r["impl"] for r in data["timings"] if "ms" in r}
    assert {"naive torch", "ours fused-loss triton -> main_grad",
            "ours triton low_memory (tl.dot)"} <= timed
    assert all(r["x_floor"] > 0 for r in data["timings"] if "ms" in r)
    acc = {r["impl"]: r for r in data["accuracy"]}
    # bf16 inputs: our fp32-logits path is far more accurate in logp than the plain torch path
    assert acc["ours fused-loss chunked"]["logp_rel_err"] < acc["naive torch"]["logp_rel_err"] / 10
    # the full-vocabulary G-OPD entry: timed, and no less accurate than three bf16 logits matrices
    full_vocab = {r["impl"] for r in data["timings"] if "ms" in r and r["mode"].startswith("full-vocab")}
    assert {"naive torch (3 full logits)", "ours full-vocab chunked", "ours full-vocab triton",
            "ours full-vocab triton -> main_grad"} <= full_vocab
    for lam in (1.0, 1.25):
        naive = acc[f"full-vocab lam={lam}: naive torch (3 full logits)"]
        for impl in ("chunked", "triton", "triton -> main_grad"):
            ours = acc[f"full-vocab lam={lam}: ours full-vocab {impl}"]
            assert ours["dh_rel_err"] < naive["dh_rel_err"] and ours["dW_rel_err"] < naive["dW_rel_err"]
    assert (tmp_path / "bench_logprob.csv").stat().st_size > 0
    assert (tmp_path / "bench_logprob.png").stat().st_size > 0
