"""Padding-free packed micro-batches (gopd_mega/model/batch.py, forward.py) change no result.

The reference is the computation packing replaced: one right-padded [N, S] forward of the whole
batch (megatron's default causal mask, positions 0..S-1), fp64 logits from the final hidden
states, plain autograd. Tolerances: the packed forward runs the same fp32 weights on the same
tokens; masked attention scores are filled with -10000 so their softmax weights are exactly 0 in
fp32, and RoPE angles are the same per position. Only the shapes of the GEMMs change (T packed
rows instead of N * S), i.e. the order of fp32 sums: log-probs agree to ~1e-6 relative (rtol 2e-5
leaves headroom), gradients to ~1e-6 relative in norm (checked at 1e-4, as
tests/test_gopd_gradient.py does for fp32 pipeline vs fp64 logits).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dist_utils import run_distributed
from gopd_mega.model.batch import balance_rows, cut_micro_batches, scoring_lengths, scoring_micro_batches

RTOL = 2e-5
GRAD_RTOL = 1e-4


def tiny_cfg(tp=1, pp=1, **kw):
    from gopd_mega.config import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=128, vocab_size=50, max_seq_len=48, qk_layernorm=True,
                       tie_embeddings=True, tp=tp, pp=pp, seed=3, init_std=0.1, **kw)


def ragged_batch(n=6, s=40, long_row=None, seed=0):
    """[n, s] tokens and a loss mask: prompts of 2-5 tokens, responses of 1-8 tokens, right
    padding; ``long_row`` gets a response that fills the whole row."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 50, (n, s), generator=g)
    mask = torch.zeros(n, s)
    for i in range(n):
        p = 2 + i % 4
        r = s - p if i == long_row else 1 + (3 * i) % 8
        mask[i, p: p + r] = 1
        tokens[i, p + r:] = 0  # padding
    return tokens, mask


# ----------------------------------------------------------------------------- batch.py alone


def test_plan_scores_every_response_token_once_within_budget():
    tokens, mask = ragged_batch(n=9, long_row=4)
    lengths = scoring_lengths(mask)
    assert lengths[4] == 39 and lengths[0] == 2  # last response position (its input length)
    seen = []
    for dp_rank in range(2):
        for mb in scoring_micro_batches(tokens, mask, 2, dp_rank, max_tokens=24):
            # over budget only when one sequence alone is longer than the budget
            assert mb.num_tokens <= 24 or len(mb.rows) == 1, mb.rows
            seen += mb.flat_index.tolist()
            # positions restart at 0 per sequence; targets are the tokens at the flat indices
            starts = mb.cu_seqlens[:-1].long()
            assert (mb.position_ids[0, starts] == 0).all()
            assert torch.equal(mb.targets, tokens.reshape(-1)[mb.flat_index])
            assert torch.equal(mb.tokens[0, mb.score_pos], tokens.reshape(-1)[mb.flat_index - 1])
            m = mb.attention_mask("cpu")[0, 0]
            upper = torch.ones_like(m).triu(1)
            assert not m.diagonal().any() and m[upper].all()  # causal
            for a, b in zip(starts.tolist(), mb.cu_seqlens[1:].tolist()):  # block-diagonal
                assert not m[a:b, a:b].tril().any() and m[a:b, :a].all()
    want = [i * 40 + j for i in range(9) for j in range(1, 40) if mask[i, j]]
    assert sorted(seen) == want  # every response token exactly once over the DP ranks


def test_dp_balance_and_first_fit():
    lengths = torch.tensor([10, 1, 9, 2, 8, 3, 0])
    shares = balance_rows(lengths, 2)
    assert sorted(shares[0] + shares[1]) == [0, 1, 2, 3, 4, 5]  # the empty row needs no forward
    assert abs(sum(int(lengths[i]) for i in shares[0]) - sum(int(lengths[i]) for i in shares[1])) <= 1
    assert cut_micro_batches([0, 2, 4, 5], lengths, max_tokens=12) == [[0], [2, 5], [4]]  # 10+3 > 12, 9+3 fits
    assert cut_micro_batches([0, 1], lengths, max_tokens=4) == [[0], [1]]  # 10 > budget: alone
    assert cut_micro_batches([1, 3, 5], lengths, 100, max_rows=2) == [[5, 3], [1]]
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch"):
        cut_micro_batches([0], lengths, 0)


# ----------------------------------------------------------------------------- the padded reference


def padded_reference(model, tokens, mask, weights):
    """fp64 log-probs [N, S], loss = -sum w * logp and parameter grads of ONE right-padded forward
    of megatron ``model`` (TP = PP = 1) with the default causal mask."""
    N, S = tokens.shape
    params = dict(model.model.named_parameters())
    for p in params.values():
        p.grad = None
    if model.optimizer is not None:  # megatron DDP: autograd's gradients land in main_grad
        model.optimizer.zero_grad()
    pos = torch.arange(S, device=tokens.device)[None].expand(N, S)
    hidden = model.model(input_ids=tokens, position_ids=pos, attention_mask=None)
    w_out = model.model.shared_embedding_or_output_weight()
    logits = (hidden.transpose(0, 1).double() @ w_out.double().t())[:, :, :model.cfg.vocab_size].cpu()
    lp_all = torch.log_softmax(logits, -1)
    logp = torch.zeros(N, S, dtype=torch.float64)
    logp[:, 1:] = lp_all[:, :-1].gather(-1, tokens[:, 1:, None].cpu()).squeeze(-1)
    m = mask.double().clone()
    m[:, 0] = 0
    logp = logp * m
    loss = -(weights.double() * logp).sum()
    loss.backward()
    grads = {n: grad_of(p).detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    if model.optimizer is not None:
        model.optimizer.zero_grad()
    return logp.detach(), float(loss), grads


def grad_of(p):
    """A parameter's accumulated gradient: megatron DDP's fp32 main_grad for a model with an
    optimizer (DDP frees .grad into it), else .grad."""
    main = getattr(p, "main_grad", None)
    return p.grad if main is None else main


def _nll(weights):
    w = weights.reshape(-1)
    return lambda logp, idx: -logp * w[idx].to(logp)


def _grad_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _one_rank(cfg_kw, budgets, long_row=None):
    """Packed (several budgets) vs padded on one process: logp, loss and every gradient."""
    from gopd_mega.config import OptimConfig
    from gopd_mega.parallel import build_layout_groups
    from gopd_mega.models import ShardedGPT

    (g,) = build_layout_groups([(1, 1)])
    tokens, mask = ragged_batch(long_row=long_row)
    weights = mask / mask.sum()
    m = ShardedGPT(tiny_cfg(**cfg_kw), g, trainable=True, optim=OptimConfig(lr=1e-30, grad_clip=0.0))
    ref_logp, ref_loss, ref_grads = padded_reference(m, tokens, mask, weights)
    out = {"ref": (ref_logp, ref_loss, ref_grads)}
    for budget in budgets:
        m.stats.reset()
        logp = m.logprobs(tokens, mask, max_tokens=budget)
        st = m.train_step(tokens, mask, _nll(weights), max_tokens=budget)
        grads = {n: grad_of(p).detach().clone() for n, p in m.model.named_parameters()}
        out[budget] = (logp, st, grads, m.stats.as_dict())
    return out


def _check_one_rank(out, budgets, tokens, mask):
    ref_logp, ref_loss, ref_grads = out["ref"]
    for budget in budgets:
        logp, st, grads, stats = out[budget]
        torch.testing.assert_close(logp.double(), ref_logp, rtol=RTOL, atol=1e-6)
        torch.testing.assert_close(st["logp"].double(), ref_logp, rtol=RTOL, atol=1e-6)
        assert st["loss"] == pytest.approx(ref_loss, rel=RTOL)
        for name, g in ref_grads.items():
            assert _grad_err(grads[name], g) < GRAD_RTOL, (budget, name)
        # every response token got a log-prob: nothing lost, nothing outside the mask
        resp = mask.bool().clone()
        resp[:, 0] = False
        assert (logp[resp] < 0).all() and (logp[~resp] == 0).all()
        # 2 calls (logprobs + train_step); no forward over budget unless one sequence is longer
        longest = int(scoring_lengths(mask).max())
        assert stats["max_tokens_per_forward"] <= max(budget, longest)
        assert stats["positions_scored"] == 2 * int(resp.sum())
        assert stats["positions_computed"] == 2 * int(scoring_lengths(mask).sum())  # no padding, no tail


def test_packed_equals_padded_logprobs_loss_grads():
    budgets = (12, 32, 10_000)  # many micro-batches (40 positions in all), two, one
    out = _one_rank({}, budgets)
    tokens, mask = ragged_batch()
    _check_one_rank(out, budgets, tokens, mask)
    assert out[12][3]["forward_calls"] > out[32][3]["forward_calls"] > out[10_000][3]["forward_calls"] == 2
    assert out[12][3]["max_tokens_per_forward"] <= 12


def test_one_long_response_among_short_ones_loses_nothing():
    """Budget 12 < the long row's 39 positions: it runs alone, every token of it is scored."""
    budgets = (12,)
    out = _one_rank({}, budgets, long_row=2)
    tokens, mask = ragged_batch(long_row=2)
    _check_one_rank(out, budgets, tokens, mask)
    assert out[12][3]["max_tokens_per_forward"] == int(scoring_lengths(mask).max()) == 39


@pytest.mark.parametrize("knobs", [{"recompute_granularity": "selective"},
                                   {"recompute_granularity": "full", "recompute_method": "uniform",
                                    "recompute_num_layers": 1},
                                   {"recompute_granularity": "full", "recompute_method": "block",
                                    "recompute_num_layers": 2}])
def test_recompute_changes_nothing(knobs):
    """Recompute replays the same fp32 ops on the same inputs: loss and gradients are bitwise
    those without it."""
    from gopd_mega.config import OptimConfig
    from gopd_mega.models import ShardedGPT
    from gopd_mega.parallel import build_layout_groups

    (g,) = build_layout_groups([(1, 1)])
    tokens, mask = ragged_batch()
    weights = mask / mask.sum()
    res = []
    for kw in ({}, knobs):
        m = ShardedGPT(tiny_cfg(**kw), g, trainable=True, optim=OptimConfig(lr=1e-30, grad_clip=0.0))
        assert m.tconfig.recompute_granularity == kw.get("recompute_granularity")
        st = m.train_step(tokens, mask, _nll(weights), max_tokens=32)
        res.append((st["loss"], {n: grad_of(p).clone() for n, p in m.model.named_parameters()}))
    assert res[0][0] == res[1][0]
    for name, grad in res[0][1].items():
        assert torch.equal(grad, res[1][1][name]), name


def test_memory_knob_validation_and_cpu_refusal():
    from gopd_mega.config import ConfigError
    from gopd_mega.model.build import has_transformer_engine
    from gopd_mega.models import ShardedGPT
    from gopd_mega.parallel import build_layout_groups

    with pytest.raises(ConfigError, match="recompute_method"):
        tiny_cfg(recompute_granularity="full").validate()
    with pytest.raises(ConfigError, match="recompute_num_layers"):
        tiny_cfg(recompute_granularity="full", recompute_method="block", recompute_num_layers=3).validate()
    with pytest.raises(ConfigError, match="recompute_granularity"):
        tiny_cfg(recompute_granularity="everything").validate()
    with pytest.raises(ConfigError, match="sequence_parallel"):
        tiny_cfg(sequence_parallel=True).validate()  # tp = 1
    with pytest.raises(ConfigError, match="context_parallel_size"):
        tiny_cfg(context_parallel_size=0).validate()
    if has_transformer_engine():
        pytest.skip("Transformer Engine is installed: the CPU refusals do not apply")
    (g,) = build_layout_groups([(1, 1)])
    with pytest.raises(ValueError, match="context_parallel_size=2 needs Transformer Engine"):
        ShardedGPT(tiny_cfg(context_parallel_size=2), g)


def test_trainer_forwards_stay_within_the_token_budget(tmp_path):
    """Student, teachers and reference: no forward of a G-OPD step exceeds the budget."""
    from helpers import make_distiller, run_cfg, save_random_model

    dirs = {"student": save_random_model(tmp_path / "s", 1),
            "add": save_random_model(tmp_path / "a", 2), "mul": save_random_model(tmp_path / "m", 3)}
    cfg = run_cfg(dirs, tmp_path / "run", 1, **{"train.max_tokens_per_micro_batch": 24,
                                                  "train.micro_batch_size": "null"})
    d = make_distiller(cfg)
    models = {"student": d.m.student, "reference": d.m.reference, **d.m.teachers}
    for m in models.values():
        m.stats.reset()
    d.train_step()
    for name, m in models.items():  # (the embedded engine samples from its own copy)
        assert m.stats.max_tokens_per_forward <= 24, (name, m.stats)
    # the 8 rows (~15 positions each) did not go through in one forward
    assert d.m.student.stats.forward_calls > 1 and d.m.reference.stats.forward_calls > 1
    assert sum(t.stats.forward_calls for t in d.m.teachers.values()) > 2


# ----------------------------------------------------------------------------- TP = 2, PP = 2


def _layouts():
    from gopd_mega.config import OptimConfig
    from gopd_mega.model.weights import gather_full_state_dict
    from gopd_mega.models import ShardedGPT
    from gopd_mega.parallel import build_layout_groups

    layouts = [(1, 1), (2, 1), (1, 2)]
    groups = build_layout_groups(layouts)
    tokens, mask = ragged_batch(long_row=1)
    weights = mask / mask.sum()
    ref_model = ShardedGPT(tiny_cfg(), groups[0], trainable=True)
    ref = padded_reference(ref_model, tokens, mask, weights)  # TP = PP = 1: no collectives
    out = {"ref": ref}
    runs = [((tp, pp), g, {}) for (tp, pp), g in zip(layouts, groups)]
    runs.append(("tp2+sp", groups[1], {"sequence_parallel": True}))
    for key, g, kw in runs:
        tp, pp = g.tp, g.pp
        m = ShardedGPT(tiny_cfg(tp, pp, **kw), g, trainable=True, optim=OptimConfig(lr=1e-30, grad_clip=0.0))
        logp = m.logprobs(tokens, mask, max_tokens=20)
        st = m.train_step(tokens, mask, _nll(weights), max_tokens=20)
        grads = gather_full_state_dict({i.local_name: grad_of(m._params[i.local_name]) for i in m.param_layout()},
                                       m.param_layout(), m.cfg, m.groups)
        canon = {i.local_name: i.canonical_name for i in ref_model.param_layout()}
        out[key] = (logp, st["loss"], grads, canon, m.stats.max_tokens_per_forward)
    return out


@pytest.mark.distributed
def test_packed_equals_padded_under_tp2_and_pp2():
    """DP=2, TP=2, TP=2 with sequence parallelism (micro-batches padded to even length by a
    never-scored segment), PP=2: log-probs, loss and the full (unsharded, reduced) gradients."""
    for out in run_distributed(_layouts, 2):
        ref_logp, ref_loss, ref_grads = out["ref"]
        for layout in ((1, 1), (2, 1), "tp2+sp", (1, 2)):
            logp, loss, grads, canon, max_tok = out[layout]
            torch.testing.assert_close(logp.double(), ref_logp, rtol=RTOL, atol=1e-6)
            assert loss == pytest.approx(ref_loss, rel=RTOL), layout
            for local, g in ref_grads.items():
                assert _grad_err(grads[canon[local]], g[: grads[canon[local]].shape[0]]) < GRAD_RTOL, (layout, local)
            assert max_tok <= 40  # the long row (39 positions, 40 with SP padding) alone; others within 20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_thd_packed_equals_padded():
    """Transformer Engine THD packing (cu_seqlens, RoPE restarting per sequence) vs one padded
    forward, bf16 weights. bf16 rounds each GEMM output to 8 mantissa bits (4e-3 relative) and the
    packed / padded GEMMs and attention kernels differ in shape, so log-probs (~ -4) agree to a few
    bf16 ulps: atol 5e-2; the fp32 tests above pin the exact equivalence."""
    from gopd_mega.config import OptimConfig
    from gopd_mega.model.build import has_transformer_engine
    from gopd_mega.models import ShardedGPT
    from gopd_mega.parallel import build_layout_groups

    if not has_transformer_engine():
        pytest.skip("needs Transformer Engine (THD attention)")
    (g,) = build_layout_groups([(1, 1)])
    tokens, mask = ragged_batch(long_row=3)
    weights = mask / mask.sum()
    m = ShardedGPT(tiny_cfg(params_dtype="bfloat16"), g, trainable=True, optim=OptimConfig(lr=1e-30, grad_clip=0.0))
    assert m.forward.thd
    ref_logp, ref_loss, _ = padded_reference(m, tokens.cuda(), mask, weights)
    logp = m.logprobs(tokens, mask, max_tokens=16)
    st = m.train_step(tokens, mask, _nll(weights), max_tokens=16)
    torch.testing.assert_close(logp.double(), ref_logp.cpu(), rtol=0, atol=5e-2)
    assert st["loss"] == pytest.approx(ref_loss, rel=2e-2)
    assert m.stats.max_tokens_per_forward <= 38  # the long row alone; the rest within 16
