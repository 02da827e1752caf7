"""Benchmark: the project beside the peers a user would pick instead, on the same work, on CPU.

    pip install -e '.[bench]'                      # the peers: TRL (and transformers, already here)
    python benchmarks/bench_peers.py               # SmolLM2-135M and the tiny model, 3 runs each
    python benchmarks/bench_peers.py --model tiny --runs 5

Two comparisons, each with the same checkpoint on both sides (an HF folder: SmolLM2-135M-Instruct
from ``gopd_mega.hf.load_smollm2()``, offline; or ``tiny``, a random 2-layer width-64 Llama with a
256-id vocabulary, the shape of benchmarks/bench_step.py's default), fp32, the same prompts
(--prompts rows of --prompt-len random ids), no stop token on either side so every row runs to
--new tokens:

  decode  greedy generation. Ours: the embedded rollout engine (gopd_mega.rollout.EmbeddedEngine,
          KV cache, the fast path) on the megatron model; peer: transformers ``generate``
          (do_sample=False, min_new_tokens = max_new_tokens, its default KV cache and SDPA
          attention). Reported per generated token; the two must give the same tokens (printed).
  step    one on-policy distillation step: sample --new tokens for each prompt at temperature 1,
          score with the teacher (the same checkpoint), update. Ours: gopd_mega.trainer.Distiller
          at lambda = 1 (OPD), megatron's DDP and AdamW; peer: TRL's DistillationTrainer (beta = 1,
          reverse KL over the full vocabulary, HF generate), bf16 and gradient checkpointing off
          (on by default in TRL), AdamW (torch fused) with the same lr 1e-5, betas, eps,
          weight decay 0.01 and clip 1.0 on both sides (HF's Trainer does not decay norms and
          biases, ours decays every parameter: the same cost).

Protocol: every measurement runs in its own process with one intra-op thread (OMP_NUM_THREADS=1
and torch.set_num_threads(1)); the processes alternate ours / peer (the order flips every run),
so the load of this shared machine falls on both alike; time is process CPU time (all threads),
not wall; each process first makes --warmup unmeasured calls (2: our first two steps of
SmolLM2-135M cost ~7.5 CPU-s in the student's forward+backward, the later ones ~5.7, as the
allocator settles; TRL's settle after one), then measures --steps calls; figures are medians over
all measured calls of all runs. Per phase (steps): CPU seconds spent inside the calls each
side makes (wrapped in the worker, see ``_ours_step`` and ``_trl_step``); "other" is the rest of
the step.

Writes benchmarks/results/peers_<model>.json (a run with --only keeps the other comparison already
in the file; each comparison records its own arguments) and peers.png (side-by-side bars per
phase), and prints the tables that benchmarks/RESULTS.md quotes (--replot: again, from the JSON). The package never imports this file or its
peers (TRL is only in the optional ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256)


# ----------------------------------------------------------------------------- workers (one process each)

def _threads() -> None:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)


def _prompts(args, vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(args.seed)
    return [torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]


class Clock:
    """Process CPU seconds per phase, from wrapped calls (nested calls count in both phases)."""

    def __init__(self):
        self.phases: dict[str, float] = {}

    def wrap(self, phase: str, fn):
        def call(*a, **k):
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.phases[phase] = self.phases.get(phase, 0.0) + time.process_time() - t0

        return call


def _megatron_model(path: str, max_len: int, trainable=False):
    from gopd_mega.hf import load_hf_checkpoint, model_config_from_hf
    from gopd_mega.models import ShardedGPT
    from gopd_mega.parallel import build_model_groups
    from gopd_mega.platform import init_distributed

    init_distributed()
    cfg = model_config_from_hf(path, max_seq_len=max_len)
    model = ShardedGPT(cfg, build_model_groups(1, 1))
    load_hf_checkpoint(model, path)
    return model


def _ours_decode(args, path: str) -> dict:
    from gopd_mega.rollout.embedded import EmbeddedEngine

    model = _megatron_model(path, args.prompt_len + args.new + 8)
    ps = _prompts(args, model.cfg.vocab_size)
    eng = EmbeddedEngine(model, pad_id=0, stop_ids=[], kv_cache=True, fast_decode=not args.megatron_decode)
    times, out = [], None
    for i in range(args.warmup + args.steps):
        t0 = time.process_time()
        out = eng.generate(ps, temperature=1.0, max_new_tokens=args.new, greedy=True)
        if i >= args.warmup:
            times.append(time.process_time() - t0)
    return {"cpu_s": times, "tokens": [out.response_ids(i) for i in range(len(ps))]}


def _hf_decode(args, path: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ps = torch.tensor(_prompts(args, model.config.vocab_size))
    kw = dict(attention_mask=torch.ones_like(ps), do_sample=False, max_new_tokens=args.new,
              min_new_tokens=args.new, pad_token_id=0, eos_token_id=None)
    times, out = [], None
    for i in range(args.warmup + args.steps):
        t0 = time.process_time()
        with torch.no_grad():
            out = model.generate(ps, **kw)
        if i >= args.warmup:
            times.append(time.process_time() - t0)
    return {"cpu_s": times, "tokens": out[:, ps.shape[1]:].tolist(), "attn": model.config._attn_implementation}


def _ours_step(args, path: str) -> dict:
    from gopd_mega.config import ModelConfig, ObjectiveConfig, OptimConfig, RolloutConfig, RunConfig, TeacherConfig, TrainConfig
    from gopd_mega.platform import init_distributed
    from gopd_mega.run import build_models, build_student_optimizer
    from gopd_mega.trainer import Distiller

    init_distributed()
    n_steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as out_dir:
        max_len = args.prompt_len + args.new + 8
        cfg = RunConfig(
            student=ModelConfig(load=path, max_seq_len=max_len),
            teachers=[TeacherConfig(name="t", model=ModelConfig(load=path, max_seq_len=max_len))],
            objective=ObjectiveConfig(lam=1.0),
            rollout=RolloutConfig(temperature=1.0, max_new_tokens=args.new),
            optim=OptimConfig(lr=1e-5, weight_decay=0.01, grad_clip=1.0),
            train=TrainConfig(steps=n_steps, prompts_per_step=args.prompts, out_dir=out_dir, progress=False, resume=False),
        )
        cfg.data.max_prompt_len = args.prompt_len
        cfg.validate()
        models = build_models(cfg, SimpleNamespace(pad_id=0, stop_ids=[]))
        prompts = _prompts(args, models.student.cfg.vocab_size)

        class Prompts:  # the PromptDataset interface the trainer uses: the same prompts every step
            def next_batch(self, n):
                return [SimpleNamespace(ids=p, teacher="t") for p in prompts[:n]]

            def state_dict(self):
                return {}

        d = Distiller(cfg, models, Prompts(), build_student_optimizer(cfg, models))
        clock = Clock()
        m = models
        m.engine.generate = clock.wrap("generation", m.engine.generate)
        for t in m.teachers.values():
            t.logprobs = clock.wrap("teacher forward", t.logprobs)
        m.reference.logprobs = clock.wrap("reference forward", m.reference.logprobs)
        m.student.train_step = clock.wrap("student fwd+bwd", m.student.train_step)
        m.student.optimizer.step = clock.wrap("optimizer (clip + AdamW)", m.student.optimizer.step)
        d.sync_weights = clock.wrap("weight sync", d.sync_weights)
        steps = []
        for i in range(n_steps):
            clock.phases = {}
            t0 = time.process_time()
            d.train_step()
            d.step += 1
            total = time.process_time() - t0
            if i >= args.warmup:
                ph = dict(clock.phases)
                ph["student fwd+bwd"] = ph.get("student fwd+bwd", 0.0) - ph.get("optimizer (clip + AdamW)", 0.0)
                ph["other"] = total - sum(ph.values())
                steps.append({"cpu_s": total, "phases": ph})
    return {"steps": steps}


def _trl_step(args, path: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    n_steps = args.warmup + args.steps
    student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    tok.padding_side = "left"
    prompts = _prompts(args, student.config.vocab_size)
    by_text = {str(i): p for i, p in enumerate(prompts)}
    clock = Clock()

    class Trainer(DistillationTrainer):
        def _tokenize_prompts(self, texts):  # the same token ids as our side, no tokenizer round trip
            return [by_text[t] for t in texts], None, {}

        def create_optimizer(self, *a, **k):
            opt = super().create_optimizer(*a, **k)
            opt.step = clock.wrap("optimizer (clip + AdamW)", opt.step)
            return opt

    class Steps(TrainerCallback):
        def __init__(self):
            self.steps, self.t0 = [], None

        def on_step_begin(self, *a, **k):
            clock.phases = {}
            self.t0 = time.process_time()

        def on_step_end(self, *a, **k):
            # on_step_end runs after the optimizer step, scheduler and zero_grad
            total = time.process_time() - self.t0
            ph = dict(clock.phases)
            ph["student fwd+bwd"] = ph.pop("training_step", 0.0) - ph.get("generation", 0.0) - ph.get("teacher forward", 0.0)
            ph["other"] = total - sum(ph.values())
            self.steps.append({"cpu_s": total, "phases": ph})

    config = DistillationConfig(
        output_dir=tempfile.mkdtemp(), max_steps=n_steps, per_device_train_batch_size=args.prompts,
        gradient_accumulation_steps=1, learning_rate=1e-5, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch_fused",
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, report_to=[], logging_steps=10**6,
        save_strategy="no", dataloader_num_workers=0, shuffle_dataset=False, seed=args.seed, beta=1.0,
        temperature=1.0, top_p=1.0, top_k=0, max_completion_length=args.new,
        generation_kwargs={"min_new_tokens": args.new}, disable_dropout=True,
    )
    data = Dataset.from_dict({"prompt": [str(i % len(prompts)) for i in range(args.prompts * n_steps)]})
    cb = Steps()
    trainer = Trainer(model=student, teacher_model=teacher, args=config, train_dataset=data, processing_class=tok,
                      callbacks=[cb])
    trainer._generate = clock.wrap("generation", trainer._generate)
    trainer.training_step = clock.wrap("training_step", trainer.training_step)
    original_hidden = trainer._get_last_hidden_state

    def hidden(model, *a, **k):  # the teacher's forward (no grad); the student's is part of fwd+bwd
        if model is trainer.accelerator.unwrap_model(trainer.teacher_model):
            return clock.wrap("teacher forward", original_hidden)(model, *a, **k)
        return original_hidden(model, *a, **k)

    trainer._get_last_hidden_state = hidden
    clip = trainer.accelerator.clip_grad_norm_
    trainer.accelerator.clip_grad_norm_ = clock.wrap("optimizer (clip + AdamW)", clip)
    trainer.train()
    return {"steps": cb.steps[args.warmup:]}


WORKERS = {("decode", "ours"): _ours_decode, ("decode", "peer"): _hf_decode,
           ("step", "ours"): _ours_step, ("step", "peer"): _trl_step}


# ----------------------------------------------------------------------------- orchestration

def _checkpoint(model: str, work: Path) -> tuple[str, str]:
    """(HF folder of the model, tokenizer folder)."""
    from gopd_mega.hf import load_smollm2

    smol = str(load_smollm2())
    if model == "smollm2":
        return smol, smol
    path = work / "tiny"
    if not (path / "config.json").exists():
        from gopd_mega.hf.testing import tiny_hf_model

        tiny_hf_model("llama", path, tie=True, seed=0, **TINY)
    return str(path), smol


def _run_worker(kind: str, side: str, args, path: str, tokenizer: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--worker", kind, "--side", side, "--path", path, "--tokenizer", tokenizer,
           "--prompts", str(args.prompts), "--prompt-len", str(args.prompt_len), "--new", str(args.new),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    if args.megatron_decode:
        cmd.append("--megatron-decode")
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        proc = subprocess.run(cmd + ["--result", f.name], cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"bench_peers: the {kind}/{side} worker failed (exit {proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return json.loads(Path(f.name).read_text())


def _median(xs):
    return statistics.median(xs) if xs else 0.0


def measure(args, model: str, work: Path) -> dict:
    path, tokenizer = _checkpoint(model, work)
    kinds = [k for k in ("decode", "step") if k in args.only]
    raw = {k: {"ours": [], "peer": []} for k in kinds}
    for run in range(args.runs):
        for kind in kinds:
            for side in (("ours", "peer") if run % 2 == 0 else ("peer", "ours")):
                t0 = time.time()
                raw[kind][side].append(_run_worker(kind, side, args, path, tokenizer))
                print(f"  [{model}] run {run + 1}/{args.runs} {kind:6} {side:4} done in {time.time() - t0:5.1f} s wall "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
    run_args = {k: v for k, v in vars(args).items() if k not in ("only", "replot")}
    out = {"model": model, "args": run_args, "raw": raw}
    tokens = args.prompts * args.new
    if "decode" in raw:
        d = {side: [t for r in raw["decode"][side] for t in r["cpu_s"]] for side in ("ours", "peer")}
        same = all(r["tokens"] == raw["decode"]["peer"][0]["tokens"] for side in ("ours", "peer") for r in raw["decode"][side])
        match = sum(a == b for x, y in zip(raw["decode"]["ours"][0]["tokens"], raw["decode"]["peer"][0]["tokens"])
                    for a, b in zip(x, y)) / tokens
        out["decode"] = {"ours_ms_per_token": 1000 * _median(d["ours"]) / tokens,
                         "peer_ms_per_token": 1000 * _median(d["peer"]) / tokens,
                         "ratio": _median(d["ours"]) / _median(d["peer"]),
                         "ratios_per_run": [_median(a["cpu_s"]) / _median(b["cpu_s"])
                                            for a, b in zip(raw["decode"]["ours"], raw["decode"]["peer"])],
                         "same_tokens": same, "token_match": match, "args": run_args}
    if "step" in raw:
        s = {}
        for side in ("ours", "peer"):
            steps = [st for r in raw["step"][side] for st in r["steps"]]
            names = sorted({k for st in steps for k in st["phases"]})
            s[side] = {"cpu_s": _median([st["cpu_s"] for st in steps]),
                       "phases": {k: _median([st["phases"].get(k, 0.0) for st in steps]) for k in names}}
        out["step"] = {**s, "ratio": s["ours"]["cpu_s"] / s["peer"]["cpu_s"],
                       "ratios_per_run": [_median([st["cpu_s"] for st in a["steps"]]) / _median([st["cpu_s"] for st in b["steps"]])
                                          for a, b in zip(raw["step"]["ours"], raw["step"]["peer"])],
                       "args": run_args}
    return out


PHASES = ["generation", "teacher forward", "reference forward", "student fwd+bwd", "optimizer (clip + AdamW)",
          "weight sync", "other"]


def _f(x: float) -> str:
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def _setting(a: dict) -> str:
    return (f"{a['prompts']} prompts x {a['prompt_len']} tokens, {a['new']} new, fp32, 1 thread, {a['runs']} runs x "
            f"{a['warmup']} warm-up + {a['steps']} measured calls (medians, process CPU seconds)")


def table(r: dict) -> str:
    lines = [f"## {r['model']}"]
    if "decode" in r:
        d = r["decode"]
        lines += ["", f"decode: {_setting(d.get('args', r['args']))}",
                  "", "| decode (greedy) | ours | HF generate | ratio | runs |", "|---|---|---|---|---|",
                  f"| CPU-ms per token | {d['ours_ms_per_token']:.2f} | {d['peer_ms_per_token']:.2f} | **{d['ratio']:.2f}x** | "
                  f"{', '.join(f'{x:.2f}' for x in d['ratios_per_run'])} |",
                  f"", f"same greedy tokens: {d['same_tokens']} (match {d['token_match']:.1%})"]
    if "step" in r:
        s = r["step"]
        lines += ["", f"step: {_setting(s.get('args', r['args']))}",
                  "", "| OPD step phase (CPU-s) | ours | TRL DistillationTrainer | gap |", "|---|---|---|---|"]
        for k in PHASES:
            a, b = s["ours"]["phases"].get(k, 0.0), s["peer"]["phases"].get(k, 0.0)
            if a or b:
                lines.append(f"| {k} | {_f(a)} | {_f(b)} | {'+' if a >= b else '-'}{_f(abs(a - b))} |")
        lines.append(f"| **whole step** | **{_f(s['ours']['cpu_s'])}** | **{_f(s['peer']['cpu_s'])}** | "
                     f"**{s['ratio']:.2f}x** (runs: {', '.join(f'{x:.2f}' for x in s['ratios_per_run'])}) |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in results if "step" in r]
    decodes = [r for r in results if "decode" in r]
    cols = len(steps) + (1 if decodes else 0)
    fig, axes = plt.subplots(1, max(cols, 1), figsize=(5.5 * max(cols, 1), 4.2), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, r in zip(axes[0], steps):
        bottoms = [0.0, 0.0]
        for i, k in enumerate(PHASES):
            vals = [r["step"][side]["phases"].get(k, 0.0) for side in ("ours", "peer")]
            if any(vals):
                ax.bar([0, 1], vals, bottom=bottoms, color=colors[i % 10], label=k, width=0.6)
                bottoms = [b + v for b, v in zip(bottoms, vals)]
        ax.set_xticks([0, 1], ["gopd-mega", "TRL Distillation-\nTrainer"])
        ax.set_ylabel("CPU seconds per step (median)")
        ax.set_title(f"OPD step, {r['model']}: {r['step']['ratio']:.2f}x")
        ax.legend(fontsize=7)
    if decodes:
        ax = axes[0][-1]
        x = range(len(decodes))
        ax.bar([i - 0.2 for i in x], [r["decode"]["ratio"] for r in decodes], 0.4, label="gopd-mega engine")
        ax.bar([i + 0.2 for i in x], [1.0 for _ in decodes], 0.4, label="HF generate")
        ax.set_xticks(list(x), [f"{r['model']}: {_f(r['decode']['ours_ms_per_token'])} vs\n"
                                f"{_f(r['decode']['peer_ms_per_token'])} CPU-ms/token" for r in decodes])
        ax.set_ylabel("CPU time per generated token, HF generate = 1")
        ax.set_title("greedy decode")
        ax.legend(fontsize=7)
    fig.suptitle("gopd-mega beside its peers, CPU, 1 thread, fp32 (benchmarks/bench_peers.py)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2,tiny", help="comma list of 'smollm2' and 'tiny'")
    ap.add_argument("--only", default="decode,step", help="comma list of 'decode' and 'step'")
    ap.add_argument("--runs", type=int, default=3, help="processes per side and comparison (interleaved)")
    ap.add_argument("--steps", type=int, default=2, help="measured calls per process")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured calls per process first")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--megatron-decode", action="store_true", help="ours: megatron's own decode forward (the old path)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--replot", action="store_true", help="no measuring: tables and plot from --out's peers_*.json")
    # internal: one worker process
    ap.add_argument("--worker", choices=["decode", "step"], help=argparse.SUPPRESS)
    ap.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(ROOT))
        _threads()
        res = WORKERS[(args.worker, args.side)](args, args.path)
        Path(args.result).write_text(json.dumps(res))
        return
    args.only = args.only.split(",")
    out = Path(args.out)
    if args.replot:
        results = [json.loads((out / f"peers_{m}.json").read_text()) for m in args.model.split(",")]
        plot(results, out / "peers.png")
        for r in results:
            print()
            print(table(r))
        return
    try:
        import trl  # noqa: F401
    except ImportError:
        if "step" in args.only:
            raise SystemExit("bench_peers: the step comparison needs TRL: pip install -e '.[bench]'")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as work:
        for model in args.model.split(","):
            print(f"== {model} (load average {os.getloadavg()[0]:.1f})", flush=True)
            r = measure(args, model, Path(work))
            path = out / f"peers_{model}.json"
            if path.exists():  # keep the comparisons this run did not make (each carries its own args)
                old = json.loads(path.read_text())
                for kind in ("decode", "step"):
                    if kind not in r and kind in old:
                        r[kind] = old[kind]
                        r["raw"][kind] = old.get("raw", {}).get(kind)
            path.write_text(json.dumps(r, indent=1))
            results.append(r)
    plot(results, out / "peers.png")
    print(f"command: python benchmarks/bench_peers.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    for r in results:
        print()
        print(table(r))
    for r in results:
        bits = []
        if "decode" in r:
            bits.append(f"decode {r['decode']['ratio']:.2f}x HF generate")
        if "step" in r:
            bits.append(f"OPD step {r['step']['ratio']:.2f}x TRL")
        print(f"{r['model']}: " + ", ".join(bits))


if __name__ == "__main__":
    main()
