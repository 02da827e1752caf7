"""Step time with and without rollout.overlap, against the stand-in SGLang server (CPU).

    PYTHONPATH=$PWD python benchmarks/rollout_overlap.py [--steps 6] [--server-delay 0.5]

The stand-in (tests/sglang_standin.py) serves the exported student; ``--server-delay`` seconds
are added to every /generate request to stand for a remote GPU server's generation time (the
stand-in's own CPU decoding would otherwise compete with training for the same cores). The
trainer is the real Distiller on tiny megatron-core models (2 layers, hidden 32). Reported:
mean step time over the steps after the first (which includes start-up), and rollout wait.
Prints one JSON line per mode and writes benchmarks/results/rollout_overlap.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--server-delay", type=float, default=0.5)
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from sglang_standin import StandinSGLang

    from gopd_mega.config import ModelConfig, RunConfig, build_config
    from gopd_mega.data import synthetic
    from gopd_mega.data.prompts import PromptDataset
    from gopd_mega.data.tokenizer import CharTokenizer
    from gopd_mega.hf import export_hf
    from gopd_mega.model_io import build_model, save_model_dir
    from gopd_mega.run import build_models, build_student_optimizer
    from gopd_mega.trainer import Distiller

    tok = CharTokenizer()
    tiny = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                vocab_size=tok.vocab_size, max_seq_len=32)
    root = Path(tempfile.mkdtemp(prefix="rollout_overlap_"))
    dirs = {}
    for name, seed, std in (("student", 1, 0.02), ("add", 2, 0.3), ("mul", 3, 0.3)):
        model = build_model(ModelConfig(**tiny, seed=seed, init_std=std), trainable=False, name=name)
        save_model_dir(model, root / name)
        dirs[name] = str(root / name)
        if name == "student":
            export_hf(model, root / "student_hf")
    server = StandinSGLang(str(root / "student_hf"))
    server.delay_s = args.server_delay
    results = {}
    try:
        for overlap in (False, True):
            data = {
                "student": {"load": dirs["student"]},
                "teachers": [{"name": d, "model": {"load": dirs[d]}} for d in ("add", "mul")],
                "rollout": {"engine": "sglang", "sglang_url": server.url, "max_new_tokens": 6, "overlap": overlap},
                "optim": {"lr": 1e-3},
                "data": {"num_train": 64, "num_eval": 8, "max_prompt_len": 12},
                "train": {"steps": args.steps, "prompts_per_step": args.prompts, "micro_batch_size": 4,
                          "out_dir": str(root / f"run_overlap{int(overlap)}"), "progress": False},
            }
            cfg = build_config(RunConfig, data)
            records, _ = synthetic.from_config(cfg.data)
            models = build_models(cfg, tok)
            prompts = PromptDataset.from_config(records, tok, cfg.data, teachers=["add", "mul"])
            run = Distiller(cfg, models, prompts, build_student_optimizer(cfg, models))
            t0 = time.perf_counter()
            history = run.fit()
            wall = time.perf_counter() - t0
            steps = history[1:]
            results[f"overlap={overlap}"] = {
                "mean_step_s": statistics.mean(m["step_s"] for m in steps),
                "mean_rollout_wait_s": statistics.mean(m["rollout_s"] for m in steps),
                "fit_wall_s": wall, "steps": args.steps, "server_delay_s": args.server_delay,
                "policy_lag": [m["policy_lag"] for m in history],
            }
            print(json.dumps({f"overlap={overlap}": results[f"overlap={overlap}"]}), flush=True)
    finally:
        server.close()
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "rollout_overlap.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
