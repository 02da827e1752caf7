"""Helpers for the HF conversion tests: tiny random HF models and a bare megatron GPTModel on CPU.

``build_gpt`` mirrors how a ModelConfig becomes a megatron-core GPTModel (local spec, RMSNorm,
SwiGLU, RoPE, no dropout, fp32). Tests use the project's ShardedGPT when it is available; this
exists so the converter can be checked without it (TP=1, PP=1, one gloo process).
"""

from __future__ import annotations

import os

import torch

from gopd_mega.config import ModelConfig

TINY = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 100,
    "max_position_embeddings": 64,
}


def tiny_hf_model(family: str, directory: str | os.PathLike, tie: bool = False, seed: int = 0, **overrides):
    """Save a tiny randomly initialised HF model of ``family`` (llama/qwen2/qwen3) to ``directory``.

    Weights are drawn with std 0.2 (not HF's 0.02) so logits vary enough for a meaningful compare;
    norm weights are perturbed away from 1 so a swapped norm would show.
    """
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[
        family
    ]
    config = cls(
        **{
            **TINY,
            "tie_word_embeddings": tie,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
            "rms_norm_eps": 1e-5,
            **overrides,
        }
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model.eval()


def init_single_process() -> None:
    """One-process gloo world plus the CPU patches and the layout-free megatron globals, exactly as
    the rest of gopd-mega sets them up (no global model-parallel layout is chosen)."""
    from gopd_mega.parallel import build_model_groups

    build_model_groups(1, 1, name="test model")


def build_gpt(cfg: ModelConfig, padded_vocab: int | None = None):
    """A megatron-core GPTModel for ``cfg`` on CPU (TP=1, PP=1)."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    tc = TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
    )
    spec = get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization="RMSNorm")
    from gopd_mega.parallel import build_model_groups

    return GPTModel(
        tc,
        spec,
        vocab_size=padded_vocab or cfg.padded_vocab,
        max_sequence_length=cfg.max_seq_len,
        pg_collection=build_model_groups(1, 1, name="test model").pg,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_base) if float(cfg.rope_base).is_integer() else cfg.rope_base,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
    ).eval()


@torch.no_grad()
def megatron_logits(gpt, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s, Vp] logits of a GPTModel for full (unpadded) token rows."""
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return gpt(tokens, positions, attention_mask=None)
