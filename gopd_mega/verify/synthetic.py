"""The synthetic arithmetic domains (gopd_mega.data.synthetic) as a :class:`Verifier`.

An adapter, not a second checker: the verdict is :func:`gopd_mega.data.synthetic.check` of the
record's domain (its teacher-route field) and prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from gopd_mega.verify.base import Verdict


@dataclass
class SyntheticVerifier:
    """Exact match with the domain's answer; the record holds the prompt and its domain."""

    prompt_field: str = "prompt"
    domain_field: str = "opd_teacher"
    domain: str | None = None
    """Fixed domain for every record (then ``domain_field`` is not read)."""

    def __call__(self, record: dict, response: str) -> Verdict:
        # Imported here: gopd_mega.data's package import loads torch, which the math and code
        # verifier processes (that import gopd_mega.verify) have no use for.
        from gopd_mega.data import synthetic

        domain = self.domain or record.get(self.domain_field)
        if domain is None:
            raise KeyError(f"SyntheticVerifier: record has no {self.domain_field!r} field naming its domain")
        prompt = record[self.prompt_field]
        return Verdict.of(
            synthetic.check(domain, prompt, response),
            domain=domain,
            expected=synthetic.get_domain(domain).solve(prompt),
            got=response.strip(),
        )
