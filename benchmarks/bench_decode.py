"""Benchmark: decode tokens/s of the embedded rollout engine, KV cache vs no cache.

Builds one model at TP=1 in a single process, then for each path (``kv_cache=False``: the whole
prefix re-run every step; ``kv_cache=True``: gopd_mega.rollout.kv_decode) generates greedily
``--batch`` rows of ``--new`` tokens each (no stop token, so every row runs to the end) from
ragged prompts of ``--prompt-len`` +- 25% tokens, after one short warm-up call. Prints the
wall time, generated tokens/s (rows * new / seconds, prefill included) and whether the two
paths gave the same tokens. The process CPU time (all its threads) is printed too: on a shared
machine it moves less with the other load than the wall time does.
Results: benchmarks/RESULTS.md, "Embedded engine decode".

    python benchmarks/bench_decode.py --model tiny                  # random 4-layer model
    python benchmarks/bench_decode.py --model smollm2 --new 96      # SmolLM2-135M (offline GGUF)
    python benchmarks/bench_decode.py --model smollm2 --skip-nocache --new 256
    python benchmarks/bench_decode.py --model qwen3-0.6b --batch 64 --new 256 --skip-nocache  # GPU, bf16

Runs on the GPU when there is one (gopd_mega.platform.device), on the CPU otherwise; set
OMP_NUM_THREADS / --threads for a fair CPU figure.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(name: str):
    from gopd_mega.config import ModelConfig
    from gopd_mega.models import ShardedGPT
    from gopd_mega.parallel import build_model_groups
    from gopd_mega.platform import init_distributed, on_gpu

    init_distributed()
    groups = build_model_groups(1, 1)
    if name == "qwen3-0.6b":  # Qwen3-0.6B's shape, random weights; bf16 on a GPU, fp32 on the CPU
        cfg = ModelConfig(num_layers=28, hidden_size=1024, num_attention_heads=16, num_query_groups=8, kv_channels=128,
                          ffn_hidden_size=3072, vocab_size=151936, qk_layernorm=True, max_seq_len=1024, seed=1,
                          params_dtype="bfloat16" if on_gpu() else "float32")
        return ShardedGPT(cfg, groups), cfg.vocab_size
    if name == "tiny":
        cfg = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4,
                          ffn_hidden_size=768, vocab_size=4096, max_seq_len=1024, seed=1)
        return ShardedGPT(cfg, groups), cfg.vocab_size
    if name == "smollm2":
        from gopd_mega.hf import load_hf_checkpoint, load_smollm2, model_config_from_hf

        path = load_smollm2()
        cfg = model_config_from_hf(path, max_seq_len=1024)
        model = ShardedGPT(cfg, groups)
        load_hf_checkpoint(model, path)
        return model, cfg.vocab_size
    raise SystemExit(f"--model must be 'tiny', 'smollm2' or 'qwen3-0.6b', got {name!r}")


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lo, hi = max(1, length * 3 // 4), max(1, length * 5 // 4)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (L,), generator=g).tolist() for L in lens]


def run(model, kv_cache: bool, ps, new: int, fast: bool = True):
    from gopd_mega.rollout.embedded import EmbeddedEngine

    eng = EmbeddedEngine(model, pad_id=0, stop_ids=[], kv_cache=kv_cache, fast_decode=fast)
    eng.generate(ps[:2], temperature=1.0, max_new_tokens=2, greedy=True)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    out = eng.generate(ps, temperature=1.0, max_new_tokens=new, greedy=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny",
                    help="'tiny' (random 4 layers, H=256), 'smollm2' (135M) or 'qwen3-0.6b' (random, its shape)")
    ap.add_argument("--batch", type=int, default=8, help="rows generated together")
    ap.add_argument("--prompt-len", type=int, default=32, help="mean prompt length (ragged +-25%%)")
    ap.add_argument("--new", type=int, default=96, help="tokens generated per row")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--skip-nocache", action="store_true", help="time only the KV-cache path")
    ap.add_argument("--megatron", action="store_true", help="also time the KV cache through megatron's own forward")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, vocab = build(args.model)
    ps = prompts(args.batch, args.prompt_len, vocab)
    from gopd_mega.platform import device

    print(f"model={args.model} batch={args.batch} prompt_lens={[len(p) for p in ps]} new={args.new} "
          f"device={device()} threads={torch.get_num_threads()} cpu={platform.processor() or platform.machine()} "
          f"load={os.getloadavg()[0]:.2f}")
    total = args.batch * args.new
    results, figures = {}, {}
    paths = [(False, True)] if not args.skip_nocache else []
    paths += [(True, True)] + ([(True, False)] if args.megatron else [])
    for kv, fast in paths:
        secs, cpu, out = run(model, kv, ps, args.new, fast)
        name = "no cache" if not kv else ("KV cache, fast path" if fast else "KV cache, megatron forward")
        results[name] = out
        figures[name] = {"wall_s": secs, "cpu_s": cpu, "tokens_per_s": total / secs}
        print(f"{name:27} wall {secs:8.2f} s  {total / secs:8.1f} tokens/s   process CPU {cpu:8.2f} s  "
              f"{total / cpu:8.1f} tokens/CPU-s  (load {os.getloadavg()[0]:.2f})", flush=True)
    first = results["KV cache, fast path"]
    for name, out in results.items():
        if out is not first:
            same = torch.equal(out.tokens, first.tokens)
            dlp = float((out.sampler_logp - first.sampler_logp).abs().max())
            print(f"{name} vs the fast path: same greedy tokens: {same}; max |logp diff| = {dlp:.2e}")
    if args.json:
        import json

        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "batch": args.batch, "new": args.new, "device": device_name,
                       "paths": figures}, f, indent=2)


if __name__ == "__main__":
    main()
