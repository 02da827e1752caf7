"""Benchmark: what padding-free packing saves on a ragged rollout batch (teacher/reference scoring).

A batch of N right-padded rows (prompts and responses of random lengths, padded to the longest
row S) is scored by ShardedGPT.logprobs with a token budget per forward. Reports from
``model.stats``: positions a padded forward would compute (N * S), positions packing computed
(only up to each row's last response token), positions scored (response tokens: the only ones
that reach the output layer), forwards and the longest one, and the wall time.

    python benchmarks/bench_packing.py                       # CPU, tiny model, ~1 min
    python benchmarks/bench_packing.py --rows 64 --hidden 512 --layers 4 --budget 8192   # GPU

Runs on one process (TP = PP = DP = 1). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def ragged(rows: int, max_prompt: int, max_response: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(max_prompt // 4, max_prompt + 1, (rows,), generator=g)
    r = torch.randint(1, max_response + 1, (rows,), generator=g)
    S = int((p + r).max())
    tokens = torch.randint(1, vocab, (rows, S), generator=g)
    mask = torch.zeros(rows, S)
    for i in range(rows):
        mask[i, p[i]: p[i] + r[i]] = 1
        tokens[i, p[i] + r[i]:] = 0
    return tokens, mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=64)
    ap.add_argument("--max-response", type=int, default=192)
    ap.add_argument("--budget", type=int, default=512, help="max tokens per micro-batch forward")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    args = ap.parse_args()

    from gopd_mega.config import ModelConfig
    from gopd_mega.models import ShardedGPT
    from gopd_mega.parallel import build_layout_groups

    tokens, mask = ragged(args.rows, args.max_prompt, args.max_response, args.vocab, seed=0)
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4,
                      vocab_size=args.vocab, max_seq_len=tokens.shape[1])
    (g,) = build_layout_groups([(1, 1)])
    model = ShardedGPT(cfg, g, name="bench")
    model.logprobs(tokens[:2], mask[:2], max_tokens=args.budget)  # warm-up
    model.stats.reset()
    t0 = time.perf_counter()
    model.logprobs(tokens, mask, max_tokens=args.budget)
    seconds = time.perf_counter() - t0
    st = model.stats.as_dict()
    padded = tokens.numel()
    print(json.dumps({
        "rows": args.rows, "S": tokens.shape[1], "budget": args.budget, "seconds": round(seconds, 3),
        "padded_positions": padded, **st,
        "computed_over_padded": round(st["positions_computed"] / padded, 3),
        "scored_over_computed": round(st["positions_scored"] / max(1, st["positions_computed"]), 3),
    }))


if __name__ == "__main__":
    main()
