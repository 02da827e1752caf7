"""The client against SGLang's own code, not against what we think SGLang does.

* Every kind of body the client sends is judged by SGLang 0.5.23's own request classes and
  validators (tests/sglang_contract.py loads them from the installed ``sglang`` wheel); the
  stand-in applies the same checks to every request it gets, so every stand-in test is also a
  conformance test (``server.refused`` must stay empty).
* The real router (``sglang-router`` 0.3.2, its Rust gateway) runs in front of stand-in servers:
  a whole rollout step, the weight sync to the servers behind it, and a server killed there.
* The protocol differences between releases 0.5.9 .. 0.5.23 (weight-update sessions from 0.5.21),
  and the refusal of a release the client does not know.
"""

from __future__ import annotations

import signal

import pytest

import sglang_contract
from sglang_procs import start_router, start_standin, stop
from sglang_standin import StandinSGLang


from gopd_mega.rollout.coordinator import RolloutCoordinator, Sampling
from gopd_mega.rollout.pool import SGLangPool
from gopd_mega.rollout.protocol import parse_version, protocol_for
from gopd_mega.rollout.servers import top_k_request
from gopd_mega.rollout.sglang import SGLangError, generate_body, http_call, sampling_params, score_body


@pytest.fixture(scope="module")
def contract():
    c = sglang_contract.load()
    assert c is not None, "the sglang wheel (0.5.23, --no-deps) is not installed: run `make setup`"
    assert c.version == sglang_contract.VERSION
    return c


def _params(**kw):
    return sampling_params(temperature=kw.get("temperature", 0.7), top_p=0.9, max_new_tokens=8, stop_ids=[2, 9],
                           greedy=kw.get("greedy", False), seed=kw.get("seed"))


@pytest.mark.parametrize("body", [
    generate_body([[1, 2, 3]], [_params()], ["s0-p0-n0"], batched=False),            # through a router
    generate_body([[1, 2, 3]], [_params(seed=7)], ["s0-p0-n1"], batched=False),      # with a seed
    generate_body([[1, 2], [3, 4, 5]], [_params()] * 2, ["a", "b"], batched=True),   # a server, one object
    generate_body([[1, 2], [3]], [_params(seed=1), _params(seed=2)], ["a", "b"], batched=True),  # per-row seeds
    generate_body([[1, 2]], [_params(greedy=True)], None, batched=False),              # greedy, server rid
    score_body([[1, 2, 3], [4, 5]], batched=True),
    score_body([[1, 2, 3]], batched=False),
    top_k_request([[1, 2, 3], [4, 5]], 4, batched=True),
    top_k_request([[1, 2, 3]], 4, batched=False),
], ids=["router", "router-seed", "batch", "batch-seeds", "greedy", "score-batch", "score-one", "top-k-batch", "top-k-one"])
def test_every_generate_body_passes_sglangs_own_checks(contract, body):
    contract.check("/generate", body, vocab_size=100)


def test_the_contract_refuses_what_sglang_refuses(contract):
    """The checks can fail: bodies SGLang 0.5.23 refuses, or whose fields it would drop."""
    bad = {
        "/generate": [{"input_ids": [[1], [2]], "rid": ["x"]},                 # rid list of the wrong length
                      {"input_ids": [[1], [2]], "rid": ["x", "x"]},            # duplicate rids
                      {"input_ids": [1], "sampling_params": {"temprature": 1.0}},  # unknown sampling field
                      {"input_ids": [1], "sampling_params": {"max_new_tokens": -1}},
                      {"input_ids": [1], "sampling_params": {"top_p": 0.0}},
                      {"input_ids": [1], "return_logprob": "yes"}],
        "/update_weights_from_disk": [{"model_path": "/x", "version": "3"}, {}],
        "/init_weights_update_group": [{"master_address": "h", "master_port": "p", "rank_offset": 1, "world_size": 2}],
        "/update_weights_from_tensor": [{"serialized_named_tensors": ["not base64!"]}],
        "/pause_generation": [{"mode": "soft"}],
    }
    for path, bodies in bad.items():
        for body in bodies:
            with pytest.raises(sglang_contract.ContractError):
                contract.check(path, body, vocab_size=100)


def test_protocol_by_release():
    assert not protocol_for("0.5.9", "u").weight_update_session
    assert not protocol_for("0.5.20", "u").weight_update_session
    assert protocol_for("0.5.21", "u").weight_update_session and protocol_for("0.5.23", "u").weight_update_session
    assert protocol_for("0.5.15.post1", "u").version == "0.5.15.post1"
    assert parse_version("0.0.0.dev0") is None
    for unknown in ("0.5.8", "0.5.24", "0.6.0", "0.0.0.dev0", "standin"):
        with pytest.raises(SGLangError, match=rf"SGLang http://h:1 reports version '{unknown}'.*supported: 0.5.9 to 0.5.23"):
            protocol_for(unknown, "http://h:1")


def _sync_calls(server):
    return [p for p, _ in server.calls if p in ("/pause_generation", "/begin_weight_update", "/update_weights_from_tensor",
                                                "/end_weight_update", "/continue_generation")]


@pytest.mark.parametrize("version,session", [("0.5.9", False), ("0.5.20", False), ("0.5.21", True), ("0.5.23", True)])
def test_weight_update_session_where_the_release_needs_one(model_dirs, student_hf, version, session):
    from gopd_mega.config import ModelConfig
    from gopd_mega.rollout.weight_sync import IpcSync
    from gopd_mega.model_io import build_model

    server = StandinSGLang(student_hf, version=version)
    try:
        student = build_model(ModelConfig(load=model_dirs["student"]), trainable=False, name="student")
        sync = IpcSync(SGLangPool(server.url, pad_id=0, stop_ids=[]), allow_cpu=True, bucket_mb=1)
        sync.bucket_bytes = 20_000  # several loads per refresh
        sync.refresh(student, 1)
        calls = _sync_calls(server)
        loads = calls.count("/update_weights_from_tensor")
        assert loads > 1 and server.weight_version == "1" and not server.refused
        if session:
            assert calls == ["/pause_generation", "/begin_weight_update"] + ["/update_weights_from_tensor"] * loads + \
                ["/end_weight_update", "/continue_generation"]
        else:
            assert calls == ["/pause_generation"] + ["/update_weights_from_tensor"] * loads + ["/continue_generation"]
            assert server.posted("/begin_weight_update") == []
        server.calls.clear()
        server.session_open = session  # a session left open by a trainer that died mid-sync
        sync.refresh(student, 2)
        assert server.weight_version == "2" and not server.session_open
    finally:
        server.close()


def test_a_release_the_client_does_not_know_is_refused_at_start(student_hf):
    server = StandinSGLang(student_hf, version="0.0.0")
    try:
        pool = SGLangPool(server.url, pad_id=0, stop_ids=[2])
        with pytest.raises(SGLangError, match=rf"SGLang {server.url} reports version '0.0.0'.*rollout.sglang_version"):
            pool.check_health()
        SGLangPool(server.url, pad_id=0, stop_ids=[2], version="0.5.23").check_health()  # the configured release
    finally:
        server.close()


# ----------------------------------------------------------------------------- the real router


@pytest.fixture
def fleet(student_hf, tmp_path):
    procs = []
    try:
        workers = []
        for _ in range(2):
            proc, url = start_standin(student_hf)
            procs.append(proc)
            workers.append(url)
        router, router_url = start_router(workers, tmp_path / "router.log")
        procs.append(router)
        yield router_url, workers, procs
    finally:
        stop(procs)


def _generate_bodies(url):
    return [b for p, b in http_call(url + "/standin_log")["calls"] if p == "/generate"]


@pytest.mark.slow
def test_a_rollout_step_through_the_real_router(fleet, model_dirs, tmp_path):
    from gopd_mega.config import ModelConfig
    from gopd_mega.rollout.weight_sync import DiskSync
    from gopd_mega.model_io import build_model

    router, workers, procs = fleet
    old = {"input_ids": [[1, 5, 7], [1, 6, 8]], "sampling_params": {"max_new_tokens": 2}, "rid": ["a", "b"]}
    with pytest.raises(SGLangError, match=r"HTTP 422: .*rid: invalid type: sequence, expected a string"):
        http_call(router + "/generate", old)  # what the client used to send
    with pytest.raises(SGLangError, match="HTTP 422"):
        http_call(router + "/generate", dict(old, rid=None, sampling_params=[{"max_new_tokens": 2}] * 2))

    student = build_model(ModelConfig(load=model_dirs["student"]), trainable=False, name="student")
    pool = SGLangPool(router, control_urls=workers, pad_id=0, stop_ids=[2], send_seed=True)
    pool.check_health()
    rollout = RolloutCoordinator(pool, weight_sync=DiskSync(pool, tmp_path / "w"))
    rollout.refresh(student, 0)
    prompts = [[1, 3 + i, 4, 5] for i in range(6)]
    batch = rollout.collect(0, prompts, 2, Sampling(1.0, 1.0, 4, seed=0))
    rollout.refresh(student, 1)
    batch1 = rollout.collect(1, prompts, 2, Sampling(1.0, 1.0, 4, seed=1))
    assert batch.weight_versions == ["0"] * 12 and batch1.weight_versions == ["1"] * 12
    bodies = [b for w in workers for b in _generate_bodies(w) if b["sampling_params"]["max_new_tokens"] == 4]
    assert all(isinstance(b["rid"], str) and isinstance(b["input_ids"][0], int) for b in bodies)  # one sample each
    assert sorted(b["rid"] for b in bodies) == sorted(batch.sample_ids + batch1.sample_ids)  # each exactly once
    assert all(_generate_bodies(w) for w in workers)  # the router spread them
    for w in workers:
        log = http_call(w + "/standin_log")
        assert log["refused"] == [] and log["weight_version"] == "1"
    # A server behind the router dies: the step completes on the other; the dead one leaves the
    # router's worker list too.
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(timeout=10)
    rollout.refresh(student, 2)
    batch2 = rollout.collect(2, prompts, 2, Sampling(1.0, 1.0, 4, seed=2))
    assert len(batch2) == 12 and batch2.weight_versions == ["2"] * 12
    assert workers[0] in pool.out and workers[1] not in pool.out
    listed = [w["url"] for w in http_call(router + "/workers")["workers"]]
    assert workers[0] not in listed and workers[1] in listed
