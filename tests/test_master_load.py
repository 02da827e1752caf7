"""A bf16 student built through the run path (gopd_mega.run.build_models) from an fp32 checkpoint
starts with fp32 master weights EQUAL to the checkpoint's tensors, not to their bf16 roundings.

Both checkpoint formats: a gopd-mega model directory and a tiny Hugging Face folder (streamed by
gopd_mega.hf). The checkpoint's values, in canonical megatron layout, come from a frozen fp32
model loaded from the same folder (an fp32 load is a plain copy: exact). The comparison is exact
(torch.equal); the test also checks that every bf16 weight differs from its master, so it fails
if the masters are copies of the rounded weights (as they were when the optimizer was built
after the load).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gopd_mega.config import RunConfig, build_config
from gopd_mega.optim import full_master_state_dict
from gopd_mega.model_io import build_model
from gopd_mega.run import build_models, build_student_optimizer

from helpers import TOK, save_random_model


def _run_cfg(load: str, out_dir, **extra) -> RunConfig:
    data = {
        "student": {"load": load, "params_dtype": "bfloat16"},
        "teachers": [{"name": "t", "model": {"load": load}}],
        "rollout": {"max_new_tokens": 4},
        "optim": {"lr": 1e-3},
        "data": {"num_train": 8, "num_eval": 2, "max_prompt_len": 12},
        "train": {"steps": 1, "prompts_per_step": 2, "micro_batch_size": 2, "out_dir": str(out_dir), "progress": False},
    }
    return build_config(RunConfig, data, [f"{k}={v}" for k, v in extra.items()])


def _check_masters(cfg: RunConfig):
    models = build_models(cfg, TOK)
    student = models.student
    assert student.model.embedding.word_embeddings.weight.dtype == torch.bfloat16
    opt = build_student_optimizer(cfg, models)
    assert opt is student.optimizer  # built before the weights were loaded, returned as it is
    exact = build_model(dataclasses.replace(cfg.student, params_dtype="float32"), trainable=False, name="fp32 copy")
    want = exact.full_state_dict()
    masters = full_master_state_dict(student)
    rounded = student.full_state_dict()
    assert set(masters) == set(want)
    n_bf16 = 0
    for name, w in want.items():
        assert masters[name].dtype == torch.float32
        assert torch.equal(masters[name], w), f"master {name} is not the checkpoint's fp32 tensor"
        weight = rounded[name]  # bf16, except megatron's norm weights, which stay fp32
        assert torch.equal(weight, w.to(weight.dtype)), f"weight {name} is not the checkpoint's tensor in {weight.dtype}"
        if weight.dtype == torch.bfloat16:
            n_bf16 += 1
            # random fp32 weights are almost never bf16-representable: a master copied from the
            # rounded weight would fail here
            assert not torch.equal(masters[name], weight.float()), f"master {name} equals the bf16 weight"
    assert n_bf16 >= 5  # embedding, qkv, proj, fc1, fc2 (+ output layer)
    return student


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_bf16_student_from_fp32_model_dir_has_exact_masters(tmp_path, distributed_optimizer):
    path = save_random_model(tmp_path / "ckpt", 5, init_std=0.3)  # an fp32 model directory
    from safetensors.torch import load_file

    sd = load_file(f"{path}/model.safetensors")
    assert all(v.dtype == torch.float32 for v in sd.values())
    cfg = _run_cfg(path, tmp_path / "run", **{"optim.use_distributed_optimizer": distributed_optimizer})
    student = _check_masters(cfg)
    masters = full_master_state_dict(student)
    for name, t in sd.items():  # and against the file itself (vocab rows past vocab_size are padding)
        m = masters[name]
        assert torch.equal(m[: t.shape[0]] if m.shape != t.shape else m, t[: m.shape[0]]), name


def test_bf16_student_from_fp32_hf_folder_has_exact_masters(tmp_path):
    from gopd_mega.hf.testing import tiny_hf_model

    tiny_hf_model("qwen3", tmp_path / "hf", seed=3, vocab_size=TOK.vocab_size)  # saved in fp32
    _check_masters(_run_cfg(str(tmp_path / "hf"), tmp_path / "run"))


def _layouts_worker(root):
    """2 gloo ranks: TP=1 x DP=2 with the distributed optimizer (each rank holds half of every
    master) and TP=2 (each rank holds its TP shard), from both checkpoint formats."""
    from gopd_mega.config import ModelConfig, OptimConfig
    from gopd_mega.model_io import save_model_dir
    from helpers import TINY

    src = build_model(ModelConfig(**TINY, seed=7, init_std=0.3), trainable=False, name="source")
    save_model_dir(src, f"{root}/dir")  # collective; fp32
    checked = 0
    for load in (f"{root}/dir", f"{root}/hf"):
        for tp, dist_opt in ((1, True), (2, False)):
            cfg = dataclasses.replace(ModelConfig(**TINY), load=load, tp=tp, params_dtype="bfloat16")
            student = build_model(cfg, trainable=True, name="student", where="student",
                                  optim=OptimConfig(lr=1e-3, use_distributed_optimizer=dist_opt))
            assert type(student.optimizer.opt).__name__ == ("DistributedOptimizer" if dist_opt else
                                                           "Float16OptimizerWithFloat16Params")
            exact = build_model(dataclasses.replace(cfg, params_dtype="float32"), trainable=False, name="fp32 copy")
            want, masters = exact.full_state_dict(), full_master_state_dict(student)  # collective
            weights = student.full_state_dict()
            for name, w in want.items():
                assert torch.equal(masters[name], w), f"{load} tp={tp}: master {name} is not the checkpoint's"
                if weights[name].dtype == torch.bfloat16:
                    assert not torch.equal(masters[name], weights[name].float()), f"{load} tp={tp}: {name}"
            checked += 1
    return checked


@pytest.mark.distributed
def test_exact_masters_at_tp2_and_sharded_over_dp(tmp_path):
    from dist_utils import run_distributed
    from gopd_mega.hf.testing import tiny_hf_model

    tiny_hf_model("qwen3", tmp_path / "hf", seed=4, vocab_size=TOK.vocab_size)
    assert run_distributed(_layouts_worker, 2, (str(tmp_path),)) == [4, 4]
