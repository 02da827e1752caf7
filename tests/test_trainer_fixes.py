"""Trainer fixes found by users: the student's temperature, several updates per rollout batch,
checkpoint retention (tiny megatron-core models, CPU)."""

from __future__ import annotations

import pytest
import torch

from helpers import make_distiller, run_cfg


def _capture(run):
    """Wrap the engine's generate and the student's train_step to keep what they returned."""
    seen = {"batches": [], "steps": []}
    generate, train_step = run.m.engine.generate, run.m.student.train_step

    def gen(*a, **k):
        seen["batches"].append(generate(*a, **k))
        return seen["batches"][-1]

    def step(*a, **k):
        seen["steps"].append(train_step(*a, **k))
        return seen["steps"][-1]

    run.m.engine.generate, run.m.student.train_step = gen, step
    return seen


def test_student_logprobs_use_the_rollout_temperature(model_dirs, tmp_path):
    """At T=0.7 the student's pre-update log-probs (the ones the loss, the IS weight and the
    metrics use) equal the sampler's: both are log_softmax(logits / T) of the same fp32 weights,
    differing only in summation order (measured ~1e-7); at T=1 in the student they differed by 0.2."""
    run = make_distiller(run_cfg(model_dirs, tmp_path / "t07", 1, **{"rollout.temperature": 0.7}))
    seen = _capture(run)
    metrics = run.train_step()
    batch, out = seen["batches"][0], seen["steps"][0]
    mask = batch.loss_mask.clone()
    mask[:, 0] = False
    assert mask.sum() > 10
    torch.testing.assert_close(out["logp"][mask], batch.sampler_logp[mask], rtol=0, atol=1e-5)
    assert metrics["sampler_mismatch"] < 1e-5


def _fake_checkpoint(root, step, complete=True):
    from gopd_mega.checkpoint import write_manifest

    d = root / "checkpoints" / f"step_{step:06d}"
    d.mkdir(parents=True)
    if complete:  # a manifest is what a finished save writes last
        write_manifest(d, step)
    return d


def test_keep_last_prunes_only_older_complete_checkpoints(tmp_path):
    from gopd_mega.checkpoint import CheckpointManager

    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step)
    broken = _fake_checkpoint(tmp_path, 4, complete=False)
    partial = tmp_path / "checkpoints" / "step_000005.partial"
    partial.mkdir()
    assert CheckpointManager(tmp_path).prune() == []  # keep_last None: keep everything
    assert CheckpointManager(tmp_path, keep_last=0).prune() == []
    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert [p.name for p in mgr.prune()] == ["step_000001"]
    assert [p.name for p in mgr.complete()] == ["step_000002", "step_000003"]
    assert broken.is_dir() and partial.is_dir()  # never touched: not complete checkpoints
    # The checkpoint being written is kept even when newer ones exist (a re-run into an old dir).
    mgr1 = CheckpointManager(tmp_path, keep_last=1)
    assert [p.name for p in mgr1.prune(keep=tmp_path / "checkpoints" / "step_000002")] == []
    assert [p.name for p in mgr1.complete()] == ["step_000002", "step_000003"]


def test_keep_last_in_a_run(model_dirs, tmp_path):
    """save_every=1, keep_last=2: after 3 steps only steps 2 and 3 remain, and resuming works."""
    cfg = run_cfg(model_dirs, tmp_path / "k", 3, **{"train.save_every": 1, "train.keep_last": 2,
                                                     "train.prompts_per_step": 2})
    run = make_distiller(cfg)
    run.fit()
    names = sorted(p.name for p in (tmp_path / "k" / "checkpoints").iterdir())
    assert names == ["latest", "step_000002", "step_000003"]
    assert run.ckpt.latest().name == "step_000003"
    cfg4 = run_cfg(model_dirs, tmp_path / "k", 4, **{"train.save_every": 1, "train.keep_last": 2,
                                                      "train.prompts_per_step": 2})
    again = make_distiller(cfg4)
    assert len(again.fit()) == 1
    assert sorted(p.name for p in (tmp_path / "k" / "checkpoints").iterdir()) == ["latest", "step_000003", "step_000004"]


def _record_builders(monkeypatch):
    """Keep the arguments of every gopd_loss_builder call the trainer makes (G-OPD's step,
    gopd_mega.steps, builds the loss)."""
    import gopd_mega.steps as trainer

    calls, real = [], trainer.gopd_loss_builder

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "gopd_loss_builder", record)
    return calls


def _expected_loss(out, args, kwargs, settings):
    from gopd_mega.objective import gopd_loss

    teacher, ref, sampler, weights = args[:4]
    mask = weights > 0
    loss, _ = gopd_loss(out["logp"], mask, teacher_logp=teacher, ref_logp=ref, sampler_logp=sampler,
                        old_logp=kwargs.get("old_logp"), settings=settings, weights=weights)
    return float(loss)


def test_one_update_per_rollout_is_the_paper(model_dirs, tmp_path, monkeypatch):
    """N = 1: one optimizer step on the whole batch, weights normalised over the whole batch,
    no pi_old pass (old_logp None: ratio 1), clip fraction 0, and the loss is objective.gopd_loss."""
    calls = _record_builders(monkeypatch)
    run = make_distiller(run_cfg(model_dirs, tmp_path / "n1", 1))
    seen = _capture(run)
    passes = []
    logprobs = run.m.student.logprobs
    run.m.student.logprobs = lambda *a, **k: passes.append(1) or logprobs(*a, **k)
    metrics = run.train_step()
    assert len(seen["steps"]) == 1 and run.optimizer.schedule_step == 1 and not passes
    (args, kwargs), = calls
    assert kwargs.get("old_logp") is None
    batch = seen["batches"][0]
    from gopd_mega.objective import token_weights

    torch.testing.assert_close(args[3], token_weights(batch.loss_mask, "seq-mean-token-mean"), rtol=0, atol=0)
    assert metrics["loss"] == pytest.approx(_expected_loss(seen["steps"][0], args, kwargs, run.settings), rel=1e-5, abs=1e-7)
    assert metrics["clip_frac"] == 0.0 and "ratio_dev" not in metrics


def test_two_updates_per_rollout(model_dirs, tmp_path, monkeypatch):
    """N = 2: pi_old from a no-grad pass, two optimizer steps on the two halves of the batch, each
    normalised over its own half; ratio ~1 on the first update (same weights, eval vs train
    forward), != 1 on the second (the first moved the weights); clip fraction reported."""
    calls = _record_builders(monkeypatch)
    cfg = run_cfg(model_dirs, tmp_path / "n2", 1, **{"train.updates_per_rollout": 2, "optim.lr": 0.05})
    run = make_distiller(cfg)
    assert run.optimizer.total_steps == 2  # the LR schedule counts updates
    seen = _capture(run)
    metrics = run.train_step()
    assert len(seen["steps"]) == 2 and run.optimizer.schedule_step == 2
    batch = seen["batches"][0]
    halves = torch.tensor_split(torch.arange(batch.tokens.shape[0]), 2)
    from gopd_mega.objective import token_weights

    devs = []
    for rows, (args, kwargs), out in zip(halves, calls, seen["steps"]):
        old = kwargs["old_logp"]
        assert old is not None and old.shape == (len(rows), batch.tokens.shape[1])
        torch.testing.assert_close(args[3], token_weights(batch.loss_mask[rows], "seq-mean-token-mean"), rtol=0, atol=0)
        assert out["loss"] == pytest.approx(_expected_loss(out, args, kwargs, run.settings), rel=1e-5, abs=1e-7)
        m = batch.loss_mask[rows].clone()
        m[:, 0] = False
        devs.append(float((out["logp"][m] - old[m]).abs().max()))
    # fp32: the no-grad pass and the training forward differ only in summation order (~1e-7)
    assert devs[0] < 1e-5 and devs[1] > 1e-2, devs
    assert run.update_stats[0]["ratio_dev"] < 1e-4 * run.update_stats[0]["tokens"]
    assert 0.0 <= metrics["clip_frac"] <= 1.0 and metrics["ratio_dev"] > 0 and metrics["updates"] == 2
    # lr 0.05 moves the student far in one update: some second-update ratios leave [0.8, 1.2]
    assert run.update_stats[1]["clipped"] > 0
