"""gopd-verify through a subprocess: math and code verdicts as one JSON object, exit statuses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gopd_mega.verify import sandbox

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "gopd_mega.verify.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_math_command():
    ok = _cli("math", r"\frac{1}{2}", r"so the answer is \boxed{0.5}")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["passed"] is True and out["extracted"] == "0.5"
    bad = _cli("math", "(1,2]", r"\boxed{[1,2]}")
    assert bad.returncode == 1 and json.loads(bad.stdout)["passed"] is False


@pytest.mark.skipif(sandbox.isolation_error() is not None, reason="sandbox isolation unavailable here")
def test_code_command(tmp_path):
    prog = tmp_path / "p.py"
    prog.write_text("print(int(input()) + 1)\n")
    tests = tmp_path / "tests.json"
    tests.write_text(json.dumps([{"stdin": "1", "expected_stdout": "2"}, {"stdin": "41\n", "expected_stdout": "42\n"}]))
    r = _cli("code", prog, tests, "--timeout-s", 60)  # roomy: loaded test machines
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["passed"] is True and [t["status"] for t in out["tests"]] == ["passed", "passed"]
    loop = tmp_path / "loop.py"
    loop.write_text("while True:\n    pass\n")
    r = _cli("code", loop, tests, "--timeout-s", "1", "--stop-on-failure")
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["passed"] is False
    assert out["tests"][0]["status"] == "timeout" and out["tests"][0]["limit"] in ("wall_time", "cpu_time")
    assert out["tests"][1]["status"] == "skipped"


def test_code_command_bad_input(tmp_path):
    prog = tmp_path / "p.py"
    prog.write_text("print(1)\n")
    r = _cli("code", prog, tmp_path / "missing.json")
    assert r.returncode == 2 and "missing.json: no such file" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('[{"stdin": "1"}]')
    r = _cli("code", prog, bad)
    assert r.returncode == 2 and "bad.json[0].expected_stdout" in r.stderr
