"""Benchmark: one full G-OPD step (rollout, teachers, reference, student forward+backward,
optimizer, weight sync) through the real trainer (gopd_mega.trainer.Distiller), random weights.

    python benchmarks/bench_step.py                          # tiny model, CPU, ~10 s
    python benchmarks/bench_step.py --preset qwen3-0.6b      # Qwen3-0.6B-shaped, bf16, one GPU
    python benchmarks/bench_step.py --layers 4 --hidden 256 --prompts 16 --max-new-tokens 64

Every phase is timed by wrapping the objects the trainer calls (engine.generate,
teacher/reference/student logprobs, student.train_step, the optimizer's step, sync_weights),
with a device synchronisation at each boundary; "student fwd+bwd" is train_step minus the
optimizer step inside it. Figures are medians over --steps measured steps after --warmup steps.
Prompts are random token ids (lengths uniform in [--prompt-min, --prompt-max]); responses are
sampled from the random student until a stop id or --max-new-tokens.

Reported:
  tokens/s            response tokens trained per second of the whole step (the trainer's
                      tokens_per_s), and all real (prompt + response) tokens per second
  computed positions  positions run through a transformer by the scoring passes (teachers,
                      reference, student training and its pi_old pass; the rollout is left out,
                      its decoding loop is the engine's business). Read from ``model.stats``
                      (positions_computed) when the models expose it, else from the batch
                      shapes: every [rows, S] position of each pass is computed. Split into
                      padding, prompt and response fractions.
  peak memory         torch.cuda.max_memory_allocated on GPU; the process's max RSS on CPU
  MFU (GPU only)      model FLOPs / (step time * peak): 6 * P * tokens for the student update,
                      2 * P * tokens for every forward-only pass (teachers, reference, pi_old
                      pass) and 2 * P * (prompt + generated) tokens for the rollout (as if
                      KV-cached: the useful work; an engine that recomputes prefixes does more).
                      tokens = real (non-padding) tokens of the rows a pass scores. P = the
                      parameters in matmuls: all weights less the input embedding table (which
                      is a lookup), plus the output layer (the tied embedding counts once, as
                      the output matmul). Attention's S^2 term is left out. Peak = --peak-tflops,
                      or 989 TFLOP/s dense bf16 for H100/H200 SXM.

Writes --out/bench_step.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gopd_mega.config import ModelConfig, ObjectiveConfig, OptimConfig, RolloutConfig, RunConfig, TeacherConfig, TrainConfig  # noqa: E402
from gopd_mega.platform import init_distributed, on_gpu  # noqa: E402
from gopd_mega.run import build_distiller  # noqa: E402
from gopd_mega.trainer import Distiller  # noqa: E402

PAD, STOP = 0, 1
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

PRESETS = {
    # Qwen3-0.6B's shape (28 layers, width 1024, 16 query / 8 kv heads of 128, SwiGLU 3072, q/k
    # norm, tied embeddings, vocab 151936): about 0.6B parameters, 0.44B outside the embedding.
    "qwen3-0.6b": dict(layers=28, hidden=1024, heads=16, kv_heads=8, head_dim=128, ffn=3072, vocab=151936,
                       qk_norm=True, dtype="bfloat16", prompts=64, prompt_min=64, prompt_max=192,
                       max_new_tokens=256, micro_batch=8),
}


class RandomPrompts:
    """The PromptDataset interface the trainer uses: random ids, teachers in turn."""

    def __init__(self, vocab: int, lo: int, hi: int, teachers: list[str], seed: int):
        self.rng = random.Random(seed)
        self.vocab, self.lo, self.hi, self.teachers = vocab, lo, hi, teachers
        self.count = 0

    def next_batch(self, n: int):
        out = []
        for _ in range(n):
            ids = [self.rng.randrange(STOP + 1, self.vocab) for _ in range(self.rng.randint(self.lo, self.hi))]
            out.append(SimpleNamespace(ids=ids, teacher=self.teachers[self.count % len(self.teachers)]))
            self.count += 1
        return out

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Probe:
    """Times calls per phase and counts the positions each scoring pass computes."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[str, float] = {}
        self.positions = {"computed": 0, "padding": 0, "prompt": 0, "response": 0}
        self.flop_tokens = {"train": 0, "forward": 0, "generated": 0}
        self.counter_source = "batch shapes"
        self.batch = None

    def timed(self, phase: str, fn):
        def call(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0
            return out

        return call

    def rollout(self, fn):
        timed = self.timed("rollout", fn)

        def call(*args, **kwargs):
            self.batch = timed(*args, **kwargs)
            self.flop_tokens["generated"] += int((self.batch.prompt_lens + self.batch.response_lens).sum())
            return self.batch

        return call

    def scoring(self, phase: str, model, fn, kind: str):
        """A pass over (tokens [n, S], loss_mask [n, S], ...) by ``model``: timed and counted."""
        timed = self.timed(phase, fn)

        def call(tokens, loss_mask, *args, **kwargs):
            stats = getattr(model, "stats", None)
            before = getattr(stats, "positions_computed", None)
            out = timed(tokens, loss_mask, *args, **kwargs)
            real = self._real_tokens(tokens)
            response = int(loss_mask[:, 1:].sum())
            computed = tokens.numel()
            if before is not None:
                computed = stats.positions_computed - before
                self.counter_source = "model.stats"
            # Every computed position is padding, a response-scoring position, or prompt. A packed
            # row stops at its last response token (whose own position predicts nothing), so a
            # packed pass may compute fewer positions than the row's real tokens.
            padding = max(0, computed - real)
            self.positions["computed"] += computed
            self.positions["response"] += response
            self.positions["padding"] += padding
            self.positions["prompt"] += computed - padding - response
            self.flop_tokens[kind] += real
            return out

        return call

    def _real_tokens(self, tokens: torch.Tensor) -> int:
        """Prompt + response tokens of ``tokens``: rows of the rollout batch (any subset, found
        by content; the pad id may also be sampled, so counting non-pad ids would be wrong)."""
        b = self.batch
        if b is None or tokens.shape[1] != b.tokens.shape[1]:
            return int((tokens != self.pad_id).sum())
        match = (tokens[:, None, :] == b.tokens[None, :, :]).all(-1)  # [n, N]
        rows = match.to(torch.float32).argmax(dim=1)
        return int((b.prompt_lens + b.response_lens)[rows].sum())


def matmul_params(model) -> int:
    """Parameters that take part in matmuls (see the module docstring)."""
    total = sum(p.numel() for p in model.model.parameters())
    if model.cfg.tie_embeddings:
        return total  # the embedding table is the output layer's weight: counted once
    return total - model.cfg.padded_vocab * model.cfg.hidden_size


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build(args, out_dir: str) -> tuple[Distiller, Probe, dict]:
    model = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                 num_query_groups=args.kv_heads, kv_channels=args.head_dim, ffn_hidden_size=args.ffn,
                 vocab_size=args.vocab, max_seq_len=args.prompt_max + args.max_new_tokens,
                 qk_layernorm=args.qk_norm, tie_embeddings=True, params_dtype=args.dtype)
    names = [f"t{i}" for i in range(args.teachers)]
    cfg = RunConfig(
        student=ModelConfig(**model, seed=1),
        teachers=[TeacherConfig(name=n, model=ModelConfig(**model, seed=100 + i)) for i, n in enumerate(names)],
        objective=ObjectiveConfig(lam=args.lam),
        rollout=RolloutConfig(temperature=1.0, max_new_tokens=args.max_new_tokens, kv_cache=not args.no_kv_cache),
        optim=OptimConfig(lr=1e-6),
        train=TrainConfig(steps=args.warmup + args.steps, prompts_per_step=args.prompts, micro_batch_size=args.micro_batch,
                          updates_per_rollout=args.updates_per_rollout, out_dir=out_dir, progress=False, resume=False),
    )
    cfg.data.max_prompt_len = args.prompt_max
    # Teachers have random weights here (no `load`), which RunConfig.validate refuses for real
    # runs; every other section is validated as usual.
    cfg.student.validate("student")
    for name in ("objective", "rollout", "optim", "train"):
        getattr(cfg, name).validate(name)
    tokenizer = SimpleNamespace(pad_id=PAD, stop_ids=[STOP])
    distiller = build_distiller(cfg, tokenizer, data=RandomPrompts(args.vocab, args.prompt_min, args.prompt_max, names, seed=0))

    probe = Probe(PAD)
    m = distiller.m
    m.engine.generate = probe.rollout(m.engine.generate)
    for name, teacher in m.teachers.items():
        teacher.logprobs = probe.scoring("teachers", teacher, teacher.logprobs, "forward")
    m.reference.logprobs = probe.scoring("reference", m.reference, m.reference.logprobs, "forward")
    m.student.logprobs = probe.scoring("student pi_old pass", m.student, m.student.logprobs, "forward")
    m.student.train_step = probe.scoring("student fwd+bwd+optim", m.student, m.student.train_step, "train")
    m.student.optimizer.step = probe.timed("optimizer", m.student.optimizer.step)
    distiller.sync_weights = probe.timed("weight sync", distiller.sync_weights)
    info = {"params_total": sum(p.numel() for p in m.student.model.parameters()),
            "params_matmul": matmul_params(m.student), "student": asdict(m.student.cfg)}
    return distiller, probe, info


def measure(args) -> dict:
    init_distributed()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out_dir:
        distiller, probe, info = build(args, out_dir)
        steps = []
        for i in range(args.warmup + args.steps):
            probe.reset()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            metrics = distiller.train_step()
            sync()
            total = time.perf_counter() - t0
            distiller.step += 1
            if i < args.warmup:
                continue
            phases = dict(probe.seconds)
            phases["student fwd+bwd"] = phases.pop("student fwd+bwd+optim") - phases.get("optimizer", 0.0)
            phases["other"] = total - sum(phases.values())
            b = probe.batch
            steps.append({"step_s": total, "phases_s": phases, "positions": dict(probe.positions),
                          "flop_tokens": dict(probe.flop_tokens), "counter_source": probe.counter_source,
                          "response_tokens": int(b.response_lens.sum()), "real_tokens": int((b.prompt_lens + b.response_lens).sum()),
                          "batch_shape": list(b.tokens.shape), "loss": metrics["loss"], "peak_mem_mib": peak_memory_mib()})
    return summarise(args, steps, info)


def summarise(args, steps: list[dict], info: dict) -> dict:
    med = lambda xs: statistics.median(xs)  # noqa: E731
    step_s = med([s["step_s"] for s in steps])
    phases = {k: med([s["phases_s"].get(k, 0.0) for s in steps]) for k in steps[0]["phases_s"]}
    pos = {k: sum(s["positions"][k] for s in steps) for k in steps[0]["positions"]}
    computed = max(1, pos["computed"])
    fractions = {f"{k}_fraction": pos[k] / computed for k in ("padding", "prompt", "response")}
    fractions["non_response_fraction"] = fractions["padding_fraction"] + fractions["prompt_fraction"]
    result = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})",
                    "threads": torch.get_num_threads()},
        "args": vars(args), **info,
        "step_s": step_s, "phases_s": phases,
        "response_tokens_per_s": med([s["response_tokens"] / s["step_s"] for s in steps]),
        "real_tokens_per_s": med([s["real_tokens"] / s["step_s"] for s in steps]),
        # the rollout engine's decode rate: generated tokens per second of the rollout phase
        "decode_tokens_per_s": med([s["response_tokens"] / max(s["phases_s"].get("rollout", 0.0), 1e-9) for s in steps]),
        "positions": pos, **fractions, "counter_source": steps[0]["counter_source"],
        "peak_mem_mib": max(s["peak_mem_mib"] for s in steps),
        "steps": steps,
    }
    if on_gpu():
        p = info["params_matmul"]
        flops = med([6 * p * s["flop_tokens"]["train"] + 2 * p * (s["flop_tokens"]["forward"] + s["flop_tokens"]["generated"])
                     for s in steps])
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        result["model_tflops_per_s"] = flops / step_s / 1e12
        result["mfu"] = None if peak is None else flops / step_s / (peak * 1e12)
        result["peak_tflops"] = peak
    return result


def table(r: dict) -> str:
    lines = [f"device: {r['machine']['device']}  params: {r['params_total'] / 1e6:.2f}M  "
             f"batch (last step): {r['steps'][-1]['batch_shape']}  steps measured: {len(r['steps'])}",
             f"{'phase':<24}{'seconds':>10}{'share':>8}"]
    for k, v in sorted(r["phases_s"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{k:<24}{v:>10.3f}{v / r['step_s']:>8.1%}")
    lines.append(f"{'whole step':<24}{r['step_s']:>10.3f}")
    lines.append(f"response tokens/s {r['response_tokens_per_s']:.1f}   real tokens/s {r['real_tokens_per_s']:.1f}   "
                 f"rollout decode tokens/s {r['decode_tokens_per_s']:.1f} (kv_cache={not r['args']['no_kv_cache']})")
    lines.append(f"computed positions ({r['counter_source']}): {r['positions']['computed']}   padding "
                 f"{r['padding_fraction']:.1%}  prompt {r['prompt_fraction']:.1%}  response {r['response_fraction']:.1%}")
    lines.append(f"peak memory {r['peak_mem_mib']:.0f} MiB")
    if "mfu" in r:
        mfu = "n/a (unknown peak; pass --peak-tflops)" if r["mfu"] is None else f"{r['mfu']:.1%}"
        lines.append(f"model TFLOP/s {r['model_tflops_per_s']:.1f}   MFU {mfu}")
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a model/batch shape (overrides the size flags)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=None)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--qk-norm", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--teachers", type=int, default=2, help="teachers (same shape as the student), prompts in turn")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (one response each)")
    ap.add_argument("--prompt-min", type=int, default=4)
    ap.add_argument("--prompt-max", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--updates-per-rollout", type=int, default=1)
    ap.add_argument("--no-kv-cache", action="store_true",
                    help="embedded engine without its KV cache (the whole prefix re-run every step)")
    ap.add_argument("--lam", type=float, default=1.25)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    if args.preset:
        p = PRESETS[args.preset]
        for k, v in p.items():
            setattr(args, k, v)
    if args.dtype != "float32" and not torch.cuda.is_available():
        ap.error(f"--dtype {args.dtype} needs a GPU")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    result = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_step.json").write_text(json.dumps(result, indent=2, default=str))
    print(table(result), flush=True)
    return result


if __name__ == "__main__":
    main()
