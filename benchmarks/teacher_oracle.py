"""Choose the demo's teachers by the oracle, not by the students: for each GRPO setting, the
exact per-token and sequence-level targets of distilling the teachers back into the base.

    python benchmarks/teacher_oracle.py --seeds 0 1 --kl 0 0.1 0.3 [--set teacher.steps=50 ...]

For every seed: the demo's base SFT (recipes/demo.yaml), then per KL coefficient one GRPO teacher
per domain (teacher.kl_coef), then gopd_mega.demo._oracle at lambda 1, 1.25, 1.5, 2 (reference =
the base). Prints, per setting, the per-token target's avg exact accuracy at each lambda and its
paired difference to lambda 1 (the headroom ExOPD can have), the teachers' own accuracy and the
sequence-level bound; writes out_dir/teacher_oracle.json. Seeds run one per process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

from gopd_mega.config import build_config, read_recipe
from gopd_mega.demo import DemoConfig, _evaluate_dir, _grpo_teachers, _oracle, _setup, _sft_model


def one_seed(cfg: DemoConfig, seed: int, kls: list[float], lambdas: list[float]) -> dict:
    out, tokenizer, train_records, held_out = _setup(cfg, quiet=True)
    sd = out / f"seed{seed}"
    model_cfg = dataclasses.replace(cfg.model, seed=cfg.model.seed + 1000 * seed)
    _sft_model(cfg, model_cfg, train_records, cfg.base, tokenizer, sd / "base", 7919 * seed + 1, f"[seed {seed}] base SFT")
    res = {}
    for kl in kls:
        c = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, kl_coef=kl))
        kd = sd / f"kl{kl:g}"
        kd.mkdir(parents=True, exist_ok=True)
        teachers, _ = _grpo_teachers(c, sd / "base", train_records, tokenizer, kd, seed)
        exact = {d: _evaluate_dir(c, cfg.model, p, {d: held_out[d]}, tokenizer)["exact"][d]["accuracy"]
                 for d, p in teachers.items()}
        oracle = _oracle(c, {d: (cfg.model, p) for d, p in teachers.items()}, (cfg.model, sd / "base"), lambdas,
                         held_out, tokenizer)
        res[f"{kl:g}"] = {"teacher_exact": exact, "oracle": oracle}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--kl", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    ap.add_argument("--lambdas", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0])
    ap.add_argument("--only-seed", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], help="section.field=value overrides of recipes/demo.yaml")
    args = ap.parse_args()
    overrides = ["out_dir=runs/teacher_oracle", "eval.greedy=false", "train.progress=false", *args.overrides]
    cfg = build_config(DemoConfig, read_recipe("recipes/demo.yaml"), overrides)
    out = Path(cfg.out_dir)
    if args.only_seed is not None:
        path = out / f"seed{args.only_seed}" / "teacher_oracle.json"
        path.write_text(json.dumps(one_seed(cfg, args.only_seed, args.kl, args.lambdas)))
        return
    out.mkdir(parents=True, exist_ok=True)
    procs = [subprocess.Popen([sys.executable, __file__, "--only-seed", str(s), "--kl", *map(str, args.kl),
                               "--lambdas", *map(str, args.lambdas), "--set", *args.overrides],
                              stdout=open(out / f"seed{s}.log", "w"), stderr=subprocess.STDOUT) for s in args.seeds]
    if any(p.wait() for p in procs):
        raise SystemExit(f"a seed failed; see {out}/seed*.log")
    per_seed = {s: json.loads((out / f"seed{s}" / "teacher_oracle.json").read_text()) for s in args.seeds}
    (out / "teacher_oracle.json").write_text(json.dumps(per_seed, indent=2))
    lams = [f"{x:g}" for x in args.lambdas]

    def avg(d):
        return 100 * statistics.fmean(d.values())

    def ms(vals):
        return f"{statistics.fmean(vals):+.2f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.2f}"

    print("| teacher kl_coef | teachers' own exact | " + " | ".join(f"per-token target lam {x}" for x in lams)
          + " | " + " | ".join(f"headroom lam {x}" for x in lams[1:]) + " | " + " | ".join(f"seq target <= lam {x}" for x in lams) + " |")
    print("|" + "---|" * (2 + 3 * len(lams) - 1))
    for kl in [f"{k:g}" for k in args.kl]:
        rows = [per_seed[s][kl] for s in args.seeds]
        own = [avg(r["teacher_exact"]) for r in rows]
        tgt = {x: [avg(r["oracle"]["per_token"][x]) for r in rows] for x in lams}
        seq = {x: [avg(r["oracle"]["sequence_upper"][x]) for r in rows] for x in lams}
        cells = ([f"{statistics.fmean(own):.1f}"] + [f"{statistics.fmean(tgt[x]):.1f}" for x in lams]
                 + [ms([a - b for a, b in zip(tgt[x], tgt[lams[0]])]) for x in lams[1:]]
                 + [f"{statistics.fmean(seq[x]):.1f}" for x in lams])
        print(f"| {kl} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
