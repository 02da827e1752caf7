"""objective.reference as a model with its own layout: a TP=2 reference beside a TP=1 student
gives the advantages of a TP=1 reference (2 gloo processes), and a plain path still works."""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from gopd_mega.config import ConfigError, ModelConfig
from gopd_mega.objective import gopd_advantage
from gopd_mega.run import build_models
from gopd_mega.trainer import score_teachers
from helpers import TOK, run_cfg

PROMPTS = ["12+34=", "5*6=", "7+8=", "9*9="]
ROUTES = ["add", "mul", "add", "mul"]


def _advantages(model_dirs, out_dir, reference) -> dict:
    """Rollout of fixed prompts, then the G-OPD advantages (lam = 1.25, so pi_ref matters)."""
    cfg = run_cfg(model_dirs, out_dir, 1, **{"objective.reference": reference, "objective.lam": 1.25})
    models = build_models(cfg, TOK)
    prompts = [[TOK.bos_id] + TOK.encode(p) for p in PROMPTS]
    batch = models.engine.generate(prompts, temperature=1.0, max_new_tokens=6, seed=3)
    t = score_teachers(models.teachers, batch, ROUTES, 1.0)
    r = models.reference.logprobs(batch.tokens, batch.loss_mask, 1.0)
    s = models.student.logprobs(batch.tokens, batch.loss_mask, 1.0)
    return {"tokens": batch.tokens, "mask": batch.loss_mask, "ref": r, "student": s,
            "advantage": gopd_advantage(s, t, r, 1.25), "ref_tp": models.reference.cfg.tp}


@pytest.mark.distributed
def test_reference_at_tp2_beside_tp1_student(model_dirs, tmp_path):
    ref = model_dirs["mul"]  # a different model from the student: its log-probs differ
    one = _advantages(model_dirs, tmp_path / "one", {"load": ref, "tp": 1})
    plain = _advantages(model_dirs, tmp_path / "plain", ref)  # a path: the student's layout
    assert plain["ref_tp"] == 1
    torch.testing.assert_close(plain["advantage"], one["advantage"], rtol=0, atol=0)
    assert (one["ref"] - one["student"]).abs().max() > 0.1
    two = run_distributed(_advantages, 2, (model_dirs, tmp_path / "two", f"{{load: {ref}, tp: 2}}"))
    for rank in two:
        assert rank["ref_tp"] == 2
        assert torch.equal(rank["tokens"], one["tokens"])
        # fp32; TP=2 splits the vocabulary sum of the log-softmax (and the attention heads) over
        # two ranks: only the summation order differs (measured max |diff| ~1e-6).
        torch.testing.assert_close(rank["advantage"], one["advantage"], rtol=0, atol=1e-5)


def test_reference_mapping_is_validated_with_field_names(model_dirs, tmp_path):
    with pytest.raises(ConfigError, match="'objective.reference.load'"):
        run_cfg(model_dirs, tmp_path, 1, **{"objective.reference": "{tp: 2}"})
    with pytest.raises(ConfigError, match="'objective.reference.tp'"):
        run_cfg(model_dirs, tmp_path, 1, **{"objective.reference": f"{{load: {model_dirs['mul']}, tp: 0}}"})
    with pytest.raises(ConfigError, match="'objective.reference.bogus'"):
        run_cfg(model_dirs, tmp_path, 1, **{"objective.reference": f"{{load: {model_dirs['mul']}, bogus: 1}}"})
    cfg = run_cfg(model_dirs, tmp_path, 1, **{"objective.reference": f"{{load: {model_dirs['mul']}, tp: 2}}"})
    assert isinstance(cfg.objective.reference, ModelConfig) and cfg.objective.reference.tp == 2
    assert run_cfg(model_dirs, tmp_path, 1).objective.reference == "initial"
