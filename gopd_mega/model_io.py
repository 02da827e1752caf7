"""Layout-free model directories: what ``ModelConfig.load`` points at, and :func:`build_model`,
a ShardedGPT on its own layout with the weights of such a directory.

Two formats are recognised by their files:
  * gopd-mega model directory: ``model_config.json`` (a ModelConfig) + ``model.safetensors``
    holding the full, unsharded tensors under megatron's canonical names (global layer indices).
    Written by :func:`save_model_dir`; any TP/PP layout can load it.
  * Hugging Face directory: ``config.json`` + safetensors (gopd_mega.hf converts it, streaming
    each rank's shard).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from gopd_mega.config import ConfigError, ModelConfig, OptimConfig, build_config
from gopd_mega.failures import TrainingError, on_every_rank, on_rank0
from gopd_mega.hf.safetensors_io import CheckpointError
from gopd_mega.model.weights import first_nonfinite
from gopd_mega.models import ShardedGPT
from gopd_mega.optim import full_master_state_dict
from gopd_mega.parallel import build_model_groups
from gopd_mega.platform import init_distributed
from gopd_mega.storage import require_space, save_safetensors, storage_error

MODEL_CONFIG = "model_config.json"
WEIGHTS = "model.safetensors"


def is_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MODEL_CONFIG).is_file()


def is_hf_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The architecture saved in a gopd-mega model directory."""
    file = Path(path) / MODEL_CONFIG
    try:
        data = json.loads(file.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    try:
        return build_config(ModelConfig, data)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{file}: {exc}") from None


def save_model_dir(
    model, path: str | os.PathLike, extra_files: dict[str, str] | None = None, dtype: torch.dtype = torch.float32
) -> Path:
    """Collective. Gathers the full weights and writes them atomically (rank 0): a directory that
    exists under ``path`` is always complete. A model with an optimizer (the student) writes its
    fp32 MASTER weights, not the bf16/fp16 copies it computes with; ``dtype`` is the dtype of the
    written tensors (fp32 keeps every bit of the masters). Weights holding NaN or inf are never
    written (TrainingError on every rank); a full disk is a StorageError naming the space needed.
    Files get the modes the umask gives ordinary files."""
    path = Path(path)
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in full_master_state_dict(model).items()}
    bad = first_nonfinite(state)
    if bad is not None:
        raise TrainingError(f"{path}: not saved: the weights hold NaN or inf ({bad})")

    def write():
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        require_space(path.parent, nbytes, f"model {path}")
        tmp = path.with_name(path.name + ".partial")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_safetensors(state, tmp / WEIGHTS)
            cfg = dataclasses.replace(
                model.cfg, load=None, tp=1, pp=1, sequence_parallel=False, context_parallel_size=1
            )
            (tmp / MODEL_CONFIG).write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise (storage_error(exc, path.parent, f"model {path}", nbytes) or exc) from None

    on_rank0(write)
    return path


def load_weights(model, path: str | os.PathLike) -> None:
    """Load ``path`` (either format) into ``model``, whatever its layout."""
    path = Path(path)
    if is_model_dir(path):
        try:
            state = load_file(str(path / WEIGHTS))
        except Exception as exc:  # noqa: BLE001 - missing, truncated or not safetensors
            raise CheckpointError(f"{path / WEIGHTS}: unreadable ({type(exc).__name__}: {exc})") from None
        bad = first_nonfinite(state)
        if bad is not None:
            raise CheckpointError(f"{path / WEIGHTS}: {bad} holds NaN or inf; refusing to load it")
        model.load_full_state_dict(state)
    elif is_hf_dir(path):
        from gopd_mega.hf import load_hf_weights

        # Each rank reads only its own slices (and checks them): whichever rank finds a problem says so.
        on_every_rank(lambda: load_hf_weights(model, path))
    else:
        raise FileNotFoundError(
            f"{path}: neither a gopd-mega model directory ({MODEL_CONFIG}) nor a Hugging Face one (config.json)"
        )


LAYOUT_FIELDS = (
    "tp",
    "pp",
    "params_dtype",
    "logits_dtype",
    "load",
    "recompute_granularity",
    "recompute_method",
    "recompute_num_layers",
    "sequence_parallel",
    "context_parallel_size",
)


def resolve_model_config(cfg: ModelConfig, where: str | None = None) -> ModelConfig:
    """With ``cfg.load`` set, the architecture comes from the checkpoint and only the layout
    and memory knobs (LAYOUT_FIELDS) from ``cfg``; without it, ``cfg`` is returned as it is.
    ``where`` is the config field of this model (e.g. 'student', 'teachers[0].model'): a layout
    that does not fit the checkpoint's architecture is reported under it."""
    if cfg.load is None:
        return cfg
    path = Path(cfg.load)
    if is_model_dir(path):
        saved = read_model_config(path)
    elif is_hf_dir(path):
        from gopd_mega.hf import model_config_from_hf

        saved = model_config_from_hf(path)
    else:
        raise FileNotFoundError(
            f"{path}: neither a gopd-mega model directory ({MODEL_CONFIG}) nor a Hugging Face one (config.json)"
        )
    resolved = dataclasses.replace(saved, **{f: getattr(cfg, f) for f in LAYOUT_FIELDS})
    try:
        resolved.validate(where or f"model at {path}")
    except ConfigError as exc:
        raise ConfigError(f"{exc} (architecture read from {path})") from None
    return resolved


def build_model(
    cfg: ModelConfig,
    trainable: bool,
    name: str,
    where: str | None = None,
    optim: OptimConfig | None = None,
    total_steps: int | None = None,
) -> ShardedGPT:
    """A ShardedGPT on its own layout, with the weights of ``cfg.load`` if given. ``where`` is its
    config field (errors about the layout name it). ``optim`` (trainable only): its optimizer
    (``model.optimizer``, LR schedule over ``total_steps``) is built BEFORE the weights are
    loaded, so its fp32 masters get the checkpoint's full-precision values, not the copies
    rounded to the model's dtype. Collective: every rank builds, then loads, in the same order."""
    if optim is not None and not trainable:
        raise ValueError(f"{name}: a frozen model gets no optimizer (optim given with trainable=False)")
    cfg = resolve_model_config(cfg, where)
    try:
        groups = build_model_groups(cfg.tp, cfg.pp, name=name)
    except ValueError as exc:  # the layout does not fit the world size
        if where is None:
            raise
        field = "pp" if cfg.tp >= 1 and init_distributed()[1] % cfg.tp == 0 else "tp"
        raise ConfigError(f"config field '{where}.{field}': {exc} (the number of processes)") from None
    model = ShardedGPT(cfg, groups, trainable=trainable, optim=optim, total_steps=total_steps)
    if cfg.load is not None:
        load_weights(model, cfg.load)
    return model
