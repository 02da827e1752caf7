"""Layouts agree: TP=2 and PP=2 give the same loss, grad norm and updates as TP=1 (DP=2) on the
same weights and batch, and a TP=2 teacher beside a TP=1 student scores like a TP=1 teacher.

Tolerance: fp32 everywhere; TP/PP only change the order of floating-point sums (row-parallel
all-reduce, vocab-parallel logsumexp), so results agree to a few ulps of the quantities
(~1e-7 relative); rtol 1e-5 leaves headroom for 3 Adam steps amplifying those differences.
"""

import pytest
import torch

from dist_utils import run_distributed
from helpers import RTOL, batch, tiny_cfg

pytestmark = pytest.mark.distributed

def _train_layouts(tie):
    """Every layout of a 2-process world trains the same model 3 steps on the same batch."""
    from gopd_mega.config import OptimConfig
    from gopd_mega.models import ShardedGPT
    from gopd_mega.objective import LossSettings, gopd_token_loss, token_weights
    from gopd_mega.parallel import build_layout_groups

    layouts = [(1, 1), (2, 1), (1, 2)]
    groups = build_layout_groups(layouts)
    tokens, mask = batch()
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(tokens.shape, generator=gen) - 3.0
    ref = torch.randn(tokens.shape, generator=gen) - 3.0
    omega = token_weights(mask, "seq-mean-token-mean")
    settings = LossSettings(lam=1.25)

    t, r, w = (x.reshape(-1) for x in (teacher, ref, omega))

    def builder(logp, idx):  # idx: flat ids into the full batch's [N * S]
        loss, _, _ = gopd_token_loss(logp, teacher_logp=t[idx], ref_logp=r[idx], sampler_logp=None,
                                     old_logp=None, settings=settings)
        return loss * w[idx]

    out = {}
    for (tp, pp), g in zip(layouts, groups):
        m = ShardedGPT(tiny_cfg(tp, pp, tie), g, trainable=True, optim=OptimConfig(lr=1e-3, grad_clip=1.0))
        steps = [m.train_step(tokens, mask, builder, micro_batch_size=2) for _ in range(3)]
        out[(tp, pp)] = {
            "loss": [s["loss"] for s in steps],
            "grad_norm": [s["grad_norm"] for s in steps],
            "logp": steps[0]["logp"],
            "final_logp": m.logprobs(tokens, mask),
        }
    return out


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_tp2_pp2_match_tp1_over_three_steps(tie):
    results = run_distributed(_train_layouts, 2, (tie,))
    for rank_out in results:  # every rank reports the full-batch numbers
        base = rank_out[(1, 1)]
        assert base["loss"][0] != 0 and base["grad_norm"][0] > 1.0  # the clip binds at step 1
        for layout in [(2, 1), (1, 2)]:
            other = rank_out[layout]
            torch.testing.assert_close(torch.tensor(other["loss"]), torch.tensor(base["loss"]), rtol=RTOL, atol=0)
            torch.testing.assert_close(torch.tensor(other["grad_norm"]), torch.tensor(base["grad_norm"]), rtol=RTOL, atol=0)
            torch.testing.assert_close(other["logp"], base["logp"], rtol=RTOL, atol=1e-6)
            torch.testing.assert_close(other["final_logp"], base["final_logp"], rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(results[0][(1, 2)]["final_logp"], results[1][(1, 2)]["final_logp"], rtol=0, atol=0)


def _teacher_beside_student():
    from gopd_mega.models import ShardedGPT
    from gopd_mega.parallel import build_layout_groups

    g_student, g_teacher, g_again = build_layout_groups([(1, 1), (2, 1), (1, 1)])
    assert g_again is g_student  # identical layouts share groups
    tokens, mask = batch(n=5)
    student = ShardedGPT(tiny_cfg(1, 1, seed=7), g_student, trainable=True)
    teacher_tp2 = ShardedGPT(tiny_cfg(2, 1, seed=7), g_teacher)
    teacher_tp1 = ShardedGPT(tiny_cfg(1, 1, seed=7), g_student)
    lp_s = student.logprobs(tokens, mask, temperature=0.7)
    lp_t2 = teacher_tp2.logprobs(tokens, mask, temperature=0.7)
    lp_t1 = teacher_tp1.logprobs(tokens, mask, temperature=0.7)
    return lp_s, lp_t2, lp_t1, mask, [p.requires_grad for p in teacher_tp2.model.parameters()]


def test_teacher_tp2_beside_student_tp1():
    for lp_s, lp_t2, lp_t1, mask, teacher_grads in run_distributed(_teacher_beside_student, 2):
        torch.testing.assert_close(lp_t2, lp_t1, rtol=RTOL, atol=1e-6)
        torch.testing.assert_close(lp_s, lp_t1, rtol=0, atol=0)
        assert (lp_t1[mask == 0] == 0).all() and (lp_t1[mask == 1] < 0).all()
        assert not any(teacher_grads)


def test_layout_that_does_not_divide_names_the_model():
    from gopd_mega.parallel import build_model_groups
    from gopd_mega.platform import init_distributed

    init_distributed()  # single-process world
    with pytest.raises(ValueError, match="teacher.*tp=2"):
        build_model_groups(2, 1, name="teacher")
