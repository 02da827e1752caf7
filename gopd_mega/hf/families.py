"""Per-family description of Hugging Face checkpoints: config fields and tensor-name tables.

A :class:`Family` says how one HF ``model_type`` maps onto gopd-mega's megatron-core GPT model:

* ``config_to_model``: HF ``config.json`` (a dict) -> :class:`~gopd_mega.config.ModelConfig`,
  refusing (with the field's name) anything the megatron model would silently get wrong
  (rope scaling, sliding windows, biases the local spec has no slot for, non-SiLU MLPs).
* ``hf_config``: the inverse, for export (a ``transformers`` config object).
* ``table``: a list of :class:`Rule` ``(megatron pattern, HF names, kind)``. ``{i}`` is the
  GLOBAL layer index (``{e}`` is reserved for experts, see below). One megatron tensor may be
  built from several HF tensors (``kind`` says how, see gopd_mega/hf/convert.py).

Megatron canonical names of the dense decoder (local spec; the Transformer Engine spec fuses the
two pre-norms into the following linear layer, both spellings are listed so the table works for
whichever the model has)::

    embedding.word_embeddings.weight                       [Vp, h]   vocab rows padded with zeros
    decoder.layers.{i}.input_layernorm.weight              [h]       (TE: self_attention.linear_qkv.layer_norm_weight)
    decoder.layers.{i}.self_attention.linear_qkv.weight    [G*(q+2)*d, h]  per KV group g: q heads of g, k_g, v_g
    decoder.layers.{i}.self_attention.linear_qkv.bias      [G*(q+2)*d]     (Qwen2) same order
    decoder.layers.{i}.self_attention.q_layernorm.weight   [d]       (Qwen3)
    decoder.layers.{i}.self_attention.k_layernorm.weight   [d]       (Qwen3)
    decoder.layers.{i}.self_attention.linear_proj.weight   [h, H*d]
    decoder.layers.{i}.pre_mlp_layernorm.weight            [h]       (TE: mlp.linear_fc1.layer_norm_weight)
    decoder.layers.{i}.mlp.linear_fc1.weight               [2F, h]   [gate; up]
    decoder.layers.{i}.mlp.linear_fc2.weight               [h, F]
    decoder.final_layernorm.weight                         [h]
    output_layer.weight                                    [Vp, h]   (absent from HF when tied)

(h hidden, H query heads, G KV groups, q = H/G, d head_dim, F ffn, V vocab, Vp padded vocab.)

Adding Qwen3-MoE: a family whose table adds ``decoder.layers.{i}.mlp.router.weight <-
model.layers.{i}.mlp.gate.weight`` and ``decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1
.weight <- [..experts.{e}.gate_proj, ..experts.{e}.up_proj]`` (kind "fc1") etc., plus the MoE
fields in ``config_to_model`` (and ModelConfig fields for them). The converter matches
``{e}`` like ``{i}``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from gopd_mega.config import ModelConfig


class UnsupportedCheckpoint(ValueError):
    """The HF checkpoint uses a feature gopd-mega's megatron model does not implement."""


@dataclass(frozen=True)
class Rule:
    """One megatron tensor and the HF tensor(s) it is made of.

    kind:
      'copy'  one HF tensor, same layout (TP split along the megatron param's partition dim)
      'vocab' one HF tensor of V rows, zero-padded to Vp rows (TP split by rows)
      'qkv'   [q, k, v] interleaved per KV group (weights or biases)
      'fc1'   [gate, up] concatenated (per TP rank: [gate_shard; up_shard])
    """

    megatron: str
    hf: tuple[str, ...]
    kind: str = "copy"

    def regex(self) -> re.Pattern:
        pattern = re.escape(self.megatron).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
        return re.compile(pattern + "$")


L = "decoder.layers.{i}."
H = "model.layers.{i}."

DENSE_TABLE: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab"),  # tied: see convert.hf_sources
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule(L + "input_layernorm.weight", (H + "input_layernorm.weight",)),
    Rule(L + "self_attention.linear_qkv.layer_norm_weight", (H + "input_layernorm.weight",)),
    Rule(
        L + "self_attention.linear_qkv.weight",
        (H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight", H + "self_attn.v_proj.weight"),
        "qkv",
    ),
    Rule(
        L + "self_attention.linear_qkv.bias",
        (H + "self_attn.q_proj.bias", H + "self_attn.k_proj.bias", H + "self_attn.v_proj.bias"),
        "qkv",
    ),
    Rule(L + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",)),
    Rule(L + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",)),
    Rule(L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",)),
    Rule(L + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",)),
    Rule(L + "mlp.linear_fc1.layer_norm_weight", (H + "post_attention_layernorm.weight",)),
    Rule(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), "fc1"),
    Rule(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",)),
)


def _rope_theta(hf: dict[str, Any]) -> float:
    """Rope base of either config spelling; refuse scaled rope (ModelConfig has no field for it)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or None
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if scaling is not None and (scaling.get("rope_type") or scaling.get("type") or "default") != "default":
        raise UnsupportedCheckpoint(f"config field 'rope_scaling' = {scaling}: only unscaled rope is supported")
    if rope_type != "default":
        raise UnsupportedCheckpoint(
            f"config field 'rope_parameters.rope_type' = {rope_type!r}: only 'default' rope is supported"
        )
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _require(hf: dict[str, Any], field_name: str, ok: Callable[[Any], bool], what: str) -> None:
    if field_name in hf and not ok(hf[field_name]):
        raise UnsupportedCheckpoint(f"config field {field_name!r} = {hf[field_name]!r}: {what}")


def _dense_config(hf: dict[str, Any], qkv_bias: bool, qk_norm: bool) -> ModelConfig:
    _rope_theta(hf)
    _require(hf, "hidden_act", lambda v: v == "silu", "only 'silu' (SwiGLU) MLPs are supported")
    _require(hf, "mlp_bias", lambda v: not v, "MLP biases are not supported")
    _require(hf, "use_sliding_window", lambda v: not v, "sliding-window attention is not supported")
    _require(
        hf, "layer_types", lambda v: all(t == "full_attention" for t in v), "only full attention layers are supported"
    )
    if not qkv_bias:
        _require(hf, "attention_bias", lambda v: not v, "attention biases are not supported for this family")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"],
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_layernorm=qk_norm,
        add_qkv_bias=qkv_bias,
        activation="swiglu",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        rope_base=_rope_theta(hf),
    )


@dataclass(frozen=True)
class Family:
    name: str
    """HF ``model_type``."""
    architecture: str
    """HF ``architectures[0]`` written on export."""
    qkv_bias: bool
    qk_norm: bool
    table: tuple[Rule, ...] = field(default=DENSE_TABLE)

    def config_to_model(self, hf: dict[str, Any], **overrides: Any) -> ModelConfig:
        return replace(_dense_config(hf, self.qkv_bias, self.qk_norm), **overrides)

    def hf_config(self, cfg: ModelConfig, dtype: str = "float32"):
        """transformers config object for ``cfg`` (written to config.json on export)."""
        from transformers import AutoConfig

        if cfg.activation != "swiglu":
            raise UnsupportedCheckpoint(
                f"model field 'activation' = {cfg.activation!r}: {self.name} checkpoints need 'swiglu'"
            )
        extra: dict[str, Any] = {}
        if self.name == "llama":
            extra = {"attention_bias": False, "mlp_bias": False}
        if self.name == "qwen3":
            extra = {"attention_bias": False}
        return AutoConfig.for_model(
            self.name,
            architectures=[self.architecture],
            num_hidden_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_query_groups or cfg.num_attention_heads,
            intermediate_size=cfg.ffn_hidden_size,
            head_dim=cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads,
            vocab_size=cfg.vocab_size,
            max_position_embeddings=cfg.max_seq_len,
            tie_word_embeddings=cfg.tie_embeddings,
            rms_norm_eps=cfg.norm_epsilon,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
            hidden_act="silu",
            dtype=dtype,
            **extra,
        )


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM", qkv_bias=False, qk_norm=False),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, qk_norm=False),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", qkv_bias=False, qk_norm=True),
}


def get_family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise UnsupportedCheckpoint(
            f"config field 'model_type' = {model_type!r}: supported families are {sorted(FAMILIES)}"
            + (
                " (Qwen3-MoE: add a Family with the expert rules, see gopd_mega/hf/families.py)"
                if "moe" in model_type
                else ""
            )
        )
    return FAMILIES[model_type]


def family_for_model(cfg: ModelConfig) -> Family:
    """Guess the family of a ModelConfig (for exporting a model that was not loaded from HF)."""
    if cfg.qk_layernorm:
        return FAMILIES["qwen3"]
    return FAMILIES["qwen2" if cfg.add_qkv_bias else "llama"]
