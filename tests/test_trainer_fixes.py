"""Trainer fixes found by users: the student's temperature, several updates per rollout batch,
checkpoint retention (tiny megatron-core models, CPU)."""

from __future__ import annotations

import pytest
import torch

from test_trainer import _distiller, _run_cfg, model_dirs  # noqa: F401 (model_dirs: shared fixture)


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
    run = _distiller(_run_cfg(model_dirs, tmp_path / "t07", 1, **{"rollout.temperature": 0.7}))
    seen = _capture(run)
    metrics = run.train_step()
    batch, out = seen["batches"][0], seen["steps"][0]
    mask = batch.loss_mask.clone()
    mask[:, 0] = False
    assert mask.sum() > 10
    torch.testing.assert_close(out["logp"][mask], batch.sampler_logp[mask], rtol=0, atol=1e-5)
    assert metrics["sampler_mismatch"] < 1e-5
