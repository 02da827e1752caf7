"""The SGLang launchers in examples/, run as written on a CPU: their server command is the stand-in
(SGLANG_SERVER="python tests/sglang_standin.py", which takes launch_server's arguments), the
router is the real sglang-router, the trainer is torchrun over gloo, and Slurm's ``scontrol`` /
``srun`` are shims that run each command on this machine."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).parent.parent

SRUN = """#!/usr/bin/env bash
# srun shim: drop srun's options, run the command here.
while [ $# -gt 0 ]; do
  case "$1" in
    -w|-N|-n|--nodelist|--ntasks) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
# scontrol shim: 'scontrol show hostnames LIST' prints the comma-separated LIST one per line.
[ "$1 $2" = "show hostnames" ] || { echo "scontrol shim: unsupported: $*" >&2; exit 2; }
tr ',' '\\n' <<< "$3"
"""


def _ports(n: int) -> int:
    """A port p with p .. p + n - 1 free, below the kernel's ephemeral range (32768+), where
    torchrun's and every client socket's own ports come from."""
    import random

    for _ in range(200):
        base = random.randrange(20000, 32000 - n)
        held = []
        try:
            for p in range(base, base + n):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no free port range")


def _recipe(tmp_path, model_dirs, student_hf) -> Path:
    import yaml

    recipe = {
        "student": {"load": student_hf},
        "teachers": [{"name": d, "model": {"load": model_dirs[d]}} for d in ("add", "mul")],
        "objective": {"lam": 1.25},
        "rollout": {"max_new_tokens": 6},
        "optim": {"lr": 1e-3},
        "data": {"num_train": 64, "num_eval": 8, "max_prompt_len": 12},
        "train": {"steps": 2, "prompts_per_step": 4, "micro_batch_size": 4, "progress": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                    "TORCHELASTIC"))}
    env.update(PATH=os.pathsep.join([str(tmp_path / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")]),
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               SGLANG_SERVER=f"{sys.executable} {ROOT / 'tests' / 'sglang_standin.py'}", **extra)
    return env


def _run(cmd, env, log_path, timeout=600) -> subprocess.CompletedProcess:
    """Run a launcher in its own session, its output to ``log_path`` (the servers it leaves in the
    background hold that file, not a pipe); whatever it left running is killed afterwards."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # servers and router it started in the background
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(cmd, proc.returncode, Path(log_path).read_text(), "")


def _steps(out_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("phase", "train") == "train" and "loss" in r]


@pytest.mark.slow
def test_single_node_launcher_against_standin_servers(model_dirs, student_hf, tmp_path):
    (tmp_path / "bin").mkdir()
    recipe = _recipe(tmp_path, model_dirs, student_hf)
    env = _env(tmp_path, MODEL=student_hf, TRAIN_GPUS="0", SERVER_GPUS="0,1", SERVER_TP="1",
               BASE_PORT=str(_ports(2)), WEIGHT_SYNC="disk", LOG_DIR=str(tmp_path / "logs"))
    out = tmp_path / "out"
    r = _run(["bash", "examples/sglang_single_node.sh", str(recipe), f"train.out_dir={out}"], env, tmp_path / "run.log")
    assert r.returncode == 0, r.stdout[-4000:]
    assert len(_steps(out)) == 2
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert logs == ["sglang_0.log", "sglang_1.log"]


@pytest.mark.slow
def test_slurm_launcher_router_and_nccl_sync_against_standin_servers(model_dirs, student_hf, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755 | stat.S_IXUSR)
    recipe = _recipe(tmp_path, model_dirs, student_hf)
    base = _ports(6)
    shared = tmp_path / "shared"
    shared.mkdir()
    env = _env(tmp_path, SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1", SLURM_JOB_ID="4242", TRAIN_NODES="1",
               SERVER_NODES="1", GPUS_PER_NODE="2", SERVER_TP="1", MODEL=student_hf, RECIPE=str(recipe),
               SHARED_DIR=str(shared), SERVER_PORT=str(base), ROUTER_PORT=str(base + 2), RDZV_PORT=str(base + 3),
               SYNC_PORT=str(base + 4), WEIGHT_SYNC="nccl",
               OVERRIDES="rollout.weight_sync_backend=gloo rollout.weight_sync_address=127.0.0.1")
    r = _run(["bash", "examples/slurm_multi_node.sbatch"], env, tmp_path / "run.log")
    assert r.returncode == 0, r.stdout[-4000:]
    assert len(_steps(shared / "out")) == 2
    assert (shared / "router.log").is_file()
    assert sorted(p.name for p in shared.glob("sglang_*.log")) == ["sglang_127.0.0.1_0.log", "sglang_127.0.0.1_1.log"]
