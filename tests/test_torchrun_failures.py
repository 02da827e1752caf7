"""gopd-train under torchrun (2 gloo workers, CPU): a user error is one line, printed once, and the
failing worker's exit code is 2; a signal that reaches one rank stops both after the same step
with one checkpoint (exit code 75 on each); a rank killed with -9 or stopped with SIGSTOP is named
by rank, host and pid. torchrun itself always exits 1 when a worker fails and prints its own
failure table, which shows each worker's exit code."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from dist_utils import subprocess_env
from helpers import REPO, run_until

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def torchrun(tiny_recipe, out, *overrides, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "gopd_mega.cli", "--recipe", str(tiny_recipe), f"train.out_dir={out}", "train.steps=200", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1", **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (read from /proc)."""
    ranks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            env = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if ppid == launcher_pid:
            rank = [v for v in env if v.startswith(b"RANK=")]
            if rank:
                ranks[int(rank[0][5:])] = int(entry)
    return ranks


def ours(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("gopd-train:")]


def exit_codes(output: str) -> dict[int, str]:
    """{rank: exit code} from torchrun's failure table."""
    return {int(r): code for r, code in re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\s+exitcode\s+: (-?\d+)", output)}


def test_user_error_is_one_line_with_exit_code_2(tiny_recipe, tmp_path):
    proc = torchrun(tiny_recipe, tmp_path / "run", "optim.lr=.nan")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1  # torchrun's own code when a worker fails
    assert ours(output) == ["gopd-train: error: config field 'optim.lr': must be a finite number, got nan"], output
    assert not re.search(r'File ".*gopd_mega/', output), output  # no traceback from our code
    codes = exit_codes(output)
    assert set(codes) == {0, 1} and "2" in codes.values(), output
    # a worker torchrun stopped before it reached the same error shows SIGTERM (-15)
    assert set(codes.values()) <= {"2", "-15"}, output


def test_user_error_is_printed_when_another_rank_meets_it_first(tiny_recipe, tmp_path):
    """Rank 0 (the one that prints) starts 3 s late: rank 1 meets the config error first and must
    not exit before rank 0 has printed it (torchrun would stop rank 0 first: no line at all)."""
    slow = REPO / "tests" / "fixtures" / "slow_rank0"
    proc = torchrun(tiny_recipe, tmp_path / "run", "optim.lr=.nan", PYTHONPATH=f"{slow}{os.pathsep}{REPO}")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert ours(output) == ["gopd-train: error: config field 'optim.lr': must be a finite number, got nan"], output
    assert exit_codes(output).get(0) == "2", output  # rank 0 reported and left with the user-error code


def test_signal_to_one_rank_stops_both_with_one_checkpoint(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(tiny_recipe, out)
    run_until(proc, "[train 2]")
    os.kill(worker_pids(proc.pid)[1], signal.SIGUSR1)  # rank 1 only, as a partial preemption would
    output, _ = proc.communicate(timeout=300)
    lines = ours(output)
    assert len(lines) == 1 and lines[0].startswith("gopd-train: stopped by SIGUSR1 after step "), output
    step = int(lines[0].split("after step ")[1].split(":")[0])
    assert exit_codes(output) == {0: "75", 1: "75"}, output
    from gopd_mega.checkpoint import CheckpointManager

    assert CheckpointManager(out).resume_point() == (out / "checkpoints" / f"step_{step:06d}", [])


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_dead_or_stopped_rank_is_named(tiny_recipe, tmp_path, how):
    """kill -9: rank 0's next collective fails at once; SIGSTOP: it times out after
    train.dist_timeout_s. Either way rank 0 names rank 1 by host and pid, once."""
    proc = torchrun(tiny_recipe, tmp_path / "run", "train.dist_timeout_s=10", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="5")
    run_until(proc, "[train 2]")
    victim = worker_pids(proc.pid)[1]
    os.kill(victim, how)
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        if how == signal.SIGSTOP:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
    lines = ours(output)
    host = socket.gethostname()
    assert len(lines) == 1, output
    assert lines[0].startswith(f"gopd-train: error: rank 1 (host {host}, pid {victim}) is dead or stopped: "), output
    if how == signal.SIGSTOP:
        assert "(train.dist_timeout_s=10)" in lines[0] and "Timed out" in lines[0]
    assert exit_codes(output)[0] == "2", output
