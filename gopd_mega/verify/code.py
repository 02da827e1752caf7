"""Code responses graded by running them on unit tests in the sandbox (gopd_mega.verify.sandbox).

The program is the LAST fenced code block of the response (```python ... ``` or ``` ... ```), or
the whole response when it has no fence; ``record[code_prefix_field]`` (e.g. the imports of a
HumanEval prompt) is prepended when present. ``record[tests_field]`` is a list of sandbox tests
(stdin/stdout, function-call or assertion style); the evaluation loaders build it from each
benchmark's published format. Passed = every test passed.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from gopd_mega.verify.base import Verdict
from gopd_mega.verify.sandbox import SandboxLimits, run_tests

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    """The last fenced code block (a python-tagged or untagged one preferred over other languages),
    or the whole response without fences."""
    blocks = _FENCE.findall(response)
    if not blocks:
        return response
    python = [code for lang, code in blocks if lang.lower() in ("", "python", "py", "python3")]
    return (python or [code for _, code in blocks])[-1]


@dataclass
class CodeVerifier:
    """Runs the response's program on the record's tests, contained (see the sandbox module)."""

    tests_field: str = "tests"
    """Record field holding the list of sandbox tests."""
    code_prefix_field: str = "code_prefix"
    """Optional record field prepended to the program (imports the prompt provided)."""
    limits: SandboxLimits = field(default_factory=lambda: SandboxLimits(stop_on_failure=True))
    """Per-test limits; by default the remaining tests are skipped after the first failure."""
    workers: int = 4
    """Programs run in parallel by :meth:`batch` (each in its own supervisor process)."""

    def program(self, record: dict, response: str) -> str:
        prefix = record.get(self.code_prefix_field) or ""
        return (prefix + "\n" if prefix else "") + extract_code(response)

    def __call__(self, record: dict, response: str) -> Verdict:
        if self.tests_field not in record:
            raise KeyError(f"CodeVerifier: record has no {self.tests_field!r} field (keys: {sorted(record)})")
        result = run_tests(self.program(record, response), record[self.tests_field], self.limits)
        details = result.to_json()
        details.pop("passed")
        n_pass = sum(t["passed"] for t in result.tests)
        return Verdict.of(result.passed, tests_passed=n_pass, tests_total=len(record[self.tests_field]), **details)

    def batch(self, records: Sequence[dict], responses: Sequence[str]) -> list[Verdict]:
        with ThreadPoolExecutor(self.workers) as ex:
            return list(ex.map(self, records, responses))
