"""Many SGLang servers (stand-ins) as one engine, and one global batch over 2-3 gloo ranks.

Servers fail mid-batch, time out, or are gone: their requests are finished by the others with the
same rid, nothing lost or duplicated; with no server left the error names every URL.
"""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from sglang_standin import StandinSGLang

from gopd_mega.rollout.coordinator import RolloutCoordinator, Sampling
from gopd_mega.rollout.pool import SGLangPool
from gopd_mega.rollout.sglang import SGLangError

EOS = 2


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from gopd_mega.hf.testing import tiny_hf_model

    path = tmp_path_factory.mktemp("standin") / "tiny"
    tiny_hf_model("llama", path, seed=0)
    return str(path)


@pytest.fixture
def servers(hf_dir):
    made = []

    def make(n):
        for _ in range(n):
            made.append(StandinSGLang(hf_dir, seed=len(made)))
            made[-1].weight_version = "0"  # as after the trainer's initial sync
        return made[-n:]

    yield make
    for s in made:
        s.close()


PROMPTS = [[1, 5 + i, 7, 9 + i] for i in range(10)]
IDS = [f"s3-p{i}-n0" for i in range(10)]


def _generate(pool, **kw):
    return pool.generate(PROMPTS, temperature=1.0, max_new_tokens=4, sample_ids=IDS, **kw)


def test_requests_split_over_servers_concurrently(servers):
    a, b = servers(2)
    a.delay_s = b.delay_s = 0.3
    pool = SGLangPool([a.url, b.url], pad_id=0, stop_ids=[EOS], chunk_size=2)
    batch = _generate(pool)
    assert batch.sample_ids == IDS and len(batch) == 10
    assert sorted(a.served_rids + b.served_rids) == sorted(IDS)  # each once
    assert a.served_rids and b.served_rids  # both servers worked
    for i in range(10):  # each row is its own prompt followed by the response
        assert batch.tokens[i, :4].tolist() == PROMPTS[i] and int(batch.response_lens[i]) >= 1
    assert set(pool.row_servers.values()) == {a.url, b.url}


def test_server_killed_mid_batch_is_finished_by_another(servers):
    a, b = servers(2)
    a.die_after_outputs = 1  # its first request: one row computed, then the server dies unanswered
    a.delay_s = 0.05
    pool = SGLangPool([a.url, b.url], pad_id=0, stop_ids=[EOS], chunk_size=3)
    batch = _generate(pool)
    assert a.dead and a.url in pool.dropped
    assert batch.sample_ids == IDS
    # every id answered exactly once, by the survivor; the dead server's chunk kept its rids
    assert sorted(b.served_rids) == sorted(IDS)
    dead_chunk = a.posted("/generate")[0]["rid"]
    assert set(dead_chunk) <= set(b.served_rids)
    assert all(pool.row_servers[i] == b.url for i in IDS)
    # the next call still works on the survivor and names the dead one only in the log
    assert len(_generate(pool)) == 10


def test_timeout_moves_requests_and_aborts_them_there(servers):
    a, b = servers(2)
    a.delay_s = 30.0
    pool = SGLangPool([a.url, b.url], pad_id=0, stop_ids=[EOS], chunk_size=5, timeout=4.0)
    batch = _generate(pool)
    assert batch.sample_ids == IDS and sorted(b.served_rids) == sorted(IDS)
    assert a.url in pool.dropped and "timed out" in pool.dropped[a.url]
    assert {p["rid"] for p in a.posted("/abort_request")} == set(a.posted("/generate")[0]["rid"])


def test_all_servers_gone_is_a_clear_error(servers):
    a, b = servers(2)
    a.die_after_outputs = b.die_after_outputs = 0
    pool = SGLangPool([a.url, b.url], pad_id=0, stop_ids=[EOS], chunk_size=4, timeout=10)
    with pytest.raises(SGLangError, match=r"no SGLang server left for generation \(\d+ of 10 requests unanswered\)") as info:
        _generate(pool)
    assert a.url in str(info.value) and b.url in str(info.value)
    with pytest.raises(SGLangError, match="no SGLang server left for generation"):
        _generate(pool)


def test_health_check_names_the_dead_server(servers):
    a, b = servers(2)
    b.close()
    pool = SGLangPool([a.url, b.url], pad_id=0, stop_ids=[EOS])
    with pytest.raises(SGLangError, match=rf"not answering /health: {b.url} \(of {a.url}, {b.url}\)"):
        pool.check_health(timeout=5)


def test_pool_config_errors():
    with pytest.raises(ValueError, match="listed twice"):
        SGLangPool(["http://h:1", "http://h:1/"], pad_id=0, stop_ids=[EOS])
    with pytest.raises(ValueError, match="unique sample ids"):
        SGLangPool("http://h:1", pad_id=0, stop_ids=[EOS]).generate([[1], [2]], temperature=1.0, max_new_tokens=2,
                                                                     sample_ids=["x", "x"])


# ----------------------------------------------------------------------------- 2-3 gloo ranks


def _collect(url, steps, prompts_per_step, spp):
    import torch.distributed as dist

    from gopd_mega.rollout.sglang import http_call

    rollout = RolloutCoordinator(SGLangPool([url], pad_id=0, stop_ids=[EOS], chunk_size=3))
    out = []
    for step in range(steps):
        prompts = [[1, 3 + i, 4 + step] for i in range(prompts_per_step)]
        batch = rollout.collect(step, prompts, spp, Sampling(1.0, 1.0, 4, seed=step))
        out.append((batch.sample_ids, batch.tokens, batch.sampler_logp, batch.weight_versions))
    # Someone switches the server to other weights behind the trainer's back: every rank must stop.
    if dist.get_rank() == 0:
        http_call(url + "/update_weight_version", {"new_version": "7"})
    with pytest.raises(SGLangError, match=r"no SGLang server left for generation .*weight version mismatch: SGLang "
                                          r"\S+ drew 2 sample\(s\) with weight version \['7'\] instead of '0'") as info:
        rollout.collect(steps, [[1, 5], [1, 6]], 1, Sampling(1.0, 1.0, 3, seed=0))
    return out, str(info.value)


@pytest.mark.distributed
def test_three_ranks_every_prompt_once_per_step_same_batch_everywhere(servers):
    """Also: a server that reports other weights is taken out; with none left the error is raised on
    every rank."""
    (server,) = servers(1)
    results = run_distributed(_collect, 3, (server.url, 2, 5, 2))
    batches = [r[0] for r in results]
    for other in batches[1:]:
        for mine, theirs in zip(batches[0], other, strict=True):
            assert mine[0] == theirs[0] and torch.equal(mine[1], theirs[1]) and torch.equal(mine[2], theirs[2])
    want = [f"s{k}-p{i}-n{j}" for k in range(2) for i in range(5) for j in range(2)]
    served = [r for r in server.served_rids if r.startswith("s0") or r.startswith("s1")]
    assert sorted(served) == sorted(want)
    assert [ids for ids, *_ in batches[0]] == [want[:10], want[10:]]
    assert sum(len(p["input_ids"]) for p in server.posted("/generate")) == 22  # 20 + the 2 refused, one rank
    assert all(v == ["0"] * 10 for *_, v in batches[0])
    messages = [r[1] for r in results]
    assert messages[0] == messages[1] == messages[2] and server.url in messages[0]
