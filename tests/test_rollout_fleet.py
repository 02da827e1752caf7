"""A fleet of SGLang servers (stand-ins in their own processes) that loses members.

* A two-server run in which one server is killed with SIGKILL right after its first answered
  request trains on every step with the same prompts as an undisturbed run.
* A hung server (its /generate never answers, its /health still does) is abandoned within
  timeout + timeout_per_token * max_new_tokens, its requests finished elsewhere with the same
  rid; it stays out while its /generate probe fails, and comes back once the probe succeeds and
  a weight sync has brought it to the current version.
"""

from __future__ import annotations

import signal
import time

import pytest

from sglang_procs import start_standin, stop
from sglang_standin import StandinSGLang

from helpers import make_distiller, run_cfg

from gopd_mega.rollout.pool import SGLangPool
from gopd_mega.rollout.sglang import http_call
from gopd_mega.rollout.weight_sync import DiskSync

def _fit(model_dirs, out_dir, urls, steps):
    cfg = run_cfg(model_dirs, out_dir, steps, **{"rollout.engine": "sglang", "rollout.sglang_url": f"[{','.join(urls)}]",
                                                  "train.prompts_per_step": 4, "rollout.request_batch": 1})
    run = make_distiller(cfg)
    seen = []
    original = run.next_rollout

    def recording():
        prompts, batch = original()
        seen.append((list(batch.sample_ids), batch.tokens[:, :4].clone(), len(prompts)))
        return prompts, batch

    run.next_rollout = recording
    history = run.fit()
    return run, seen, history


@pytest.mark.slow
def test_kill_9_of_one_server_loses_no_prompt(model_dirs, student_hf, tmp_path):
    """Server A SIGKILLs itself right after answering its first /generate: the run completes every
    step on server B, with the same prompts (ids and tokens) as a run with both servers alive."""
    procs = []
    try:
        a, url_a = start_standin(student_hf, "--kill-after", "1")
        procs.append(a)
        b, url_b = start_standin(student_hf)
        procs.append(b)
        c, url_c = start_standin(student_hf)
        procs.append(c)
        d, url_d = start_standin(student_hf)
        procs.append(d)
        steps = 3
        run, disturbed, history = _fit(model_dirs, tmp_path / "killed", [url_a, url_b], steps)
        assert a.wait(timeout=30) == -signal.SIGKILL  # it really was kill -9'ed
        assert url_a in run.rollout.engine.out and url_b not in run.rollout.engine.out
        _, calm, calm_history = _fit(model_dirs, tmp_path / "calm", [url_c, url_d], steps)
    finally:
        stop(procs)
    assert len(history) == len(calm_history) == steps
    assert [n for *_, n in disturbed] == [n for *_, n in calm] == [4] * steps  # prompts trained on, per step
    for (ids, toks, _), (ids2, toks2, _) in zip(disturbed, calm, strict=True):
        assert ids == ids2 and (toks == toks2).all()  # the same prompts, every sample once
    assert all(m["loss"] == m["loss"] for m in history)  # finite training on the survivor


def test_hung_server_is_abandoned_in_bounded_time_and_comes_back_after_probe_and_sync(model_dirs, student_hf,
                                                                                       tmp_path):
    from gopd_mega.config import ModelConfig
    from gopd_mega.model_io import build_model

    a, b = StandinSGLang(student_hf), StandinSGLang(student_hf, seed=1)
    try:
        a.weight_version = b.weight_version = "0"
        a.hang = True
        pool = SGLangPool([a.url, b.url], pad_id=0, stop_ids=[2], chunk_size=2, timeout=3.0, timeout_per_token=0.1,
                          probe_timeout=3.0)
        prompts = [[1, 5 + i, 7] for i in range(6)]
        ids = [f"s0-p{i}-n0" for i in range(6)]
        t0 = time.monotonic()
        batch = pool.generate(prompts, temperature=1.0, max_new_tokens=4, sample_ids=ids, expect_version="0")
        elapsed = time.monotonic() - t0
        assert batch.sample_ids == ids and sorted(b.served_rids) == sorted(ids)  # all finished on b, same rids
        assert elapsed < 3.0 + 0.1 * 4 + 10.0  # the limit (3.4 s) plus b's own work, not an hour
        assert a.url in pool.out and "timed out" in pool.out[a.url]
        held = {rid for body in a.posted("/generate") for rid in body["rid"]}
        assert held and held <= set(ids) and held <= {body["rid"] for body in a.posted("/abort_request")}
        assert pool.servers[0].health()  # /health still answers: it is not what lets a server back in
        assert pool.probe_out() == [] and a.url in pool.out
        student = build_model(ModelConfig(load=model_dirs["student"]), trainable=False, name="student")
        sync = DiskSync(pool, tmp_path / "w")
        sync.refresh(student, 1)  # a still hangs: b alone is synced
        assert a.url in pool.out and b.weight_version == "1" and a.weight_version == "0"
        a.hang = False
        sync.refresh(student, 2)  # a's probe succeeds: it is synced to version 2, then readmitted
        assert pool.out == {} and a.weight_version == b.weight_version == "2"
        for s in pool.servers:
            s.timeout = 60.0  # a's abandoned requests finish now: no time limit race on a busy machine
        batch = pool.generate(prompts, temperature=1.0, max_new_tokens=4, sample_ids=[f"s2-{i}" for i in ids],
                              expect_version="2")
        assert set(pool.row_servers.values()) == {a.url, b.url}
        assert not a.refused and not b.refused  # SGLang's own request classes took every body
    finally:
        a.close()
        b.close()


def test_probe_is_a_real_generate(student_hf):
    server = StandinSGLang(student_hf)
    try:
        pool = SGLangPool([server.url], pad_id=0, stop_ids=[2])
        pool.take_out(pool.servers[0], "test")
        assert pool.probe_out() == pool.servers[0:1]
        body = server.posted("/generate")[-1]
        assert body["sampling_params"]["max_new_tokens"] == 1 and isinstance(body["input_ids"][0], int)
        assert pool.out  # a probe alone does not readmit a server that syncs weights ...
        assert pool.readmit_frozen() == pool.servers[0:1] and pool.out == {}  # ... one of a frozen model, yes
        pool.take_out(pool.servers[0], "test")
        http_call(server.url + "/release_memory_occupation", {"tags": ["weights"]})
        assert pool.probe_out() == [] and pool.readmit_frozen() == []  # a server that cannot generate fails its probe
    finally:
        server.close()


def test_behind_a_router_a_stale_or_dead_worker_is_found_by_probing_the_workers(student_hf):
    """A failure through a router does not say which server behind it failed: the workers are
    probed, and one that fails its probe or reports another weight version is taken out (the
    router stays). Here a stand-in plays the router (it answers with stale weights); W1 is stale
    too, W2 is current: W1 is taken out, W2 kept; the router is taken out after its third failure
    of the same rows, and the error names it."""
    r, w1, w2 = StandinSGLang(student_hf), StandinSGLang(student_hf), StandinSGLang(student_hf)
    try:
        r.weight_version = w1.weight_version = "0"
        w2.weight_version = "1"
        pool = SGLangPool(r.url, control_urls=[w1.url, w2.url], pad_id=0, stop_ids=[2], probe_timeout=10.0)
        with pytest.raises(Exception, match=rf"no SGLang server left for generation.*{r.url}: weight version mismatch"):
            pool.generate([[1, 5, 7]], temperature=1.0, max_new_tokens=2, sample_ids=["s1-p0-n0"], expect_version="1")
        assert w1.url in pool.out and "reports weight version '0' instead of '1'" in pool.out[w1.url]
        assert w2.url not in pool.out and r.url in pool.out
        assert [b["rid"] for b in r.posted("/generate")] == ["s1-p0-n0"] * 3  # the same rid each try
    finally:
        for s in (r, w1, w2):
            s.close()
