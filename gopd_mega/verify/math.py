"""Math answers graded with Hugging Face's math-verify.

    grade(gold, response):
        gold side:  parse(gold) -- a bare answer like '\\frac{1}{2}' or '(1,2]' is read as LaTeX
                    ($...$-wrapped); a gold already in $...$ or \\boxed{} is parsed as it is
        pred side:  the LAST \\boxed{...} (or \\fbox{...}) of the response, nested braces matched,
                    parsed as LaTeX; without one, math-verify's own extraction of the whole text,
                    then (short text only) the text as one LaTeX expression; with
                    require_boxed=True no box is a failure
        passed   =  math_verify.verify(gold_parsed, pred_parsed)   (order matters: gold first)

math-verify compares numbers (fractions, decimals, percentages), symbolic expressions, intervals,
sets, tuples, equations (x=2 vs 2) and drops \\text{} units. Its own time-outs use signal.alarm
(main thread only), so they are disabled here (None) and every call runs in a
:class:`~gopd_mega.verify.workers.TimedWorker` process that is killed when it overruns
``timeout_s``: safe from any thread, and a sympy blow-up costs one worker restart, not a hang.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gopd_mega.verify.base import Verdict
from gopd_mega.verify.workers import OK, TIMEOUT, WorkerPool

_BARE_MAX = 64
"""Longest unboxed response also tried as one bare LaTeX expression (longer text is prose)."""
_BOXED = re.compile(r"\\(?:boxed|fbox)(\s*)")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` (braces matched, so
    ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); ``\\boxed 5`` gives ``5``; None if there is none
    (an unterminated one is skipped)."""
    matches = list(_BOXED.finditer(text))
    for m in reversed(matches):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{" and text[j - 1] != "\\":
                    depth += 1
                elif text[j] == "}" and text[j - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
            continue  # unterminated: try an earlier one
        token = re.match(r"[^\s$]+", text[i:])
        if token and m.group(1):
            return token.group(0)  # '\\boxed 5': whitespace, then one token
    return None


def _as_latex(text: str) -> str:
    return text if ("$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text) else f"${text}$"


def _parse(text: str) -> list:
    from math_verify import parse

    return parse(text, parsing_timeout=None)


def grade(gold: str, response: str, require_boxed: bool = False) -> dict[str, Any]:
    """In-process grading (no time limit: call it through :class:`MathVerifier`, or where a hang
    is acceptable). Returns ``{"passed", "gold_parsed", "extracted", "pred_parsed"[, "error"]}``."""
    from math_verify import verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # the "timeouts disabled" warning
    gold = str(gold).strip()
    gold_parsed = _parse(_as_latex(gold))
    out: dict[str, Any] = {"passed": False, "gold_parsed": _show(gold_parsed), "extracted": None, "pred_parsed": None}
    if not gold_parsed:
        out["error"] = f"gold answer {gold!r} could not be parsed"
        return out
    boxed = last_boxed(response)
    if boxed is not None:
        out["extracted"] = boxed
        pred = _parse(f"${boxed}$") or _parse(boxed)
    elif require_boxed:
        out["error"] = "no \\boxed{} answer in the response"
        return out
    else:
        pred = _parse(response)
        if not pred and len(response) <= _BARE_MAX and "\n" not in response:
            pred = _parse(f"${response.strip()}$")  # a bare short answer such as '[1,2]'
    out["pred_parsed"] = _show(pred)
    out["passed"] = bool(pred) and bool(verify(gold_parsed, pred, timeout_seconds=None))
    return out


def _show(parsed: list) -> str | None:
    return str(parsed[0]) if parsed else None


@dataclass
class MathVerifier:
    """Verifier for records with a gold answer; each grading runs in a time-limited worker process."""

    answer_field: str = "answer"
    """Record field holding the gold answer (AIME/HMMT files: 'answer')."""
    timeout_s: float = 10.0
    """Wall-time limit of one grading; an overrun fails the response (details: timeout)."""
    workers: int = 1
    """Parallel worker processes for :meth:`batch`."""
    require_boxed: bool = False
    """Fail responses without a \\boxed{} answer instead of letting math-verify search the text."""
    _pool: WorkerPool | None = field(default=None, init=False, repr=False)

    def _workers(self) -> WorkerPool:
        if self._pool is None:
            self._pool = WorkerPool("gopd_mega.verify.math:grade", self.workers)
        return self._pool

    def _gold(self, record: dict) -> str:
        if self.answer_field not in record or record[self.answer_field] is None:
            raise KeyError(f"MathVerifier: record has no {self.answer_field!r} field (keys: {sorted(record)})")
        return str(record[self.answer_field])

    def _verdict(self, status: str, value: Any) -> Verdict:
        if status == OK:
            return Verdict.of(value.pop("passed"), **value)
        if status == TIMEOUT:
            return Verdict.of(False, timeout=True, error=f"grading took longer than {self.timeout_s} s")
        return Verdict.of(False, error=f"grading failed: {value}")

    def grade(self, gold: str, response: str) -> Verdict:
        return self._verdict(*self._workers().call(str(gold), response, self.require_boxed, timeout_s=self.timeout_s))

    def __call__(self, record: dict, response: str) -> Verdict:
        return self.grade(self._gold(record), response)

    def batch(self, records: Sequence[dict], responses: Sequence[str]) -> list[Verdict]:
        args = [(self._gold(r), s, self.require_boxed) for r, s in zip(records, responses)]
        return [self._verdict(*res) for res in self._workers().map(args, self.timeout_s)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
