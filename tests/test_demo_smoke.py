"""A smoke run of the demo pipeline (every phase, two seeds, very few steps): the seed loop (in
worker processes and in one process), the statistics over seeds and the outputs."""

from __future__ import annotations

import json
import statistics

import pytest

from gopd_mega.config import ConfigError, build_config, read_recipe
from gopd_mega.demo import DemoConfig, mean_std, run_demo, summarise

TINY = ["model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64", "base.steps=3", "teacher.steps=2",
        "teacher.prompts_per_step=4", "train.steps=2", "train.prompts_per_step=8", "data.num_train=64",
        "data.num_eval=8", "eval.max_prompts=8", "train.progress=false", "train.eval_every=1", "seeds=[0, 1]",
        "oracle.sequence_prompts=2", "oracle.beam=4"]


def test_demo_pipeline_smoke(tmp_path):
    """Two seeds in two worker processes, as ``make demo`` runs them on 2 CPUs, started from a
    process that has its own single-process world (its MASTER_PORT must not reach the workers)."""
    from gopd_mega.platform import init_distributed

    init_distributed()
    cfg = build_config(DemoConfig, read_recipe("recipes/demo.yaml"), [f"out_dir={tmp_path / 'demo'}", *TINY, "workers=2",
                                                                      "eval.sampled=true", "sequence_lambdas=[1.5]"])
    doc = run_demo(cfg)
    assert doc["workers"] == 2 and doc["modes"] == ["exact", "greedy", "sampled"]
    domains = cfg.data.domains
    systems = ["base student"] + [f"teacher '{d}'" for d in domains] + [
        "OPD (lam=1)", "ExOPD (lam=1.25)", "ExOPD (lam=1.5)", "ExOPD (lam=1.5), sequence returns"]
    assert doc["seeds"] == ["0", "1"] and list(doc["summary"]) == systems
    for seed in doc["seeds"]:
        assert list(doc["runs"][seed]) == systems
        for res in doc["runs"][seed].values():
            for mode in ("exact", "greedy", "sampled"):
                assert set(res[mode]) == set(domains)
                assert all(0.0 <= res[mode][d]["accuracy"] <= 1.0 for d in domains)
    # the summary is the mean and sample std of the per-seed numbers
    for name in systems:
        vals = [100 * doc["runs"][s][name]["exact"][domains[0]]["accuracy"] for s in doc["seeds"]]
        got = doc["summary"][name]["exact"][domains[0]]
        assert got["values"] == vals
        assert got["mean"] == pytest.approx(statistics.fmean(vals)) and got["std"] == pytest.approx(statistics.stdev(vals))
    # seeds differ (different init / data order), so the seeds' bases are not copies of each other
    out = tmp_path / "demo"
    weights = [(out / f"seed{k}" / "base" / "model.safetensors").read_bytes() for k in (0, 1)]
    assert weights[0] != weights[1]
    # reverse-KL curves per teacher for every distillation run and seed, GRPO reward curves per teacher
    assert len(doc["curves"]["OPD (lam=1)"]) == 2
    assert all(len(c[f"reverse_kl/{d}"]) == 2 for c in doc["curves"]["OPD (lam=1)"] for d in domains)
    assert all(len(c["reward_mean"]) == 2 for c in doc["curves"][f"teacher '{domains[0]}'"])
    assert json.loads((out / "results.json").read_text())["summary"] == doc["summary"]
    md = (out / "results.md").read_text()
    assert "| ExOPD (lam=1.25) |" in md and "− OPD (lam=1), paired" in md and "±" in md
    assert "ExOPD (lam=1.25) − base student on exact avg accuracy" in md
    assert (out / "results.png").stat().st_size > 1000
    # the targets: at lambda 1 the per-token target IS the routed teacher, so its accuracy is that
    # teacher's exact accuracy on its own domain; every lambda asked has a row, the distilled ones
    # an attainment (student minus target); the tables are printed
    oracle = doc["oracle"]["base"]
    assert list(oracle["lambdas"]) == ["1", "1.25", "1.5", "2", "3"]
    for d in domains:
        teacher_exact = doc["summary"][f"teacher '{d}'"]["exact"][d]["values"]
        assert oracle["lambdas"]["1"]["per_token"][d]["values"] == pytest.approx(teacher_exact, abs=1e-3)
    assert oracle["lambdas"]["1"]["per_token_log_z"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert {lam for lam, row in oracle["lambdas"].items() if row["attainment"]} == {"1", "1.25", "1.5"}
    opd = doc["summary"]["OPD (lam=1)"]["exact"]["avg"]["values"]
    target = oracle["lambdas"]["1"]["per_token"]["avg"]["values"]
    assert list(oracle["lambdas"]["1.5"]["attainment"]) == ["ExOPD (lam=1.5)", "ExOPD (lam=1.5), sequence returns"]
    ckpt = out / "seed0" / "gopd_lam1.5_sequence" / "train" / "checkpoints" / "step_000002"
    assert json.loads((ckpt / "trainer_state.json").read_text())["config"]["objective"]["returns"] == "sequence"
    attained = oracle["lambdas"]["1"]["attainment"]["OPD (lam=1)"]["values"]
    assert attained == pytest.approx([a - b for a, b in zip(opd, target)])
    assert all(0 < oracle["coverage"][m]["mean"] <= 1 for m in ("teacher", "reference"))
    assert "Targets with reference = the base" in md and "per-token target" in md
    # periodic held-out evaluation ran inside the distillation loop
    evals = [json.loads(x) for x in (out / "seed0" / "gopd_lam1" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["phase"] == "eval" and "eval/mean/greedy" in r and "eval/mean/exact" in r for r in evals)
    assert (out / "seed1.log").is_file() and (out / "seed1" / "result.json").is_file()
    # a re-run skips every finished phase and reproduces the same table
    again = run_demo(cfg)
    assert again["summary"] == doc["summary"]


def test_failed_worker_seed_is_named_with_its_log(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "seed1").write_text("not a directory")  # seed 1 cannot save its base model
    cfg = build_config(DemoConfig, read_recipe("recipes/demo.yaml"), [f"out_dir={out}", *TINY, "workers=2"])
    with pytest.raises(SystemExit, match=r"seed 1 failed \(exit 1\); last lines of .*seed1\.log"):
        run_demo(cfg)
    assert not (out / "results.json").exists()


def test_summary_statistics_and_paired_difference():
    def res(a, b):
        return {"sampled": {"x": {"accuracy": a}, "y": {"accuracy": b}}}

    runs = {"0": {"OPD (lam=1)": res(0.5, 0.3), "ExOPD (lam=1.25)": res(0.6, 0.3)},
            "1": {"OPD (lam=1)": res(0.7, 0.1), "ExOPD (lam=1.25)": res(0.7, 0.2)}}
    doc = summarise(["x", "y"], runs, baseline="OPD (lam=1)")
    assert doc["summary"]["OPD (lam=1)"]["sampled"]["x"]["mean"] == pytest.approx(60.0)
    assert doc["summary"]["OPD (lam=1)"]["sampled"]["avg"]["values"] == pytest.approx([40.0, 40.0])
    d = doc["paired"]["ExOPD (lam=1.25)"]["sampled"]["avg"]
    assert d["values"] == pytest.approx([5.0, 5.0]) and d["std"] == pytest.approx(0.0)
    assert mean_std([1.0])["std"] == 0.0


def test_demo_config_errors():
    with pytest.raises(ConfigError, match="seeds"):
        build_config(DemoConfig, read_recipe("recipes/demo.yaml"), ["seeds=[]"])
    with pytest.raises(ConfigError, match="teacher"):
        build_config(DemoConfig, read_recipe("recipes/demo.yaml"), ["teacher.samples_per_prompt=1"])


def test_strong_to_weak_smoke(tmp_path):
    """The strong-to-weak example: larger teacher, smaller student, both references compared."""
    from gopd_mega.demo import run_strong_to_weak

    cfg = build_config(DemoConfig, read_recipe("recipes/demo_strong_to_weak.yaml"), [
        f"out_dir={tmp_path / 's2w'}", *TINY[3:], "seeds=[0]", "strong_to_weak.student_model.hidden_size=16",
        "strong_to_weak.student_model.ffn_hidden_size=32", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "strong_to_weak.student_base.steps=2"])
    doc = run_strong_to_weak(cfg)
    names = list(doc["summary"])
    assert names[:2] == ["student base (small)", "teacher base (large)"]
    assert "ExOPD (lam=1.25), ref = student initial" in names and "ExOPD (lam=1.25), ref = teacher pre-RL base" in names
    # the two runs differ only in the reference, so their implicit rewards differ from step 1
    def first_reward(run):
        rows = (tmp_path / "s2w" / "seed0" / run / "train" / "metrics.jsonl").read_text().splitlines()
        return json.loads(rows[0])["implicit_reward"]

    assert first_reward("s2w_student_initial") != first_reward("s2w_teacher_base")
    assert doc["paired"] and (tmp_path / "s2w" / "results.png").stat().st_size > 1000


def test_digit_string_domains():
    from gopd_mega.data import synthetic

    cases = {"sort": ("s4719=", "1479"), "rev": ("r4710=", "0174"), "dsum": ("d4719=", "21"), "max": ("m47193=", "9")}
    for domain, (prompt, answer) in cases.items():
        assert synthetic.get_domain(domain).solve(prompt) == answer
        assert synthetic.check(domain, prompt, f" {answer} ") and not synthetic.check(domain, prompt, answer + "0")
    with pytest.raises(ValueError, match="not a 's' prompt"):
        synthetic.get_domain("sort").solve("r4719=")
    train, held = synthetic.make_datasets(["sort", "rev"], 50, 10, 0)
    assert not {r["prompt"] for r in train} & {r["prompt"] for v in held.values() for r in v}
