"""Sandbox: hostile programs are contained, get a clear verdict and leave nothing behind; correct
and incorrect programs in stdin/stdout, function-call and assertion styles."""

import glob
import os
import socket
import tempfile

import pytest

from gopd_mega.verify import CodeVerifier, IsolationUnavailable, SandboxLimits, extract_code, run_tests
from gopd_mega.verify import sandbox
from gopd_mega.verify.sandbox import SANDBOX_UID_BASE, SANDBOX_UID_SPAN

pytestmark = pytest.mark.skipif(sandbox.isolation_error() is not None,
                                reason=f"sandbox isolation unavailable: {sandbox.isolation_error()}")

EMPTY = [{"stdin": "", "expected_stdout": "done"}]
# Programs meant to finish get a generous wall time: the test machine may be heavily loaded.
ROOMY = SandboxLimits(timeout_s=60)


def _sandbox_state():
    """(processes owned by sandbox uids or children of this process, sandbox temporary dirs)."""
    procs = []
    for status in glob.glob("/proc/[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in open(status).read().splitlines() if ":\t" in line)
        except (OSError, ValueError):
            continue
        uid = int(fields.get("Uid", "0").split()[0])
        if SANDBOX_UID_BASE <= uid < SANDBOX_UID_BASE + SANDBOX_UID_SPAN or fields.get("PPid", "").strip() == str(os.getpid()):
            procs.append((status, fields.get("Name", "").strip(), uid))
    return procs, set(glob.glob(os.path.join(tempfile.gettempdir(), "gopd-sbx-*")))


@pytest.fixture
def leaves_nothing():
    procs_before, dirs_before = _sandbox_state()  # e.g. worker processes other tests left behind
    yield
    procs, dirs_after = _sandbox_state()
    procs = [p for p in procs if p not in procs_before]
    assert procs == [], f"processes left running: {procs}"
    assert dirs_after - dirs_before == set(), f"temporary directories left: {dirs_after - dirs_before}"


def _run(program, tests=EMPTY, **limits):
    # 30 s: hostile programs meet their own limit (or finish) long before; only the tests that
    # expect a time-out set a short one.
    return run_tests(program, tests, SandboxLimits(**{"timeout_s": 30.0, **limits}))


def test_infinite_loop(leaves_nothing):
    r = _run("while True:\n    pass\n", timeout_s=2.0)
    assert not r.passed and r.tests[0]["status"] == "timeout" and r.tests[0]["limit"] in ("wall_time", "cpu_time")


def test_sleeping_background_children_are_killed(leaves_nothing):
    # A daemon in its own session outlives the program's exit: the pid namespace ends it.
    r = _run("import os, time\nif os.fork() == 0:\n    os.setsid(); time.sleep(60)\nprint('done')\n")
    assert r.passed and r.tests[0]["status"] == "passed"


def test_fork_bomb(leaves_nothing):
    r = _run("import os\nwhile True:\n    os.fork()\n", max_processes=16, timeout_s=3.0)
    t = r.tests[0]
    assert not r.passed and t["limit"] in ("processes", "wall_time", "cpu_time"), t


def test_memory_hog(leaves_nothing):
    r = _run("a = []\nwhile True:\n    a.append(bytearray(1 << 24))\n", memory_mb=256)
    assert not r.passed and r.tests[0]["limit"] == "memory", r.tests[0]


def test_write_outside_the_temporary_directory(leaves_nothing):
    target = os.path.join(tempfile.gettempdir(), f"gopd_sandbox_escape_{os.getpid()}")
    prog = (f"import os\nopen('inside.txt', 'w').write('ok')\nopen({target!r}, 'w').write('escaped')\n"
            "print('done')\n")
    r = _run(prog)
    assert not os.path.exists(target)
    assert not r.passed and r.tests[0]["status"] == "runtime_error"
    assert "Read-only file system" in r.tests[0]["stderr_tail"] or "Permission denied" in r.tests[0]["stderr_tail"]


def test_no_network(leaves_nothing):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        prog = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('done')\n"
        r = _run(prog)
        assert not r.passed and r.tests[0]["status"] == "runtime_error"
        assert "unreachable" in r.tests[0]["stderr_tail"] or "refused" in r.tests[0]["stderr_tail"]
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever connected
    finally:
        server.close()


def test_huge_output(leaves_nothing):
    r = _run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", max_output_bytes=1 << 20)
    assert not r.passed and r.tests[0]["limit"] == "output"


def test_huge_file(leaves_nothing):
    r = _run("f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * (1 << 20))\n", file_size_mb=4)
    assert not r.passed and r.tests[0]["limit"] == "file_size", r.tests[0]


def test_program_killing_its_parent(leaves_nothing):
    # Its parent is pid 1 of its pid namespace (our root-owned waiter): EPERM. kill(-1) reaches
    # only processes of its own uid (none but itself, which kill(-1) skips: ESRCH).
    prog = ("import os, signal\n"
            "for pid in (os.getppid(), 1, -1):\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError as e:\n        print('denied', pid, e.errno)\n"
            "print('done')\n")
    expected = "denied 1 1\ndenied 1 1\ndenied -1 3\ndone\n"
    r = _run(prog, tests=[{"stdin": "", "expected_stdout": expected}] * 2)
    assert r.passed and [t["status"] for t in r.tests] == ["passed", "passed"], r.tests
    # A program that does kill every process it can (a fork, then kill(-1) from the child) only
    # kills itself; the verdict still comes back for every test.
    prog = "import os, signal, time\nif os.fork() == 0:\n    os.kill(-1, signal.SIGKILL)\n    time.sleep(5)\ntime.sleep(5)\n"
    r = _run(prog, tests=[{"stdin": "", "expected_stdout": "done"}] * 2)
    assert [t["signal"] for t in r.tests] == ["SIGKILL", "SIGKILL"], r.tests


def test_stdin_stdout_style():
    prog = "n = int(input())\nprint(n * 2)\nprint()\n"
    r = run_tests(prog, [{"stdin": "3\n", "expected_stdout": "6"}, {"stdin": "5", "expected_stdout": "10  \n"},
                         {"stdin": "5", "expected_stdout": "11"}], ROOMY)
    assert [t["status"] for t in r.tests] == ["passed", "passed", "wrong_answer"] and not r.passed
    assert run_tests(prog, [{"stdin": "1", "expected_stdout": "2"}], ROOMY).passed


def test_function_call_style():
    prog = "class Solution:\n    def f(self, a, b):\n        return [a + b, a / b]\n"
    r = run_tests(prog, [{"fn": "f", "args": [1, 3], "expected": [4, 0.3333333333]},
                         {"fn": "f", "args": [2, 2], "expected": [4, 1]},
                         {"fn": "f", "args": [2, 2], "expected": [5, 1]},
                         {"fn": "g", "args": [], "expected": None}], ROOMY)
    assert [t["status"] for t in r.tests] == ["passed", "passed", "wrong_answer", "runtime_error"]
    top = run_tests("def add(a, b):\n    print('noise')\n    return a + b\n", [{"fn": "add", "args": [2, 3], "expected": 5}], ROOMY)
    assert top.passed  # prints of the function do not disturb the result
    early_exit = run_tests("import sys\ndef add(a, b):\n    sys.exit(0)\n", [{"fn": "add", "args": [2, 3], "expected": 5}])
    assert not early_exit.passed


def test_assertion_style_and_stop_on_failure():
    prog = "def add(a, b):\n    return a + b\n"
    r = run_tests(prog, [{"test_code": "assert add(1, 2) == 3"}, {"test_code": "assert add(1, 2) == 4"},
                         {"test_code": "assert add(0, 0) == 0"}], SandboxLimits(timeout_s=60, stop_on_failure=True))
    assert [t["status"] for t in r.tests] == ["passed", "runtime_error", "skipped"]
    assert not run_tests("import sys\nsys.exit(0)\n", [{"test_code": "assert False"}]).passed


def test_code_verifier_extracts_the_last_python_block():
    resp = "Plan:\n```text\nnot code\n```\n```python\nprint(1)\n```\nthen\n```python\nprint(input()[::-1])\n```\n"
    assert extract_code(resp).strip() == "print(input()[::-1])"
    v = CodeVerifier(workers=2, limits=ROOMY)
    recs = [{"tests": [{"stdin": "abc", "expected_stdout": "cba"}]}, {"tests": [{"stdin": "ab", "expected_stdout": "ab"}]}]
    verdicts = v.batch(recs, [resp, resp])
    assert [x.passed for x in verdicts] == [True, False]
    assert verdicts[1].details["tests"][0]["status"] == "wrong_answer"


def test_bad_tests_and_refusal_without_isolation(monkeypatch):
    with pytest.raises(ValueError, match=r"tests\[0\]\.expected_stdout"):
        run_tests("print(1)", [{"stdin": ""}])
    with pytest.raises(ValueError, match="unknown test style"):
        run_tests("print(1)", [{"input": "1"}])
    monkeypatch.setattr(sandbox, "_ISOLATION", "no namespaces here")
    with pytest.raises(IsolationUnavailable, match="no namespaces here.*--no-isolation"):
        run_tests("print(1)", [{"stdin": "", "expected_stdout": "1"}])
    # The explicit opt-out runs (rlimits, session, temporary directory only) and still times out.
    r = run_tests("print(1)", [{"stdin": "", "expected_stdout": "1"}], SandboxLimits(isolate=False, timeout_s=60))
    assert r.passed
    r = run_tests("while True: pass", [{"stdin": "", "expected_stdout": "1"}], SandboxLimits(isolate=False, timeout_s=1))
    assert r.tests[0]["status"] == "timeout"


def test_apps_style_ground_truth_as_in_the_paper_code_data():
    from gopd_mega.verify import normalize_tests

    stdin = normalize_tests('{"inputs": ["1 2\\n", ["3", "4"]], "outputs": ["3\\n", ["7"]]}')
    assert stdin == [{"stdin": "1 2\n", "expected_stdout": "3\n"}, {"stdin": "3\n4", "expected_stdout": "7"}]
    call = normalize_tests({"inputs": [[1, 2], [5, 5]], "outputs": [[3], 10], "fn_name": "add"})
    assert call[0] == {"fn": "add", "args": [1, 2], "expected": [3], "expected_any": [[3], 3]}
    with pytest.raises(ValueError, match="answer.*same length"):
        normalize_tests({"inputs": [1], "outputs": []}, "answer")
    v = CodeVerifier(tests_field="answer", limits=ROOMY)
    rec = {"answer": '{"inputs": [[1, 2], [5, 5]], "outputs": [[3], 10], "fn_name": "add"}'}
    assert v(rec, "```python\ndef add(a, b):\n    return a + b\n```").passed
    assert not v(rec, "```python\ndef add(a, b):\n    return a - b\n```").passed
