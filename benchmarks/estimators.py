"""G-OPD's estimators in the miniature, over seeds: sampled (the paper's one-sample advantage) vs
full_vocab (the exact expectation over the vocabulary) vs top_k (the teacher's top-k + a tail).

    python benchmarks/estimators.py                                   # 5 seeds, OPD and ExOPD (~25 min)
    python benchmarks/estimators.py --seeds 0 --steps 20 --out runs/estimators_quick base.steps=50

Per seed, the demo's base student and its two GRPO teachers (recipes/demo.yaml, its seeds: found
under --demo-dir when `make demo` has made them, else trained here by the demo's own phases).
Then, for lambda = 1 (OPD) and 1.25 (ExOPD) and each estimator, one distillation of both
teachers into the base, reference = the base, with the demo's settings except --steps and
--prompts (the same seed gives every run of a seed the same data order and base). Measured:

- the exact reverse KL to the prompt's teacher, KL(pi_S(.|h) || pi_T(.|h)) summed over the
  vocabulary at every response position h, token mean, on a fixed set of held-out prompts
  (--kl-prompts per domain) with responses sampled from the current student, at step 0 and every
  --kl-every steps; the SAME measurement for every estimator (through kernels.full_vocab_gopd_loss
  at lam = 1); mean and sample std over seeds;
- for top_k also the reverse KL it would report itself on those positions (the coarsened one):
  its bias against the exact value;
- the steps each run needs to halve the held-out KL of step 0 (the first measured step at or
  below half of it);
- held-out exact accuracy (the probability of the reference answer at temperature 1) of the base
  and after the last step, the demo's own evaluation, on --eval-prompts per domain, and the
  paired per-seed difference of each estimator to the sampled one;
- process CPU time per step and the process's peak RSS of each estimator (--time-steps steps
  after one warm-up, each estimator in a fresh process, random weights of the demo's shape, at the
  miniature's vocabulary and at --wide-vocab ids).

Writes --out/results.json, results.md (the table the README quotes) and estimators.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ESTIMATORS = ("sampled", "full_vocab", "top_k")
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAMBDAS = (1.0, 1.25)


def _run_name(lam: float, estimator: str) -> str:
    return f"{'OPD' if lam == 1.0 else 'ExOPD'} lam={lam:g} {estimator}"


# ----------------------------------------------------------------------------- measurements


class HeldOutKL:
    """Exact reverse KL to each prompt's teacher on fixed held-out prompts, responses sampled from
    the current student (models.engine samples from it after every update)."""

    def __init__(self, models, prompts: list[list[int]], routes: list[str], temperature: float,
                 max_new_tokens: int, top_k: int | None):
        from gopd_mega.model.distill import Projection

        self.m, self.prompts, self.routes = models, prompts, routes
        self.temperature, self.max_new_tokens, self.top_k = temperature, max_new_tokens, top_k
        self.heads = {n: Projection(t, models.student, n).head for n, t in models.teachers.items()}

    @torch.no_grad()
    def __call__(self, seed: int = 0) -> dict[str, float]:
        import kernels
        from gopd_mega.model.distill import TopK
        from gopd_mega.objective import top_k_token_loss

        s, T = self.m.student, self.temperature
        batch = self.m.engine.generate(self.prompts, temperature=T, max_new_tokens=self.max_new_tokens, seed=seed)
        tokens, mask = batch.tokens, batch.loss_mask
        hs = s.hidden_states_for(s, tokens, mask)
        ws = s.output_weight_on(s)
        out = {}
        for name, teacher in self.m.teachers.items():
            rows = torch.tensor([i for i, r in enumerate(self.routes) if r == name])
            ht = teacher.hidden_states_for(s, tokens, mask, rows)
            kl, _ = kernels.full_vocab_gopd_loss(hs.at(ht.flat), ws, ht.hidden, self.heads[name], None, None,
                                                 lam=1.0, temperature=T)
            out[f"exact_kl/{name}"] = float(kl.mean())
            if self.top_k:  # what the top-k estimator sees at the same positions
                ids, lp, tgt = teacher.top_k_logprobs(tokens[rows], mask[rows], self.top_k, T)
                top = TopK.from_teacher(tokens[rows], mask[rows], ids, lp, tgt, s.cfg.vocab_size)
                s_lp = s.logprobs_at(tokens[rows], mask[rows], top.ids, T)
                coarse, _ = top_k_token_loss(s_lp.double(), top.teacher_logp.double(), None, 1.0, top.mask)
                m = mask[rows].clone().bool()
                m[:, 0] = False
                out[f"top_k_kl/{name}"] = float(coarse[m].mean())
        return out


def distill(cfg, base: Path, teachers: dict[str, Path], lam: float, estimator: str, args, records, held_out,
            tokenizer, out: Path, seed: int) -> dict:
    """One distillation run; its curves, final accuracy and CPU time (cached in out/result.json)."""
    from gopd_mega.config import RunConfig, TeacherConfig
    from gopd_mega.data import synthetic
    from gopd_mega.data.prompts import PromptDataset
    from gopd_mega.eval.domains import evaluate_modes
    from gopd_mega.run import build_models, build_student_optimizer
    from gopd_mega.trainer import Distiller

    path = out / "result.json"
    if path.is_file():
        return json.loads(path.read_text())
    run_cfg = RunConfig(
        student=dataclasses.replace(cfg.model, load=str(base)),
        teachers=[TeacherConfig(name=d, model=dataclasses.replace(cfg.model, load=str(p))) for d, p in teachers.items()],
        objective=dataclasses.replace(cfg.objective, lam=lam, reference="initial", estimator=estimator, top_k=args.top_k),
        rollout=cfg.rollout, optim=cfg.optim, data=cfg.data,
        train=dataclasses.replace(cfg.train, steps=args.steps, prompts_per_step=args.prompts, eval_every=args.kl_every,
                                  out_dir=str(out / "train"), seed=seed, progress=False),
        eval=cfg.eval,
    ).validate()
    models = build_models(run_cfg, tokenizer)
    data = PromptDataset.from_config(records, tokenizer, run_cfg.data, teachers=list(teachers))
    kl_records = {d: recs[: args.kl_prompts] for d, recs in held_out.items()}
    prompts = [[tokenizer.bos_id] + tokenizer.encode(r[cfg.data.prompt_field]) for recs in kl_records.values() for r in recs]
    routes = [d for d, recs in kl_records.items() for _ in recs]
    measure = HeldOutKL(models, prompts, routes, cfg.rollout.temperature, cfg.rollout.max_new_tokens,
                        args.top_k if estimator == "top_k" else None)
    curve = [{"step": 0, **measure(seed)}]
    distiller = Distiller(run_cfg, models, data, build_student_optimizer(run_cfg, models),
                          lambda: curve.append({"step": distiller.step, **measure(seed + distiller.step)}) or {})
    t0 = time.process_time()
    history = distiller.fit()
    cpu_s = time.process_time() - t0
    eval_cfg = dataclasses.replace(cfg.eval, exact=True, greedy=False, sampled=False, max_prompts=args.eval_prompts)
    acc = evaluate_modes(models.engine, held_out, tokenizer, synthetic.check, eval_cfg, cfg.rollout,
                         seed=cfg.data.seed + 17, model=models.student, answer_of=synthetic.answer)["exact"]
    result = {"curve": curve, "accuracy": dict(acc.accuracy), "cpu_s_per_step_incl_kl": cpu_s / max(1, len(history)),
              "train_reverse_kl": [h["reverse_kl"] for h in history]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def seed_job(cfg, args, seed: int) -> dict:
    """Base, teachers (found or trained), then every (lambda, estimator) run of one seed."""
    from gopd_mega.demo import _grpo_teachers, _setup, _sft_model
    from gopd_mega.model_io import is_model_dir

    out, tokenizer, train_records, held_out = _setup(cfg, quiet=True)
    demo = Path(args.demo_dir) / f"seed{seed}"
    sd = demo if is_model_dir(demo / "base") and all(is_model_dir(demo / f"teacher_{d}") for d in cfg.data.domains) \
        else Path(args.out) / f"seed{seed}"
    model_cfg = dataclasses.replace(cfg.model, seed=cfg.model.seed + 1000 * seed)  # as the demo's merge_seed
    _sft_model(cfg, model_cfg, train_records, cfg.base, tokenizer, sd / "base", 7919 * seed + 1, f"[seed {seed}] base SFT")
    teachers, _ = _grpo_teachers(cfg, sd / "base", train_records, tokenizer, sd, seed)
    runs = {"base": {"accuracy": base_accuracy(cfg, args, sd / "base", held_out, tokenizer, Path(args.out) / f"seed{seed}")}}
    for lam in LAMBDAS:
        for estimator in args.estimators:
            name = _run_name(lam, estimator)
            t0 = time.perf_counter()
            runs[name] = distill(cfg, sd / "base", teachers, lam, estimator, args, train_records, held_out, tokenizer,
                                 Path(args.out) / f"seed{seed}" / name.replace(" ", "_").replace("=", ""), seed)
            print(f"[seed {seed}] {name}: final exact KL {statistics.fmean(_final(runs[name])):.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return runs


def base_accuracy(cfg, args, base: Path, held_out, tokenizer, out: Path) -> dict:
    """Held-out exact accuracy of the base student (cached in out/base_accuracy.json)."""
    from gopd_mega.data import synthetic
    from gopd_mega.eval.domains import evaluate_modes
    from gopd_mega.rollout.embedded import EmbeddedEngine
    from gopd_mega.model_io import build_model

    path = out / "base_accuracy.json"
    if path.is_file():
        return json.loads(path.read_text())
    model = build_model(dataclasses.replace(cfg.model, load=str(base)), trainable=False, name="base")
    engine = EmbeddedEngine(model, pad_id=tokenizer.pad_id, stop_ids=tokenizer.stop_ids)
    eval_cfg = dataclasses.replace(cfg.eval, exact=True, greedy=False, sampled=False, max_prompts=args.eval_prompts)
    acc = dict(evaluate_modes(engine, held_out, tokenizer, synthetic.check, eval_cfg, cfg.rollout, seed=cfg.data.seed + 17,
                              model=model, answer_of=synthetic.answer)["exact"].accuracy)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(acc))
    return acc


def _final(run: dict) -> list[float]:
    last = run["curve"][-1]
    return [v for k, v in last.items() if k.startswith("exact_kl/")]


# ----------------------------------------------------------------------------- step time / memory


def time_job(estimator: str, lam: float, vocab: int, steps: int) -> dict:
    """Process CPU time per G-OPD step (median of ``steps`` after one warm-up) and the process's
    peak RSS, on random weights of the demo's model shape with ``vocab`` ids (this process only)."""
    from gopd_mega.config import ModelConfig, ObjectiveConfig, RolloutConfig, RunConfig, TeacherConfig, TrainConfig
    from gopd_mega.data import synthetic
    from gopd_mega.data.prompts import PromptDataset
    from gopd_mega.data.tokenizer import CharTokenizer
    from gopd_mega.demo import DemoConfig
    from gopd_mega.config import build_config, read_recipe
    from gopd_mega.model_io import build_model, save_model_dir
    from gopd_mega.run import build_models, build_student_optimizer
    from gopd_mega.trainer import Distiller
    import tempfile

    torch.set_num_threads(1)
    demo = build_config(DemoConfig, read_recipe(ROOT / "recipes" / "demo.yaml"))
    tok = CharTokenizer()
    arch = dataclasses.replace(demo.model, vocab_size=vocab)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for i, name in enumerate(["student", *demo.data.domains]):
            m = build_model(dataclasses.replace(arch, seed=10 + i, init_std=0.02 if i == 0 else 0.3), False, name)
            dirs[name] = f"{tmp}/{name}"
            save_model_dir(m, dirs[name])
        cfg = RunConfig(
            student=ModelConfig(load=dirs["student"]),
            teachers=[TeacherConfig(name=d, model=ModelConfig(load=dirs[d])) for d in demo.data.domains],
            objective=ObjectiveConfig(lam=lam, estimator=estimator),
            rollout=RolloutConfig(max_new_tokens=demo.rollout.max_new_tokens),
            optim=demo.optim, data=demo.data,
            train=TrainConfig(steps=steps + 1, prompts_per_step=demo.train.prompts_per_step, out_dir=f"{tmp}/run",
                              progress=False, max_tokens_per_micro_batch=demo.train.max_tokens_per_micro_batch),
        ).validate()
        records, _ = synthetic.from_config(cfg.data)
        models = build_models(cfg, tok)
        data = PromptDataset.from_config(records, tok, cfg.data, teachers=list(demo.data.domains))
        d = Distiller(cfg, models, data, build_student_optimizer(cfg, models))
        d.logger.console_every = 10 ** 9
        times = []
        for i in range(steps + 1):
            t0 = time.process_time()
            d.train_step()
            d.step += 1
            if i:
                times.append(time.process_time() - t0)
    return {"cpu_s_per_step": statistics.median(times), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def time_all(args) -> dict:
    """Each estimator's time_job in its own process, --time-repeats times in turn (interleaved, so
    that a change in the machine's load hits every estimator alike)."""
    out: dict[str, list] = {}
    for _ in range(args.time_repeats):
        for vocab in (None, args.wide_vocab):
            for estimator in args.estimators:
                cmd = [sys.executable, __file__, "--time-job", estimator, "--time-steps", str(args.time_steps)]
                if vocab:
                    cmd += ["--time-vocab", str(vocab)]
                env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}  # not this process's world
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(f"timing {estimator} failed:\n{proc.stderr[-3000:]}")
                key = f"{estimator} V={vocab or 'miniature'}"
                out.setdefault(key, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"timing {key}: {out[key][-1]}", flush=True)
    return out


# ----------------------------------------------------------------------------- report


def _ms(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs_by_seed: dict[int, dict], domains: list[str]) -> dict:
    """Per (lambda, estimator): the held-out exact KL curve (mean / std over seeds of the domain
    mean), its start and end, the steps to halve it, accuracy (and paired minus the sampled run's),
    top-k's reported KL over the exact one; and the base's accuracy."""
    seeds = sorted(runs_by_seed)
    names = [n for n in runs_by_seed[seeds[0]] if n != "base"]

    def acc_of(s, name):
        return statistics.fmean(runs_by_seed[s][name]["accuracy"][d] for d in domains)

    out = {"base": {"accuracy": _ms([acc_of(s, "base") for s in seeds])}}
    for name in names:
        steps = [p["step"] for p in runs_by_seed[seeds[0]][name]["curve"]]
        per_seed = [[statistics.fmean(p[f"exact_kl/{d}"] for d in domains) for p in runs_by_seed[s][name]["curve"]]
                    for s in seeds]
        halve = [next((st for st, v in zip(steps, kl) if v <= kl[0] / 2), None) for kl in per_seed]
        acc = [acc_of(s, name) for s in seeds]
        sampled = name.rsplit(" ", 1)[0] + " sampled"
        row = {"steps": steps, "kl_mean": [statistics.fmean(c) for c in zip(*per_seed)],
               "kl_std": [statistics.stdev(c) if len(c) > 1 else 0.0 for c in zip(*per_seed)],
               "kl_start": _ms([k[0] for k in per_seed]), "kl_end": _ms([k[-1] for k in per_seed]),
               "steps_to_half": halve, "accuracy": _ms(acc), "accuracy_per_seed": acc,
               "accuracy_minus_sampled": _ms([a - acc_of(s, sampled) for s, a in zip(seeds, acc)])}
        if "top_k" in name:
            ratio = [statistics.fmean(p[f"top_k_kl/{d}"] / p[f"exact_kl/{d}"] for d in domains for p in runs_by_seed[s][name]["curve"])
                     for s in seeds]
            row["top_k_kl_over_exact"] = _ms(ratio)
        out[name] = row
    return out


def table(summary: dict, timing: dict, args) -> str:
    n = len(args.seeds)
    lines = [f"| run | exact KL, step 0 | exact KL, step {args.steps} | steps to halve it | held-out exact "
             f"accuracy (%) | accuracy − sampled, paired |", "|---|---|---|---|---|---|"]
    base = summary["base"]["accuracy"]
    lines.append(f"| base student | | | | {100 * base[0]:.1f} ± {100 * base[1]:.1f} | |")
    for name, r in summary.items():
        if name == "base":
            continue
        got = [x for x in r["steps_to_half"] if x is not None]
        half = (f"{statistics.fmean(got):.0f}" + (f" ± {statistics.stdev(got):.0f}" if len(got) > 1 else "")
                + ("" if len(got) == n else f" ({n - len(got)} of {n} seeds: not in {args.steps})")) if got else f"not in {args.steps}"
        diff = "" if name.endswith("sampled") else (f"{100 * r['accuracy_minus_sampled'][0]:+.1f} ± "
                                                     f"{100 * r['accuracy_minus_sampled'][1]:.1f}")
        lines.append(f"| {name} | {r['kl_start'][0]:.4f} ± {r['kl_start'][1]:.4f} | {r['kl_end'][0]:.4f} ± "
                     f"{r['kl_end'][1]:.4f} | {half} | {100 * r['accuracy'][0]:.1f} ± {100 * r['accuracy'][1]:.1f} | {diff} |")
    for name, r in summary.items():
        if "top_k_kl_over_exact" in r:
            lines.append(f"\ntop_k (k={args.top_k}), {name.split(' ')[0]}: the coarsened reverse KL it reports is "
                         f"{r['top_k_kl_over_exact'][0]:.3f} ± {r['top_k_kl_over_exact'][1]:.3f} of the exact one "
                         "(mean over the measured steps; seeds ± std)")
    if timing:
        lines += ["", f"Step cost (lam = 1.25; process CPU time per step, the median of {args.time_steps} steps after a "
                  "warm-up; random weights of the demo's shape, its 256 prompts per step, one thread; each estimator "
                  f"in its own process, {args.time_repeats} times in turn, every repeat shown):", "",
                  "| estimator | vocabulary | CPU s per step | peak RSS (MiB) |", "|---|---|---|---|"]
        for key, reps in timing.items():
            est, vocab = key.split(" V=")
            cpu = " / ".join(f"{t['cpu_s_per_step']:.2f}" for t in reps)
            rss = " / ".join(f"{t['peak_rss_mib']:.0f}" for t in reps)
            lines.append(f"| {est} | {vocab} | {cpu} | {rss} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LAMBDAS), figsize=(6 * len(LAMBDAS), 4), sharey=True)
    colors = {"sampled": "tab:blue", "full_vocab": "tab:red", "top_k": "tab:green"}
    for ax, lam in zip(axes, LAMBDAS):
        for name, r in summary.items():
            if name == "base" or not name.startswith(_run_name(lam, "").strip()):
                continue
            est = name.rsplit(" ", 1)[1]
            mean, std = torch.tensor(r["kl_mean"]), torch.tensor(r["kl_std"])
            ax.plot(r["steps"], mean, label=est, color=colors[est])
            ax.fill_between(r["steps"], mean - std, mean + std, color=colors[est], alpha=0.2)
        ax.set_title(_run_name(lam, "").strip())
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    axes[0].set_ylabel("held-out exact reverse KL to the teacher (nats/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    ap.add_argument("--steps", type=int, default=60, help="distillation steps (the demo: 120)")
    ap.add_argument("--prompts", type=int, default=128, help="prompts per step (the demo: 256)")
    ap.add_argument("--top-k", type=int, default=4, help="k of the top_k runs (the miniature has 44 ids)")
    ap.add_argument("--kl-every", type=int, default=5)
    ap.add_argument("--kl-prompts", type=int, default=64, help="held-out prompts per domain for the KL")
    ap.add_argument("--eval-prompts", type=int, default=500, help="held-out prompts per domain for the accuracy")
    ap.add_argument("--time-steps", type=int, default=10)
    ap.add_argument("--time-repeats", type=int, default=2)
    ap.add_argument("--wide-vocab", type=int, default=32768)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--demo-dir", default="runs/demo", help="where `make demo` left its bases and teachers")
    ap.add_argument("--out", default="runs/estimators")
    ap.add_argument("overrides", nargs="*", help="recipes/demo.yaml overrides, e.g. base.steps=50 (section.field=value)")
    ap.add_argument("--time-job", choices=ESTIMATORS, help=argparse.SUPPRESS)
    ap.add_argument("--time-vocab", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_job:
        from gopd_mega.data.tokenizer import CharTokenizer

        print(json.dumps(time_job(args.time_job, 1.25, args.time_vocab or CharTokenizer().vocab_size, args.time_steps)))
        return

    from gopd_mega.config import build_config, read_recipe
    from gopd_mega.demo import DemoConfig

    torch.set_num_threads(1)
    cfg = build_config(DemoConfig, read_recipe(ROOT / "recipes" / "demo.yaml"), [f"out_dir={args.out}", *args.overrides])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = {seed: seed_job(cfg, args, seed) for seed in args.seeds}
    summary = summarise(runs, cfg.data.domains)
    timing = {} if args.no_timing else time_all(args)
    doc = {"args": vars(args), "summary": summary, "timing": timing, "wall_s": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    (out / "results.md").write_text(table(summary, timing, args))
    plot(out / "estimators.png", summary)
    print(table(summary, timing, args))


if __name__ == "__main__":
    main()
