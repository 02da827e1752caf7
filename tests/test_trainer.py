"""The G-OPD driver end to end on tiny megatron-core models (CPU, gloo)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from gopd_mega.config import RunConfig, build_config
from gopd_mega.data import synthetic
from gopd_mega.data.prompts import DataError, PromptDataset
from gopd_mega.run import build_models
from gopd_mega.trainer import score_teachers
from helpers import TOK, make_distiller, run_cfg, save_random_model


def test_resume_equals_straight_run(model_dirs, tmp_path):
    """N steps straight == N/2 steps, save, a fresh process-state restart, N/2 more steps."""
    straight = make_distiller(run_cfg(model_dirs, tmp_path / "straight", 4)).fit()

    first = make_distiller(run_cfg(model_dirs, tmp_path / "resumed", 2)).fit()
    torch.manual_seed(12345)  # whatever the RNG did in between must not matter
    second_run = make_distiller(run_cfg(model_dirs, tmp_path / "resumed", 4))
    second = second_run.fit()
    assert second_run.step == 4 and len(first) == 2 and len(second) == 2
    got = [m["loss"] for m in first + second]
    want = [m["loss"] for m in straight]
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert [m["grad_norm"] for m in first + second] == pytest.approx([m["grad_norm"] for m in straight], rel=1e-6)
    # metrics.jsonl continues across the restart
    lines = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]


def _next_token_kl(student, teachers, prompts, routes) -> float:
    """Exact KL(pi_student || pi_teacher) of the first response token, averaged over prompts."""
    tokens = torch.nn.utils.rnn.pad_sequence([torch.tensor(p) for p in prompts], batch_first=True)
    lengths = torch.tensor([len(p) for p in prompts])
    log_s = torch.log_softmax(student.next_token_logits(tokens, lengths), -1)
    kl = []
    for name, teacher in teachers.items():
        rows = [i for i, r in enumerate(routes) if r == name]
        log_t = torch.log_softmax(teacher.next_token_logits(tokens[rows], lengths[rows]), -1)
        kl.append((log_s[rows].exp() * (log_s[rows] - log_t)).sum(-1))
    return float(torch.cat(kl).mean())


def test_metrics_and_learning(model_dirs, tmp_path):
    """Training moves the student towards its teachers: the exact next-token KL to each prompt's
    teacher on held prompts falls, and every metric is logged."""
    cfg = run_cfg(model_dirs, tmp_path / "run", 12, **{"optim.lr": 1e-3, "objective.lam": 1.0, "train.prompts_per_step": 64, "train.micro_batch_size": 32})
    run = make_distiller(cfg)
    _, held = synthetic.from_config(cfg.data)
    recs = [r for d in held.values() for r in d]
    prompts = [[TOK.bos_id] + TOK.encode(r["prompt"]) for r in recs]
    routes = [r["opd_teacher"] for r in recs]
    before = _next_token_kl(run.m.student, run.m.teachers, prompts, routes)
    history = run.fit()
    after = _next_token_kl(run.m.student, run.m.teachers, prompts, routes)
    for key in ("loss", "grad_norm", "reverse_kl", "entropy", "clip_frac",
                "response_len", "tokens_per_s", "reverse_kl/add", "reverse_kl/mul"):
        assert key in history[-1], key
    # lambda = 1: the reference cancels, so implicit_reward is logged only when asked for
    assert "implicit_reward" not in history[-1]
    # Deterministic (seeded rollouts, fixed prompts). Measured: 1.393 -> 1.341 after 12 steps and
    # falling monotonically (a random teacher is hard to match exactly, so the drop is slow);
    # a wrong-signed update raises the KL instead.
    assert after < 0.98 * before, (before, after)


def test_reference_is_not_scored_where_it_cancels(model_dirs, tmp_path, monkeypatch):
    """At lambda = 1 the reference is never scored (unless objective.reference_metrics_every asks
    for its metrics), and training is what it was when it was scored and cancelled in the
    advantage: same losses and gradient norms to fp32 rounding."""
    from gopd_mega.config import ObjectiveConfig

    def run(name, **extra):
        d = make_distiller(run_cfg(model_dirs, tmp_path / name, 3, **{"objective.lam": 1.0, **extra}))
        d.m.reference.stats.reset()
        history = d.fit()
        return history, d.m.reference.stats.forward_calls

    skipped, calls = run("skip")
    assert calls == 0
    assert all("implicit_reward" not in m for m in skipped)
    every2, calls = run("every2", **{"objective.reference_metrics_every": 2})
    assert calls > 0
    assert ["implicit_reward" in m for m in every2] == [True, False, True]  # steps 1 and 3
    assert [m["loss"] for m in every2] == [m["loss"] for m in skipped]  # a metric never enters the loss
    monkeypatch.setattr(ObjectiveConfig, "needs_reference", lambda self: True)  # the old way: scored, cancels
    scored, calls = run("scored")
    assert calls > 0 and all("implicit_reward" in m for m in scored)
    assert [m["loss"] for m in skipped] == pytest.approx([m["loss"] for m in scored], rel=1e-5, abs=1e-7)
    assert [m["grad_norm"] for m in skipped] == pytest.approx([m["grad_norm"] for m in scored], rel=1e-5)


def test_each_prompt_is_scored_by_its_teacher(model_dirs, tmp_path):
    cfg = run_cfg(model_dirs, tmp_path / "route", 1)
    models = build_models(cfg, TOK)
    prompts = [[TOK.bos_id] + TOK.encode(p) for p in ("12+34=", "5*6=", "7+8=", "9*9=")]
    batch = models.engine.generate(prompts, temperature=1.0, max_new_tokens=5, seed=0)
    routes = ["add", "mul", "add", "mul"]
    got = score_teachers(models.teachers, batch, routes, 1.0)
    for name, teacher in models.teachers.items():
        own = teacher.logprobs(batch.tokens, batch.loss_mask, 1.0)
        rows = [i for i, r in enumerate(routes) if r == name]
        torch.testing.assert_close(got[rows], own[rows], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(models.teachers["add"].logprobs(batch.tokens, batch.loss_mask, 1.0),
                              models.teachers["mul"].logprobs(batch.tokens, batch.loss_mask, 1.0))


def test_vocab_mismatch_is_refused(model_dirs, tmp_path):
    other = save_random_model(tmp_path / "wide", 4, vocab_size=TOK.vocab_size + 7)
    cfg = run_cfg(model_dirs, tmp_path / "v", 1)
    cfg.teachers[1].model = dataclasses.replace(cfg.teachers[1].model, load=other)
    with pytest.raises(ValueError, match=f"vocabulary mismatch: teacher 'mul' has vocab_size={TOK.vocab_size + 7}"):
        build_models(cfg, TOK)


def test_long_prompts_are_counted_and_reported_and_empty_data_refused(capsys):
    records = [{"prompt": "1+1=", "opd_teacher": "add"}, {"prompt": "123456789+123456789=", "opd_teacher": "add"}]
    data = PromptDataset(records, TOK, max_prompt_len=10, teachers=["add"])
    assert len(data) == 1
    assert (data.filter_summary.dropped, data.filter_summary.longest) == (1, 21)
    assert "dropped 1" in str(data.filter_summary)
    with pytest.raises(DataError, match="empty after filtering"):
        PromptDataset(records[1:], TOK, max_prompt_len=10, teachers=["add"])
    with pytest.raises(DataError, match="empty"):
        PromptDataset([], TOK, max_prompt_len=10, teachers=["add"])


def test_incomplete_checkpoint_is_never_loaded(model_dirs, tmp_path):
    run = make_distiller(run_cfg(model_dirs, tmp_path / "c", 1))
    run.fit()
    ckpt = run.ckpt.latest()
    assert ckpt is not None and ckpt.name == "step_000001"
    # A save that died half-way: only a .partial directory, which latest() ignores.
    partial = ckpt.parent / "step_000002.partial"
    partial.mkdir()
    (partial / "rng_00000.safetensors").write_bytes(b"truncated")
    assert run.ckpt.latest() == ckpt
    (ckpt / "manifest.json").unlink()  # what a save writes last
    assert run.ckpt.latest() is None
    with pytest.raises(ValueError, match="incomplete"):
        run.ckpt.load(ckpt, run.m.student, run.optimizer)


def test_padded_only_vocab_difference_is_accepted_one_way(tmp_path):
    """HF checkpoints with the same tokenizer but more embedding rows (Qwen's 151936 vs 152064)
    may teach a student with fewer rows; the other way round the student could sample ids the
    teacher cannot score, which is refused."""
    from gopd_mega.hf import HFTokenizer
    from gopd_mega.hf.testing import tiny_hf_model
    from helpers import make_tokenizer

    def hf_model(name, vocab):
        d = tmp_path / name
        tiny_hf_model("llama", d, vocab_size=vocab)
        make_tokenizer(d)  # 16 real ids
        return str(d)

    small, padded = hf_model("small", 16), hf_model("padded", 24)
    base = {"rollout": {"max_new_tokens": 4}, "data": {"max_prompt_len": 8}}
    ok = build_config(RunConfig, {**base, "student": {"load": small}, "teachers": [{"name": "t", "model": {"load": padded}}]})
    build_models(ok, HFTokenizer(small))
    bad = build_config(RunConfig, {**base, "student": {"load": padded}, "teachers": [{"name": "t", "model": {"load": small}}]})
    with pytest.raises(ValueError, match="could sample ids this model cannot score"):
        build_models(bad, HFTokenizer(padded))
