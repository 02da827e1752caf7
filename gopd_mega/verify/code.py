"""Code responses graded by running them on unit tests in the sandbox (gopd_mega.verify.sandbox).

The program is the LAST fenced code block of the response (```python ... ``` or ``` ... ```), or
the whole response when it has no fence; ``record[code_prefix_field]`` (e.g. the imports of a
HumanEval prompt) is prepended when present. ``record[tests_field]`` holds the tests, as
  * a list of sandbox tests (stdin/stdout, function-call or assertion style; the evaluation
    loaders build these from each benchmark's published format), or
  * APPS-style ``{"inputs": [...], "outputs": [...], "fn_name"?: str}`` (the ground truth of
    verl / Eurus-RL-Code parquet files): stdin strings and expected stdout, or, with fn_name,
    argument lists and return values (a one-element list output also accepts its element, as
    APPS's checker does), or
  * either of those as a JSON string (how gopd_mega.hf.load_paper_mix stores it in 'answer').
Passed = every test passed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from gopd_mega.verify.base import Verdict
from gopd_mega.verify.sandbox import SandboxLimits, check_tests, run_tests

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    """The last fenced code block (a python-tagged or untagged one preferred over other languages),
    or the whole response without fences."""
    blocks = _FENCE.findall(response)
    if not blocks:
        return response
    python = [code for lang, code in blocks if lang.lower() in ("", "python", "py", "python3")]
    return (python or [code for _, code in blocks])[-1]


def _text(value) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def normalize_tests(value, where: str = "tests") -> list[dict]:
    """Sandbox tests from any of the forms in the module docstring (errors name ``where``)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: tests are a string but not JSON ({exc})") from exc
    if isinstance(value, dict) and "inputs" in value and "outputs" in value:
        ins, outs = value["inputs"], value["outputs"]
        if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs):
            raise ValueError(f"{where}: 'inputs' and 'outputs' must be lists of the same length")
        fn = value.get("fn_name")
        if fn:
            tests = []
            for i, o in zip(ins, outs):
                test = {"fn": fn, "args": i if isinstance(i, list) else [i], "expected": o}
                if isinstance(o, list) and len(o) == 1:
                    test["expected_any"] = [o, o[0]]
                tests.append(test)
            return check_tests(tests, where)
        return check_tests([{"stdin": _text(i), "expected_stdout": _text(o)} for i, o in zip(ins, outs)], where)
    return check_tests(value, where)


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
        tests = normalize_tests(record[self.tests_field], f"record field {self.tests_field!r}")
        result = run_tests(self.program(record, response), tests, self.limits)
        details = result.to_json()
        details.pop("passed")
        n_pass = sum(t["passed"] for t in result.tests)
        return Verdict.of(result.passed, tests_passed=n_pass, tests_total=len(tests), **details)

    def batch(self, records: Sequence[dict], responses: Sequence[str]) -> list[Verdict]:
        with ThreadPoolExecutor(self.workers) as ex:
            return list(ex.map(self, records, responses))
