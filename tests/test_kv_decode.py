"""KV-cache decoding (gopd_mega.rollout.kv_decode) equals the no-cache path.

On a 2-process gloo world, for the layouts DP=2 (tp=1), TP=2 and PP=2 of the same tiny model,
for both decode paths, the fast one (gopd_mega.model.inference: plain torch on the model's
parameters, the default) and megatron's own forward with its StaticInferenceContext:
- CachedDecoder logits (prefill + steps, ragged prompts, rows dropped at different steps) match
  ShardedGPT.next_token_logits on the whole prefix, for the left-padded batch and for the
  bucketed mode (the Transformer-Engine fallback);
- the engine with the cache gives the same greedy tokens and, with the same seed, the same
  sampled tokens as the engine without it, and the same reported log-probs; the fast path gives
  the same tokens as megatron's path;
- a row decoded in a batch gives the same greedy tokens as decoded alone;
- forward-only scoring (ShardedGPT.logprobs, packed micro-batches) through the same plain-torch
  stage equals megatron's forward.

Tolerances (fp32): the cached path computes the same functions with different matmul shapes and,
for left-padded rows, RoPE positions shifted by the pad (same query-key distances), so only
rounding differs. Measured max |diff| ~4e-6 on logits of magnitude ~10 (init_std 0.3, chosen so
that the distributions are peaked and greedy ties are not a coin flip); ATOL 1e-4 leaves room for
other BLAS builds while still catching any wrong position, mask or cache slot (those move logits
by O(1)).
"""

import dataclasses

import pytest
import torch

from dist_utils import run_distributed
from helpers import tiny_cfg

pytestmark = pytest.mark.distributed

ATOL = 1e-4
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15], [16, 17]]
MAX_NEW = 8


def _cfg(tp, pp):
    return dataclasses.replace(tiny_cfg(tp, pp), max_seq_len=64, init_std=0.3, seed=7)


def _layouts():
    from gopd_mega.models import ShardedGPT
    from gopd_mega.parallel import build_layout_groups
    from gopd_mega.rollout.embedded import EmbeddedEngine
    from gopd_mega.rollout.kv_decode import CachedDecoder

    layouts = [(1, 1), (2, 1), (1, 2)]
    out = {}
    for (tp, pp), g in zip(layouts, build_layout_groups(layouts)):
        m = ShardedGPT(_cfg(tp, pp), g)
        res = {"fast_path": CachedDecoder(m, torch.ones(1, 1, dtype=torch.int64), torch.ones(1, dtype=torch.int64),
                                          1).fast_path_off}
        # 1. logits, step by step, against the full-prefix forward
        lengths = torch.tensor([len(p) for p in PROMPTS])
        S = int(lengths.max()) + 6
        tokens = torch.zeros(len(PROMPTS), S, dtype=torch.int64)
        for i, p in enumerate(PROMPTS):
            tokens[i, :len(p)] = torch.tensor(p)
        gen = torch.Generator().manual_seed(0)
        prompt_tokens = tokens.clone()
        for fast, bucketed in ((True, False), (True, True), (False, False), (False, True)):
            tokens = prompt_tokens.clone()
            with CachedDecoder(m, tokens[:, :int(lengths.max())], lengths.clone(), 6, bucketed=bucketed,
                               fast=fast) as dec:
                lens = lengths.clone()
                active = torch.arange(len(PROMPTS))
                diffs = []
                for step in range(5):
                    if step == 0:
                        got = dec.prefill()
                    else:
                        active = active[[j for j in range(len(active)) if (step + j) % 4]]  # drop some rows
                        got = dec.step(active, tokens[active, lens[active] - 1])
                    want = m.next_token_logits(tokens[active, :int(lens[active].max())], lens[active])
                    diffs.append(float((got - want).abs().max()))
                    new = torch.randint(0, 50, (len(active),), generator=gen)
                    tokens[active, lens[active]] = new
                    lens[active] += 1
            res[f"diffs_fast={fast}_bucketed={bucketed}"] = diffs
            res[f"rows_left_fast={fast}_bucketed={bucketed}"] = len(active)
        # 1b. forward-only scoring (packed micro-batches) through the plain stage = megatron's forward
        score_tokens = torch.randint(1, 50, (5, 12), generator=torch.Generator().manual_seed(1))
        score_mask = torch.zeros(5, 12)
        for i in range(5):
            score_mask[i, 3: 6 + i] = 1
        lps = {}
        for fast in (True, False):
            m.forward.fast_scoring = fast
            lps[fast] = m.logprobs(score_tokens, score_mask, 0.9, max_tokens=24)
        m.forward.fast_scoring = True
        res["scoring_used_fast"] = m.forward._inference_stage() is not None
        res["scoring_diff"] = float((lps[True] - lps[False]).abs().max())
        res["scoring_nonzero"] = bool((lps[False] != 0).sum() == (score_mask[:, 1:] != 0).sum())
        # 2. the engine, with and without the cache. The stop token is the 4th greedy token of
        # row 0, so that some rows stop and others run to max_new_tokens.
        first = EmbeddedEngine(m, pad_id=0, stop_ids=[], kv_cache=False).generate(
            PROMPTS[:1], temperature=1.0, max_new_tokens=4, greedy=True)
        stop = first.response_ids(0)[3]
        res["stop"] = stop
        for greedy in (True, False):
            for kv in (False, True, "megatron"):
                eng = EmbeddedEngine(m, pad_id=0, stop_ids=[stop], kv_cache=bool(kv), fast_decode=kv != "megatron")
                b = eng.generate(PROMPTS, temperature=0.8, top_p=0.9, max_new_tokens=MAX_NEW, greedy=greedy, seed=5)
                res[(greedy, kv)] = (b.tokens, b.sampler_logp, b.finish_reasons)
        # 3. a row alone decodes as in the batch (greedy; one layout suffices, TP=2 here)
        if tp == 2:
            eng = EmbeddedEngine(m, pad_id=0, stop_ids=[stop], kv_cache=True)
            res["alone"] = [eng.generate([p], temperature=1.0, max_new_tokens=MAX_NEW, greedy=True).response_ids(0)
                            for p in PROMPTS]
        out[(tp, pp)] = res
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_layouts, 2)


def test_fast_path_serves_every_layout(results):
    for out in results:
        for layout, res in out.items():
            assert res["fast_path"] == "", (layout, res["fast_path"])


def test_fast_scoring_equals_megatron_forward(results):
    for out in results:
        for layout, res in out.items():
            assert res["scoring_used_fast"] and res["scoring_nonzero"], layout
            assert res["scoring_diff"] < ATOL, (layout, res["scoring_diff"])


def test_cached_logits_match_full_prefix(results):
    for rank, out in enumerate(results):
        for layout, res in out.items():
            for fast in (True, False):
                for bucketed in (False, True):
                    diffs = res[f"diffs_fast={fast}_bucketed={bucketed}"]
                    assert res[f"rows_left_fast={fast}_bucketed={bucketed}"] < len(PROMPTS)  # rows were dropped
                    assert max(diffs) < ATOL, (rank, layout, fast, bucketed, diffs)


def test_engine_with_cache_equals_without(results):
    for rank, out in enumerate(results):
        for layout, res in out.items():
            for greedy in (True, False):
                tok0, lp0, fin0 = res[(greedy, False)]
                for kv in (True, "megatron"):  # the fast path, megatron's path
                    tok1, lp1, fin1 = res[(greedy, kv)]
                    assert torch.equal(tok0, tok1), (rank, layout, greedy, kv)
                    assert fin0 == fin1
                    torch.testing.assert_close(lp1, lp0, rtol=0, atol=ATOL)
            for greedy in (True, False):
                assert len(set(res[(greedy, False)][2])) == 2, ("want rows that stop and rows that run out", greedy)


def test_row_alone_equals_row_in_batch(results):
    for out in results:
        for layout, res in out.items():
            if "alone" not in res:
                continue
            tokens, _, _ = res[(True, True)]
            for i, p in enumerate(PROMPTS):
                resp = res["alone"][i]
                assert tokens[i, len(p):len(p) + len(resp)].tolist() == resp, (layout, i)


def test_same_tokens_on_every_rank_and_layout(results):
    base = results[0][(1, 1)]
    for out in results:
        for layout, res in out.items():
            assert torch.equal(res[(True, True)][0], base[(True, True)][0]), layout


VARIANTS = {  # model options the fast path reads differently (one process, TP=1)
    "untied, gelu, qkv bias, no qk norm": dict(tie_embeddings=False, activation="gelu", add_qkv_bias=True,
                                                qk_layernorm=False),
    "MHA (no GQA), rope base 500000": dict(num_query_groups=4, rope_base=500000.0),
    "MQA, 3 layers": dict(num_query_groups=1, num_layers=3),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fast_path_equals_megatron_path_across_model_options(variant):
    from gopd_mega.hf.testing import init_single_process
    from gopd_mega.models import ShardedGPT
    from gopd_mega.parallel import build_model_groups
    from gopd_mega.rollout.embedded import EmbeddedEngine
    from gopd_mega.rollout.kv_decode import CachedDecoder

    init_single_process()
    cfg = dataclasses.replace(_cfg(1, 1), **VARIANTS[variant])
    m = ShardedGPT(cfg, build_model_groups(1, 1))
    if cfg.add_qkv_bias:  # megatron initialises biases to zero: make them count
        with torch.no_grad():
            for name, p in m.model.named_parameters():
                if name.endswith("linear_qkv.bias"):
                    p.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    assert CachedDecoder(m, torch.ones(1, 1, dtype=torch.int64), torch.ones(1, dtype=torch.int64), 1).stage is not None
    out = {}
    for kv in (False, True, "megatron"):
        eng = EmbeddedEngine(m, pad_id=0, stop_ids=[], kv_cache=bool(kv), fast_decode=kv != "megatron")
        out[kv] = eng.generate(PROMPTS, temperature=1.0, max_new_tokens=MAX_NEW, greedy=True)
    for kv in (True, "megatron"):
        assert torch.equal(out[kv].tokens, out[False].tokens), (variant, kv)
        torch.testing.assert_close(out[kv].sampler_logp, out[False].sampler_logp, rtol=0, atol=ATOL)
