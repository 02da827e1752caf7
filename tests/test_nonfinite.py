"""Non-finite values never train or leave: a NaN/inf loss or gradient skips the update and says so,
too many in a row stop the run, and weights holding NaN/inf are refused on load and never saved
or exported (tiny megatron-core models, CPU). Config floats: tests/test_config.py."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from gopd_mega.config import ModelConfig
from gopd_mega.failures import TrainingError
from gopd_mega.hf.safetensors_io import CheckpointError
from gopd_mega.model_io import build_model, load_weights, save_model_dir
from helpers import TINY, make_distiller, run_cfg


def _masters(run):
    return {k: v.clone() for k, v in run.optimizer.master_weights().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _poison_teacher_at(run, steps: set[int], value=float("nan")):
    """From the teachers' scores on, the loss of the given steps (1-based) is non-finite."""
    teacher = run.m.teachers["add"]
    real = teacher.logprobs

    def logprobs(tokens, mask, *a, **k):
        out = real(tokens, mask, *a, **k)
        if run.step + 1 in steps:
            out = torch.where(mask.bool(), torch.full_like(out, value), out)
        return out

    teacher.logprobs = logprobs


def test_nan_loss_skips_the_update_and_says_so(model_dirs, tmp_path, capsys):
    run = make_distiller(run_cfg(model_dirs, tmp_path / "r", 3, **{"data.domains": "[add]"}))
    _poison_teacher_at(run, {2})
    seen = []
    real_step = run.train_step

    def step():
        before = _masters(run)
        metrics = real_step()
        seen.append((metrics, _same(before, _masters(run))))
        return metrics

    run.train_step = step
    history = run.fit()
    assert [h["skipped_updates"] for h in history] == [0.0, 1.0, 0.0]
    assert [unchanged for _, unchanged in seen] == [False, True, False]  # step 2 moved no weight
    assert math.isnan(history[1]["loss"]) and math.isfinite(history[2]["loss"])
    assert "step 2: update skipped (no optimizer step): loss=nan" in capsys.readouterr().out
    assert run.skips_in_a_row == 0


def test_infinite_loss_with_finite_gradients_is_skipped(model_dirs, tmp_path):
    """The loss check does not rely on the gradient norm: here the gradients are finite."""
    run = make_distiller(run_cfg(model_dirs, tmp_path / "r", 1))
    forward = run.m.student.forward
    real = forward.loss_and_grads

    def inf_loss(*a, **k):
        out = real(*a, **k)
        return {**out, "loss": float("inf")}

    forward.loss_and_grads = inf_loss
    before = _masters(run)
    history = run.fit()
    assert math.isfinite(history[0]["grad_norm"]) and history[0]["skipped_updates"] == 1.0
    assert _same(before, _masters(run))


def test_nan_gradient_is_skipped(model_dirs, tmp_path):
    run = make_distiller(run_cfg(model_dirs, tmp_path / "r", 1))
    param = next(p for n, p in run.m.student.model.named_parameters() if n.endswith("final_layernorm.weight"))
    param.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = _masters(run)
    history = run.fit()
    assert math.isfinite(history[0]["loss"]) and math.isnan(history[0]["grad_norm"])
    assert history[0]["skipped_updates"] == 1.0 and _same(before, _masters(run))


def test_consecutive_skips_stop_the_run_and_nothing_is_saved(model_dirs, tmp_path):
    run = make_distiller(run_cfg(model_dirs, tmp_path / "r", 6, **{"train.max_consecutive_skips": 3,
                                                                  "train.save_every": 1}))
    _poison_teacher_at(run, {3, 4, 5, 6}, value=float("inf"))
    with pytest.raises(TrainingError, match=r"training stopped at step 5: 3 updates in a row were skipped .* "
                                            r"train.max_consecutive_skips=3\).* newest checkpoint: .*step_000004"):
        run.fit()
    # the checkpoints of the skipped steps hold the last finite weights: every value finite
    for p in (tmp_path / "r" / "checkpoints").iterdir():
        assert not p.name.startswith("step_000005")


def test_non_finite_weights_are_never_saved_or_exported(tmp_path):
    from gopd_mega.hf import export_hf
    from gopd_mega.hf.testing import tiny_hf_model

    model = build_model(ModelConfig(**TINY), trainable=False, name="m")
    next(iter(model._params.values())).data[0] = float("inf")
    with pytest.raises(TrainingError, match="not saved: the weights hold NaN or inf"):
        save_model_dir(model, tmp_path / "dir")
    assert not (tmp_path / "dir").exists() and not (tmp_path / "dir.partial").exists()
    tiny_hf_model("llama", tmp_path / "hf", vocab_size=16)
    from gopd_mega.hf import model_config_from_hf

    hf = build_model(model_config_from_hf(tmp_path / "hf"), trainable=False, name="hf")
    next(iter(hf._params.values())).data.view(-1)[3] = float("nan")
    with pytest.raises(TrainingError, match="not exported: the weights hold NaN or inf"):
        export_hf(hf, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_non_finite_weights_are_refused_on_load(tmp_path):
    """A gopd-mega model directory and a Hugging Face folder with one NaN each."""
    from gopd_mega.hf import model_config_from_hf
    from gopd_mega.hf.testing import tiny_hf_model

    model = build_model(ModelConfig(**TINY), trainable=False, name="m")
    save_model_dir(model, tmp_path / "dir")
    weights = tmp_path / "dir" / "model.safetensors"
    state = load_file(str(weights))
    name = sorted(state)[2]
    state[name][0] = float("nan")
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=f"{name} holds NaN or inf; refusing to load it"):
        load_weights(build_model(ModelConfig(**TINY), trainable=False, name="x"), tmp_path / "dir")

    tiny_hf_model("llama", tmp_path / "hf", vocab_size=16)
    shard = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(shard))
    state["model.norm.weight"][1] = float("-inf")
    save_file(state, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.norm.weight hold NaN or inf; refusing to load them"):
        build_model(model_config_from_hf(tmp_path / "hf"), trainable=False, name="hf")
