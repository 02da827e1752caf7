"""The main job: a miniature of the paper's multi-teacher domain-expert merging (Table 2).

    make demo        # = python -m gopd_mega.demo --recipe recipes/demo.yaml

1. Two verifiable synthetic domains (addition 'add', multiplication 'mul') from a seed, with
   exact-match checkers and the project's character tokenizer.
2. A tiny megatron-core GPT base student, trained briefly by SFT on both: mediocre.
3. Two domain teachers made from that same base by further SFT on their own domain.
4. Both teachers distilled back into the base with G-OPD, reference = the base:
   lambda = 1 (OPD) and lambda = 1.25 (ExOPD); each prompt is scored by its domain's teacher.
5. Held-out accuracy per domain, greedy and sampled, for base, teachers, OPD and ExOPD: printed
   as a table, written to results.json / results.md and plotted to results.png.

Every phase saves its model directory under ``out_dir``; re-running skips finished phases
(delete ``out_dir`` to start over). Runs under torchrun too (examples/demo_tp2.sh).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from gopd_mega.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    TeacherConfig,
    TrainConfig,
    build_config,
    read_recipe,
)
from gopd_mega.data import synthetic
from gopd_mega.data.prompts import PromptDataset
from gopd_mega.data.tokenizer import CharTokenizer
from gopd_mega.evaluation import evaluate_modes
from gopd_mega.model_io import is_model_dir, save_model_dir
from gopd_mega.optim import build_optimizer
from gopd_mega.rollout.embedded import EmbeddedEngine
from gopd_mega.run import build_model, build_models, build_student_optimizer, report, synthetic_evaluator
from gopd_mega.sft import train_sft
from gopd_mega.trainer import Distiller


@dataclass
class SFTPhase:
    """One supervised phase (base model or a domain teacher)."""

    steps: int = 300
    """Updates."""
    batch_size: int = 64
    """Sequences per update."""
    lr: float = 3e-3
    """Peak learning rate (cosine decay to lr/10, short warm-up)."""

    def validate(self, where: str) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"config field '{where}': need steps >= 0, batch_size >= 1, lr > 0")


@dataclass
class DemoConfig:
    """The demo experiment."""

    out_dir: str = "runs/demo"
    """Where every phase writes its model directory and the results."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture and layout of base, teachers and students (vocab_size comes from the tokenizer)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Synthetic domains and sizes."""
    base: SFTPhase = field(default_factory=SFTPhase)
    """Brief SFT on all domains: the mediocre base student."""
    teacher: SFTPhase = field(default_factory=SFTPhase)
    """Further SFT on one domain: each domain teacher."""
    lambdas: list[float] = field(default_factory=lambda: [1.0, 1.25])
    """Reward scales to distil with (1 = OPD, 1.25 = ExOPD)."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """G-OPD settings shared by the distillation runs (lam is set per run)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling for distillation and sampled evaluation."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Student optimiser for distillation."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Distillation loop (out_dir is set per run)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""

    def validate(self) -> "DemoConfig":
        self.model.validate("model")
        for name in ("data", "objective", "rollout", "optim", "train", "eval"):
            getattr(self, name).validate(name)
        self.base.validate("base")
        self.teacher.validate("teacher")
        for i, lam in enumerate(self.lambdas):
            if lam < 0:
                raise ConfigError(f"config field 'lambdas[{i}]': must be >= 0, got {lam}")
        return self


def _sft_model(cfg: DemoConfig, init: str | None, records: list[dict], phase: SFTPhase, tokenizer, out: Path, seed: int, desc: str) -> None:
    if is_model_dir(out):
        report(f"{desc}: found {out}, skipping")
        return
    model_cfg = dataclasses.replace(cfg.model, load=init)
    model = build_model(model_cfg, trainable=True, name=desc)
    optim_cfg = OptimConfig(lr=phase.lr, min_lr=phase.lr / 10, schedule="cosine", warmup_steps=min(20, phase.steps // 10), grad_clip=1.0)
    optimizer = build_optimizer(model, optim_cfg, total_steps=phase.steps)
    t0 = time.perf_counter()
    losses = train_sft(model, optimizer, records, tokenizer, steps=phase.steps, batch_size=phase.batch_size,
                       micro_batch_size=cfg.train.micro_batch_size, max_len=cfg.model.max_seq_len, seed=seed, desc=desc,
                       max_tokens=cfg.train.max_tokens_per_micro_batch)
    save_model_dir(model, out)
    report(f"{desc}: {phase.steps} steps in {time.perf_counter() - t0:.0f}s, final loss {losses[-1] if losses else float('nan'):.3f}")


def _run_config(cfg: DemoConfig, base: Path, teachers: dict[str, Path], lam: float, out: Path) -> RunConfig:
    student = dataclasses.replace(cfg.model, load=str(base))
    teacher_cfgs = [TeacherConfig(name=d, model=dataclasses.replace(cfg.model, load=str(p))) for d, p in teachers.items()]
    return RunConfig(
        student=student,
        teachers=teacher_cfgs,
        objective=dataclasses.replace(cfg.objective, lam=lam, reference="initial"),
        rollout=cfg.rollout,
        optim=cfg.optim,
        data=cfg.data,
        train=dataclasses.replace(cfg.train, out_dir=str(out / "train")),
        eval=cfg.eval,
    ).validate()


def _evaluate_dir(cfg: DemoConfig, path: Path, held_out: dict[str, list[dict]], tokenizer) -> dict:
    """Held-out accuracy of the model saved at ``path``: greedy and sampled, per domain."""
    model = build_model(dataclasses.replace(cfg.model, load=str(path)), trainable=False, name=str(path))
    engine = EmbeddedEngine(model, pad_id=tokenizer.pad_id, stop_ids=tokenizer.stop_ids)
    results = evaluate_modes(engine, held_out, tokenizer, synthetic.check, cfg.eval, cfg.rollout, seed=cfg.data.seed + 17)
    return {mode: {d: {"accuracy": r.accuracy[d], "response_len": r.response_len[d], "stop_rate": r.stop_rate[d]}
                   for d in r.accuracy}
            for mode, r in results.items()}


def run_demo(cfg: DemoConfig) -> dict:
    t_start = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = CharTokenizer()
    cfg.model = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)
    train_records, held_out = synthetic.from_config(cfg.data)
    by_domain = {d: [r for r in train_records if r[cfg.data.teacher_field] == d] for d in cfg.data.domains}
    report(f"data: {len(train_records)} training prompts over {cfg.data.domains}, {sum(map(len, held_out.values()))} held out")

    # 1-2. mediocre base student, 3. domain teachers from that base
    _sft_model(cfg, None, train_records, cfg.base, tokenizer, out / "base", cfg.data.seed + 1, "base SFT")
    teachers = {}
    for i, domain in enumerate(cfg.data.domains):
        teachers[domain] = out / f"teacher_{domain}"
        _sft_model(cfg, str(out / "base"), by_domain[domain], cfg.teacher, tokenizer, teachers[domain], cfg.data.seed + 2 + i, f"teacher '{domain}' SFT")

    # 4. G-OPD distillation of all teachers back into the base
    students = {}
    for lam in cfg.lambdas:
        name = ("OPD" if lam == 1.0 else "ExOPD" if lam > 1 else "G-OPD") + f" (lam={lam:g})"
        run_dir = out / f"gopd_lam{lam:g}"
        students[name] = run_dir / "student"
        if is_model_dir(students[name]):
            report(f"{name}: found {students[name]}, skipping")
            continue
        run_cfg = _run_config(cfg, out / "base", teachers, lam, run_dir)
        models = build_models(run_cfg, tokenizer)
        data = PromptDataset.from_config(train_records, tokenizer, run_cfg.data, teachers=list(teachers))
        report(str(data.filter_summary))
        evaluate = synthetic_evaluator(run_cfg, models, tokenizer, held_out)
        distiller = Distiller(run_cfg, models, data, build_student_optimizer(run_cfg, models), evaluate)
        t0 = time.perf_counter()
        distiller.fit()
        save_model_dir(models.student, students[name])
        report(f"{name}: {run_cfg.train.steps} G-OPD steps in {time.perf_counter() - t0:.0f}s")

    # 5. evaluation
    systems = {"base student": out / "base", **{f"teacher '{d}'": p for d, p in teachers.items()}, **students}
    results = {name: _evaluate_dir(cfg, path, held_out, tokenizer) for name, path in systems.items()}
    results_doc = {"domains": cfg.data.domains, "results": results, "wall_s": time.perf_counter() - t_start}
    write_results(out, results_doc)
    return results_doc


def results_table(doc: dict) -> str:
    domains = doc["domains"]
    modes = list(next(iter(doc["results"].values())).keys())
    head = ["system"] + [f"{d} {m}" for m in modes for d in domains] + [f"avg {m}" for m in modes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in doc["results"].items():
        cells = [name]
        for m in modes:
            cells += [f"{100 * res[m][d]['accuracy']:.1f}" for d in domains]
        for m in modes:
            cells.append(f"{100 * sum(res[m][d]['accuracy'] for d in domains) / len(domains):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: Path, doc: dict) -> None:
    from gopd_mega.metrics import is_rank0

    if not is_rank0():
        return
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    table = results_table(doc)
    (out / "results.md").write_text("Held-out accuracy (%), per domain\n\n" + table + "\n")
    _plot(out / "results.png", doc)
    print("\nHeld-out accuracy (%), per domain\n" + table, flush=True)
    print(f"\nresults: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}", flush=True)


def _plot(path: Path, doc: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["results"])
    modes = list(doc["results"][names[0]])
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    width = 0.8 / len(doc["domains"])
    for ax, mode in zip(axes[0], modes):
        for j, domain in enumerate(doc["domains"]):
            acc = [100 * doc["results"][n][mode][domain]["accuracy"] for n in names]
            ax.bar([i + j * width for i in range(len(names))], acc, width, label=domain)
        ax.set_xticks([i + width * (len(doc["domains"]) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(f"{mode} decoding")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/demo.yaml", help="YAML/TOML recipe (DemoConfig sections)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = build_config(DemoConfig, read_recipe(args.recipe), args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))  # exits with status 2 and the message naming the field
    run_demo(cfg)


if __name__ == "__main__":
    main()
