"""Canonical weight names, shard / unshard, layout-free initialisation and full state dicts.

Canonical names and layouts (full_state_dict / load_full_state_dict / param_layout): megatron-core
local-spec names with GLOBAL layer indices, e.g.
    embedding.word_embeddings.weight            [vocab_size, H]   (real rows only, see below)
    decoder.layers.{l}.input_layernorm.weight   [H]
    decoder.layers.{l}.self_attention.linear_qkv.weight  [ng * (q_per_g + 2) * d, H]
    decoder.layers.{l}.self_attention.linear_qkv.bias    (add_qkv_bias) same row layout
    decoder.layers.{l}.self_attention.q_layernorm.weight / k_layernorm.weight  [d] (qk_layernorm)
    decoder.layers.{l}.self_attention.linear_proj.weight [H, nh * d]
    decoder.layers.{l}.pre_mlp_layernorm.weight [H]
    decoder.layers.{l}.mlp.linear_fc1.weight    [2F, H] swiglu ([F, H] gelu)
    decoder.layers.{l}.mlp.linear_fc2.weight    [H, F]
    decoder.final_layernorm.weight              [H]
    output_layer.weight                         [vocab_size, H]   (untied only)
- Fused QKV (megatron's order): rows grouped per KV group g = 0..ng-1; inside a group the
  q_per_g = nh/ng query heads of that group (d rows each), then its k head (d rows), then its v
  head (d rows). TP shards dim 0 contiguously, i.e. rank r holds KV groups [r*ng/tp, (r+1)*ng/tp).
- fc1 with swiglu: the canonical full tensor is [gate (F rows); up (F rows)]. Megatron keeps
  [gate; up] PER TP SHARD: rank r holds [gate[r*F/tp:(r+1)*F/tp]; up[r*F/tp:(r+1)*F/tp]].
- Row-parallel linear_proj / linear_fc2 shard dim 1; norms are replicated on every TP rank.
- Vocab tensors (word embeddings, output layer) have cfg.padded_vocab rows in the model (TP
  shards dim 0: rank r holds rows [r*Vp/tp, (r+1)*Vp/tp)); canonical tensors hold only the
  cfg.vocab_size real rows, padding rows are zero, so canonical weights do not depend on the
  layout. The Transformer-Engine spec's fused norm names (linear_qkv.layer_norm_weight,
  linear_fc1.layer_norm_weight) are mapped to the canonical input/pre_mlp_layernorm names.

Random initialisation is per canonical tensor from a generator seeded by (cfg.seed, name), so the
full weights are identical whatever the layout: normal(0, init_std) matrices, ones for norms,
zeros for biases.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gopd_mega.config import ModelConfig
from gopd_mega.parallel import ModelGroups

# Transformer-Engine spec names -> canonical (local spec) names.
_TE_RENAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_COLUMN_PARALLEL = (
    "linear_qkv.weight",
    "linear_qkv.bias",
    "linear_fc1.weight",
    "linear_fc1.bias",
    "word_embeddings.weight",
    "output_layer.weight",
)
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")


def partition_dim(canonical: str) -> int | None:
    """Megatron's TP split of a canonical tensor: 0 (column-parallel and vocab-parallel
    layers), 1 (row-parallel layers), None (replicated: norms, row-parallel biases). Decided by
    name because megatron only tags parameters when it initialises them itself."""
    if canonical.endswith(_COLUMN_PARALLEL):
        return 0
    if canonical.endswith(_ROW_PARALLEL):
        return 1
    return None


@dataclass(frozen=True)
class ParamInfo:
    """Where one local parameter sits in its canonical full tensor."""

    local_name: str
    canonical_name: str
    partition_dim: int | None
    """TP partition dim (0: column-parallel / vocab, 1: row-parallel), None if replicated."""
    tp_rank: int
    tp_size: int
    vocab_padded: bool
    """Rows are the padded vocab (full model has cfg.padded_vocab rows, canonical vocab_size)."""
    gated: bool
    """swiglu fc1: the shard is [gate shard; up shard] (see the module docstring)."""


def canonical_name(local_name: str, cfg: ModelConfig, layer_offset: int) -> str:
    """Canonical name of a local megatron parameter name (global layer index, local-spec names)."""
    name = local_name
    if name.startswith("decoder.layers."):
        parts = name.split(".")
        parts[2] = str(int(parts[2]) + layer_offset)
        name = ".".join(parts)
    for te, local in _TE_RENAMES.items():
        if name.endswith(te):
            name = name[: -len(te)] + local
    if name == "output_layer.weight" and cfg.tie_embeddings:
        name = "embedding.word_embeddings.weight"  # last stage's copy of the tied weight (PP>1)
    return name


def build_layout(model: torch.nn.Module, cfg: ModelConfig, groups: ModelGroups) -> list[ParamInfo]:
    """ParamInfo of every local parameter of ``model`` (this rank's TP shard of its PP stage);
    also gives megatron's tensor-parallel attributes to parameters that lack them."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    offset = groups.pp_rank * (cfg.num_layers // cfg.pp)
    layout = []
    for local, p in model.named_parameters():
        canonical = canonical_name(local, cfg, offset)
        info = ParamInfo(
            local_name=local,
            canonical_name=canonical,
            partition_dim=partition_dim(canonical),
            tp_rank=groups.tp_rank,
            tp_size=cfg.tp,
            vocab_padded=canonical in ("embedding.word_embeddings.weight", "output_layer.weight"),
            gated=canonical.endswith("mlp.linear_fc1.weight") and cfg.activation == "swiglu",
        )
        if not hasattr(p, "tensor_model_parallel"):  # 0.16 tags parameters only when it initialises them
            set_tensor_model_parallel_attributes(p, info.partition_dim is not None, info.partition_dim or 0, 1)
        layout.append(info)
    return layout


def shard_of(cfg: ModelConfig, info: ParamInfo, full: torch.Tensor) -> torch.Tensor:
    """This rank's shard of canonical full tensor ``full`` for parameter ``info``."""
    if info.vocab_padded:
        rows = full[: cfg.vocab_size]
        full = torch.zeros((cfg.padded_vocab, *full.shape[1:]), dtype=full.dtype)
        full[: rows.shape[0]] = rows
    if info.partition_dim is None or info.tp_size == 1:
        return full
    if info.gated:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(info.tp_size, 0)[info.tp_rank], up.chunk(info.tp_size, 0)[info.tp_rank]])
    return full.chunk(info.tp_size, dim=info.partition_dim)[info.tp_rank]


def unshard(cfg: ModelConfig, info: ParamInfo, shards: list[torch.Tensor]) -> torch.Tensor:
    """Canonical full tensor from every TP rank's shard (inverse of :func:`shard_of`)."""
    if info.partition_dim is None or len(shards) == 1:
        full = shards[0]
    elif info.gated:
        halves = [s.chunk(2, dim=0) for s in shards]
        full = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    else:
        full = torch.cat(shards, dim=info.partition_dim)
    return full[: cfg.vocab_size] if info.vocab_padded else full


def full_shape(cfg: ModelConfig, info: ParamInfo, local: torch.Tensor) -> tuple[int, ...]:
    """Shape of the canonical full tensor of local parameter ``local``."""
    shape = list(local.shape)
    if info.partition_dim is not None:
        shape[info.partition_dim] *= info.tp_size
    if info.vocab_padded:
        shape[0] = cfg.vocab_size
    return tuple(shape)


@torch.no_grad()
def init_weights(params: dict[str, torch.nn.Parameter], layout: list[ParamInfo], cfg: ModelConfig) -> None:
    """Layout-free random init (module docstring): each rank copies its shard of the full tensor."""
    for info in layout:
        p = params[info.local_name]
        shape = full_shape(cfg, info, p)
        if info.canonical_name.endswith("bias"):
            full = torch.zeros(shape)
        elif "norm" in info.canonical_name.rsplit(".", 2)[-2]:
            full = torch.ones(shape)
        else:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + zlib.crc32(info.canonical_name.encode()))
            full = torch.randn(shape, generator=gen) * cfg.init_std
        p.copy_(shard_of(cfg, info, full))


@torch.no_grad()
def gather_full_state_dict(
    params: Mapping[str, torch.Tensor], layout: list[ParamInfo], cfg: ModelConfig, groups: ModelGroups
) -> dict[str, torch.Tensor]:
    """{canonical name: full unsharded CPU tensor}, gathered over TP and PP, on every rank."""
    local: dict[str, torch.Tensor] = {}
    for info in layout:
        if info.local_name == "output_layer.weight" and cfg.tie_embeddings:
            continue  # a copy of the first stage's embedding
        p = params[info.local_name].detach()
        if info.partition_dim is not None and groups.tp > 1:
            shards = [torch.empty_like(p) for _ in range(groups.tp)]
            dist.all_gather(shards, p.contiguous(), group=groups.pg.tp)
        else:
            shards = [p]
        local[info.canonical_name] = unshard(cfg, info, [s.cpu() for s in shards])
    if groups.pp == 1:
        return local
    stages: list[dict] = [None] * groups.pp  # type: ignore[list-item]
    dist.all_gather_object(stages, local, group=groups.pg.pp)
    return {k: v for stage in stages for k, v in stage.items()}


@torch.no_grad()
def load_full_state_dict(
    params: dict[str, torch.nn.Parameter],
    layout: list[ParamInfo],
    cfg: ModelConfig,
    sd: dict[str, torch.Tensor],
    name: str,
) -> None:
    """Shard canonical full tensors onto this rank (vocab tensors may carry any number of rows >=
    vocab_size; rows past vocab_size are ignored). ``name`` (the model's) goes into errors."""
    missing = [i.canonical_name for i in layout if i.canonical_name not in sd]
    if missing:
        raise KeyError(f"{name}: state dict lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for info in layout:
        p = params[info.local_name]
        p.copy_(shard_of(cfg, info, sd[info.canonical_name].to(torch.float32)).to(p.dtype))


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity (None: every value is finite).
    Run on full state dicts, which every rank holds alike, so every rank gives the same answer."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None
