"""Benchmark: the cost of one weight refresh of the rollout servers, in seconds per GB of bf16.

    python benchmarks/bench_weight_sync.py --preset qwen3-0.6b --out DIR   # one GPU (disk); two GPUs: + NCCL
    python benchmarks/bench_weight_sync.py --dry --out DIR                 # CPU, tiny model (gloo for NCCL)

The trainer's side of gopd_mega.rollout.weight_sync, without SGLang servers (what the servers do
with the weights is theirs to measure):
  disk  ``gopd_mega.hf.export_hf(student, dir, dtype=bf16)``: what DiskSync writes (HF layout,
        safetensors, atomic rename), then a server's read of that folder (safetensors straight to
        the device); reported separately and together.
  nccl  ``gopd_mega.hf.hf_named_tensors`` (HF layout, bf16) cut into buckets of --bucket-mb
        (``weight_sync.buckets``), each tensor broadcast from rank 0 (the trainer) to rank 1 (a
        receiver that allocates every tensor, as a server does), which is what NcclSync does
        between the HTTP calls. Two processes on two GPUs (NCCL); needs two GPUs, or --dry (two
        CPU processes over gloo). With one GPU this part is reported as not run, and the exit
        status says so (2).

The student is random, in bf16, on the device (--preset qwen3-0.6b: Qwen3-0.6B's shape, as
benchmarks/bench_step.py). Each figure is the median of --repeats after one warm-up. Writes
--out/bench_weight_sync.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {
    "qwen3-0.6b": dict(num_layers=28, hidden_size=1024, num_attention_heads=16, num_query_groups=8, kv_channels=128,
                       ffn_hidden_size=3072, vocab_size=151936, qk_layernorm=True, params_dtype="bfloat16"),
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                 vocab_size=256, qk_layernorm=True, params_dtype="bfloat16"),
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(preset: str):
    from gopd_mega.config import ModelConfig
    from gopd_mega.models import ShardedGPT
    from gopd_mega.parallel import build_model_groups

    cfg = ModelConfig(**PRESETS[preset], max_seq_len=256, tie_embeddings=True, seed=1)
    return ShardedGPT(cfg, build_model_groups(1, 1), trainable=False)


def bf16_bytes(model) -> int:
    from gopd_mega.hf import hf_named_tensors

    return sum(t.numel() * 2 for _, t in hf_named_tensors(model, dtype=torch.bfloat16))


def disk(model, repeats: int, root: str) -> dict:
    from safetensors.torch import load_file

    from gopd_mega.hf import export_hf

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    write, read = [], []
    for i in range(repeats + 1):
        path = Path(root) / f"v{i}"
        sync()
        t0 = time.perf_counter()
        export_hf(model, path, dtype=torch.bfloat16)
        t1 = time.perf_counter()
        for f in sorted(path.glob("*.safetensors")):
            load_file(str(f), device=dev)
        sync()
        t2 = time.perf_counter()
        shutil.rmtree(path)
        if i:
            write.append(t1 - t0)
            read.append(t2 - t1)
    return {"write_s": statistics.median(write), "read_s": statistics.median(read)}


def _nccl_worker(rank: int, port: int, preset: str, bucket_mb: int, repeats: int, backend: str, out: str) -> None:
    import torch.distributed as dist

    from gopd_mega.hf import hf_named_tensors
    from gopd_mega.platform import init_distributed
    from gopd_mega.rollout.weight_sync import buckets

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    init_distributed()
    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    group = dist.new_group([0, 1], backend=backend)
    # Both ranks hold the model (a DP=2 layout) and walk its HF tensors in the same order (the
    # converter is collective over TP/PP); rank 1 stands for a server: it receives each tensor
    # into a fresh allocation.
    model = build(preset)
    times, nbytes = [], 0
    for i in range(repeats + 1):
        sync()
        dist.barrier(group=group)
        t0 = time.perf_counter()
        nbytes = 0
        for bucket in buckets(hf_named_tensors(model, dtype=torch.bfloat16), bucket_mb * 2**20):
            for _, t in bucket:
                buf = t.to(dev) if rank == 0 else torch.empty(t.shape, dtype=torch.bfloat16, device=dev)
                dist.broadcast(buf, src=0, group=group)
                nbytes += t.numel() * 2
        sync()
        dist.barrier(group=group)
        if i:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": statistics.median(times), "bytes": nbytes}))
    dist.destroy_process_group()


def nccl(preset: str, bucket_mb: int, repeats: int, dry: bool) -> dict:
    import socket

    import torch.multiprocessing as mp

    backend = "gloo" if dry else "nccl"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.start_processes(_nccl_worker, args=(port, preset, bucket_mb, repeats, backend, f.name), nprocs=2,
                           start_method="spawn")
        r = json.loads(Path(f.name).read_text())
    return {"backend": backend, "seconds": r["seconds"], "bytes": r["bytes"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="qwen3-0.6b", choices=sorted(PRESETS))
    ap.add_argument("--dry", action="store_true", help="CPU: the tiny preset, gloo instead of NCCL")
    ap.add_argument("--bucket-mb", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    if args.dry:
        args.preset = "tiny"
    elif not torch.cuda.is_available():
        ap.error("needs a GPU (or --dry)")
    from gopd_mega.platform import init_distributed

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU", "preset": args.preset,
              "bucket_mb": args.bucket_mb}
    status = 0
    if args.dry or torch.cuda.device_count() >= 2:
        r = nccl(args.preset, args.bucket_mb, args.repeats, args.dry)
        result["nccl"] = {**r, "s_per_gb": r["seconds"] / (r["bytes"] / 1e9)}
    else:
        result["nccl"] = {"not_run": f"needs 2 GPUs, this machine has {torch.cuda.device_count()}"}
        status = 2
    init_distributed()
    model = build(args.preset)
    gb = bf16_bytes(model) / 1e9
    with tempfile.TemporaryDirectory() as root:
        d = disk(model, args.repeats, root)
    result["bf16_gb"] = gb
    result["disk"] = {**d, "write_s_per_gb": d["write_s"] / gb, "read_s_per_gb": d["read_s"] / gb,
                      "s_per_gb": (d["write_s"] + d["read_s"]) / gb}
    (out / "bench_weight_sync.json").write_text(json.dumps(result, indent=2))
    print(f"weight sync, {args.preset} ({gb:.3f} GB bf16) on {result['device']}:")
    print(f"  disk: export {d['write_s']:.3f} s ({result['disk']['write_s_per_gb']:.2f} s/GB), read to device "
          f"{d['read_s']:.3f} s ({result['disk']['read_s_per_gb']:.2f} s/GB), together {result['disk']['s_per_gb']:.2f} s/GB")
    n = result["nccl"]
    if "not_run" in n:
        print(f"  nccl: NOT RUN ({n['not_run']})")
    else:
        print(f"  nccl ({n['backend']}, buckets of {args.bucket_mb} MB): {n['seconds']:.3f} s for {n['bytes'] / 1e9:.3f} GB, "
              f"{n['s_per_gb']:.2f} s/GB")
    return status


if __name__ == "__main__":
    sys.exit(main())
