"""Helpers shared by the test modules (plain functions and constants; the shared fixtures are in
conftest.py). Test modules import them by name: ``from helpers import TOK, run_cfg``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from typing import TYPE_CHECKING

import pytest
import torch

from gopd_mega.config import ModelConfig, RunConfig, build_config
from gopd_mega.data import synthetic
from gopd_mega.data.tokenizer import CharTokenizer

if TYPE_CHECKING:
    from gopd_mega.trainer import Distiller

# The model-building modules (megatron-core) are imported where they are used: a test module that
# needs only a tokenizer or a config does not pay for them.

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- tiny synthetic runs

TOK = CharTokenizer()
TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
            vocab_size=TOK.vocab_size, max_seq_len=32)


def save_random_model(path, seed, **overrides):
    from gopd_mega.model_io import build_model, save_model_dir

    model = build_model(ModelConfig(**{**TINY, **overrides}, seed=seed), trainable=False, name=f"seed{seed}")
    save_model_dir(model, path)
    return str(path)


def run_cfg(model_dirs, out_dir, steps, **extra) -> RunConfig:
    data = {
        "student": {"load": model_dirs["student"]},
        "teachers": [{"name": d, "model": {"load": model_dirs[d]}} for d in ("add", "mul")],
        "objective": {"lam": 1.25},
        "rollout": {"max_new_tokens": 6},
        "optim": {"lr": 1e-3},
        "data": {"num_train": 64, "num_eval": 8, "max_prompt_len": 12},
        "train": {"steps": steps, "prompts_per_step": 8, "micro_batch_size": 4, "out_dir": str(out_dir), "progress": False},
    }
    overrides = [f"{k}={v}" for k, v in extra.items()]
    return build_config(RunConfig, data, overrides)


def make_distiller(cfg: RunConfig) -> Distiller:
    from gopd_mega.run import build_distiller

    records, _ = synthetic.from_config(cfg.data)
    return build_distiller(cfg, TOK, records)


# ----------------------------------------------------------------------------- gopd-train's one-line errors

def cli_fails(capsys, tmp_path, recipe: dict, overrides=(), rank: str | None = None) -> str:
    """Run the CLI, expect exit status 2 and return its single stderr line ('' on rank != 0)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    from gopd_mega.cli import main

    env = dict(os.environ)
    if rank is not None:
        os.environ["RANK"] = rank
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["--recipe", str(path), *overrides])
    finally:
        os.environ.clear()
        os.environ.update(env)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if rank not in (None, "0"):
        assert err == ""
        return err
    # datasets' progress bars (tqdm, carriage returns) may precede the message; nothing else may.
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip() and "examples/s]" not in x]
    assert len(lines) == 1 and lines[0].startswith("gopd-train: error: "), err
    return lines[0]


def cli_recipe(student, teacher, tmp_path, **data):
    return {"student": {"load": student}, "teachers": [{"name": "add", "model": {"load": teacher}}],
            "rollout": {"max_new_tokens": 4}, "data": {"max_prompt_len": 12, "num_train": 8, "num_eval": 2, **data},
            "train": {"steps": 1, "prompts_per_step": 2, "out_dir": str(tmp_path / "run"), "progress": False}}


# ----------------------------------------------------------------------------- a local HF tokenizer

WORDS = ["hello", "world", "the", "answer", "is", "42", "think", "user", "assistant"]
# A Qwen3-like template: one <no_think> marker when enable_thinking is false.
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% if enable_thinking is defined and not enable_thinking %}"
    "<no_think> {% endif %}{% endif %}"
)


def make_tokenizer(directory, words=WORDS, bos=False, template=TEMPLATE, eos_list=None):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "<no_think>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                                 unk_token="<unk>", bos_token="<s>" if bos else None,
                                 additional_special_tokens=["<|im_start|>", "<|im_end|>", "<no_think>"])
    hf.chat_template = template
    hf.save_pretrained(directory)
    if eos_list is not None:
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_list}))
    return directory


# ----------------------------------------------------------------------------- layouts

RTOL = 1e-5


def tiny_cfg(tp=1, pp=1, tie=True, seed=1234):
    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=128, vocab_size=50, max_seq_len=16, qk_layernorm=True,
                       tie_embeddings=tie, tp=tp, pp=pp, seed=seed)


def batch(n=6, s=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (n, s), generator=g)
    mask = torch.zeros(n, s)
    for i in range(n):  # prompt of 3 tokens, responses of different lengths, right padding
        mask[i, 3: 3 + 4 + i % 5] = 1
    return tokens, mask


# ----------------------------------------------------------------------------- gopd-train subprocesses

TINY_RECIPE_STEPS = 6
"""train.steps of the ``tiny_recipe`` fixture (conftest.py)."""


def run_until(proc, text: str) -> str:
    """Read the run's stdout until a line holding ``text``; returns what was read."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"the run ended before printing {text!r}: {''.join(seen)}{proc.stderr.read()}")
