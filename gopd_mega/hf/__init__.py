"""Hugging Face models, tokenizers and datasets for gopd-mega.

* gopd_mega/hf/families.py      per-family config mapping and tensor-name tables (Llama, Qwen2, Qwen3)
* gopd_mega/hf/convert.py       HF <-> megatron tensors: streaming load, export, named tensors
* gopd_mega/hf/safetensors_io.py  sliced safetensors reads, atomic sharded writes
* gopd_mega/hf/tokenizer.py     HFTokenizer (the project's Tokenizer protocol), vocab checks
* gopd_mega/hf/datasets.py      prompt records from parquet / JSONL / arrow / saved datasets
* gopd_mega/hf/smollm2.py       the offline SmolLM2-135M-Instruct as an HF checkpoint folder
* gopd_mega/hf/train_state.py   layout-free (DCP) training state: resume at another DP/TP/PP
* gopd_mega/hf/testing.py       tiny random HF models and a bare megatron GPTModel for tests
"""

from gopd_mega.hf.convert import (
    export_hf,
    hf_named_tensors,
    load_hf_checkpoint,
    load_hf_weights,
    model_config_from_hf,
    read_hf_config,
)
from gopd_mega.hf.datasets import load_paper_mix, load_prompt_records, open_dataset
from gopd_mega.hf.families import FAMILIES, UnsupportedCheckpoint, get_family
from gopd_mega.hf.safetensors_io import CheckpointError, CheckpointReader, write_checkpoint
from gopd_mega.hf.smollm2 import load_smollm2
from gopd_mega.hf.tokenizer import HFTokenizer, TokenizerMismatch, check_same_vocab

__all__ = [
    "FAMILIES",
    "CheckpointError",
    "CheckpointReader",
    "HFTokenizer",
    "TokenizerMismatch",
    "UnsupportedCheckpoint",
    "check_same_vocab",
    "export_hf",
    "get_family",
    "hf_named_tensors",
    "load_hf_checkpoint",
    "load_hf_weights",
    "load_paper_mix",
    "load_prompt_records",
    "load_smollm2",
    "model_config_from_hf",
    "open_dataset",
    "read_hf_config",
    "write_checkpoint",
]
