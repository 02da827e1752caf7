"""Stand-in servers and the real sglang-router as processes on this machine (tests, benchmarks).

    proc, url = start_standin(hf_dir, "--kill-after", "1")     # tests/sglang_standin.py
    router, router_url = start_router([url1, url2], log_path)  # python -m sglang_router.launch_router
    stop([proc, router])
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def start_standin(model_path: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """tests/sglang_standin.py in its own process; (process, URL) once it listens."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(HERE / "sglang_standin.py"), "--model-path", model_path, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if not line.startswith("URL "):
        proc.kill()
        raise RuntimeError(f"stand-in did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, line.split()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_router(workers: list[str], log_path, timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """sglang-router's gateway in front of ``workers`` (round robin); returns once it lists every
    worker as healthy (it registers them in the background)."""
    from gopd_mega.rollout.sglang import SGLangError, http_call

    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *workers,
                             "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin",
                             "--log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the router exited ({proc.returncode}): {Path(log_path).read_text()[-2000:]}")
        try:
            listing = http_call(url + "/workers", timeout=5)
            if sum(bool(w.get("is_healthy")) for w in listing.get("workers", [])) == len(workers):
                return proc, url
        except SGLangError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the router did not register {workers}: {Path(log_path).read_text()[-2000:]}")


def stop(procs) -> None:
    """Terminate (then kill) the processes, waiting for each."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
