"""The main job: the paper's multi-teacher domain-expert merging (Table 2) in miniature, over seeds.

    make demo                                   # = python -m gopd_mega.demo (recipes/demo.yaml)
    python -m gopd_mega.demo --full             # longer, more accurate (recipes/demo_full.yaml)
    python -m gopd_mega.demo --strong-to-weak   # reward correction (recipes/demo_strong_to_weak.yaml)

For every seed (model initialisation, data order and sampling change; the data split does not):
1. A tiny megatron-core GPT base student, trained briefly by SFT on all synthetic domains
   (gopd_mega/data/synthetic.py, exact-match checkers, character tokenizer): mediocre.
2. One domain teacher per domain, made from that base by the project's own GRPO on the domain's
   checker (objective.kind=grpo), as the paper makes its teachers: the base tilted by a reward.
3. All teachers distilled back into the base with G-OPD, reference = the base, every prompt
   scored by its domain's teacher: lambda = 1 (OPD) and lambda > 1 (ExOPD, e.g. 1.25 and 1.5).
4. Held-out accuracy per domain of every system: "exact" (the expected accuracy of sampling at
   temperature 1, computed as the probability of the reference answer: no sampling noise, see
   gopd_mega.eval.domains.answer_probability) and greedy.
Then mean +- sample std over seeds, the paired per-seed difference ExOPD - OPD (same base and
teachers within a seed), a table (printed last; results.md / results.json) and results.png
(accuracy with its spread; reverse KL to each teacher over distillation steps; teacher rewards).

Strong-to-weak (--strong-to-weak): a larger base is SFT-trained and RL-tuned into a teacher; a
smaller student (its own SFT base) distils it with reference = the student's initial weights or
reference = the teacher's pre-RL base (reward correction), per seed.

Seeds run in parallel worker processes, one CPU thread each (``workers``; on 2 CPUs two seeds at
a time: these tiny models leave a second thread mostly idle). Every phase saves its model directory
under ``out_dir/seed<k>`` and each seed its ``result.json``; re-running skips what has finished
(delete ``out_dir`` to start over).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gopd_mega.config import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    RunConfig,
    RunSections,
    TeacherConfig,
    build_config,
    read_recipe,
    to_dict,
)
from gopd_mega.data import synthetic
from gopd_mega.data.prompts import sft_batch
from gopd_mega.data.tokenizer import CharTokenizer
from gopd_mega.eval.domains import evaluate_modes
from gopd_mega.model_io import build_model, is_model_dir, save_model_dir
from gopd_mega.oracle import per_token_target, sequence_target
from gopd_mega.rollout.embedded import EmbeddedEngine
from gopd_mega.run import build_distiller, report
from gopd_mega.sft import train_sft


@dataclass
class SFTPhase:
    """One supervised phase (the base model)."""

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
class GRPOPhase:
    """GRPO from the base on one domain's checker: each domain teacher."""

    steps: int = 60
    """Updates."""
    prompts_per_step: int = 16
    """Prompts per update (each sampled ``samples_per_prompt`` times)."""
    samples_per_prompt: int = 8
    """GRPO group size."""
    lr: float = 1e-3
    """Peak learning rate, reached after the warm-up, then cosine decay to 0 (the final teacher is
    not a noisy snapshot of a constant-LR walk)."""
    warmup_steps: int = 0
    """Linear warm-up: Adam's first, sign-like updates of a noisy policy gradient can wreck a tiny model."""
    kl_coef: float = 0.0
    """k3 KL-to-base coefficient (objective.kl_coef)."""

    def validate(self, where: str) -> None:
        if (
            self.steps < 0
            or self.prompts_per_step < 1
            or self.samples_per_prompt < 2
            or self.lr <= 0
            or self.kl_coef < 0
            or self.warmup_steps < 0
        ):
            raise ConfigError(
                f"config field '{where}': need steps >= 0, prompts_per_step >= 1, "
                "samples_per_prompt >= 2, lr > 0, kl_coef >= 0, warmup_steps >= 0"
            )


@dataclass
class StrongToWeak:
    """The strong-to-weak example (``--strong-to-weak``): a larger teacher, a smaller student."""

    student_model: ModelConfig = field(default_factory=ModelConfig)
    """The smaller student's architecture (``model`` is the larger teacher's)."""
    student_base: SFTPhase | None = None
    """The smaller student's own SFT (None: the same as ``base``, the teacher base's)."""
    lam: float = 1.25
    """Reward scale of both distillations."""
    references: list[str] = field(default_factory=lambda: ["student_initial", "teacher_base"])
    """Which references to compare: 'student_initial' (the student's own initial weights) and/or
    'teacher_base' (the teacher's pre-RL base: reward correction)."""

    def validate(self, where: str) -> None:
        self.student_model.validate(f"{where}.student_model")
        if self.student_base is not None:
            self.student_base.validate(f"{where}.student_base")
        for i, r in enumerate(self.references):
            if r not in ("student_initial", "teacher_base"):
                raise ConfigError(
                    f"config field '{where}.references[{i}]': must be 'student_initial' or 'teacher_base', got {r!r}"
                )
        if self.lam < 0:
            raise ConfigError(f"config field '{where}.lam': must be >= 0, got {self.lam}")


@dataclass
class OracleConfig:
    """The exact targets beside the students (gopd_mega/oracle.py), per seed, lambda and domain."""

    enabled: bool = True
    """Compute the targets (per-token on every evaluated prompt; sequence-level on a few)."""
    lambdas: list[float] = field(default_factory=lambda: [1.0, 1.25, 1.5, 2.0, 3.0])
    """Reward scales to compute the targets at (the distilled ones are added): beyond them, the
    extrapolation cliff."""
    sequence_prompts: int = 16
    """Held-out prompts per domain for the sequence-level target (0: not computed)."""
    beam: int = 128
    """Prefixes kept per depth of the response tree (oracle.sequence_target): the enumerated Z is a
    lower bound, so the sequence-level accuracy shown is an upper bound."""

    def validate(self, where: str) -> None:
        if self.sequence_prompts < 0 or self.beam < 1 or any(not (lam >= 0) for lam in self.lambdas):
            raise ConfigError(f"config field '{where}': need sequence_prompts >= 0, beam >= 1, lambdas >= 0")


@dataclass
class DemoConfig(RunSections):
    """The demo experiment: its phases, plus the run sections every phase's RunConfig is built from
    (:class:`gopd_mega.config.RunSections`): ``data`` (the synthetic domains and sizes; data.seed
    fixes the prompts, the same for every seed), ``objective`` (G-OPD settings shared by the
    distillation runs; lam is set per run), ``rollout`` (sampling for distillation, GRPO and sampled
    evaluation), ``optim`` (the student's optimiser in distillation), ``train`` (the distillation
    loop; out_dir and seed are set per run) and ``eval`` (held-out evaluation).
    """

    out_dir: str = "runs/demo"
    """Where every phase writes its model directory and the results."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Every system is trained once per seed (model init, data order, sampling); >= 1 seed, and
    >= 2 for a spread."""
    workers: int = 0
    """Seeds run at once, each in its own process with cpu_count // workers threads (0: one per
    CPU, at most one per seed; 1: all seeds in this process, one after another)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture and layout of base, teachers and students (vocab_size comes from the tokenizer)."""
    base: SFTPhase = field(default_factory=SFTPhase)
    """Brief SFT on all domains: the mediocre base student."""
    teacher: GRPOPhase = field(default_factory=GRPOPhase)
    """GRPO from the base on one domain: each domain teacher."""
    lambdas: list[float] = field(default_factory=lambda: [1.0, 1.25, 1.5])
    """Reward scales to distil with (1 = OPD, > 1 = ExOPD)."""
    sequence_lambdas: list[float] = field(default_factory=list)
    """Reward scales to distil with ALSO with objective.returns = 'sequence' (return-to-go: the
    sequence-level target; the runs above use the paper's per-token advantage): [] = none."""
    strong_to_weak: StrongToWeak = field(default_factory=StrongToWeak)
    """Only for ``--strong-to-weak``."""
    oracle: OracleConfig = field(default_factory=OracleConfig)
    """The exact per-token and sequence-level targets, reported beside the students."""

    def validate(self) -> DemoConfig:
        self.model.validate("model")
        self.validate_sections()
        self.base.validate("base")
        self.teacher.validate("teacher")
        self.strong_to_weak.validate("strong_to_weak")
        self.oracle.validate("oracle")
        if self.workers < 0:
            raise ConfigError(f"config field 'workers': must be >= 0 (0: one per CPU), got {self.workers}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"config field 'seeds': need one or more distinct seeds, got {self.seeds}")
        for name in ("lambdas", "sequence_lambdas"):
            for i, lam in enumerate(getattr(self, name)):
                if not lam >= 0:
                    raise ConfigError(f"config field '{name}[{i}]': must be >= 0, got {lam}")
        if self.objective.kind != "gopd":
            raise ConfigError(
                "config field 'objective.kind': the distillation runs are G-OPD ('gopd'); GRPO "
                "settings of the teachers are under 'teacher'"
            )
        return self


def system_name(lam: float, returns: str = "token") -> str:
    name = ("OPD" if lam == 1.0 else "ExOPD" if lam > 1 else "G-OPD") + f" (lam={lam:g})"
    return name if returns == "token" else f"{name}, sequence returns"


def _s2w_name(lam: float, reference: str) -> str:
    """A strong-to-weak student's system name: lambda and which reference it was distilled against."""
    return f"{system_name(lam)}, ref = {REFERENCE_NAMES[reference]}"


# ----------------------------------------------------------------------------- phases


def _sft_model(
    cfg: DemoConfig,
    model_cfg: ModelConfig,
    records: list[dict],
    phase: SFTPhase,
    tokenizer,
    out: Path,
    seed: int,
    desc: str,
) -> None:
    if is_model_dir(out):
        report(f"{desc}: found {out}, skipping")
        return
    optim_cfg = OptimConfig(
        lr=phase.lr, min_lr=phase.lr / 10, schedule="cosine", warmup_steps=min(20, phase.steps // 10), grad_clip=1.0
    )
    # optimizer built before the weights load: its fp32 masters get the checkpoint's full precision
    model = build_model(model_cfg, trainable=True, name=desc, optim=optim_cfg, total_steps=phase.steps)
    optimizer = model.optimizer
    t0 = time.perf_counter()
    losses = train_sft(
        model,
        optimizer,
        records,
        tokenizer,
        steps=phase.steps,
        batch_size=phase.batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        max_len=model_cfg.max_seq_len,
        seed=seed,
        desc=desc,
        max_tokens=cfg.train.max_tokens_per_micro_batch,
        progress=cfg.train.progress,
    )
    save_model_dir(model, out)
    report(
        f"{desc}: {phase.steps} steps in {time.perf_counter() - t0:.0f}s, "
        f"final loss {losses[-1] if losses else float('nan'):.3f}"
    )


def _grpo_teacher(
    cfg: DemoConfig, base: Path, domain: str, records: list[dict], tokenizer, out: Path, seed: int
) -> None:
    """GRPO from ``base`` on ``domain``'s checker, saved to ``out`` (metrics in out/../<name>_train)."""
    desc = f"teacher '{domain}' GRPO"
    if is_model_dir(out):
        report(f"{desc}: found {out}, skipping")
        return
    phase = cfg.teacher
    run_cfg = RunConfig(
        student=dataclasses.replace(cfg.model, load=str(base)),
        teachers=[],
        objective=dataclasses.replace(cfg.objective, kind="grpo", kl_coef=phase.kl_coef, reference="initial"),
        rollout=dataclasses.replace(cfg.rollout, samples_per_prompt=phase.samples_per_prompt),
        optim=OptimConfig(
            lr=phase.lr, min_lr=0.0, schedule="cosine", warmup_steps=phase.warmup_steps, grad_clip=cfg.optim.grad_clip
        ),
        data=dataclasses.replace(cfg.data, domains=[domain]),
        train=dataclasses.replace(
            cfg.train,
            steps=phase.steps,
            prompts_per_step=phase.prompts_per_step,
            seed=seed,
            eval_every=0,
            out_dir=str(out.parent / f"{out.name}_train"),
        ),
        eval=cfg.eval,
    ).validate()
    distiller = build_distiller(run_cfg, tokenizer, records)  # GRPO: the synthetic checker's reward
    t0 = time.perf_counter()
    history = distiller.fit()
    save_model_dir(distiller.m.student, out)
    if history:
        k = max(1, len(history) // 5)
        first = statistics.fmean(m["reward_mean"] for m in history[:k])
        last = statistics.fmean(m["reward_mean"] for m in history[-k:])
        report(
            f"{desc}: {phase.steps} steps in {time.perf_counter() - t0:.0f}s, training reward {first:.2f} -> {last:.2f}"
        )


def _distill(
    cfg: DemoConfig,
    student: ModelConfig,
    teachers: dict[str, Path],
    lam: float,
    reference: str,
    records: list[dict],
    held_out: dict,
    tokenizer,
    out: Path,
    seed: int,
    desc: str,
    returns: str = "token",
) -> Path:
    """G-OPD of ``teachers`` into ``student`` (objective.returns ``returns``); saved to out/student."""
    result = out / "student"
    if is_model_dir(result):
        report(f"{desc}: found {result}, skipping")
        return result
    run_cfg = RunConfig(
        student=student,
        teachers=[
            TeacherConfig(name=d, model=dataclasses.replace(cfg.model, load=str(p))) for d, p in teachers.items()
        ],
        objective=dataclasses.replace(cfg.objective, lam=lam, reference=reference, returns=returns),
        rollout=cfg.rollout,
        optim=cfg.optim,
        data=cfg.data,
        train=dataclasses.replace(cfg.train, out_dir=str(out / "train"), seed=seed),
        eval=cfg.eval,
    ).validate()
    distiller = build_distiller(run_cfg, tokenizer, records, held_out=held_out)
    t0 = time.perf_counter()
    distiller.fit()
    save_model_dir(distiller.m.student, result)
    report(f"{desc}: {run_cfg.train.steps} G-OPD steps in {time.perf_counter() - t0:.0f}s")
    return result


def _evaluate_dir(
    cfg: DemoConfig, model_cfg: ModelConfig, path: Path, held_out: dict[str, list[dict]], tokenizer
) -> dict:
    """Held-out accuracy of the model saved at ``path``, per domain, in the modes ``cfg.eval`` asks for."""
    model = build_model(dataclasses.replace(model_cfg, load=str(path)), trainable=False, name=str(path))
    engine = EmbeddedEngine(model, pad_id=tokenizer.pad_id, stop_ids=tokenizer.stop_ids)
    results = evaluate_modes(
        engine,
        held_out,
        tokenizer,
        synthetic.check,
        cfg.eval,
        cfg.rollout,
        seed=cfg.data.seed + 17,
        model=model,
        answer_of=synthetic.answer,
    )
    return {
        mode: {
            d: {
                "accuracy": r.accuracy[d],
                **({"response_len": r.response_len[d], "stop_rate": r.stop_rate[d]} if d in r.response_len else {}),
            }
            for d in r.accuracy
        }
        for mode, r in results.items()
    }


def _oracle(
    cfg: DemoConfig,
    teachers: dict[str, tuple[ModelConfig, Path]],
    reference: tuple[ModelConfig, Path],
    lambdas: list[float],
    held_out: dict[str, list[dict]],
    tokenizer,
) -> dict:
    """The exact targets of distilling ``teachers`` (domain -> architecture, directory) against
    ``reference`` at each lambda (gopd_mega.oracle), per held-out domain, every prompt routed to its
    domain's teacher: the per-token target's expected accuracy and mean log Z_t on the evaluated
    prompts, and on the first ``oracle.sequence_prompts`` of them the sequence-level target's
    accuracy (an upper bound), its log Z (a lower bound) and the beam's coverage. Keys: f"{lam:g}"."""
    oc, temp = cfg.oracle, cfg.rollout.temperature
    ref = build_model(
        dataclasses.replace(reference[0], load=str(reference[1])), trainable=False, name="oracle reference"
    )
    keys = {lam: f"{lam:g}" for lam in lambdas}
    out: dict = {
        k: {}
        for k in (
            "per_token",
            "per_token_log_z",
            "sequence_upper",
            "sequence_log_z",
            "coverage_teacher",
            "coverage_reference",
            "sequence_exact",
        )
    }
    for name in ("per_token", "per_token_log_z", "sequence_upper", "sequence_log_z"):
        out[name] = {keys[lam]: {} for lam in lambdas}
    for domain, records in held_out.items():
        arch, path = teachers[domain]
        teacher = build_model(
            dataclasses.replace(arch, load=str(path)), trainable=False, name=f"oracle teacher {domain}"
        )
        records = records[: cfg.eval.max_prompts]
        pairs = [
            {"prompt": r[cfg.data.prompt_field], "answer": synthetic.answer(domain, r[cfg.data.prompt_field])}
            for r in records
        ]
        tokens, mask = sft_batch(pairs, tokenizer, None)
        tok = per_token_target(teacher, ref, tokens, mask, lambdas, temp)
        for lam in lambdas:
            out["per_token"][keys[lam]][domain] = tok.accuracy(lam)
            out["per_token_log_z"][keys[lam]][domain] = float(tok.mean_log_z[lam].mean())
        n = min(oc.sequence_prompts, len(pairs))
        if n:
            bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
            prompts = [bos + list(tokenizer.encode(p["prompt"])) for p in pairs[:n]]
            answers = [[*list(tokenizer.encode(p["answer"])), tokenizer.eos_id] for p in pairs[:n]]
            seq = sequence_target(
                teacher,
                ref,
                prompts,
                answers,
                lambdas,
                stop_ids=tokenizer.stop_ids,
                max_new_tokens=cfg.rollout.max_new_tokens,
                beam=oc.beam,
                temperature=temp,
            )
            for lam in lambdas:
                out["sequence_upper"][keys[lam]][domain] = seq.accuracy_upper(lam)
                out["sequence_log_z"][keys[lam]][domain] = seq.mean_log_z(lam)
            out["coverage_teacher"][domain] = float(seq.coverage_teacher.mean())
            out["coverage_reference"][domain] = float(seq.coverage_reference.mean())
            out["sequence_exact"][domain] = float(seq.exact.double().mean())
    out["sequence_prompts"], out["beam"] = oc.sequence_prompts, oc.beam
    return out


def _oracle_lambdas(cfg: DemoConfig, distilled: list[float]) -> list[float]:
    return sorted(set(cfg.oracle.lambdas) | set(distilled) | {1.0})


def _curves(train_dir: Path, keys: list[str]) -> dict[str, list[float]]:
    """Per-step training metrics from a run's metrics.jsonl (what the plot draws)."""
    path = train_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("phase") == "train"]
    return {k: [r[k] for r in rows if k in r] for k in keys}


def _setup(cfg: DemoConfig, quiet: bool = False):
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = CharTokenizer()
    cfg.model = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)
    train_records, held_out = synthetic.from_config(cfg.data)
    if not quiet:
        report(
            f"data: {len(train_records)} training prompts over {cfg.data.domains}, "
            f"{sum(map(len, held_out.values()))} held out"
        )
    return out, tokenizer, train_records, held_out


# ----------------------------------------------------------------------------- one seed


def _grpo_teachers(
    cfg: DemoConfig, base: Path, train_records: list[dict], tokenizer, sd: Path, seed: int, suffix: str = ""
) -> tuple[dict[str, Path], dict[str, dict]]:
    """One GRPO teacher per domain from ``base`` (saved as sd/teacher_<domain>), and each one's
    reward curve under the name "teacher '<domain>'" + suffix."""
    teachers, curves = {}, {}
    for i, domain in enumerate(cfg.data.domains):
        records = [r for r in train_records if r[cfg.data.teacher_field] == domain]
        teachers[domain] = sd / f"teacher_{domain}"
        _grpo_teacher(cfg, base, domain, records, tokenizer, teachers[domain], 7919 * seed + 2 + i)
        curves[f"teacher '{domain}'{suffix}"] = _curves(sd / f"teacher_{domain}_train", ["reward_mean"])
    return teachers, curves


def merge_seed(cfg: DemoConfig, seed: int) -> dict:
    """The main job for one seed: base, GRPO teachers, G-OPD merges, evaluation of each.
    Returns ``{"eval": {system: {mode: {domain: ...}}}, "curves": {system: {metric: [...]}}}``."""
    out, tokenizer, train_records, held_out = _setup(cfg, quiet=True)
    sd = out / f"seed{seed}"
    model_cfg = dataclasses.replace(cfg.model, seed=cfg.model.seed + 1000 * seed)
    # 1. mediocre base, 2. domain teachers by GRPO from that base
    _sft_model(
        cfg, model_cfg, train_records, cfg.base, tokenizer, sd / "base", 7919 * seed + 1, f"[seed {seed}] base SFT"
    )
    teachers, curves = _grpo_teachers(cfg, sd / "base", train_records, tokenizer, sd, seed)
    # 3. G-OPD distillation of all teachers back into the base, reference = the base
    students = {}
    for lam, returns in [(x, "token") for x in cfg.lambdas] + [(x, "sequence") for x in cfg.sequence_lambdas]:
        name = system_name(lam, returns)
        run_dir = sd / (f"gopd_lam{lam:g}" + ("" if returns == "token" else "_sequence"))
        students[name] = _distill(
            cfg,
            dataclasses.replace(cfg.model, load=str(sd / "base")),
            teachers,
            lam,
            "initial",
            train_records,
            held_out,
            tokenizer,
            run_dir,
            seed,
            f"[seed {seed}] {name}",
            returns,
        )
        curves[name] = _curves(run_dir / "train", [f"reverse_kl/{d}" for d in cfg.data.domains])
    # 4. evaluation
    systems = {"base student": sd / "base", **{f"teacher '{d}'": p for d, p in teachers.items()}, **students}
    result = {
        "eval": {name: _evaluate_dir(cfg, cfg.model, path, held_out, tokenizer) for name, path in systems.items()},
        "curves": curves,
    }
    if cfg.oracle.enabled:  # 5. the exact targets each lambda trains towards (reference = the base)
        arch = {d: (cfg.model, p) for d, p in teachers.items()}
        lambdas = _oracle_lambdas(cfg, cfg.lambdas + cfg.sequence_lambdas)
        result["oracle"] = {"base": _oracle(cfg, arch, (cfg.model, sd / "base"), lambdas, held_out, tokenizer)}
    return result


def strong_to_weak_seed(cfg: DemoConfig, seed: int) -> dict:
    """Strong-to-weak for one seed: a larger teacher (cfg.model: SFT base -> GRPO per domain), a
    smaller student (its own SFT base), G-OPD with reference = the student's initial weights vs the
    teacher's pre-RL base. Returns the same shape as :func:`merge_seed`."""
    out, tokenizer, train_records, held_out = _setup(cfg, quiet=True)
    s2w = cfg.strong_to_weak
    small = dataclasses.replace(s2w.student_model, vocab_size=cfg.model.vocab_size)
    sd = out / f"seed{seed}"
    big_cfg = dataclasses.replace(cfg.model, seed=cfg.model.seed + 1000 * seed)
    small_cfg = dataclasses.replace(small, seed=small.seed + 1000 * seed)
    _sft_model(
        cfg,
        big_cfg,
        train_records,
        cfg.base,
        tokenizer,
        sd / "teacher_base",
        7919 * seed + 1,
        f"[seed {seed}] teacher base SFT",
    )
    student_phase = s2w.student_base or cfg.base
    _sft_model(
        cfg,
        small_cfg,
        train_records,
        student_phase,
        tokenizer,
        sd / "student_base",
        7919 * seed + 5,
        f"[seed {seed}] student base SFT",
    )
    teachers, curves = _grpo_teachers(cfg, sd / "teacher_base", train_records, tokenizer, sd, seed, " (large)")
    students = {}
    for ref in s2w.references:
        name = _s2w_name(s2w.lam, ref)
        reference = "initial" if ref == "student_initial" else str(sd / "teacher_base")
        run_dir = sd / f"s2w_{ref}"
        students[name] = _distill(
            cfg,
            dataclasses.replace(small, load=str(sd / "student_base")),
            teachers,
            s2w.lam,
            reference,
            train_records,
            held_out,
            tokenizer,
            run_dir,
            seed,
            f"[seed {seed}] {name}",
        )
        curves[name] = _curves(run_dir / "train", [f"reverse_kl/{d}" for d in cfg.data.domains])
    systems = {
        "student base (small)": (small, sd / "student_base"),
        "teacher base (large)": (cfg.model, sd / "teacher_base"),
        **{f"teacher '{d}' (large)": (cfg.model, p) for d, p in teachers.items()},
        **{k: (small, v) for k, v in students.items()},
    }
    result = {
        "eval": {name: _evaluate_dir(cfg, m, path, held_out, tokenizer) for name, (m, path) in systems.items()},
        "curves": curves,
    }
    if cfg.oracle.enabled:  # does the reference choice move the target?
        arch = {d: (cfg.model, p) for d, p in teachers.items()}
        refs = {"student_initial": (small, sd / "student_base"), "teacher_base": (cfg.model, sd / "teacher_base")}
        result["oracle"] = {
            r: _oracle(cfg, arch, refs[r], _oracle_lambdas(cfg, [s2w.lam]), held_out, tokenizer) for r in s2w.references
        }
    return result


SEED_JOBS = {"merge": merge_seed, "strong_to_weak": strong_to_weak_seed}


def _seed_result(cfg: DemoConfig, seed: int) -> Path:
    return Path(cfg.out_dir) / f"seed{seed}" / "result.json"


def run_one_seed(cfg: DemoConfig, kind: str, seed: int) -> dict:
    """Run (or find) one seed's experiment and save its result next to its models."""
    path = _seed_result(cfg, seed)
    if path.is_file():
        report(f"[seed {seed}] found {path}, skipping")
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    result = SEED_JOBS[kind](cfg, seed)
    result["wall_s"] = time.perf_counter() - t0
    from gopd_mega.metrics import is_rank0

    if is_rank0():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)  # a killed seed leaves no result that looks finished
    report(f"[seed {seed}] done in {result['wall_s']:.0f}s")
    return result


def _workers(cfg: DemoConfig) -> int:
    """Worker processes for the seeds: none under torchrun (the ranks together run each seed's
    model-parallel models, one seed after another)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if cfg.workers > 1:
            raise ConfigError(
                f"config field 'workers': {cfg.workers} worker processes per rank under torchrun "
                "(WORLD_SIZE > 1); the ranks run the seeds one after another, set workers=1 or 0"
            )
        return 1
    if cfg.workers:
        return min(cfg.workers, len(cfg.seeds))
    return max(1, min(len(cfg.seeds), os.cpu_count() or 1))


_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def _run_seeds_in_workers(cfg: DemoConfig, kind: str, workers: int) -> dict[str, dict]:
    """Each seed in its own process (one CPU thread each), at most ``workers`` at a time: the tiny
    models leave a second thread of one process mostly idle, so two processes get nearly twice the
    work done. Each process logs to out_dir/seed<k>.log."""
    out = Path(cfg.out_dir)
    config_path = out / "demo_config.json"
    worker_cfg = to_dict(cfg)
    worker_cfg["train"]["progress"] = False  # progress bars would fill the log files
    config_path.write_text(json.dumps(worker_cfg))
    threads = max(1, (os.cpu_count() or 1) // workers)
    # each worker is its own single-process world: without this process's torch.distributed
    # variables (set if it initialised one), two workers would try to serve the same MASTER_PORT
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    pending, results = list(cfg.seeds), {}
    running: dict[int, subprocess.Popen] = {}
    while pending or running:
        while pending and len(running) < workers:
            seed = pending.pop(0)
            log = out / f"seed{seed}.log"
            cmd = [
                sys.executable,
                "-m",
                "gopd_mega.demo",
                "--recipe",
                str(config_path),
                "--kind",
                kind,
                "--only-seed",
                str(seed),
            ]
            with open(log, "w") as fh:
                running[seed] = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
            report(f"[seed {seed}] started in a worker process (log: {log})")
        time.sleep(1.0)
        for seed, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[seed]
            log = out / f"seed{seed}.log"
            if proc.returncode != 0 or not _seed_result(cfg, seed).is_file():
                for other in running.values():
                    other.terminate()
                tail = "\n".join(log.read_text().splitlines()[-15:])
                raise SystemExit(
                    f"gopd-demo: seed {seed} failed (exit {proc.returncode}); last lines of {log}:\n{tail}"
                )
            results[str(seed)] = json.loads(_seed_result(cfg, seed).read_text())
            report(f"[seed {seed}] finished in {results[str(seed)]['wall_s']:.0f}s")
    return {str(s): results[str(s)] for s in cfg.seeds}


def run_seeds(cfg: DemoConfig, kind: str) -> dict:
    """Every seed's experiment (in parallel worker processes when there are spare CPUs), then the
    statistics over seeds, the table and the plot."""
    t_start = time.perf_counter()
    out, *_ = _setup(cfg)
    workers = _workers(cfg)
    if workers > 1:
        per_seed = _run_seeds_in_workers(cfg, kind, workers)
    else:
        per_seed = {str(s): run_one_seed(cfg, kind, s) for s in cfg.seeds}
    runs = {s: r["eval"] for s, r in per_seed.items()}
    curves: dict[str, list] = {}
    for r in per_seed.values():
        for name, c in r["curves"].items():
            curves.setdefault(name, []).append(c)
    first_student = next(n for n in runs[str(cfg.seeds[0])] if n.startswith(("OPD", "ExOPD", "G-OPD")))
    doc = summarise(cfg.data.domains, runs, baseline="OPD (lam=1)" if kind == "merge" else first_student)
    doc.update(curves=curves, wall_s=time.perf_counter() - t_start, kind=kind, workers=workers)
    oracles = {s: r["oracle"] for s, r in per_seed.items() if "oracle" in r}
    if len(oracles) == len(per_seed):
        students: dict[tuple[str, float], list[str]] = {}
        if kind == "merge":
            for lam, returns in [(x, "token") for x in cfg.lambdas] + [(x, "sequence") for x in cfg.sequence_lambdas]:
                students.setdefault(("base", float(lam)), []).append(system_name(lam, returns))
        else:
            for ref in cfg.strong_to_weak.references:
                students[(ref, float(cfg.strong_to_weak.lam))] = [_s2w_name(cfg.strong_to_weak.lam, ref)]
        doc["oracle"] = summarise_oracle(cfg.data.domains, oracles, runs, students)
    write_results(out, doc)
    return doc


def run_demo(cfg: DemoConfig) -> dict:
    """The main job over ``cfg.seeds`` (see the module docstring)."""
    return run_seeds(cfg, "merge")


def run_strong_to_weak(cfg: DemoConfig) -> dict:
    """The strong-to-weak example over ``cfg.seeds``."""
    return run_seeds(cfg, "strong_to_weak")


# ----------------------------------------------------------------------------- statistics


def mean_std(values: list[float]) -> dict:
    """Mean and SAMPLE standard deviation (n - 1; 0 for a single value) of per-seed numbers."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": list(values),
    }


def summarise(domains: list[str], runs: dict[str, dict], baseline: str) -> dict:
    """Per-seed results -> mean +- std per system/mode/domain (and 'avg' over domains), plus the
    paired per-seed difference of every system to ``baseline`` (accuracy points, x100)."""
    seeds = list(runs)
    systems = list(runs[seeds[0]])
    modes = list(runs[seeds[0]][systems[0]])

    def acc(seed, system, mode, domain):
        res = runs[seed][system][mode]
        if domain == "avg":
            return 100 * statistics.fmean(res[d]["accuracy"] for d in domains)
        return 100 * res[domain]["accuracy"]

    cols = [*list(domains), "avg"]
    summary = {s: {m: {c: mean_std([acc(k, s, m, c) for k in seeds]) for c in cols} for m in modes} for s in systems}
    paired = {}
    if baseline in systems:
        for s in systems:
            if s == baseline or s.startswith(("base", "teacher", "student base")):
                continue
            paired[s] = {
                m: {c: mean_std([acc(k, s, m, c) - acc(k, baseline, m, c) for k in seeds]) for c in cols} for m in modes
            }
    return {
        "domains": domains,
        "seeds": seeds,
        "modes": modes,
        "runs": runs,
        "summary": summary,
        "baseline": baseline,
        "paired": paired,
    }


REFERENCE_NAMES = {"base": "the base", "student_initial": "student initial", "teacher_base": "teacher pre-RL base"}


def summarise_oracle(domains: list[str], per_seed: dict[str, dict], runs: dict[str, dict], students: dict) -> dict:
    """Per reference and lambda, mean +- std over seeds (accuracy in points) of the per-token
    target, each student's attainment (its exact accuracy minus that target, for the students
    distilled at that lambda against that reference: ``students[(reference, lam)]`` = their system
    names), the sequence-level target (upper bound) and the mean log Z's. ``per_seed[seed][reference]``
    is :func:`_oracle`'s output."""
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    out: dict = {}

    def points(key: str, seed: str, ref: str, lam: str, d: str | None = None) -> float:
        """One seed's oracle accuracy in points: domain ``d``, or the mean over domains."""
        vals = per_seed[seed][ref][key][lam]
        return 100 * (vals[d] if d else statistics.fmean(vals[x] for x in domains))

    for ref, o in first.items():
        rows = {}
        for lam in o["per_token"]:
            row = {
                "per_token": {
                    d: mean_std([points("per_token", k, ref, lam, d if d != "avg" else None) for k in seeds])
                    for d in [*domains, "avg"]
                },
                "per_token_log_z": mean_std(
                    [statistics.fmean(per_seed[k][ref]["per_token_log_z"][lam][d] for d in domains) for k in seeds]
                ),
            }
            if o["sequence_upper"][lam]:
                row["sequence_upper"] = mean_std([points("sequence_upper", k, ref, lam) for k in seeds])
                row["sequence_log_z"] = mean_std(
                    [statistics.fmean(per_seed[k][ref]["sequence_log_z"][lam][d] for d in domains) for k in seeds]
                )
            row["attainment"] = {
                student: mean_std(
                    [
                        100 * statistics.fmean(runs[k][student]["exact"][d]["accuracy"] for d in domains)
                        - points("per_token", k, ref, lam)
                        for k in seeds
                    ]
                )
                for student in students.get((ref, float(lam)), [])
            }
            rows[lam] = row
        coverage = {
            m: mean_std([statistics.fmean(per_seed[k][ref][f"coverage_{m}"].values()) for k in seeds])
            for m in ("teacher", "reference")
            if o[f"coverage_{m}"]
        }
        out[ref] = {"lambdas": rows, "coverage": coverage, "sequence_prompts": o["sequence_prompts"], "beam": o["beam"]}
    return out


def oracle_table(doc: dict) -> str:
    """The targets beside the students, one table per reference (see summarise_oracle)."""
    domains = doc["domains"]
    blocks = []
    for ref, o in doc.get("oracle", {}).items():
        head = (
            ["lambda"]
            + [f"per-token target {d}" for d in [*domains, "avg"]]
            + [
                "students − per-token target (avg)",
                f"sequence-level target ≤ (avg, {o['sequence_prompts']} prompts/domain)",
                "mean log Z_t (per token)",
                "mean log Z(x) ≥ (sequence)",
            ]
        )
        lines = [
            f"Targets with reference = {REFERENCE_NAMES.get(ref, ref)} (exact; accuracy %, mean ± std over seeds)",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]

        def cell(x, signed=False, digits=1):
            return "—" if x is None else f"{x['mean']:{'+' if signed else ''}.{digits}f} ± {x['std']:.{digits}f}"

        for lam, row in o["lambdas"].items():
            lines.append(
                "| "
                + " | ".join(
                    [lam]
                    + [cell(row["per_token"][d]) for d in [*domains, "avg"]]
                    + [
                        "; ".join(f"{s}: {cell(a, signed=True)}" for s, a in row["attainment"].items()) or "—",
                        cell(row.get("sequence_upper")),
                        cell(row["per_token_log_z"], digits=3),
                        cell(row.get("sequence_log_z"), digits=3),
                    ]
                )
                + " |"
            )
        cov = o["coverage"]
        if cov:
            lines.append("")
            lines.append(
                f"Sequence-level target: a beam of {o['beam']} prefixes per depth enumerated responses holding "
                f"{100 * cov['teacher']['mean']:.2f}% of the teacher's and {100 * cov['reference']['mean']:.2f}% of "
                "the reference's probability (mean over prompts and seeds); the enumerated Z is a lower bound, so "
                "the accuracy shown is an upper bound and log Z(x) a lower bound."
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def results_table(doc: dict) -> str:
    domains, modes = doc["domains"], doc["modes"]
    cols = [*list(domains), "avg"]
    head = ["system"] + [f"{c} {m}" for m in modes for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in doc["summary"].items():
        cells = [name] + [f"{res[m][c]['mean']:.1f} ± {res[m][c]['std']:.1f}" for m in modes for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    for name, res in doc["paired"].items():
        cells = [f"{name} − {doc['baseline']}, paired"] + [
            f"{res[m][c]['mean']:+.1f} ± {res[m][c]['std']:.1f}" for m in modes for c in cols
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def conclusions(doc: dict) -> list[str]:
    """Plain-language reading of the table, from the numbers (no claim the numbers do not carry)."""
    n = len(doc["seeds"])
    lines = []
    for name, res in doc["paired"].items():
        for m in doc["modes"]:
            d = res[m]["avg"]
            wins = sum(v > 0 for v in d["values"])
            mean = round(d["mean"], 1)  # as printed: a difference under 0.05 points is no difference
            verdict = (
                "beats"
                if mean > 0 and mean > d["std"]
                else "is below"
                if mean < 0 and -mean > d["std"]
                else "does not clearly differ from"
            )
            lines.append(
                f"{name} {verdict} {doc['baseline']} on {m} avg accuracy: {d['mean']:+.1f} ± {d['std']:.1f} points "
                f"(paired over {n} seeds; higher in {wins}/{n})"
            )
    summ = doc["summary"]
    teachers = [s for s in summ if s.startswith("teacher '")]
    if doc.get("kind") == "merge" and "base student" in summ:
        for s in summ:
            if s.startswith(("OPD", "ExOPD", "G-OPD")):
                for m in doc["modes"]:
                    d = mean_std(
                        [summ[s][m]["avg"]["values"][i] - summ["base student"][m]["avg"]["values"][i] for i in range(n)]
                    )
                    lines.append(
                        f"{s} − base student on {m} avg accuracy: {d['mean']:+.1f} ± {d['std']:.1f} points "
                        f"(paired over {n} seeds)"
                    )
    if doc.get("kind") == "merge" and teachers:
        for m in doc["modes"]:
            best = {d: max(summ[t][m][d]["mean"] for t in teachers) for d in doc["domains"]}
            for s in summ:
                if s.startswith(("OPD", "ExOPD", "G-OPD")):
                    gaps = ", ".join(f"{d} {summ[s][m][d]['mean'] - best[d]:+.1f}" for d in doc["domains"])
                    lines.append(f"{s} vs the best teacher per domain ({m}): {gaps} points")
    lines += _oracle_conclusions(doc)
    return lines


def _oracle_conclusions(doc: dict) -> list[str]:
    """The targets in words: headroom of each lambda over lambda = 1, attainment, the sequence-level bound."""
    lines = []
    n = len(doc["seeds"])
    for ref, o in doc.get("oracle", {}).items():
        rows = o["lambdas"]
        base = rows.get("1")
        for lam, row in rows.items():
            where = f"reference = {REFERENCE_NAMES.get(ref, ref)}, lambda {lam}"
            if base is not None and lam != "1":
                d = mean_std(
                    [a - b for a, b in zip(row["per_token"]["avg"]["values"], base["per_token"]["avg"]["values"])]
                )
                lines.append(
                    f"{where}: the per-token target's avg exact accuracy is {row['per_token']['avg']['mean']:.1f}, "
                    f"{d['mean']:+.1f} ± {d['std']:.1f} points from lambda 1's (paired over {n} seeds): the "
                    "headroom a student trained at this lambda can have"
                )
            for student, a in row["attainment"].items():
                lines.append(
                    f"{where}: {student} ends {a['mean']:+.1f} ± {a['std']:.1f} points from the "
                    "per-token target (avg exact)"
                )
            if "sequence_upper" in row and base is not None and "sequence_upper" in base and lam != "1":
                lines.append(
                    f"{where}: the sequence-level target's avg accuracy is at most "
                    f"{row['sequence_upper']['mean']:.1f} (lambda 1: {base['sequence_upper']['mean']:.1f}), "
                    f"mean log Z(x) >= {row['sequence_log_z']['mean']:.2f} nats"
                )
    return lines


MODE_NOTES = {
    "exact": "expected accuracy of sampling at temperature 1, exactly (p of the answer, no sampling noise)",
    "greedy": "greedy decoding",
    "sampled": "one sample per prompt at temperature 1",
}


def write_results(out: Path, doc: dict) -> None:
    from gopd_mega.metrics import is_rank0

    if not is_rank0():
        return
    doc["conclusions"] = conclusions(doc)
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    table = results_table(doc)
    n = len(doc["seeds"])
    title = f"Held-out accuracy (%), mean ± std over {n} seed{'s' * (n > 1)} ({', '.join(doc['seeds'])})"
    legend = "; ".join(f"{m}: {MODE_NOTES[m]}" for m in doc["modes"] if m in MODE_NOTES)
    oracle = oracle_table(doc)
    text = (
        title
        + "\n\n"
        + table
        + "\n\n"
        + legend
        + "\n\n"
        + (oracle + "\n\n" if oracle else "")
        + "\n".join(f"- {c}" for c in doc["conclusions"])
        + "\n"
    )
    (out / "results.md").write_text(text + f"\nwall time {doc['wall_s']:.0f}s\n")
    _plot(out / "results.png", doc)
    print(
        f"\nresults: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'} (wall {doc['wall_s']:.0f}s)",
        flush=True,
    )
    print("\n" + text, flush=True)


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (single-sample per-step estimates are noisy)."""
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def _band(ax, series: list[list[float]], label: str, color=None, window: int = 10) -> None:
    """Mean over seeds with a +-std band of the ``window``-step moving averages (series truncated
    to the shortest)."""
    series = [_smooth(s, window) for s in series if s]
    if not series:
        return
    n = min(map(len, series))
    steps = list(range(1, n + 1))
    mean = [statistics.fmean(s[i] for s in series) for i in range(n)]
    std = [statistics.stdev([s[i] for s in series]) if len(series) > 1 else 0.0 for i in range(n)]
    (line,) = ax.plot(steps, mean, label=label, color=color)
    ax.fill_between(
        steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)], color=line.get_color(), alpha=0.2
    )


def _plot(path: Path, doc: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["summary"])
    modes = doc["modes"]
    cols = [*list(doc["domains"]), "avg"]
    panels = len(modes) + 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    width = 0.8 / len(cols)
    for ax, mode in zip(axes[0], modes):
        for j, c in enumerate(cols):
            mean = [doc["summary"][n][mode][c]["mean"] for n in names]
            std = [doc["summary"][n][mode][c]["std"] for n in names]
            xs = [i + j * width for i in range(len(names))]
            ax.bar(xs, mean, width, yerr=std, capsize=2, label=c)
            for x, n in zip(xs, names):  # every seed's value as a dot: the spread itself
                vals = doc["summary"][n][mode][c]["values"]
                ax.plot([x] * len(vals), vals, "k.", markersize=3)
        ax.set_xticks([i + width * (len(cols) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=25, ha="right", fontsize=7)
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(f"{mode}: {MODE_NOTES.get(mode, '')}\nmean ± std over {len(doc['seeds'])} seeds", fontsize=8)
        ax.legend(fontsize=7)
    ax_kl, ax_r = axes[0][len(modes)], axes[0][len(modes) + 1]
    for name, per_seed in doc.get("curves", {}).items():
        if name.startswith("teacher '"):
            _band(ax_r, [c.get("reward_mean", []) for c in per_seed], name)
            continue
        for d in doc["domains"]:
            _band(ax_kl, [c.get(f"reverse_kl/{d}", []) for c in per_seed], f"{name}: {d}")
    ax_kl.set_xlabel("distillation step")
    ax_kl.set_ylabel("reverse KL to the prompt's teacher (nats/token)")
    ax_kl.set_title(
        "distillation: KL(student || teacher) per teacher\n(10-step moving average, mean ± std over seeds)", fontsize=9
    )
    ax_kl.legend(fontsize=6)
    ax_r.set_xlabel("GRPO step")
    ax_r.set_ylabel("training reward (success rate)")
    ax_r.set_title("domain teachers: GRPO from the base\n(10-step moving average, mean ± std over seeds)", fontsize=9)
    if ax_r.lines:
        ax_r.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--recipe",
        default=None,
        help="YAML/TOML recipe (DemoConfig sections); default "
        "recipes/demo.yaml, recipes/demo_full.yaml with --full, recipes/demo_strong_to_weak.yaml "
        "with --strong-to-weak",
    )
    parser.add_argument(
        "--full", action="store_true", help="the longer, more accurate setting (recipes/demo_full.yaml)"
    )
    parser.add_argument("--strong-to-weak", action="store_true", help="the strong-to-weak reward-correction example")
    parser.add_argument(
        "--only-seed",
        type=int,
        default=None,
        help="run only this seed's experiment and save its result (what each worker process of a multi-seed run does)",
    )
    parser.add_argument("--kind", choices=sorted(SEED_JOBS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    args = parser.parse_args(argv)
    recipe = args.recipe or (
        "recipes/demo_strong_to_weak.yaml"
        if args.strong_to_weak
        else "recipes/demo_full.yaml"
        if args.full
        else "recipes/demo.yaml"
    )
    try:
        cfg = build_config(DemoConfig, read_recipe(recipe), args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))  # exits with status 2 and the message naming the field
    kind = args.kind or ("strong_to_weak" if args.strong_to_weak else "merge")
    if args.only_seed is not None:
        run_one_seed(cfg, kind, args.only_seed)
    else:
        run_seeds(cfg, kind)


if __name__ == "__main__":
    main()
