"""Time-limited worker processes for verifiers that may hang (math-verify's sympy calls).

math-verify bounds its own work with ``signal.alarm``, which only works in a process's main
thread; the math verifier therefore runs it with its time-outs disabled inside a
:class:`TimedWorker` process and bounds each call from outside: a call that overruns gets its
worker killed (SIGKILL) and a fresh one started for the next call. :class:`WorkerPool` runs
calls on several workers in parallel (one thread per worker, each waiting on its own pipe), so
callers may be multi-threaded.

A worker is a fresh ``python`` running :func:`_serve` for ``package.module:function``: a fresh interpreter
(nothing of the caller is inherited or re-imported, unlike multiprocessing's spawn) that reads one
JSON array of arguments per line on stdin and answers one JSON line ``[status, value]`` on its
original stdout (the function's own prints go to stderr). Arguments and results must be JSON.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

OK, TIMEOUT, CRASHED = "ok", "timeout", "crashed"


def _serve(target: str) -> None:
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # prints of the function must not corrupt the protocol
    sys.stdout = sys.stderr
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    for line in sys.stdin:
        try:
            reply = [OK, fn(*json.loads(line))]
        except Exception as exc:  # noqa: BLE001 - the caller decides; the worker lives on
            reply = [CRASHED, f"{type(exc).__name__}: {exc}"]
        out.write(json.dumps(reply) + "\n")
        out.flush()


_WORKER_MAIN = "import sys; from gopd_mega.verify.workers import _serve; _serve(sys.argv[1])"


class TimedWorker:
    """One worker process running ``target`` on request, each call limited to ``timeout_s``."""

    def __init__(self, target: str, start_timeout_s: float = 60.0):
        self.target = target
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._buf = b""

    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_MAIN, self.target], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self._buf = b""

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc.stdin.close()  # type: ignore[union-attr]  # started above, with pipes  # type: ignore[union-attr]  # started above, with pipes
            self._proc.stdout.close()  # type: ignore[union-attr]  # started above, with pipes  # type: ignore[union-attr]  # started above, with pipes
        self._proc = None

    def _read_line(self, deadline: float) -> bytes | None:
        fd = self._proc.stdout.fileno()  # type: ignore[union-attr]  # started above, with pipes  # type: ignore[union-attr]  # started above, with pipes
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError("worker closed its output")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def call(self, *args: Any, timeout_s: float) -> tuple[str, Any]:
        """(status, value): (OK, result), (TIMEOUT, None) or (CRASHED, message). The first call
        also waits for the worker to import its module (up to ``start_timeout_s`` more)."""
        extra = 0.0
        if self._proc is None or self._proc.poll() is not None:
            self._kill()
            self._start()
            extra = self.start_timeout_s
        try:
            self._proc.stdin.write((json.dumps(list(args)) + "\n").encode())  # type: ignore[union-attr]  # started above, with pipes  # type: ignore[union-attr]  # started above, with pipes
            self._proc.stdin.flush()  # type: ignore[union-attr]  # started above, with pipes  # type: ignore[union-attr]  # started above, with pipes
            line = self._read_line(time.monotonic() + timeout_s + extra)
        except (EOFError, OSError) as exc:
            code = self._proc.poll()  # type: ignore[union-attr]  # started above, with pipes  # type: ignore[union-attr]  # started above, with pipes
            self._kill()
            return CRASHED, f"worker process died (exit code {code}): {exc}"
        if line is None:
            self._kill()
            return TIMEOUT, None
        status, value = json.loads(line)
        return status, value

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        self._kill()


class WorkerPool:
    """``workers`` :class:`TimedWorker` processes; :meth:`map` spreads calls over them."""

    def __init__(self, target: str, workers: int = 1):
        if workers < 1:
            raise ValueError(f"WorkerPool: workers must be >= 1, got {workers}")
        self._idle = [TimedWorker(target) for _ in range(workers)]
        self._all = list(self._idle)
        self._lock = threading.Lock()
        self._ready = threading.Semaphore(workers)
        self.workers = workers

    def call(self, *args: Any, timeout_s: float) -> tuple[str, Any]:
        with self._ready:
            with self._lock:
                worker = self._idle.pop()
            try:
                return worker.call(*args, timeout_s=timeout_s)
            finally:
                with self._lock:
                    self._idle.append(worker)

    def map(self, arg_tuples: Sequence[tuple], timeout_s: float) -> list[tuple[str, Any]]:
        with ThreadPoolExecutor(self.workers) as ex:
            return list(ex.map(lambda a: self.call(*a, timeout_s=timeout_s), arg_tuples))

    def close(self) -> None:
        for w in self._all:
            w.close()
