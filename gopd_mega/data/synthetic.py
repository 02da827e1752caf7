"""Verifiable synthetic domains: multi-digit arithmetic, generated from a seed.

Each domain turns a random draw into a prompt such as ``"47+385="`` and its exact answer
``"432"``; the domain name doubles as the prompt's teacher route (one domain expert per domain, as
in the paper's math/code "domain expert merging"). Domains live in a registry (:data:`DOMAINS`,
:func:`register_domain`) so a new one is a ``Domain(...)`` away.

Difficulty, measured (a 3-layer, 128-wide pre-norm torch transformer, AdamW lr 3e-3, batch 64 of
mixed add+mul SFT records, greedy accuracy on 100 held-out prompts per domain):
    add:  a + b, both operands 2 digits              (answer 2-3 digits)   ~0.9 after 1500 steps
    mul:  a * b, a 2 digits, b 1 or 2 digits         (answer 2-4 digits)   ~0.15 after 1500 steps
    add3: a + b, each operand 2 or 3 digits          (harder variant)      ~0.03 after 1500 steps
Digit-string domains (4 random digits; 10000 problems each, max: 5 digits), measured with a
2-layer, 64-wide model, AdamW lr 3e-3 cosine, batch 64 of mixed rev+sort+max+dsum records,
greedy / sampled (temperature 1) accuracy on 100 held-out prompts per domain, after 100/200/400 steps:
    sort: 's4719=' -> '1479'  (sorted digits)        .33/.07  .71/.48  .97/.89
    dsum: 'd4719=' -> '21'    (sum of the digits)    .16/.11  .29/.17  .71/.55
    rev:  'r4719=' -> '9174'  (reversed digits)      .01/.00  .18/.09  .77/.62
    max:  'm47193=' -> '9'    (largest digit)        .91/.74  1.0/.95  1.0/.98
Arithmetic answers are written most-significant digit first, so a tiny model needs on the order of a
thousand steps, not a few hundred (reversing the digits did not speed it up at 600 steps).
Pool sizes: add 8100 problems, mul 8910 (about 1/HELD_OUT_BUCKETS of each held out), enough for
the default 2000 training + 200 held-out prompts per domain.

Train/held-out split: a problem belongs to the held-out pool iff a stable hash of its prompt
text falls in the held-out bucket (1 in ``HELD_OUT_BUCKETS``). The split therefore never depends on
the seed, num_train or num_eval: no held-out prompt can ever appear in any training set, even
across runs with different seeds (a teacher trained with seed 0 is not evaluated on its training
data by a run with seed 1). The seed only picks which problems are drawn from each pool.

Records are plain dicts ``{prompt, answer, opd_teacher}`` (field names configurable, defaults
matching :class:`gopd_mega.config.DataConfig`).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

HELD_OUT_BUCKETS = 8
"""One problem in this many (by prompt hash) is reserved for evaluation."""


@dataclass(frozen=True)
class Domain:
    """A verifiable task family."""

    name: str
    """Registry key and teacher route of its prompts."""
    sample: Callable[[random.Random], str]
    """Draws one prompt (e.g. '47+385=') from the given RNG."""
    solve: Callable[[str], str]
    """The exact reference answer of a prompt of this domain."""


DOMAINS: dict[str, Domain] = {}


def register_domain(domain: Domain) -> Domain:
    """Add ``domain`` to the registry (replacing one of the same name)."""
    DOMAINS[domain.name] = domain
    return domain


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise KeyError(f"unknown synthetic domain {name!r} (known: {sorted(DOMAINS)})")
    return DOMAINS[name]


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _binary_solver(op: str, fn: Callable[[int, int], int]) -> Callable[[str], str]:
    pattern = re.compile(rf"^\s*(\d+)\s*{re.escape(op)}\s*(\d+)\s*=\s*$")

    def solve(prompt: str) -> str:
        m = pattern.match(prompt)
        if m is None:
            raise ValueError(f"not a '{op}' prompt: {prompt!r}")
        return str(fn(int(m.group(1)), int(m.group(2))))

    return solve


register_domain(
    Domain(
        name="add",
        sample=lambda rng: f"{_number(rng, 2)}+{_number(rng, 2)}=",
        solve=_binary_solver("+", lambda a, b: a + b),
    )
)
register_domain(
    Domain(
        name="add3",
        sample=lambda rng: f"{_number(rng, rng.choice((2, 3)))}+{_number(rng, rng.choice((2, 3)))}=",
        solve=_binary_solver("+", lambda a, b: a + b),
    )
)
register_domain(
    Domain(
        name="mul",
        sample=lambda rng: f"{_number(rng, 2)}*{_number(rng, rng.choice((1, 2)))}=",
        solve=_binary_solver("*", lambda a, b: a * b),
    )
)


def _digit_string_solver(prefix: str, fn: Callable[[str], str]) -> Callable[[str], str]:
    pattern = re.compile(rf"^\s*{re.escape(prefix)}(\d+)\s*=\s*$")

    def solve(prompt: str) -> str:
        m = pattern.match(prompt)
        if m is None:
            raise ValueError(f"not a '{prefix}' prompt: {prompt!r}")
        return fn(m.group(1))

    return solve


def _digits(rng: random.Random, n: int) -> str:
    return "".join(str(rng.randint(0, 9)) for _ in range(n))


# Digit-string domains: short answers that a tiny model learns in a few hundred steps (the demo's).
register_domain(
    Domain(
        name="sort",
        sample=lambda rng: f"s{_digits(rng, 4)}=",
        solve=_digit_string_solver("s", lambda d: "".join(sorted(d))),
    )
)
register_domain(
    Domain(
        name="dsum",
        sample=lambda rng: f"d{_digits(rng, 4)}=",
        solve=_digit_string_solver("d", lambda d: str(sum(map(int, d)))),
    )
)
register_domain(
    Domain(
        name="rev",
        sample=lambda rng: f"r{_digits(rng, 4)}=",
        solve=_digit_string_solver("r", lambda d: d[::-1]),
    )
)
register_domain(
    Domain(
        name="max",
        sample=lambda rng: f"m{_digits(rng, 5)}=",
        solve=_digit_string_solver("m", max),
    )
)


def is_held_out(prompt: str) -> bool:
    """Whether ``prompt`` is in the held-out pool (stable across processes and Python versions)."""
    digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELD_OUT_BUCKETS == 0


def check(domain: str, prompt: str, response_text: str) -> bool:
    """Exact match of the response (surrounding whitespace ignored) with the prompt's answer."""
    return response_text.strip() == get_domain(domain).solve(prompt)


def answer(domain: str, prompt: str) -> str:
    """The one answer :func:`check` accepts (whitespace aside): the reference of exact evaluation."""
    return get_domain(domain).solve(prompt)


def verifier(prompt_field: str = "prompt", domain_field: str = "opd_teacher") -> Callable[[dict, str], float]:
    """A ``(record, response_text) -> reward`` verifier for GRPO: 1.0 when :func:`check` accepts
    the response, else 0.0; the record's ``domain_field`` names its domain."""

    def reward(record: dict, response: str) -> float:
        return float(check(record[domain_field], record[prompt_field], response))

    return reward


def _draw(domain: Domain, rng: random.Random, n: int, held_out: bool) -> list[str]:
    """``n`` distinct prompts of one pool; fails clearly when the pool is too small."""
    seen: dict[str, None] = {}  # insertion-ordered set: the order is part of determinism
    stale = 0  # draws since the last new prompt: many in a row means the pool is exhausted
    while len(seen) < n:
        if stale > 20_000:
            pool = "held-out" if held_out else "training"
            raise ValueError(
                f"domain {domain.name!r}: could only draw {len(seen)} distinct {pool} prompts of the {n} asked"
            )
        prompt = domain.sample(rng)
        if is_held_out(prompt) == held_out and prompt not in seen:
            seen[prompt] = None
            stale = 0
        else:
            stale += 1
    return list(seen)


def make_split(
    domain: str,
    num_train: int,
    num_eval: int,
    seed: int,
    *,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    teacher_field: str = "opd_teacher",
) -> tuple[list[dict], list[dict]]:
    """(train, held_out) records of one domain; deterministic in (domain, sizes, seed)."""
    d = get_domain(domain)
    # Separate streams per pool: the training draws do not shift when num_eval changes.
    train = _draw(d, random.Random(f"{seed}:{domain}:train"), num_train, held_out=False)
    held = _draw(d, random.Random(f"{seed}:{domain}:eval"), num_eval, held_out=True)

    def record(p: str) -> dict:
        return {prompt_field: p, answer_field: d.solve(p), teacher_field: domain}

    return [record(p) for p in train], [record(p) for p in held]


def make_datasets(
    domains: list[str], num_train: int, num_eval: int, seed: int, **fields: str
) -> tuple[list[dict], dict[str, list[dict]]]:
    """Training records of all domains (interleaved by a seeded shuffle) and held-out records by domain."""
    train: list[dict] = []
    held: dict[str, list[dict]] = {}
    for name in domains:
        tr, ev = make_split(name, num_train, num_eval, seed, **fields)
        train.extend(tr)
        held[name] = ev
    random.Random(f"{seed}:mix").shuffle(train)
    return train, held


def from_config(cfg) -> tuple[list[dict], dict[str, list[dict]]]:
    """:func:`make_datasets` for a :class:`gopd_mega.config.DataConfig` with source='synthetic'."""
    return make_datasets(
        list(cfg.domains),
        cfg.num_train,
        cfg.num_eval,
        cfg.seed,
        prompt_field=cfg.prompt_field,
        answer_field=cfg.answer_field,
        teacher_field=cfg.teacher_field,
    )
