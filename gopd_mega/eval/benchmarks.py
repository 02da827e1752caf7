"""Benchmark files in their published formats -> prompt records + the verifier that judges them.

Every loader returns a :class:`Benchmark`: records ``{"id", "prompt", ...verifier fields}`` where
``prompt`` is the user-turn text (the chat template is applied later, by the harness) and the rest
is what the benchmark's verifier reads.

Formats (local files; nothing is downloaded):
  math (AIME24 / AIME25 / HMMT25 as on the HF hub, JSONL or parquet)
      ``problem`` (also ``question`` / ``Problem``), ``answer`` (also ``Answer``; int or str);
      prompt = problem + MATH_INSTRUCTION; verifier: MathVerifier on ``answer``.
  evalplus (HumanEval+ / MBPP+ JSONL)
      ``task_id``, ``prompt``, ``entry_point``, ``canonical_solution``, ``base_input``,
      ``plus_input`` (lists of argument lists), ``atol``; the response's function is diff-tested
      against the canonical solution on base + plus inputs (outputs equal; floats within atol,
      or 1e-6 relative when atol is 0), in one sandboxed assertion-style test.
  livecodebench (code_generation_lite JSONL)
      ``question_content``, ``starter_code``, ``public_test_cases`` / ``private_test_cases``
      (JSON strings of ``[{"input", "output", "testtype": "stdin"|"functional"}]``; private ones
      may be base64(zlib(pickle(json))) as published, decoded with a pickle loader that refuses
      every global), ``metadata`` (JSON string, ``func_name`` for functional problems).
      stdin tests compare stdout; functional ones call ``Solution().func_name(*args)`` with one
      JSON argument per input line and compare the JSON result; typing/collections/math imports
      are prepended to the program (LCB_IMPORTS), as LiveCodeBench's own harness does.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gopd_mega.verify.base import Verifier

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_STDIN_INSTRUCTION = (
    "Write a Python program that reads the input from stdin and writes the answer to stdout. "
    "Enclose your code in a ```python code block."
)
CODE_FUNCTION_INSTRUCTION = "Complete the starter code below. Enclose your full solution in a ```python code block."


DEFAULT_SAMPLES = {"math": 32, "code": 4}
"""Samples per problem by benchmark kind (the paper's avg@32 for math, avg@4 for code)."""


class BenchmarkError(ValueError):
    """A benchmark file or record does not have the published format (the message says where)."""


@dataclass
class Benchmark:
    """One benchmark: its records and how they are judged."""

    name: str
    kind: str
    """'math' or 'code' (picks the default number of samples)."""
    records: list[dict]
    verifier: Verifier
    source: str = ""
    """The file it was read from."""


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL / JSON / parquet file (JSON read with the json module: evalplus inputs mix
    types that Arrow's JSON reader rejects)."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"benchmark file does not exist: {path}")
    if path.suffix == ".jsonl":
        rows = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise BenchmarkError(f"{path}:{n}: not valid JSON ({exc})") from exc
    elif path.suffix == ".json":
        rows = json.loads(path.read_text())
        if isinstance(rows, dict):  # {"data": [...]} / {"train": [...]}
            lists = [v for v in rows.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise BenchmarkError(f"{path}: a JSON object must hold exactly one list of records")
            rows = lists[0]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise BenchmarkError(f"{path}: unknown benchmark file type (expected .jsonl, .json or .parquet)")
    if not rows:
        raise BenchmarkError(f"{path}: no records")
    return rows


def _field(row: dict, names: tuple[str, ...], where: str) -> Any:
    for n in names:
        if row.get(n) is not None:
            return row[n]
    raise BenchmarkError(f"{where}: missing field {names[0]!r} (record has {sorted(row)})")


# ---------------------------------------------------------------------------------- math


def load_math(path: str | os.PathLike, name: str = "math", verifier: Verifier | None = None) -> Benchmark:
    from gopd_mega.verify.math import MathVerifier

    records = []
    for i, row in enumerate(read_rows(path)):
        where = f"{path} record {i}"
        problem = _field(row, ("problem", "question", "Problem"), where)
        answer = _field(row, ("answer", "Answer"), where)
        rid = row.get("id", row.get("problem_idx", row.get("ID", i)))
        records.append({"id": str(rid), "prompt": f"{problem}\n{MATH_INSTRUCTION}", "answer": str(answer)})
    return Benchmark(name, "math", records, verifier or MathVerifier(), str(path))


# ------------------------------------------------------------------------------ evalplus

_EVALPLUS_CHECK = """
import copy as _gopd_copy, json as _gopd_json, math as _gopd_math
_gopd_ref_ns = {{}}
exec({reference!r}, _gopd_ref_ns)
_gopd_ref = _gopd_ref_ns[{entry_point!r}]
_gopd_cand = {entry_point}
_gopd_atol = {atol!r}

def _gopd_close(got, exp):
    if isinstance(exp, float) or isinstance(got, float):
        if not isinstance(got, (int, float)) or not isinstance(exp, (int, float)):
            return False
        if _gopd_math.isnan(exp):
            return _gopd_math.isnan(got)
        return _gopd_math.isclose(got, exp, rel_tol=0 if _gopd_atol else 1e-6, abs_tol=_gopd_atol)
    if isinstance(exp, (list, tuple)) and isinstance(got, (list, tuple)) and type(got) is type(exp):
        return len(got) == len(exp) and all(_gopd_close(g, e) for g, e in zip(got, exp))
    return got == exp

for _gopd_i, _gopd_args in enumerate(_gopd_json.loads({inputs!r})):
    _gopd_exp = _gopd_ref(*_gopd_copy.deepcopy(_gopd_args))
    _gopd_got = _gopd_cand(*_gopd_copy.deepcopy(_gopd_args))
    assert _gopd_close(_gopd_got, _gopd_exp), f"input {{_gopd_i}}: expected {{_gopd_exp!r}}, got {{_gopd_got!r}}"
"""


def evalplus_tests(row: dict, where: str) -> list[dict]:
    """One assertion-style sandbox test diff-testing ``entry_point`` against the canonical solution."""
    entry = _field(row, ("entry_point",), where)
    if not str(entry).isidentifier():
        raise BenchmarkError(f"{where}: entry_point {entry!r} is not a Python identifier")
    reference = _field(row, ("prompt",), where) + _field(row, ("canonical_solution",), where)
    inputs = list(_field(row, ("base_input",), where)) + list(row.get("plus_input") or [])
    if not inputs or not all(isinstance(a, list) for a in inputs):
        raise BenchmarkError(f"{where}: base_input/plus_input must be non-empty lists of argument lists")
    code = _EVALPLUS_CHECK.format(
        reference=reference, entry_point=entry, atol=float(row.get("atol") or 0.0), inputs=json.dumps(inputs)
    )
    return [{"test_code": code}]


def _prompt_imports(prompt: str) -> str:
    """Import lines of a HumanEval prompt (a response that restates only the function needs them)."""
    return "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))


def load_evalplus(path: str | os.PathLike, name: str = "evalplus", verifier: Verifier | None = None) -> Benchmark:
    from gopd_mega.verify.code import CodeVerifier

    records = []
    for i, row in enumerate(read_rows(path)):
        where = f"{path} record {i} ({row.get('task_id', '?')})"
        prompt = _field(row, ("prompt",), where)
        # HumanEval+ prompts are a signature + docstring; MBPP+ prompts only a docstring with an
        # example assertion (the function name comes from it).
        ask = (
            "Complete the following Python function."
            if "def " in prompt
            else "Write the Python function described below."
        )
        text = (
            f"{ask} Give the complete function (with its imports) in a ```python code block.\n"
            f"```python\n{prompt.rstrip()}\n```"
        )
        records.append(
            {
                "id": str(_field(row, ("task_id",), where)),
                "prompt": text,
                "tests": evalplus_tests(row, where),
                "code_prefix": _prompt_imports(prompt),
            }
        )
    return Benchmark(name, "code", records, verifier or CodeVerifier(), str(path))


# ------------------------------------------------------------------------- livecodebench


LCB_IMPORTS = (
    "from typing import *\nfrom collections import *\n"
    "import collections, heapq, bisect, itertools, functools, math, re, sys"
)
"""Prepended to LiveCodeBench programs: starter code uses typing names (List[int]) unimported, as
LiveCodeBench's own harness allows."""


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise BenchmarkError(f"refusing to unpickle {module}.{name}: test cases must be plain data")


def decode_lcb_tests(value: Any, where: str) -> list[dict]:
    """LiveCodeBench test cases: a list, a JSON string, or base64(zlib(pickle(JSON string)))."""
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        raise BenchmarkError(f"{where}: test cases must be a JSON string or a list, got {type(value).__name__}")
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        inner = _NoGlobalsUnpickler(io.BytesIO(zlib.decompress(base64.b64decode(value)))).load()
        return json.loads(inner) if isinstance(inner, (str, bytes)) else inner
    except BenchmarkError:
        raise
    except Exception as exc:
        raise BenchmarkError(f"{where}: test cases are neither JSON nor base64(zlib(pickle(JSON))): {exc}") from exc


def lcb_tests(row: dict, where: str) -> list[dict]:
    meta = row.get("metadata") or {}
    if isinstance(meta, str):
        meta = json.loads(meta) if meta.strip() else {}
    cases = decode_lcb_tests(_field(row, ("public_test_cases",), where), f"{where} public_test_cases")
    if row.get("private_test_cases"):
        cases = cases + decode_lcb_tests(row["private_test_cases"], f"{where} private_test_cases")
    tests = []
    for j, case in enumerate(cases):
        kind = case.get("testtype", "stdin")
        if kind == "stdin":
            tests.append({"stdin": case["input"], "expected_stdout": case["output"]})
        elif kind == "functional":
            if "func_name" not in meta:
                raise BenchmarkError(f"{where}: functional test {j} but metadata has no func_name")
            try:
                args = [json.loads(line) for line in case["input"].split("\n") if line.strip()]
                expected = json.loads(case["output"])
            except json.JSONDecodeError as exc:
                raise BenchmarkError(f"{where}: functional test {j} is not JSON ({exc})") from exc
            tests.append({"fn": meta["func_name"], "args": args, "expected": expected})
        else:
            raise BenchmarkError(f"{where}: test {j} has unknown testtype {kind!r} (expected 'stdin' or 'functional')")
    if not tests:
        raise BenchmarkError(f"{where}: no test cases")
    return tests


def load_livecodebench(
    path: str | os.PathLike, name: str = "livecodebench", verifier: Verifier | None = None
) -> Benchmark:
    from gopd_mega.verify.code import CodeVerifier

    records = []
    for i, row in enumerate(read_rows(path)):
        where = f"{path} record {i} ({row.get('question_id', '?')})"
        question = _field(row, ("question_content",), where)
        starter = row.get("starter_code") or ""
        if starter.strip():
            text = f"{question}\n\n{CODE_FUNCTION_INSTRUCTION}\n```python\n{starter.rstrip()}\n```"
        else:
            text = f"{question}\n\n{CODE_STDIN_INSTRUCTION}"
        records.append(
            {
                "id": str(row.get("question_id", i)),
                "prompt": text,
                "tests": lcb_tests(row, where),
                "code_prefix": LCB_IMPORTS,
            }
        )
    return Benchmark(name, "code", records, verifier or CodeVerifier(), str(path))


# ------------------------------------------------------------------------------ registry

FORMATS: dict[str, Callable[..., Benchmark]] = {
    "math": load_math,
    "evalplus": load_evalplus,
    "livecodebench": load_livecodebench,
}
"""Loader per file format."""

KNOWN: dict[str, str] = {
    "aime24": "math",
    "aime25": "math",
    "hmmt25": "math",
    "math500": "math",
    "humaneval_plus": "evalplus",
    "mbpp_plus": "evalplus",
    "livecodebench": "livecodebench",
}
"""Format of each benchmark name the paper reports (others need an explicit format)."""


def load_benchmark(
    name: str, path: str | os.PathLike, fmt: str | None = None, verifier: Verifier | None = None
) -> Benchmark:
    """Load ``path`` as benchmark ``name`` (format from :data:`KNOWN` unless ``fmt`` is given)."""
    fmt = fmt or KNOWN.get(name)
    if fmt is None:
        raise BenchmarkError(
            f"benchmark {name!r}: unknown name, give its format (one of {sorted(FORMATS)}); "
            f"known names: {sorted(KNOWN)}"
        )
    if fmt not in FORMATS:
        raise BenchmarkError(f"benchmark {name!r}: unknown format {fmt!r} (known: {sorted(FORMATS)})")
    return FORMATS[fmt](path, name=name, verifier=verifier)
