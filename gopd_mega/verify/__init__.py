"""Verifiers: ``verifier(record, response_text) -> Verdict(reward, passed, details)``.

* gopd_mega/verify/base.py       Verdict, the Verifier protocol, verify_batch
* gopd_mega/verify/math.py       MathVerifier: last \\boxed{} answer vs the gold with math-verify
* gopd_mega/verify/code.py       CodeVerifier: the response's program on unit tests, in the sandbox
* gopd_mega/verify/sandbox.py    run_tests: namespaces, rlimits, own uid, killed whole at the timeout
* gopd_mega/verify/synthetic.py  SyntheticVerifier: the arithmetic domains' exact-match check
* gopd_mega/verify/workers.py    time-limited worker processes (math-verify may hang)
"""

from gopd_mega.verify.base import Verdict, Verifier, verify_batch
from gopd_mega.verify.code import CodeVerifier, extract_code, normalize_tests
from gopd_mega.verify.math import MathVerifier, grade, last_boxed
from gopd_mega.verify.sandbox import CodeResult, IsolationUnavailable, SandboxLimits, run_tests
from gopd_mega.verify.synthetic import SyntheticVerifier

__all__ = [
    "CodeResult",
    "CodeVerifier",
    "IsolationUnavailable",
    "MathVerifier",
    "SandboxLimits",
    "SyntheticVerifier",
    "Verdict",
    "Verifier",
    "extract_code",
    "grade",
    "last_boxed",
    "normalize_tests",
    "run_tests",
    "verify_batch",
]
