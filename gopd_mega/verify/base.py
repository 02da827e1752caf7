"""The verifier interface: ``verifier(record, response_text) -> Verdict``.

A verifier judges one model response against one dataset record (a dict: the prompt, the gold
answer or the unit tests, whatever its task needs). Every verifier in gopd_mega.verify (math,
code, the synthetic arithmetic domains) has this one signature, so the evaluation harness and the
trainer's periodic evaluation take any of them. ``Verdict.reward`` is the scalar a training or
evaluation loop consumes (1.0 / 0.0 for pass / fail here); ``details`` is JSON-serialisable and
says why (extracted answer, per-test results, time-outs, the resource limit hit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Verdict:
    """The judgement of one response."""

    reward: float
    """Scalar reward: 1.0 when passed, 0.0 otherwise (verifiers here are binary)."""
    passed: bool
    """Whether the response is correct."""
    details: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable explanation (what was extracted, per-test verdicts, limits hit)."""

    @classmethod
    def of(cls, passed: bool, **details: Any) -> Verdict:
        return cls(reward=1.0 if passed else 0.0, passed=bool(passed), details=details)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "reward": self.reward, **self.details}


class Verifier(Protocol):
    """Anything with ``__call__(record, response) -> Verdict``; ``batch`` is optional (see
    :func:`verify_batch`)."""

    def __call__(self, record: dict, response: str) -> Verdict: ...


def verify_batch(verifier: Verifier, records: Sequence[dict], responses: Sequence[str]) -> list[Verdict]:
    """Verdicts of ``responses[i]`` against ``records[i]``; uses ``verifier.batch`` (parallel
    workers) when the verifier has one."""
    if len(records) != len(responses):
        raise ValueError(f"verify_batch: {len(records)} records but {len(responses)} responses")
    batch = getattr(verifier, "batch", None)
    if batch is not None:
        return list(batch(records, responses))
    return [verifier(r, s) for r, s in zip(records, responses)]
