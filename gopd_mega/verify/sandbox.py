"""Run untrusted Python programs against unit tests, contained.

Process chain of one :func:`run_tests` call (generated code never runs outside it):

    caller --Popen(new session)--> supervisor (python, JSON job on stdin, JSON result on stdout)
      per test:  supervisor --fork--> A: unshare(NEWNS | NEWNET | NEWPID); every mount re-bound
                                         read-only except the test's temporary directory
                 A --fork--> B: pid 1 of the new pid namespace (root, our code): waits for C,
                                reports C's exit status and CPU time, exits
                 B --fork--> C: the candidate: own session, cwd = fresh temporary directory,
                                rlimits (CPU, address space, file size, processes, open files),
                                an unprivileged uid of its own, then exec python
Contained because
  * no network: a fresh network namespace has no interface up (connect() fails at once);
  * no writes outside its directory: all other mounts are read-only in its mount namespace, and
    it is not root;
  * it cannot kill anything that matters: its uid owns no other process; kill(getppid()) hits B
    (root: EPERM); the supervisor and the caller live outside its pid namespace;
  * nothing survives: when C ends, B exits, and the kernel kills every process left in the pid
    namespace (fork-bomb children, daemons that called setsid); at the wall timeout or output cap
    the supervisor SIGKILLs B with the same effect; the directory is then removed;
  * a hung or killed supervisor still yields a verdict: the caller waits with a deadline and kills
    the supervisor's whole process group.
Isolation needs root (CAP_SYS_ADMIN for the namespaces, setuid). Where it is unavailable the run is
refused unless ``isolate=False`` (CLI: --no-isolation) is passed explicitly; then only the session,
rlimits and the temporary directory apply.

Test styles (each a dict; TESTS.json of gopd-verify is a list of them):
  stdin/stdout  {"stdin": str, "expected_stdout": str}: compared line by line, whitespace around
                each line and trailing blank lines ignored (as LiveCodeBench does)
  function call {"fn": name, "args": [...], "expected": value}: ``name`` is a top-level function
                or a method of ``class Solution`` (LiveCodeBench); the JSON result is compared
                with ``expected`` (lists = tuples; floats to 1e-6 relative / absolute); an optional
                ``expected_any`` list accepts any of its values instead
  assertions    {"test_code": str}: the program followed by ``test_code`` (e.g. evalplus
                ``check(candidate)`` code) must exit 0 and reach its end
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
SANDBOX_UID_BASE = 3_000_000
"""Candidates run as uid/gid SANDBOX_UID_BASE + k (k < SANDBOX_UID_SPAN), owned by nothing else."""
SANDBOX_UID_SPAN = 1_000_000
_SENTINEL = "__gopd_sandbox_done_7f3a__"

LIMITS = ("wall_time", "cpu_time", "memory", "processes", "file_size", "output")


class IsolationUnavailable(RuntimeError):
    """The namespaces / uid switch cannot be set up here (and isolate=False was not given)."""


@dataclass
class SandboxLimits:
    """Resource limits of one test run."""

    timeout_s: float = 6.0
    """Wall-clock limit per test (seconds); the whole process tree is killed at it."""
    cpu_s: float | None = None
    """RLIMIT_CPU per process (seconds); None: the wall timeout rounded up."""
    memory_mb: int = 2048
    """RLIMIT_AS (address space) per process, MiB."""
    file_size_mb: int = 16
    """RLIMIT_FSIZE: largest file the program may write, MiB."""
    max_processes: int = 32
    """RLIMIT_NPROC: processes of the candidate's own uid (a fork bomb stops here)."""
    max_output_bytes: int = 1 << 20
    """stdout + stderr bytes kept; more kills the run (limit 'output')."""
    isolate: bool = True
    """Network/mount/pid namespaces and an unprivileged uid (root needed). False runs WITHOUT
    them (rlimits, session and temporary directory only): an explicit opt-out."""
    stop_on_failure: bool = False
    """Skip the remaining tests after the first failing one (they are reported as 'skipped')."""

    def validate(self) -> None:
        for name in ("timeout_s", "memory_mb", "file_size_mb", "max_processes", "max_output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)}")
        if self.cpu_s is not None and self.cpu_s <= 0:
            raise ValueError(f"SandboxLimits.cpu_s must be > 0 or None, got {self.cpu_s}")


# ----------------------------------------------------------------------------- caller side


def check_tests(tests: Any, where: str = "tests") -> list[dict]:
    """Validate a list of tests (see the module docstring); errors name the index and field."""
    if not isinstance(tests, list) or not tests:
        raise ValueError(f"{where}: expected a non-empty list of tests, got {type(tests).__name__}")
    for i, t in enumerate(tests):
        if not isinstance(t, dict):
            raise ValueError(f"{where}[{i}]: a test must be an object, got {type(t).__name__}")
        if "stdin" in t or "expected_stdout" in t:
            for k in ("stdin", "expected_stdout"):
                if not isinstance(t.get(k), str):
                    raise ValueError(f"{where}[{i}].{k}: must be a string")
        elif "fn" in t:
            if not isinstance(t["fn"], str) or not isinstance(t.get("args"), list) or "expected" not in t:
                raise ValueError(f"{where}[{i}]: a function-call test needs 'fn' (str), 'args' (list) and 'expected'")
        elif "test_code" in t:
            if not isinstance(t["test_code"], str):
                raise ValueError(f"{where}[{i}].test_code: must be a string")
        else:
            raise ValueError(
                f"{where}[{i}]: unknown test style (keys {sorted(t)}); expected stdin/expected_stdout, "
                "fn/args/expected or test_code"
            )
    return tests


@dataclass
class CodeResult:
    """Outcome of one program on its tests."""

    passed: bool
    tests: list[dict] = field(default_factory=list)
    """Per test: index, status ('passed', 'wrong_answer', 'runtime_error', 'timeout', 'limit',
    'skipped'), limit (None or one of LIMITS), exit_code, signal, time_s, stdout/stderr heads."""
    error: str | None = None
    """Set when the sandbox itself failed (then no test ran or finished)."""

    def to_json(self) -> dict:
        return asdict(self)


_SUPERVISOR_MAIN = "from gopd_mega.verify.sandbox import _supervise; _supervise()"


def run_tests(program: str, tests: list[dict], limits: SandboxLimits | None = None) -> CodeResult:
    """Run ``program`` (Python source) on ``tests`` in a fresh supervisor process; see the module
    docstring. Raises :class:`IsolationUnavailable` when isolation is asked for but impossible."""
    limits = limits or SandboxLimits()
    limits.validate()
    check_tests(tests)
    if limits.isolate:
        require_isolation()
    job = json.dumps({"program": program, "tests": tests, "limits": asdict(limits)}).encode()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    # The supervisor needs about the sum of the test timeouts plus process start-ups.
    budget = len(tests) * (limits.timeout_s + 5.0) + 60.0
    proc = subprocess.Popen(
        [sys.executable, "-c", _SUPERVISOR_MAIN],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(job, timeout=budget)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.communicate()
        return CodeResult(False, error=f"sandbox supervisor overran its {budget:.0f} s budget and was killed")
    if proc.returncode != 0 or not out:
        tail = err.decode(errors="replace")[-500:]
        return CodeResult(False, error=f"sandbox supervisor failed (exit {proc.returncode}): {tail}")
    data = json.loads(out)
    if data.get("isolation_error"):
        raise IsolationUnavailable(data["isolation_error"])
    return CodeResult(**data)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


_ISOLATION: str | bool | None = False  # False: not probed yet; None: works; str: why not


def isolation_error() -> str | None:
    """None if namespaces + uid switch work here, else why not (probed once per process)."""
    global _ISOLATION
    if _ISOLATION is False:
        if os.geteuid() != 0:
            _ISOLATION = f"sandbox isolation needs root (euid is {os.geteuid()})"
        else:
            probe = subprocess.run(
                [sys.executable, "-c", "from gopd_mega.verify.sandbox import _probe; _probe()"],
                capture_output=True,
                text=True,
                timeout=60,
                env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)),
            )
            _ISOLATION = None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["probe failed"])[-1]
    return _ISOLATION  # type: ignore[return-value]  # probed above: never False here


def require_isolation() -> None:
    why = isolation_error()
    if why is not None:
        raise IsolationUnavailable(
            f"{why}; refusing to run generated code without isolation "
            "(pass isolate=False / --no-isolation to accept that risk)"
        )


def _probe() -> None:
    """Exit 0 iff a trivial program runs and passes through the whole isolated path (namespaces,
    read-only mounts, uid switch, exec of this Python); otherwise say why on stderr."""
    try:
        res = _run_one("print('ok')", {"stdin": "", "expected_stdout": "ok"}, SandboxLimits(timeout_s=60))
    except (OSError, IsolationUnavailable) as exc:
        sys.exit(f"sandbox isolation failed: {exc}")
    if not res["passed"]:
        sys.exit(f"sandbox isolation probe program failed ({res['status']}): {res['stderr_tail'].strip()[-300:]}")


# ------------------------------------------------------------------------- supervisor side

_libc = None


def _libc_call(name: str, *args) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(
            err, f"{name}{tuple(a.decode() if isinstance(a, bytes) else a for a in args)}: {os.strerror(err)}"
        )


def _mount_points() -> list[tuple[str, int]]:
    """(mount point, flags to keep) of every mount, from /proc/self/mountinfo."""
    keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            point = parts[4].encode().decode("unicode_escape")  # '\040' -> ' '
            flags = sum(keep.get(o, 0) for o in parts[5].split(","))
            out.append((point, flags))
    return out


def _enter_namespaces(workdir: str) -> None:
    """In the (single-threaded) caller: new mount/net/pid namespaces; all mounts read-only except
    ``workdir`` (bound onto itself, read-write). The NEXT child is pid 1 of the new namespace."""
    _libc_call("unshare", CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID)
    _libc_call("mount", None, b"/", None, MS_REC | MS_PRIVATE, None)
    _libc_call("mount", workdir.encode(), workdir.encode(), None, MS_BIND, None)
    _expose_python()
    for point, flags in _mount_points():
        if point == workdir:
            continue
        try:
            _libc_call("mount", None, point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None)
        except OSError:
            # A mount point hidden under another mount (stacked entries) cannot be reached; the
            # root file system and the world-writable places must be read-only, though.
            if point in ("/", "/tmp", "/var/tmp", "/dev/shm") and _writable(point):
                raise
    for point in ("/", "/tmp", "/dev/shm"):
        if os.path.isdir(point) and _writable(point):
            raise OSError(f"{point} is still writable inside the sandbox's mount namespace")


def _expose_python() -> None:
    """The candidate (not root) must reach the Python installation, e.g. /root/.pyenv/... under a
    0700 /root: a blocking directory is covered with an empty tmpfs (also hiding its other contents)
    into which only the installation directories are bound."""
    blocked: dict[str, list[str]] = {}
    for target in {
        os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)))
    }:
        cur = "/"
        for comp in target.strip("/").split("/"):
            cur = os.path.join(cur, comp)
            if cur != target and not os.stat(cur).st_mode & 0o001:
                blocked.setdefault(cur, []).append(target)
                break
    for cover, targets in blocked.items():
        fds = {t: os.open(t, os.O_PATH) for t in targets}
        _libc_call("mount", b"tmpfs", cover.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=1m")
        for t, fd in fds.items():
            os.makedirs(t, exist_ok=True)
            _libc_call("mount", f"/proc/self/fd/{fd}".encode(), t.encode(), None, MS_BIND | MS_REC, None)
            os.close(fd)


def _writable(point: str) -> bool:
    return not (os.statvfs(point).f_flag & os.ST_RDONLY)


def _supervise() -> None:
    job = json.loads(sys.stdin.buffer.read())
    limits = SandboxLimits(**job["limits"])
    results: list[dict] = []
    failed = False
    for i, test in enumerate(job["tests"]):
        if failed and limits.stop_on_failure:
            results.append({"index": i, "passed": False, "status": "skipped", "limit": None})
            continue
        try:
            res = _run_one(job["program"], test, limits)
        except IsolationUnavailable as exc:
            sys.stdout.write(json.dumps({"isolation_error": str(exc)}))
            return
        res["index"] = i
        results.append(res)
        failed = failed or not res["passed"]
    sys.stdout.write(json.dumps({"passed": all(r["passed"] for r in results), "tests": results}))


_DRIVER_FN = """\
import json, sys
_out = sys.stdout
sys.stdout = sys.stderr
_ns = {"__name__": "__candidate__"}
exec(compile(open("program.py").read(), "program.py", "exec"), _ns)
_spec = json.load(open("call.json"))
_fn = _ns.get(_spec["fn"])
if _fn is None and "Solution" in _ns:
    _fn = getattr(_ns["Solution"](), _spec["fn"])
if _fn is None:
    raise NameError("the program defines no function or Solution method " + repr(_spec["fn"]))
_result = _fn(*_spec["args"])
_out.write(json.dumps(_result, default=repr) + "\\n" + _spec["sentinel"] + "\\n")
_out.flush()
"""


def _write_files(workdir: str, program: str, test: dict) -> list[str]:
    """Files of one test in ``workdir``; returns the script to run."""

    def put(name: str, text: str) -> None:
        with open(os.path.join(workdir, name), "w") as f:
            f.write(text)

    put("program.py", program)
    if "fn" in test:
        put("call.json", json.dumps({"fn": test["fn"], "args": test["args"], "sentinel": _SENTINEL}))
        put("driver.py", _DRIVER_FN)
        return ["driver.py"]
    if "test_code" in test:
        put("driver.py", program + "\n\n" + test["test_code"] + f"\n\nprint({_SENTINEL!r})\n")
        return ["driver.py"]
    return ["program.py"]


def _run_one(program: str, test: dict, limits: SandboxLimits) -> dict:
    uid = SANDBOX_UID_BASE + (os.getpid() * 7919 + time.monotonic_ns()) % SANDBOX_UID_SPAN
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="gopd-sbx-"))
    stdin_file = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    try:
        script = _write_files(workdir, program, test)
        stdin_file.write(test.get("stdin", "").encode())
        stdin_file.seek(0)
        if limits.isolate:
            os.chown(workdir, uid, uid)
            for name in os.listdir(workdir):
                os.chown(os.path.join(workdir, name), uid, uid)
        return _execute(script, workdir, stdin_file.fileno(), uid, limits, test)
    finally:
        stdin_file.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _candidate(
    script: list[str], workdir: str, stdin_fd: int, out_w: int, err_w: int, uid: int | None, limits: SandboxLimits
) -> None:
    """In the forked candidate process: limits, identity, exec. Never returns."""
    try:
        os.setsid()
        os.chdir(workdir)
        os.dup2(stdin_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, 1 << 16)
        cpu = math.ceil(limits.cpu_s or limits.timeout_s)
        mem = limits.memory_mb << 20
        fsize = limits.file_size_mb << 20
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        os.execve(sys.executable, [sys.executable, "-I", "-B", *script], env)
    except BaseException as exc:  # noqa: BLE001
        os.write(2, f"sandbox: could not start the program: {exc}\n".encode())
    os._exit(127)


def _execute(script: list[str], workdir: str, stdin_fd: int, uid: int, limits: SandboxLimits, test: dict) -> dict:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    info_r, info_w = os.pipe()  # A/B -> supervisor: B's pid, then C's status (JSON lines)
    start = time.monotonic()
    if limits.isolate:
        child = os.fork()
        if child == 0:  # A
            os.close(out_r)
            os.close(err_r)
            os.close(info_r)
            try:
                _enter_namespaces(workdir)
            except BaseException as exc:  # noqa: BLE001
                os.write(info_w, (json.dumps({"isolation_error": f"sandbox isolation failed: {exc}"}) + "\n").encode())
                os._exit(1)
            b = os.fork()
            if b == 0:  # B: pid 1 of the new pid namespace
                c = os.fork()
                if c == 0:
                    os.close(info_w)
                    _candidate(script, workdir, stdin_fd, out_w, err_w, uid, limits)
                os.close(out_w)
                os.close(err_w)
                while True:
                    pid, status, ru = os.wait4(-1, 0)
                    if pid == c:
                        break
                os.write(info_w, (json.dumps({"status": status, "cpu_s": ru.ru_utime + ru.ru_stime}) + "\n").encode())
                os._exit(0)  # the kernel now kills whatever is left in the namespace
            os.close(out_w)
            os.close(err_w)
            os.write(info_w, (json.dumps({"pid_b": b}) + "\n").encode())
            os.waitpid(b, 0)
            os._exit(0)
    else:
        child = os.fork()
        if child == 0:
            os.close(out_r)
            os.close(err_r)
            os.close(info_r)
            os.close(info_w)
            _candidate(script, workdir, stdin_fd, out_w, err_w, None, limits)
    os.close(out_w)
    os.close(err_w)
    os.close(info_w)

    info_buf = b""

    def pid_b() -> int | None:
        for line in info_buf.split(b"\n")[:-1]:
            msg = json.loads(line)
            if "isolation_error" in msg:
                raise IsolationUnavailable(msg["isolation_error"])
            if "pid_b" in msg:
                return msg["pid_b"]
        return None

    def kill_tree() -> None:
        nonlocal info_buf
        if not limits.isolate:
            _kill_group(child)
            return
        # A reports B's pid right after forking it; wait for that report if it is still in flight.
        wait_until = time.monotonic() + 10.0
        while pid_b() is None and info_r in open_fds and time.monotonic() < wait_until:
            if select.select([info_r], [], [], 0.5)[0]:
                chunk = os.read(info_r, 1 << 16)
                if not chunk:
                    open_fds.remove(info_r)
                info_buf += chunk
        target = pid_b()
        # B is pid 1 of the namespace: killing it kills everything in it. Without B (A never
        # forked it), A is all there is.
        with contextlib.suppress(ProcessLookupError):
            os.kill(target if target is not None else child, signal.SIGKILL)

    bufs = {out_r: bytearray(), err_r: bytearray()}
    open_fds = [out_r, err_r, info_r]
    deadline = start + limits.timeout_s
    limit = None
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            limit = "wall_time"
            break
        ready, _, _ = select.select(open_fds, [], [], left)
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                open_fds.remove(fd)
            elif fd == info_r:
                info_buf += chunk
                pid_b()  # raises when A could not set up the namespaces
            else:
                bufs[fd] += chunk
        if len(bufs[out_r]) + len(bufs[err_r]) > limits.max_output_bytes:
            limit = "output"
            break
    if limit is not None:
        kill_tree()
        # Read the rest of the info pipe (C's status, if B got to write it) without blocking long.
        while info_r in open_fds and select.select([info_r], [], [], 2.0)[0]:
            chunk = os.read(info_r, 1 << 16)
            if not chunk:
                break
            info_buf += chunk
    elapsed = time.monotonic() - start
    for fd in (out_r, err_r, info_r):
        os.close(fd)
    cpu_s = None
    status = None  # type: ignore[assignment]  # None until C reports
    if limits.isolate:
        os.waitpid(child, 0)  # A
        for line in info_buf.split(b"\n"):
            if line.strip():
                msg = json.loads(line)
                status = msg.get("status", status)
                cpu_s = msg.get("cpu_s", cpu_s)
    else:
        kill_tree()
        _, status, ru = os.wait4(child, 0)
        cpu_s = ru.ru_utime + ru.ru_stime
    return _judge(test, bytes(bufs[out_r]), bytes(bufs[err_r]), status, cpu_s, elapsed, limit, limits)


def _judge(
    test: dict,
    out: bytes,
    err: bytes,
    status: int | None,
    cpu_s: float | None,
    elapsed: float,
    limit: str | None,
    limits: SandboxLimits,
) -> dict:
    stdout = out.decode(errors="replace")
    stderr = err.decode(errors="replace")
    exit_code = sig = None
    if status is not None:
        if os.WIFSIGNALED(status):
            sig = signal.Signals(os.WTERMSIG(status)).name
        else:
            exit_code = os.WEXITSTATUS(status)
    if limit is None:
        cpu_limit = math.ceil(limits.cpu_s or limits.timeout_s)
        if sig == "SIGXCPU" or (sig == "SIGKILL" and cpu_s is not None and cpu_s >= cpu_limit):
            limit = "cpu_time"
        elif sig == "SIGXFSZ" or "File too large" in stderr:
            limit = "file_size"
        elif "MemoryError" in stderr or "Cannot allocate memory" in stderr:
            limit = "memory"
        elif "BlockingIOError" in stderr or "Resource temporarily unavailable" in stderr:
            limit = "processes"
    res: dict[str, Any] = {
        "passed": False,
        "limit": limit,
        "exit_code": exit_code,
        "signal": sig,
        "time_s": round(elapsed, 3),
        "cpu_s": None if cpu_s is None else round(cpu_s, 3),
        "stdout_head": stdout[:200],
        "stderr_tail": stderr[-500:],
    }
    if limit in ("wall_time", "cpu_time"):
        res["status"] = "timeout"
    elif limit is not None:
        res["status"] = "limit"
    elif exit_code != 0:
        res["status"] = "runtime_error"
    else:
        res["passed"] = _output_ok(test, stdout)
        res["status"] = "passed" if res["passed"] else "wrong_answer"
    return res


def _lines(text: str) -> list[str]:
    lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _output_ok(test: dict, stdout: str) -> bool:
    if "fn" in test or "test_code" in test:
        lines = _lines(stdout)
        if not lines or lines[-1] != _SENTINEL:
            return False  # the driver did not reach its end (e.g. the program called exit)
        if "test_code" in test:
            return True
        try:
            got = json.loads(lines[-2]) if len(lines) >= 2 else None
        except json.JSONDecodeError:
            return False
        wanted = test["expected_any"] if "expected_any" in test else [test["expected"]]
        return any(_same(got, json.loads(json.dumps(w))) for w in wanted)
    return _lines(stdout) == _lines(test["expected_stdout"])


def _same(a: Any, b: Any) -> bool:
    """JSON values equal, floats to 1e-6 (relative or absolute)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b
