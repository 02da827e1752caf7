"""gopd_mega.oracle against brute-force enumeration in float64 on a tiny vocabulary, and on real
models (the per-token target's teacher-forced path equals next-token sampling's distribution)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gopd_mega.config import ModelConfig
from gopd_mega.oracle import per_token_target, sequence_target
from gopd_mega.model_io import build_model

V, STOP, L = 4, 0, 3  # ids 0..3, 0 stops a response, at most 3 response tokens


class Table:
    """A model whose next-token logits are a fixed random function of the whole prefix (any
    context, any length): every prefix gets its own distribution, as a real LM's would."""

    def __init__(self, seed: int, scale: float):
        self.seed, self.scale = seed, scale
        self.cfg = ModelConfig(vocab_size=V)

    def logits(self, prefix: list[int]) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((self.seed, tuple(prefix))) % (2 ** 31))
        return self.scale * torch.randn(V, generator=g, dtype=torch.float64)

    def next_token_logits(self, tokens, lengths):
        return torch.stack([self.logits(tokens[i, :n].tolist()) for i, n in enumerate(lengths.tolist())])

    def logprobs_at(self, tokens, loss_mask, ids, temperature=1.0):
        out = torch.zeros(ids.shape, dtype=torch.float64)
        for i, j in loss_mask.nonzero().tolist():
            lp = torch.log_softmax(self.logits(tokens[i, :j].tolist()) / temperature, -1)
            out[i, j] = lp[ids[i, j]]
        return out


def _lp(model: Table, ctx: list[int], temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(model.logits(ctx) / temperature, -1)


def _responses():
    """Every response: up to L tokens, ended by STOP or by the limit."""
    for n in range(1, L + 1):
        for ys in itertools.product(range(V), repeat=n):
            if STOP in ys[:-1] or (n < L and ys[-1] != STOP):
                continue
            yield list(ys)


def _brute(teacher, ref, prompt, answer, lam, temperature=1.0):
    """log Z(x), log W(answer), per-token target log q(answer), mean log Z_t along the answer."""
    def log_w(y):
        return sum(lam * _lp(teacher, prompt + y[:t], temperature)[y[t]]
                   + (1 - lam) * _lp(ref, prompt + y[:t], temperature)[y[t]] for t in range(len(y)))

    log_z = torch.logsumexp(torch.stack([log_w(y) for y in _responses()]), 0)
    log_q, zs = 0.0, []
    for t in range(len(answer)):
        g = lam * _lp(teacher, prompt + answer[:t], temperature) + (1 - lam) * _lp(ref, prompt + answer[:t], temperature)
        z = torch.logsumexp(g, 0)
        log_q += g[answer[t]] - z
        zs.append(z)
    return float(log_z), float(log_w(answer)), float(log_q), float(sum(zs) / len(zs))


PROMPTS = [[1, 2], [3], [2, 2, 1]]
ANSWERS = [[2, 0], [1, 3, 0], [0]]  # the middle one fills all L tokens


def _sft_rows(prompts, answers):
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        tokens[i, :len(p) + len(a)] = torch.tensor(p + a)
        mask[i, len(p):len(p) + len(a)] = True
    return tokens, mask


@pytest.mark.parametrize("lam", [0.5, 1.0, 1.5, 3.0])
def test_both_targets_equal_brute_force(lam):
    teacher, ref = Table(1, 2.0), Table(2, 2.0)
    answers = ANSWERS
    seq = sequence_target(teacher, ref, PROMPTS, answers, [lam], stop_ids=[STOP], max_new_tokens=L, beam=10_000)
    tokens, mask = _sft_rows(PROMPTS, answers)
    tok = per_token_target(teacher, ref, tokens, mask, [lam])
    assert bool(seq.exact.all())
    for i, (p, a) in enumerate(zip(PROMPTS, answers)):
        log_z, log_w, log_q, mean_z = _brute(teacher, ref, p, a, lam)
        assert float(seq.log_z[lam][i]) == pytest.approx(log_z, abs=1e-9)
        assert float(seq.log_w_answer[lam][i]) == pytest.approx(log_w, abs=1e-9)
        assert float(tok.log_prob[lam][i]) == pytest.approx(log_q, abs=1e-9)
        assert float(tok.mean_log_z[lam][i]) == pytest.approx(mean_z, abs=1e-9)
    if lam == 1.0:  # the targets are the teacher itself: Z = 1 and both give pi_T(answer)
        assert torch.allclose(seq.log_z[lam], torch.zeros(3, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(seq.coverage_teacher, torch.ones(3, dtype=torch.float64))
        assert torch.allclose(seq.log_w_answer[lam], tok.log_prob[lam].double(), atol=1e-12)
    else:  # the two targets differ (a test of one cannot pass as the other)
        assert (seq.log_w_answer[lam] - seq.log_z[lam] - tok.log_prob[lam]).abs().max() > 1e-3


def test_a_narrow_beam_bounds_z_from_below_and_accuracy_from_above():
    teacher, ref = Table(3, 1.0), Table(4, 1.0)
    answers = ANSWERS
    lams = [1.0, 1.5]
    full = sequence_target(teacher, ref, PROMPTS, answers, lams, stop_ids=[STOP], max_new_tokens=L, beam=10_000)
    narrow = sequence_target(teacher, ref, PROMPTS, answers, lams, stop_ids=[STOP], max_new_tokens=L, beam=2)
    assert not bool(narrow.exact.any())
    for lam in lams:
        assert bool((narrow.log_z[lam] <= full.log_z[lam] + 1e-12).all())
        assert bool((narrow.log_z[lam] < full.log_z[lam] - 1e-6).any())
        assert narrow.accuracy_upper(lam) >= full.accuracy_upper(lam) - 1e-12
        # the answer is always counted: its weight is the same and never above the enumerated Z
        assert torch.allclose(narrow.log_w_answer[lam], full.log_w_answer[lam])
        assert bool((narrow.log_w_answer[lam] <= narrow.log_z[lam] + 1e-12).all())
    assert bool((narrow.coverage_teacher < 1).all()) and bool((narrow.coverage_reference < 1).all())


def test_bad_answers_are_refused():
    teacher = Table(1, 1.0)
    with pytest.raises(ValueError, match="answer 0 must be tokens then one stop id"):
        sequence_target(teacher, teacher, [[1]], [[2, 3]], [1.0], stop_ids=[STOP], max_new_tokens=L, beam=4)
    with pytest.raises(ValueError, match="at most 3 long"):
        sequence_target(teacher, teacher, [[1]], [[2, 3, 1, 0]], [1.0], stop_ids=[STOP], max_new_tokens=L, beam=4)


def test_per_token_target_on_real_models_matches_next_token_logits():
    """The teacher-forced path (logprobs_at over every id) against the sampling path
    (next_token_logits), on two megatron models of the tiny size, at temperature 0.7."""
    from helpers import TINY

    teacher = build_model(ModelConfig(**TINY, seed=5, init_std=0.2), trainable=False, name="t")
    ref = build_model(ModelConfig(**TINY, seed=6, init_std=0.2), trainable=False, name="r")
    prompts, answers = [[1, 5, 6, 7], [1, 9]], [[4, 4, 2], [8, 2]]
    tokens, mask = _sft_rows(prompts, answers)
    lam, temp = 1.5, 0.7
    got = per_token_target(teacher, ref, tokens, mask, [lam], temperature=temp)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        log_q = 0.0
        for t in range(len(a)):
            ctx = torch.tensor([p + a[:t]])
            n = torch.tensor([ctx.shape[1]])
            g = (lam * torch.log_softmax(teacher.next_token_logits(ctx, n)[0].double() / temp, -1)
                 + (1 - lam) * torch.log_softmax(ref.next_token_logits(ctx, n)[0].double() / temp, -1))
            log_q += float(g[a[t]] - torch.logsumexp(g, 0))
        # fp32 models: the two paths pack positions differently; 1e-4 nats is fp32 noise over 3 tokens
        assert float(got.log_prob[lam][i]) == pytest.approx(log_q, abs=1e-4)
        assert math.isfinite(float(got.mean_log_z[lam][i]))
