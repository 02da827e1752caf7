"""Megatron's forward of a micro-batch as a right-padded [k, L] batch (gopd_mega/model/forward.py,
``PipelineForward.padded_layout``) gives what the packed [1, T] row under the block-diagonal mask
gives: the same log-probs, loss and gradients up to the order of fp32 sums.

Why not bitwise: both layouts fill the masked attention scores with -10000, whose softmax weights
are exactly 0 in fp32, and rotate each token by the same RoPE angle; but the softmax sums and the
probs @ V GEMM run over T keys packed and L keys padded (the extra terms are exact zeros, the
summation order is not the same), and the layers' GEMMs see T vs k * L rows. Measured on these
batches: log-probs within ~1e-7 absolute, gradients ~1e-7 relative in norm (checked at 1e-5).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dist_utils import run_distributed
from gopd_mega.model.batch import scoring_lengths, scoring_micro_batches
from test_packing import _grad_err, _nll, grad_of, padded_reference, ragged_batch, tiny_cfg

GRAD_RTOL = 1e-5


def equal_batch(n=6, s=40, seed=0):
    """[n, s] tokens, every row a 6-token prompt and a 34-token response (the rollout shape)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 50, (n, s), generator=g)
    mask = torch.zeros(n, s)
    mask[:, 6:] = 1
    return tokens, mask


def test_padded_view_of_a_micro_batch():
    tokens, mask = ragged_batch(n=7)
    S = tokens.shape[1]
    (mb,) = scoring_micro_batches(tokens, mask, 1, 0, max_tokens=10_000)
    padded, index = mb.padded()
    lens = scoring_lengths(mask)[mb.rows]
    assert padded.shape == (len(mb.rows), int(lens.max()))
    for b, (r, n) in enumerate(zip(mb.rows.tolist(), lens.tolist())):
        assert torch.equal(padded[b, :n], tokens[r, :n]) and (padded[b, n:] == 0).all()
    # index into [L, k] flattened: row b, position j - 1 predicts flat target i * S + j
    k = padded.shape[0]
    b, pos = index % k, index // k
    rows = mb.rows[b]
    assert torch.equal(rows * S + pos + 1, mb.flat_index)
    assert torch.equal(padded[b, pos], tokens.reshape(-1)[mb.flat_index - 1])


def _train(m, tokens, mask, weights, padded: bool, budget=10_000):
    m.forward.padded_layout = padded
    m.stats.reset()
    logp = m.logprobs(tokens, mask, max_tokens=budget)  # (gopd_mega.model.inference's forward)
    scoring = m.stats.as_dict()
    m.stats.reset()
    st = m.train_step(tokens, mask, _nll(weights), max_tokens=budget)  # (megatron's)
    grads = {n: grad_of(p).detach().clone() for n, p in m.model.named_parameters()}
    return logp, st, grads, m.stats.as_dict(), scoring


def _compare(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(a[1]["logp"], b[1]["logp"], rtol=2e-5, atol=1e-6)
    assert a[1]["loss"] == pytest.approx(b[1]["loss"], rel=1e-5)
    for name, g in b[2].items():
        assert _grad_err(a[2][name], g) < GRAD_RTOL, name


def _one_rank(batch, force=False):
    from gopd_mega.config import OptimConfig
    from gopd_mega.models import ShardedGPT
    from gopd_mega.parallel import build_layout_groups

    (g,) = build_layout_groups([(1, 1)])
    tokens, mask = batch
    weights = mask / mask.sum()
    m = ShardedGPT(tiny_cfg(), g, trainable=True, optim=OptimConfig(lr=1e-30, grad_clip=0.0))
    ref = padded_reference(m, tokens, mask, weights)
    if force:  # the padded layout for every micro-batch of several sequences, whatever it costs
        m.forward._use_padded = lambda mb: m.forward.padded_layout and len(mb.cu_seqlens) > 2
    out = {"ref": ref, "packed": _train(m, tokens, mask, weights, False),
           "padded": _train(m, tokens, mask, weights, True)}
    m.forward.fast_scoring = False  # scoring through megatron's forward (``_run_eval``) too
    for padded in (False, True):
        m.forward.padded_layout = padded
        out[f"eval_{padded}"] = m.logprobs(tokens, mask, max_tokens=10_000)
    return out


def _check(out, tokens, mask, padded_positions):
    packed, padded = out["packed"], out["padded"]
    _compare(padded, packed)
    torch.testing.assert_close(out["eval_True"], out["eval_False"], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(out["eval_True"], packed[0], rtol=2e-5, atol=1e-6)
    ref_logp, ref_loss, ref_grads = out["ref"]
    torch.testing.assert_close(padded[0].double(), ref_logp, rtol=2e-5, atol=1e-6)
    assert padded[1]["loss"] == pytest.approx(ref_loss, rel=2e-5)
    for name, g in ref_grads.items():
        assert _grad_err(padded[2][name], g) < 1e-4, name
    real = int(scoring_lengths(mask).sum())
    assert packed[3]["positions_computed"] == real
    assert padded[3]["positions_computed"] == padded_positions  # the layout did run
    assert packed[4]["positions_computed"] == real
    assert padded[4]["positions_computed"] == padded_positions
    assert padded[3]["positions_scored"] == packed[3]["positions_scored"]


def test_equal_lengths_run_padded_and_match_packed():
    tokens, mask = equal_batch()
    out = _one_rank((tokens, mask))
    _check(out, tokens, mask, padded_positions=6 * 39)  # chosen by the cost: no padding, 6x fewer scores


def test_ragged_rows_padded_match_packed():
    """Short rows: positions after a sequence's end are computed, never scored nor attended to."""
    tokens, mask = ragged_batch()
    lens = scoring_lengths(mask)
    out = _one_rank((tokens, mask), force=True)
    _check(out, tokens, mask, padded_positions=int((lens > 0).sum()) * int(lens.max()))


def test_cost_keeps_ragged_rows_packed():
    """A long row among short ones: padding every row to its length costs more than the [T, T] mask."""
    from gopd_mega.models import ShardedGPT
    from gopd_mega.parallel import build_layout_groups

    (g,) = build_layout_groups([(1, 1)])
    m = ShardedGPT(tiny_cfg(), g)
    tokens, mask = ragged_batch(long_row=2)
    (mb,) = scoring_micro_batches(tokens, mask, 1, 0, max_tokens=10_000)
    assert not m.forward._use_padded(mb)
    tokens, mask = equal_batch()
    (mb,) = scoring_micro_batches(tokens, mask, 1, 0, max_tokens=10_000)
    assert m.forward._use_padded(mb)
    (mb,) = scoring_micro_batches(tokens[:3, :30], mask[:3, :30], 1, 0, max_tokens=10_000)
    assert not m.forward._use_padded(mb)  # 87 positions: below PADDED_MIN_TOKENS
    (mb,) = scoring_micro_batches(tokens, mask, 1, 0, max_tokens=10_000)
    m.forward.padded_layout = False
    assert not m.forward._use_padded(mb)
    off = ShardedGPT(dataclasses.replace(tiny_cfg(), padded_layout=False), g)  # the config switch
    assert not off.forward._use_padded(mb)


def _dp2():
    import torch.distributed as dist

    from gopd_mega.config import OptimConfig
    from gopd_mega.models import ShardedGPT
    from gopd_mega.parallel import build_layout_groups

    (g,) = build_layout_groups([(1, 1)])
    assert g.dp == dist.get_world_size() == 2
    tokens, mask = equal_batch(n=8)
    weights = mask / mask.sum()
    out = {}
    for padded in (False, True):
        m = ShardedGPT(tiny_cfg(), g, trainable=True, optim=OptimConfig(lr=1e-30, grad_clip=0.0))
        out[padded] = _train(m, tokens, mask, weights, padded)
    return out


@pytest.mark.distributed
def test_padded_equals_packed_under_dp2():
    """DP=2 (gloo): each rank runs its 4 rows padded; loss and the DP-reduced gradients match."""
    for out in run_distributed(_dp2, 2):
        _compare(out[True], out[False])
        assert out[True][3]["positions_computed"] == out[False][3]["positions_computed"] == 4 * 39
