"""The G-OPD objective (gopd_mega/objective.py) against its closed form and the paper's formula."""

import math

import pytest
import torch

from gopd_mega.objective import (
    LossSettings,
    clipped_policy_loss,
    gopd_advantage,
    gopd_loss,
    gopd_token_loss,
    token_weights,
    truncated_importance_weight,
)


def _optimum(teacher_logp, ref_logp, lam):
    return torch.softmax(lam * teacher_logp + (1 - lam) * ref_logp, dim=-1)


@pytest.mark.parametrize("lam", [0.5, 1.0, 1.25, 1.5])
def test_single_step_converges_to_geometric_mixture_exact_expectation(lam):
    """Prompt -> one token. Weighting every vocabulary token by pi(y) gives the exact policy
    gradient; training must reach pi ~ pi_teacher^lam * pi_ref^(1-lam). Tolerance 1e-4 in
    probability: the fixed point is exact, only the optimiser's finite convergence remains."""
    g = torch.Generator().manual_seed(0)
    vocab = 8
    theta0 = torch.randn(vocab, generator=g, dtype=torch.float64)
    teacher_logp = torch.log_softmax(2.0 * torch.randn(vocab, generator=g, dtype=torch.float64), -1)
    ref_logp = torch.log_softmax(theta0, -1)  # reference = the student's initial weights
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.05)
    settings = LossSettings(lam=lam, aggregation="token-mean")
    ids = torch.arange(vocab)
    for _ in range(3000):
        logp = torch.log_softmax(theta, -1)[ids][None]  # [1 "batch row" per token, laid flat]
        weights = torch.softmax(theta, -1).detach()[None]
        loss, _ = gopd_loss(logp, torch.ones_like(logp), teacher_logp=teacher_logp[None],
                            ref_logp=ref_logp[None], settings=settings, weights=weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
    got = torch.softmax(theta.detach(), -1)
    want = _optimum(teacher_logp, ref_logp, lam)
    assert (got - want).abs().max() < 1e-4, (got, want)


@pytest.mark.parametrize("lam", [0.5, 1.25])
def test_single_step_converges_with_sampled_rollouts(lam):
    """The same with sampled responses (one token each), as the trainer sees them. The estimate
    is noisy, so the tolerance is total variation < 0.03 (about 3 standard errors of 4096 samples
    averaged over the last steps)."""
    g = torch.Generator().manual_seed(1)
    vocab = 6
    theta0 = torch.randn(vocab, generator=g, dtype=torch.float64)
    teacher_logp = torch.log_softmax(1.5 * torch.randn(vocab, generator=g, dtype=torch.float64), -1)
    ref_logp = torch.log_softmax(theta0, -1)
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.02)
    settings = LossSettings(lam=lam, aggregation="seq-mean-token-mean")
    avg = torch.zeros(vocab, dtype=torch.float64)
    steps, tail = 1500, 300
    for step in range(steps):
        with torch.no_grad():
            y = torch.multinomial(torch.softmax(theta, -1), 4096, replacement=True, generator=g)
            sampler_logp = torch.log_softmax(theta, -1)[y]
        logp = torch.log_softmax(theta, -1)[y][:, None]  # 4096 sequences of one token
        loss, _ = gopd_loss(logp, torch.ones_like(logp), teacher_logp=teacher_logp[y][:, None],
                            ref_logp=ref_logp[y][:, None], sampler_logp=sampler_logp[:, None],
                            settings=settings)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= steps - tail:
            avg += torch.softmax(theta.detach(), -1) / tail
    want = _optimum(teacher_logp, ref_logp, lam)
    assert 0.5 * (avg - want).abs().sum() < 0.03, (avg, want)


def test_advantage_matches_official_formula():
    g = torch.Generator().manual_seed(2)
    s, t, r = (torch.randn(5, 7, generator=g, dtype=torch.float64) - 3 for _ in range(3))
    for lam in [0.0, 0.25, 1.0, 1.25, 1.5]:
        official = lam * t + (1 - lam) * r - s
        assert torch.allclose(gopd_advantage(s, t, r, lam), official, rtol=0, atol=1e-12)
    # lambda = 1: the reference cancels exactly, whatever it is.
    r_other = torch.randn(5, 7, generator=g, dtype=torch.float64) * 10
    assert torch.allclose(gopd_advantage(s, t, r, 1.0), t - s, atol=1e-12)
    assert torch.allclose(gopd_advantage(s, t, r_other, 1.0), t - s, atol=1e-12)
    # detached
    s.requires_grad_(True)
    assert not gopd_advantage(s, t, r, 1.25).requires_grad


def test_ratio_one_gradient_is_minus_advantage():
    """One update per batch: ratio = 1, so d loss_t / d logp_t = -A_t * w_t."""
    g = torch.Generator().manual_seed(3)
    logp = (torch.randn(4, 5, generator=g, dtype=torch.float64) - 2).requires_grad_(True)
    t, r, q = (torch.randn(4, 5, generator=g, dtype=torch.float64) - 2 for _ in range(3))
    settings = LossSettings(lam=1.25, is_cap=5.0)
    loss, adv, _ = gopd_token_loss(logp, teacher_logp=t, ref_logp=r, sampler_logp=q, old_logp=None, settings=settings)
    loss.sum().backward()
    w = torch.exp(logp.detach() - q).clamp(max=5.0)
    assert torch.allclose(logp.grad, -adv * w, atol=1e-12)
    assert torch.allclose(adv, 1.25 * t - 0.25 * r - logp.detach(), atol=1e-12)


def test_clip_and_dual_clip():
    logp = torch.log(torch.tensor([1.5, 0.5, 10.0, 1.5]))
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -1.0, -1.0, -1.0])
    loss, clipped = clipped_policy_loss(logp, old, adv, 0.2, 0.2, 3.0)
    # A>0, ratio 1.5: clipped to 1.2 -> max(-1.5, -1.2) = -1.2
    # A<0, ratio 0.5: max(0.5, 0.8) = 0.8
    # A<0, ratio 10: max(10, 1.2) = 10 -> dual clip min(10, 3) = 3
    # A<0, ratio 1.5: max(1.5, 1.2) = 1.5, not clipped
    assert torch.allclose(loss, torch.tensor([-1.2, 0.8, 3.0, 1.5]))
    assert clipped.tolist() == [True, True, True, False]


def test_truncated_importance_weight():
    old = torch.tensor([0.0, 0.0, -1.0])
    sampler = torch.tensor([0.0, -3.0, 0.0])
    w = truncated_importance_weight(old, sampler, 5.0)
    assert torch.allclose(w, torch.tensor([1.0, 5.0, math.exp(-1.0)]))
    assert torch.equal(truncated_importance_weight(old, sampler, None), torch.ones(3))


def test_aggregation_modes():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)
    loss = torch.tensor([[1.0, 2.0, 3.0, 100.0], [10.0, 100.0, 100.0, 100.0], [100.0] * 4])
    tok = (token_weights(mask, "token-mean") * loss).sum()
    assert torch.isclose(tok, torch.tensor((1 + 2 + 3 + 10) / 4))
    seq = (token_weights(mask, "seq-mean-token-mean") * loss).sum()
    assert torch.isclose(seq, torch.tensor((2.0 + 10.0) / 2))  # the empty row does not count
    # global normalisers: two micro-batches sum to the full-batch loss
    halves = sum((token_weights(mask[i:i + 2], "seq-mean-token-mean", num_sequences=2) * loss[i:i + 2]).sum() for i in (0, 2))
    assert torch.isclose(halves, seq)
    with pytest.raises(ValueError, match="aggregation"):
        token_weights(mask, "sum")


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="teacher_logp"):
        gopd_loss(torch.zeros(2, 3), torch.ones(2, 3), teacher_logp=torch.zeros(2, 4), ref_logp=torch.zeros(2, 3))


def test_tilted_target_against_enumeration():
    """q_t ~ pi_T^lam * pi_ref^(1-lam), normalised by hand in fp64; lam = 1 gives the teacher, Z = 1."""
    from gopd_mega.objective import tilted_target

    g = torch.Generator().manual_seed(0)
    t = torch.log_softmax(torch.randn(3, 7, generator=g, dtype=torch.float64), -1)
    r = torch.log_softmax(torch.randn(3, 7, generator=g, dtype=torch.float64), -1)
    for lam in (0.5, 1.0, 1.25, 2.0):
        unnorm = t.exp() ** lam * r.exp() ** (1 - lam)
        z = unnorm.sum(-1)
        log_q, log_z = tilted_target(t, r, lam)
        torch.testing.assert_close(log_q.exp(), unnorm / z[:, None], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(log_z, z.log(), rtol=1e-12, atol=1e-14)
    log_q, log_z = tilted_target(t, r, 1.0)
    torch.testing.assert_close(log_q, t)
    assert log_z.abs().max() < 1e-12


def test_advantage_without_the_reference_at_lambda_one():
    """At lambda = 1 the reference cancels: A = t - s, equal (to fp32 rounding) to the formula
    with any reference, and refused at any other lambda."""
    from gopd_mega.objective import gopd_advantage

    g = torch.Generator().manual_seed(0)
    s, t, r = (-torch.rand(64, generator=g) * 5 for _ in range(3))
    torch.testing.assert_close(gopd_advantage(s, t, None, 1.0), gopd_advantage(s, t, r, 1.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(gopd_advantage(s.double(), t.double(), None, 1.0), (t - s).double())
    with pytest.raises(ValueError, match="lambda = 1.25"):
        gopd_advantage(s, t, None, 1.25)
