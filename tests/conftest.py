"""Test-session set-up shared by every test module, and the shared fixtures (the shared plain
helpers are in helpers.py).

Without a GPU, Triton kernels run only in its interpreter, and triton reads TRITON_INTERPRET
when it is first imported (megatron-core and transformers import it during collection), so the
flag is set here, before any test module is imported. On GPU machines nothing changes.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub
sys.path.insert(0, str(Path(__file__).parent))  # tests import their shared helpers by name


# ----------------------------------------------------------------------------- shared fixtures
# (module-scoped: each test module that asks builds its own, as when they were imported per module)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Tiny gopd-mega model directories: 'student' and the teachers 'add' and 'mul'."""
    from helpers import save_random_model

    root = tmp_path_factory.mktemp("models")
    # Teachers with a larger init scale have peaked, distinct distributions to distil.
    return {
        "student": save_random_model(root / "student", 1),
        "add": save_random_model(root / "t_add", 2, init_std=0.3),
        "mul": save_random_model(root / "t_mul", 3, init_std=0.3),
    }


@pytest.fixture(scope="module")
def student_hf(model_dirs, tmp_path_factory):
    """The test student exported as a Hugging Face folder: what the stand-in server serves."""
    from gopd_mega.config import ModelConfig
    from gopd_mega.hf import export_hf
    from gopd_mega.model_io import build_model

    path = tmp_path_factory.mktemp("hf") / "student"
    export_hf(build_model(ModelConfig(load=model_dirs["student"]), trainable=False, name="export"), path)
    return str(path)


@pytest.fixture(scope="module")
def two_head_model(tmp_path_factory):
    """A model with 2 attention heads: tp=4 passes the recipe's own checks (the default
    architecture has 4 heads) and fails only against the checkpoint's architecture."""
    from gopd_mega.config import ModelConfig
    from gopd_mega.model_io import build_model, save_model_dir
    from helpers import TOK

    path = tmp_path_factory.mktemp("m") / "two_heads"
    cfg = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
                      vocab_size=TOK.vocab_size, max_seq_len=32)
    save_model_dir(build_model(cfg, trainable=False, name="two_heads"), path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    """A gopd-train recipe file of tiny models (one teacher, 'add'); ``train.out_dir`` is given per run."""
    import json

    from gopd_mega.config import ModelConfig
    from gopd_mega.model_io import build_model, save_model_dir
    from helpers import TINY_RECIPE_STEPS, TOK

    root = tmp_path_factory.mktemp("signals")
    for name, seed, std in (("student", 1, 0.02), ("teacher", 2, 0.3)):
        cfg = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
                          vocab_size=TOK.vocab_size, max_seq_len=32, seed=seed, init_std=std)
        save_model_dir(build_model(cfg, trainable=False, name=name), root / name)
    path = root / "recipe.json"
    path.write_text(json.dumps({
        "student": {"load": str(root / "student")}, "teachers": [{"name": "add", "model": {"load": str(root / "teacher")}}],
        "rollout": {"max_new_tokens": 4}, "optim": {"lr": 1e-3},
        "data": {"max_prompt_len": 12, "num_train": 16, "num_eval": 2, "domains": ["add"]},
        "train": {"steps": TINY_RECIPE_STEPS, "prompts_per_step": 2, "progress": False}}))
    return path
