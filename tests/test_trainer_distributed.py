"""The driver on 2 gloo processes: per-model layouts and resuming at another layout."""

from __future__ import annotations

import pytest

from dist_utils import run_distributed
from helpers import make_distiller, run_cfg


def _train(model_dirs, out_dir, steps, overrides):
    history = make_distiller(run_cfg(model_dirs, out_dir, steps, **overrides)).fit()
    return [v for m in history for v in (m["loss"], m["grad_norm"])]


@pytest.mark.distributed
def test_layouts_and_resume_at_another_layout(model_dirs, tmp_path):
    """4 steps on one process == 2 steps on one process, then 2 more resumed on 2 processes with
    the student at DP=2 beside teachers at TP=2 (and == 4 steps on 2 processes with a TP=2
    student). fp32: only the order of reductions differs, so rtol 1e-5."""
    straight = _train(model_dirs, tmp_path / "one", 4, {})
    first = _train(model_dirs, tmp_path / "resume", 2, {})
    layout = {"teachers.0.model.tp": 2, "teachers.1.model.tp": 2}
    resumed = run_distributed(_train, 2, (model_dirs, tmp_path / "resume", 4, layout))
    assert resumed[0] == resumed[1]  # every rank reports the same full-batch metrics
    assert first + resumed[0] == pytest.approx(straight, rel=1e-5)

    tp2 = run_distributed(_train, 2, (model_dirs, tmp_path / "tp2", 4, {"student.tp": 2, "teachers.1.model.pp": 2}))
    assert tp2[0] == pytest.approx(straight, rel=1e-5)
