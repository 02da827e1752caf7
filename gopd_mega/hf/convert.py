"""Hugging Face <-> megatron-core tensor conversion for dense Llama / Qwen2 / Qwen3.

Names and the rule table live in gopd_mega/hf/families.py. This module applies a rule in two
directions, for one tensor at a time:

HF -> megatron, per TP rank (``build_shard``; reads only this rank's rows/columns from disk):
  copy   local = hf[rank part along the param's partition dim]      (norms: whole tensor)
  vocab  local rows [r*Vp/tp, (r+1)*Vp/tp) of hf (V rows), rows >= V zero-filled
  qkv    this rank owns KV groups g in [r*G/tp, (r+1)*G/tp); for each such g the local block is
         [q rows of the q/G heads of g ; k rows of g ; v rows of g]  (d rows per head).
         Those q, k and v row ranges are contiguous in the HF tensors, so each is one read.
  fc1    local = [gate rows r*F/tp..(r+1)*F/tp ; up rows likewise]. NOTE: megatron's full fc1
         is [gate; up] but rank r's shard is [gate_r; up_r], NOT rows r*2F/tp.. of [gate; up].

megatron (full, unsharded) -> HF (``to_hf``): the inverses on whole tensors
  vocab: drop the padded rows;  qkv: view [G, (q+2)*d, ...] and split q*d | d | d;
  fc1: split in halves.

``load_hf_checkpoint(model, dir)`` fills every local parameter of a (TP/PP-sharded) model;
``hf_named_tensors(model)`` yields (HF name, full tensor) pairs for export or for refreshing a
rollout engine's weights; ``export_hf(model, dir)`` writes a checkpoint transformers can load.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from gopd_mega.config import ModelConfig
from gopd_mega.failures import TrainingError, on_rank0
from gopd_mega.hf.families import Family, Rule, family_for_model, get_family
from gopd_mega.hf.safetensors_io import CheckpointError, CheckpointReader, write_checkpoint
from gopd_mega.model.weights import first_nonfinite
from gopd_mega.optim import full_master_state_dict

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def read_hf_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def model_config_from_hf(directory: str | os.PathLike, **overrides) -> ModelConfig:
    """ModelConfig of the HF checkpoint in ``directory`` (``load`` set to it); overrides e.g. tp=2."""
    hf = read_hf_config(directory)
    family = get_family(hf.get("model_type", "<missing>"))
    overrides.setdefault("load", str(directory))
    return family.config_to_model(hf, **overrides)


# ----------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Geometry:
    """Sizes the transforms need, from a ModelConfig."""

    heads: int
    groups: int
    head_dim: int
    ffn: int
    hidden: int
    vocab: int
    padded_vocab: int
    tied: bool

    @classmethod
    def of(cls, cfg: ModelConfig, padded_vocab: int | None = None) -> Geometry:
        heads = cfg.num_attention_heads
        return cls(
            heads,
            cfg.num_query_groups or heads,
            cfg.kv_channels or cfg.hidden_size // heads,
            cfg.ffn_hidden_size,  # type: ignore[arg-type]  # set for every family
            cfg.hidden_size,
            cfg.vocab_size,
            padded_vocab or cfg.padded_vocab,
            cfg.tie_embeddings,
        )


def match_rule(family: Family, name: str, geo: Geometry) -> tuple[Rule, tuple[str, ...]]:
    """The rule for megatron ``name`` and its HF source names (layer/expert indices filled in)."""
    for rule in family.table:
        m = rule.regex().fullmatch(name)
        if m:
            hf = tuple(h.format(**m.groupdict()) for h in rule.hf)
            if name == "output_layer.weight" and geo.tied:
                hf = ("model.embed_tokens.weight",)  # the last PP stage keeps its own copy
            return rule, hf
    raise CheckpointError(f"no {family.name} conversion rule for megatron tensor {name!r}")


def _expect(reader: CheckpointReader, name: str, shape: tuple[int, ...]) -> None:
    actual = reader.shape(name)
    if actual != tuple(shape):
        raise CheckpointError(
            f"{reader.file_of(name)}: tensor {name!r} has shape {list(actual)}, the model config expects {list(shape)}"
        )


def build_shard(
    reader: CheckpointReader,
    rule: Rule,
    hf: tuple[str, ...],
    geo: Geometry,
    local_shape: tuple[int, ...],
    partition_dim: int | None,
    tp_rank: int,
    tp_size: int,
) -> torch.Tensor:
    """This TP rank's part of one megatron tensor, read from the HF checkpoint slice by slice."""
    r, t = tp_rank, tp_size
    if rule.kind == "copy":
        full = list(local_shape)
        if partition_dim is not None:
            full[partition_dim] *= t
        _expect(reader, hf[0], tuple(full))
        if partition_dim is None or t == 1:
            return reader.read(hf[0])
        n = local_shape[partition_dim]
        span = (r * n, (r + 1) * n)
        return reader.read(hf[0], rows=span) if partition_dim == 0 else reader.read(hf[0], cols=span)
    if rule.kind == "vocab":
        _expect(reader, hf[0], (geo.vocab, geo.hidden))
        rows = geo.padded_vocab // t
        lo, hi = r * rows, (r + 1) * rows
        real = reader.read(hf[0], rows=(lo, min(hi, geo.vocab))) if lo < geo.vocab else None
        out = torch.zeros((rows, geo.hidden), dtype=real.dtype if real is not None else torch.float32)
        if real is not None:
            out[: real.shape[0]] = real
        return out
    if rule.kind == "qkv":
        q_per_group, d = geo.heads // geo.groups, geo.head_dim
        tail = (geo.hidden,) if rule.megatron.endswith("weight") else ()
        _expect(reader, hf[0], (geo.heads * d, *tail))
        _expect(reader, hf[1], (geo.groups * d, *tail))
        _expect(reader, hf[2], (geo.groups * d, *tail))
        ng = geo.groups // t
        g0, g1 = r * ng, (r + 1) * ng
        q = reader.read(hf[0], rows=(g0 * q_per_group * d, g1 * q_per_group * d)).reshape(ng, q_per_group * d, *tail)
        k = reader.read(hf[1], rows=(g0 * d, g1 * d)).reshape(ng, d, *tail)
        v = reader.read(hf[2], rows=(g0 * d, g1 * d)).reshape(ng, d, *tail)
        return torch.cat([q, k, v], dim=1).reshape(ng * (q_per_group + 2) * d, *tail)
    if rule.kind == "fc1":
        _expect(reader, hf[0], (geo.ffn, geo.hidden))
        _expect(reader, hf[1], (geo.ffn, geo.hidden))
        n = geo.ffn // t
        span = (r * n, (r + 1) * n)
        return torch.cat([reader.read(hf[0], rows=span), reader.read(hf[1], rows=span)], dim=0)
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def to_hf(rule: Rule, hf: tuple[str, ...], tensor: torch.Tensor, geo: Geometry) -> list[tuple[str, torch.Tensor]]:
    """Full megatron tensor -> [(HF name, HF tensor)] (the inverse of build_shard at tp=1)."""
    if rule.kind == "copy":
        return [(hf[0], tensor)]
    if rule.kind == "vocab":
        return [(hf[0], tensor[: geo.vocab])]
    if rule.kind == "qkv":
        q_per_group, d = geo.heads // geo.groups, geo.head_dim
        tail = tuple(tensor.shape[1:])
        grouped = tensor.reshape(geo.groups, (q_per_group + 2) * d, *tail)
        q, k, v = torch.split(grouped, [q_per_group * d, d, d], dim=1)
        return [(hf[0], q.reshape(-1, *tail)), (hf[1], k.reshape(-1, *tail)), (hf[2], v.reshape(-1, *tail))]
    if rule.kind == "fc1":
        gate, up = torch.chunk(tensor, 2, dim=0)
        return [(hf[0], gate), (hf[1], up)]
    raise ValueError(f"unknown rule kind {rule.kind!r}")


# ----------------------------------------------------------------------------- model access


@dataclass
class Slot:
    """One local parameter of a (possibly sharded) megatron model."""

    name: str
    """Canonical megatron name (global layer index)."""
    param: torch.Tensor
    partition_dim: int | None
    tp_rank: int
    tp_size: int
    local_name: str | None = None
    """The parameter's local name in a ShardedGPT (None for a bare GPTModel)."""


def _gpt_module(model):
    """The megatron GPTModel inside ``model`` (a ShardedGPT, a DDP wrapper or the GPTModel)."""
    from megatron.core.models.gpt import GPTModel

    seen = model
    for _ in range(4):
        if isinstance(seen, GPTModel):
            return seen
        seen = getattr(seen, "gpt", None) or getattr(seen, "model", None) or getattr(seen, "module", None)
        if seen is None:
            break
    raise TypeError(f"cannot find a megatron GPTModel inside {type(model).__name__}")


def model_slots(model) -> list[Slot]:
    """Local parameters with canonical names and their TP placement.

    A ShardedGPT (gopd_mega/models.py) describes its own parameters (``param_layout()``; the tied
    output layer of the last PP stage is named ``embedding.word_embeddings.weight`` there). For
    a bare GPTModel the placement comes from megatron's parameter attributes
    (``tensor_model_parallel``, ``partition_dim``) and each layer's global ``layer_number``.
    """
    if hasattr(model, "param_layout"):
        params = dict(_gpt_module(model).named_parameters())
        return [
            Slot(i.canonical_name, params[i.local_name], i.partition_dim, i.tp_rank, i.tp_size, i.local_name)
            for i in model.param_layout()
        ]
    gpt = _gpt_module(model)
    tp = gpt.pg_collection.tp
    tp_rank, tp_size = (tp.rank(), tp.size()) if tp is not None else (0, 1)
    offsets = {str(j): layer.layer_number - 1 for j, layer in enumerate(gpt.decoder.layers)}
    slots = []
    for name, param in gpt.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(offsets[parts[2]])
        split = getattr(param, "tensor_model_parallel", False)
        slots.append(
            Slot(".".join(parts), param, getattr(param, "partition_dim", None) if split else None, tp_rank, tp_size)
        )
    return slots


def _model_cfg(model, cfg: ModelConfig | None) -> ModelConfig:
    cfg = cfg or getattr(model, "cfg", None)
    if cfg is None:
        raise TypeError("pass the model's ModelConfig (cfg=...)")
    return cfg


def _padded_vocab(model) -> int:
    return _gpt_module(model).vocab_size


@torch.no_grad()
def load_hf_checkpoint(model, directory: str | os.PathLike, cfg: ModelConfig | None = None) -> int:
    """Fill every local parameter of ``model`` from the HF checkpoint in ``directory``.

    Streams: one megatron tensor at a time, reading only this rank's slices. A ShardedGPT with an
    optimizer also gets each tensor at the checkpoint's precision in its fp32 master weights
    (``ShardedGPT.load_local_weight``), not the copy rounded to the model's dtype. Returns the
    number of parameters filled. Errors name the file and tensor (missing, wrong shape, corrupt file).
    """
    cfg = _model_cfg(model, cfg)
    family = get_family(read_hf_config(directory).get("model_type", "<missing>"))
    geo = Geometry.of(cfg, _padded_vocab(model))
    reader = CheckpointReader(directory)
    slots = model_slots(model)
    used: set[str] = set()
    for slot in slots:
        rule, hf = match_rule(family, slot.name, geo)
        used.update(hf)
        shard = build_shard(
            reader, rule, hf, geo, tuple(slot.param.shape), slot.partition_dim, slot.tp_rank, slot.tp_size
        )
        if tuple(shard.shape) != tuple(slot.param.shape):
            raise CheckpointError(
                f"{directory}: {slot.name} built from {list(hf)} has shape {list(shard.shape)}, "
                f"the model has {list(slot.param.shape)}"
            )
        if shard.is_floating_point() and not bool(torch.isfinite(shard).all()):
            raise CheckpointError(f"{directory}: {', '.join(hf)} hold NaN or inf; refusing to load them")
        if slot.local_name is not None and hasattr(model, "load_local_weight"):
            model.load_local_weight(slot.local_name, shard)  # a ShardedGPT: its fp32 masters get the full precision
        else:
            slot.param.copy_(shard.to(slot.param.dtype))
    if _gpt_module(model).pg_collection.pp.size() == 1:
        # A whole model must use every tensor: a leftover one (e.g. attention biases the config
        # does not announce) means the config and the weights disagree.
        ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
        unused = sorted(
            n for n in reader.names() if n not in used and n not in ignorable and not n.endswith("rotary_emb.inv_freq")
        )
        if unused:
            raise CheckpointError(
                f"{directory}: tensors not used by the {family.name} model: {unused[:5]}"
                f"{' ...' if len(unused) > 5 else ''} (config.json and weights disagree?)"
            )
    return len(slots)


load_hf_weights = load_hf_checkpoint  # the name gopd_mega/model_io.py uses


def full_megatron_state(model, master: bool = False) -> dict[str, torch.Tensor]:
    """Canonical name -> full tensor: the model's ``full_state_dict()`` if it has one (ShardedGPT,
    collective over its TP/PP groups), else the GPTModel's own parameters (TP=1, PP=1 only).
    ``master``: a ShardedGPT with an optimizer gives its fp32 master weights instead."""
    if hasattr(model, "full_state_dict"):
        state = full_master_state_dict(model) if master else model.full_state_dict()
        return {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    slots = model_slots(model)
    if any(s.tp_size > 1 for s in slots) or _gpt_module(model).pg_collection.pp.size() > 1:
        raise TypeError("a sharded GPTModel needs a wrapper with full_state_dict() to export")
    return {s.name: s.param.detach() for s in slots}


@torch.no_grad()
def hf_named_tensors(
    model,
    cfg: ModelConfig | None = None,
    family: Family | str | None = None,
    dtype: torch.dtype | None = None,
    master: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for every weight of ``model`` in HF layout (the rollout
    engine's weight refresh consumes this). The tied output layer is not yielded (HF ties it).
    ``master``: the optimizer's fp32 master weights (see :func:`full_megatron_state`)."""
    cfg = _model_cfg(model, cfg)
    family = get_family(family) if isinstance(family, str) else (family or family_for_model(cfg))
    geo = Geometry.of(cfg, _padded_vocab(model))
    for name, tensor in full_megatron_state(model, master).items():
        if name == "output_layer.weight" and cfg.tie_embeddings:
            continue
        rule, hf = match_rule(family, name, geo)
        for hf_name, t in to_hf(rule, hf, tensor, geo):
            yield hf_name, (t.to(dtype) if dtype is not None else t).contiguous()


def export_hf(
    model,
    directory: str | os.PathLike,
    cfg: ModelConfig | None = None,
    family: Family | str | None = None,
    source_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    shard_bytes: int = 2 * 1024**3,
) -> Path | None:
    """Write ``model`` as an HF checkpoint (config.json, sharded safetensors + index, tokenizer
    and generation_config copied from ``source_dir``, the HF folder the model was loaded from,
    whose config.json also names the family) at ``directory``, atomically.

    A model with an optimizer (the student) exports its fp32 MASTER weights, cast to ``dtype``
    (default fp32: nothing of the masters is lost; pass torch.bfloat16 for a smaller checkpoint).
    Collective when the model is sharded (every rank calls it); global rank 0 writes. Returns the
    directory on the writing rank, None elsewhere. Weights holding NaN or inf are never exported
    (TrainingError on every rank), and a failed write (a full disk) fails on every rank.
    """
    cfg = _model_cfg(model, cfg)
    if family is None and source_dir is not None:
        family = read_hf_config(source_dir).get("model_type")
    family = get_family(family) if isinstance(family, str) else (family or family_for_model(cfg))
    tensors = list(hf_named_tensors(model, cfg, family, dtype, master=True))  # collective: all ranks
    bad = first_nonfinite(dict(tensors))
    if bad is not None:
        raise TrainingError(f"{directory}: not exported: the weights hold NaN or inf ({bad})")

    def extra_files(tmp: Path) -> None:
        family.hf_config(cfg, dtype=str(dtype).removeprefix("torch.")).save_pretrained(tmp)
        if source_dir is not None:
            for fname in TOKENIZER_FILES:
                if (Path(source_dir) / fname).is_file():
                    shutil.copy2(Path(source_dir) / fname, tmp / fname)

    written = on_rank0(lambda: str(write_checkpoint(directory, tensors, extra_files, shard_bytes)))
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    return Path(written) if rank0 else None
