"""Math verifier: a table of equivalent / non-equivalent answers, boxed extraction, the worker
process time limit, and the synthetic checker behind the same Verifier interface."""

import threading
import time

import pytest

from gopd_mega.verify import MathVerifier, SyntheticVerifier, Verdict, grade, last_boxed, verify_batch
from gopd_mega.verify.workers import CRASHED, OK, TIMEOUT, TimedWorker

# (gold, response, expected verdict)
TABLE = [
    # fractions and decimals
    (r"\frac{1}{2}", r"The answer is $\boxed{\frac{1}{2}}$.", True),
    (r"\frac{1}{2}", r"so \boxed{0.5}", True),
    (r"\frac{1}{2}", r"\boxed{1/2}", True),
    ("0.5", r"\boxed{\dfrac{1}{2}}", True),
    (r"\frac{1}{2}", r"\boxed{\frac{1}{3}}", False),
    ("033", r"\boxed{33}", True),
    (r"10\%", r"\boxed{10\%}", True),
    # symbolic LaTeX
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\frac{1}{\sqrt{2}}}", True),
    ("x^2+2x+1", r"\boxed{(x+1)^2}", True),
    ("x^2+2x+1", r"\boxed{(x-1)^2}", False),
    (r"\pi", r"\boxed{3}", False),
    ("2", r"\boxed{x=2}", True),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", True),
    # intervals, sets, tuples
    ("(1,2]", r"\boxed{(1,2]}", True),
    ("(1,2]", r"\boxed{[1,2]}", False),
    ("(1,2]", r"\boxed{(1,2)}", False),
    (r"\{1,2\}", r"\boxed{\{2,1\}}", True),
    (r"\{1,2\}", r"\boxed{\{1,3\}}", False),
    # units
    ("5", r"\boxed{5\text{ cm}}", True),
    ("5", r"\boxed{5 \text{cm}}", True),
    ("5", r"\boxed{6\text{ cm}}", False),
    # the LAST box counts; unboxed answers
    ("204", r"first \boxed{3}, finally \boxed{204}", True),
    ("3", r"first \boxed{3}, finally \boxed{204}", False),
    ("204", "204", True),
    (r"\frac{1}{2}", "1/2", True),
    ("[1,2]", "[1,2]", True),
    ("204", "no answer here", False),
]


@pytest.mark.parametrize("gold,response,expected", TABLE)
def test_grade_table(gold, response, expected):
    out = grade(gold, response)
    assert out["passed"] is expected, out


def test_last_boxed_nested_and_last():
    assert last_boxed(r"a \boxed{1} b \boxed{\frac{1}{\{2\}}} c") == r"\frac{1}{\{2\}}"
    assert last_boxed(r"\boxed 7$") == "7"
    assert last_boxed(r"\fbox{x}") == "x"
    assert last_boxed(r"\boxed{1} then \boxed{2") == "1"  # the unterminated last box is skipped
    assert last_boxed("none") is None


def test_require_boxed_and_unparsable_gold():
    assert grade("2", "2", require_boxed=True)["passed"] is False
    assert "no \\boxed" in grade("2", "2", require_boxed=True)["error"]
    assert "could not be parsed" in grade("", r"\boxed{2}")["error"]


def test_math_verifier_worker_process_and_batch_from_threads():
    v = MathVerifier(workers=2, timeout_s=20)
    try:
        records = [{"answer": "1/2"}, {"answer": 204}, {"answer": "(1,2]"}]
        responses = [r"\boxed{0.5}", r"\boxed{205}", r"\boxed{(1,2]}"]
        verdicts = verify_batch(v, records, responses)
        assert [x.passed for x in verdicts] == [True, False, True]
        assert [x.reward for x in verdicts] == [1.0, 0.0, 1.0]
        assert verdicts[0].details["extracted"] == "0.5"
        # callable from a non-main thread (math-verify's signal.alarm would refuse there)
        got = []
        t = threading.Thread(target=lambda: got.append(v({"answer": "3"}, r"\boxed{3}")))
        t.start(); t.join()
        assert got[0].passed
        with pytest.raises(KeyError, match="'answer'"):
            v({"solution": "3"}, "3")
    finally:
        v.close()


def test_timed_worker_kills_an_overrun_and_recovers():
    w = TimedWorker("time:sleep")
    try:
        assert w.call(0, timeout_s=30) == (OK, None)  # includes the worker start
        pid = w.pid
        t0 = time.monotonic()
        assert w.call(60, timeout_s=0.5) == (TIMEOUT, None)
        assert time.monotonic() - t0 < 10
        assert w.pid is None  # killed
        import os
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert w.call(0, timeout_s=30) == (OK, None)  # a fresh worker
        status, msg = w.call("x", timeout_s=30)
        assert status == CRASHED and "TypeError" in msg
    finally:
        w.close()


def test_synthetic_checker_plugs_into_the_interface():
    v = SyntheticVerifier()
    ok = v({"prompt": "47+38=", "opd_teacher": "add"}, " 85 ")
    bad = v({"prompt": "12*3=", "opd_teacher": "mul"}, "35")
    assert isinstance(ok, Verdict) and ok.passed and ok.reward == 1.0
    assert not bad.passed and bad.details["expected"] == "36"
