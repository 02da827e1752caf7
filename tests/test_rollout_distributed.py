"""Server rollouts in a distributed job (gloo, CPU) against the stand-in SGLang server.

The users' report: on 2 ranks with rollout.engine=sglang, 2 steps x 4 prompts sent 16 prompts,
4 weight refreshes, and rank 1 could post /update_weights_from_disk before rank 0 had written the
checkpoint. Here: every prompt goes to the server once per step, every rank trains on the same
batch, one refresh per step (plus the initial one), each of a complete bf16 checkpoint.
"""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from sglang_standin import StandinSGLang
from helpers import make_distiller, run_cfg

from gopd_mega.config import ModelConfig
from gopd_mega.rollout.servers import ServerScoringMismatch


@pytest.fixture(scope="module")
def _server(student_hf):
    server = StandinSGLang(student_hf)
    yield server
    server.close()


@pytest.fixture
def server(_server, student_hf):
    _server.calls.clear()
    _server.loads.clear()
    _server.served_rids.clear()
    _server.return_original_logprob, _server.report_version = False, None
    return _server


def _fit_recording(model_dirs, out_dir, url, steps, extra):
    cfg = run_cfg(model_dirs, out_dir, steps, **{"rollout.engine": "sglang", "rollout.sglang_url": url,
                                                  "train.prompts_per_step": 4, **extra})
    run = make_distiller(cfg)
    seen = []
    original = run.next_rollout

    def recording():
        prompts, batch = original()
        seen.append((list(batch.sample_ids), batch.tokens.clone(), list(batch.weight_versions)))
        return prompts, batch

    run.next_rollout = recording
    history = run.fit()
    return seen, [m["loss"] for m in history]


@pytest.mark.distributed
def test_two_ranks_one_global_batch_and_one_refresh_per_step(model_dirs, server, tmp_path):
    results = run_distributed(_fit_recording, 2, (model_dirs, tmp_path / "run", server.url, 2, {}))
    (seen0, loss0), (seen1, loss1) = results
    assert loss0 == loss1
    for (ids0, tok0, ver0), (ids1, tok1, ver1) in zip(seen0, seen1, strict=True):
        assert ids0 == ids1 and torch.equal(tok0, tok1) and ver0 == ver1  # every rank: the same batch
    assert [v for _, _, v in seen0] == [["0"] * 4, ["1"] * 4]  # step k sampled after k updates
    # s-1-*: the start-up check's samples; standin-*: its prefill scoring (no rid sent)
    served = [r for r in server.served_rids if not r.startswith(("s-1-", "standin-"))]
    assert sorted(served) == sorted(f"s{k}-p{i}-n0" for k in range(2) for i in range(4))  # once each
    posts = server.posted("/update_weights_from_disk")
    assert [p["weight_version"] for p in posts] == ["0", "1", "2"]  # initial + one per step, one rank
    assert all(load["complete"] and load["dtypes"] == ["torch.bfloat16"] for load in server.loads)
    assert server.weight_version == "2"
    folders = sorted(p.name for p in (tmp_path / "run" / "rollout_weights").iterdir())
    assert folders == ["v000002"]  # older exports removed once the server confirmed the new one
    # pause/continue around every update, never two updates at once
    paths = [p for p, _ in server.calls if p in ("/pause_generation", "/update_weights_from_disk", "/continue_generation")]
    assert paths == ["/pause_generation", "/update_weights_from_disk", "/continue_generation"] * 3


def test_server_scoring_disagreement_is_reported(model_dirs, server, tmp_path, capsys):
    """A rollout server that reports temperature-1 log-probs (launched with
    SGLANG_RETURN_ORIGINAL_LOGPROB=1): the start-up check compares its sampler log-probs with the
    student's at T = 0.5 and refuses (or, with server_check=warn, reports the gap and runs)."""
    server.return_original_logprob = True
    base = {"rollout.engine": "sglang", "rollout.sglang_url": server.url, "rollout.temperature": 0.5,
            "train.prompts_per_step": 2}
    run = make_distiller(run_cfg(model_dirs, tmp_path / "refuse", 1, **base))
    with pytest.raises(ServerScoringMismatch, match=r"rollout server \(student\).*temperature 0.5: mean \|server - "
                                                    r"trainer\| = \d+\.\d+ nats per token"):
        run.fit()
    run = make_distiller(run_cfg(model_dirs, tmp_path / "warn", 1, **base, **{"rollout.server_check": "warn"}))
    assert len(run.fit()) == 1
    assert "WARNING: rollout server (student)" in capsys.readouterr().out
    # the same server reporting log-probs at the sampling temperature passes the check at T = 0.5
    # (prefill scoring, which SGLang does at T = 1 only, is not what the check compares)
    server.return_original_logprob = False
    run = make_distiller(run_cfg(model_dirs, tmp_path / "agree", 1, **base))
    assert len(run.fit()) == 1


def test_overlap_samples_next_batch_with_previous_weights(model_dirs, server, tmp_path):
    """rollout.overlap: batch k+1 is sampled while step k trains, so it carries version k (one step
    off-policy); the prompts of every step are those of a run without overlap, and a checkpoint
    taken with a batch in flight resumes from that batch's prompts."""
    plain, _ = _fit_recording(model_dirs, tmp_path / "plain", server.url, 3, {"train.save_every": 2})
    overlapped, _ = _fit_recording(model_dirs, tmp_path / "overlap", server.url, 3,
                                   {"rollout.overlap": True, "train.save_every": 2})
    assert [v for _, _, v in plain] == [["0"] * 4, ["1"] * 4, ["2"] * 4]
    assert [v for _, _, v in overlapped] == [["0"] * 4, ["0"] * 4, ["1"] * 4]
    assert [ids for ids, _, _ in plain] == [ids for ids, _, _ in overlapped]
    prompt_len = lambda toks: toks[:, :4]  # noqa: E731 - synthetic prompts are longer than 4 tokens
    for (_, a, _), (_, b, _) in zip(plain, overlapped):
        assert torch.equal(prompt_len(a), prompt_len(b))  # the same prompts, step by step
    import json

    def data_state(run):  # the data position saved with the checkpoint of step 2
        return json.loads((tmp_path / run / "checkpoints" / "step_000002" / "trainer_state.json").read_text())["data"]

    assert data_state("overlap") == data_state("plain")  # the prefetched step-2 prompts are drawn again on resume


def test_teacher_served_by_sglang_scores_like_the_local_teacher(model_dirs, tmp_path):
    """teachers[0].server: the 'add' teacher is scored by prefill on a server (the stand-in holds its
    fp32 HF export); its log-probs equal the trainer-side teacher's up to fp32 rounding, and the
    start-up check compared them (the local copy comes from teachers[0].model.load)."""
    from gopd_mega.hf import export_hf
    from gopd_mega.model_io import build_model
    from gopd_mega.trainer import score_teachers

    local = build_model(ModelConfig(load=model_dirs["add"]), trainable=False, name="add")
    export_hf(local, tmp_path / "add_hf")
    server = StandinSGLang(str(tmp_path / "add_hf"))
    try:
        cfg = run_cfg(model_dirs, tmp_path / "run", 1, **{"teachers.0.server": server.url})
        run = make_distiller(cfg)
        assert type(run.m.teachers["add"]).__name__ == "ServerScorer"
        history = run.fit()
        assert len(history) == 1
        scored = [p for p in server.posted("/generate") if p["sampling_params"]["max_new_tokens"] == 0]
        assert scored and all(p["return_logprob"] and p["logprob_start_len"] == 0 for p in scored)
        prompts, batch = run.next_rollout()
        routes = [p.teacher for p in prompts]
        served = score_teachers(run.m.teachers, batch, routes, 1.0)
        trained = score_teachers({"add": local, "mul": run.m.teachers["mul"]}, batch, routes, 1.0)
        assert torch.allclose(served, trained, atol=1e-4)  # fp32 weights both sides, other kernels
        assert (served[[r == "add" for r in routes]] != 0).any()
    finally:
        server.close()
