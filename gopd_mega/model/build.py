"""How a model is built: ModelConfig -> megatron-core TransformerConfig, layer spec and GPTModel.

The built model (:class:`HiddenGPT`) is a megatron ``GPTModel`` whose last pipeline stage returns
the final hidden states [T, b, H] (after the final RMSNorm) instead of logits: the output layer is
applied by ``kernels`` (fused log-prob / loss) so [T, V] logits are never materialised.

Positions: megatron's RoPE ignores ``position_ids`` and rotates position t of the input by angle
t. For packed micro-batches (several sequences back to back in one row, see
gopd_mega.model.batch) HiddenGPT instead rotates token t by ``position_ids[0, t]``, so positions
restart at 0 for each sequence. Under Transformer Engine's THD format megatron restarts them
itself from ``packed_seq_params.cu_seqlens_q``.

Spec: Transformer Engine's when it imports (GPU clusters), megatron's local spec otherwise (with
a sequence-parallel-capable torch RMSNorm when sequence_parallel is on). Only the TE spec has THD
packed attention and context parallelism; the local spec takes an explicit
attention mask instead ([1, 1, T, T] bool, True = masked out; megatron fills those scores with
-10000 before the softmax: fusions/fused_softmax.py, transformer/utils.attention_mask_func).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gopd_mega.config import ModelConfig
from gopd_mega.parallel import ModelGroups
from gopd_mega.platform import device, on_gpu

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ffn_size(cfg: ModelConfig) -> int:
    """cfg.ffn_hidden_size, or 4H (gelu) / 8H/3 rounded up to a multiple of 64 (swiglu)."""
    if cfg.ffn_hidden_size is not None:
        return cfg.ffn_hidden_size
    if cfg.activation == "swiglu":
        return -(-(8 * cfg.hidden_size // 3) // 64) * 64
    return 4 * cfg.hidden_size


def has_transformer_engine() -> bool:
    """True when Transformer Engine imports (its spec, THD packing and context parallelism)."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure (no CUDA, ABI mismatch) means no TE
        return False
    return True


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm for megatron's local spec under sequence parallelism (megatron's own
    WrappedTorchNorm refuses SP and Apex is not installed). Under SP each TP rank normalises its
    [T/tp] slice, so the weight's gradient is partial: it is tagged ``sequence_parallel`` (as
    megatron tags its own norms) and summed over TP when gradients are finalised."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]  # megatron reads it


def layer_spec(cfg: ModelConfig):
    """Transformer-Engine spec when TE imports (GPU clusters), megatron's local spec otherwise.
    With sequence parallelism and no TE: the local spec with :class:`SequenceParallelRMSNorm`
    for every norm (a TransformerBlockSubmodules, so the final norm is one too)."""
    if has_transformer_engine():
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_layernorm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization="RMSNorm")
    if not cfg.sequence_parallel:
        return spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    layer = spec.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = SequenceParallelRMSNorm
    if cfg.qk_layernorm:  # per-head norms after the QKV all-gather: full sequence, TP-local heads
        layer.self_attention.submodules.q_layernorm = SequenceParallelRMSNorm
        layer.self_attention.submodules.k_layernorm = SequenceParallelRMSNorm
    return TransformerBlockSubmodules(
        layer_specs=[spec] * (cfg.num_layers // cfg.pp), layer_norm=SequenceParallelRMSNorm
    )


def check_platform_support(cfg: ModelConfig, name: str) -> None:
    """Refuse, with one line naming the field, the memory knobs this platform cannot run."""
    te = has_transformer_engine()
    if cfg.context_parallel_size > 1 and not te:
        raise ValueError(
            f"{name}: model.context_parallel_size={cfg.context_parallel_size} needs Transformer "
            "Engine attention (GPU only)"
        )
    if cfg.context_parallel_size > 1:
        raise ValueError(
            f"{name}: model.context_parallel_size={cfg.context_parallel_size}: the model groups "
            "(gopd_mega.parallel) have no context-parallel group yet"
        )


def transformer_config(cfg: ModelConfig):
    """megatron TransformerConfig of ``cfg`` (fp32/bf16/fp16 params, RMSNorm, RoPE, no biases
    except the optional QKV bias, no dropout, recompute / SP knobs from the config)."""
    from megatron.core.transformer import TransformerConfig

    dtype = DTYPES[cfg.params_dtype]
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups or cfg.num_attention_heads,
        ffn_hidden_size=ffn_size(cfg),
        kv_channels=cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=cfg.activation == "swiglu",
        activation_func=F.silu if cfg.activation == "swiglu" else F.gelu,
        add_bias_linear=False,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        context_parallel_size=cfg.context_parallel_size,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu(),
        perform_initialization=False,  # gopd_mega.model.weights initialises per canonical tensor
        sequence_parallel=cfg.sequence_parallel,
        recompute_granularity=cfg.recompute_granularity,
        recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
        variable_seq_lengths=True,  # packed micro-batches differ in length; p2p sends shapes
        moe_token_dispatcher_type="alltoall",  # (no MoE; the default refuses variable_seq_lengths)
        calculate_per_token_loss=True,  # our losses are already globally normalised sums
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )


def _hidden_gpt_class():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    class HiddenGPT(GPTModel):
        """GPTModel returning the final hidden states [T, b, H] (full sequence on every TP rank,
        also under sequence parallelism) instead of logits, with per-token RoPE positions."""

        def _preprocess(
            self,
            input_ids,
            position_ids,
            decoder_input=None,
            inference_context=None,
            packed_seq_params=None,
            padding_mask=None,
        ):
            out = super()._preprocess(
                input_ids,
                position_ids,
                decoder_input=decoder_input,
                inference_context=inference_context,
                packed_seq_params=packed_seq_params,
                padding_mask=padding_mask,
            )
            emb = out[1]
            if (
                emb is not None
                and packed_seq_params is None
                and inference_context is None
                and position_ids is not None
                and position_ids.shape[0] == 1
            ):
                # emb [T, 1, 1, d] rotates position t by angle t; token t of a packed row sits at
                # position position_ids[0, t] < T of its own sequence.
                out = (out[0], emb[position_ids[0].to(emb.device)], *out[2:])
            return out

        def _postprocess(self, hidden_states, *args, **kwargs):
            if self.config.sequence_parallel:
                # [T/tp, b, H] -> [T, b, H]; backward reduce-scatters (sums the TP ranks' partial
                # dh of the vocab-parallel kernel, which then runs with reduce_dh=False).
                hidden_states = gather_from_sequence_parallel_region(
                    hidden_states, tensor_parallel_output_grad=True, group=self.pg_collection.tp
                )
            return hidden_states

    return HiddenGPT


def build_gpt(cfg: ModelConfig, groups: ModelGroups, tconfig):
    """The HiddenGPT of this rank's pipeline stage, on :func:`gopd_mega.platform.device`.
    Parameters are left uninitialised (gopd_mega.model.weights.init_weights fills them)."""
    model = _hidden_gpt_class()(
        config=tconfig,
        transformer_layer_spec=layer_spec(cfg),
        vocab_size=cfg.padded_vocab,
        max_sequence_length=cfg.max_seq_len,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_base),
        pg_collection=groups.pg,
    ).to(device())
    if groups.is_last_stage and getattr(model.decoder, "final_layernorm", None) is None:
        # HiddenGPT relies on the decoder block applying the final norm (0.16 - 0.19 do).
        raise RuntimeError("this megatron-core no longer applies the final norm in the decoder block")
    return model
