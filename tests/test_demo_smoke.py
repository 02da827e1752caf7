"""A smoke run of the demo pipeline (every phase, very few steps) and its outputs."""

from __future__ import annotations

import json

from gopd_mega.config import build_config, read_recipe
from gopd_mega.demo import DemoConfig, run_demo


def test_demo_pipeline_smoke(tmp_path):
    data = read_recipe("recipes/demo.yaml")
    cfg = build_config(DemoConfig, data, [
        f"out_dir={tmp_path / 'demo'}", "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "base.steps=3", "teacher.steps=2", "train.steps=2", "train.prompts_per_step=8", "data.num_train=64",
        "data.num_eval=8", "eval.max_prompts=8", "train.progress=false",
    ])
    doc = run_demo(cfg)
    domains = cfg.data.domains
    systems = ["base student"] + [f"teacher '{d}'" for d in domains] + ["OPD (lam=1)", "ExOPD (lam=1.25)"]
    assert list(doc["results"]) == systems
    for res in doc["results"].values():
        for mode in ("greedy", "sampled"):
            assert set(res[mode]) == set(domains)
            assert all(0.0 <= res[mode][d]["accuracy"] <= 1.0 for d in domains)
    out = tmp_path / "demo"
    assert json.loads((out / "results.json").read_text())["results"] == doc["results"]
    assert "| ExOPD (lam=1.25) |" in (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 1000
    # a re-run skips every finished phase and reproduces the same table
    again = run_demo(cfg)
    assert again["results"] == doc["results"]
