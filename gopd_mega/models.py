"""ShardedGPT: one megatron-core GPT model (student, teacher or reference) on its own TP/PP layout.

Built from a ModelConfig and the ModelGroups of its layout (gopd_mega.parallel). The trainer holds
the FULL batch on every rank; each model splits the rows over its own DP group, runs megatron's
pipeline schedule over its own PP group, and all-gathers the results so that every rank gets
full-batch outputs. Sequences are [N, S] right-padded token ids, causal attention, positions
0..S-1.

The output layer never materialises [T, V] logits for scoring/training: the model returns the
last stage's final hidden states (after the final RMSNorm) and the vocab-parallel output weight
shard (the embedding weight when tied) goes to ``kernels`` (fused log-prob / loss).

Alignment convention used everywhere (logprobs, train_step, token_loss_fn):
    logp[i, j] = log p(tokens[i, j] | tokens[i, :j]) for j >= 1;  logp[i, 0] = 0.
We feed the kernel T = n * S "aligned" tokens: the hidden state of position j-1 with target
tokens[:, j] (flat index i * S + j); position 0 and masked positions carry ignore_index.

Canonical weight names and layouts (full_state_dict / load_full_state_dict / param_layout):
megatron-core local-spec names with GLOBAL layer indices, e.g.
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

import os
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import kernels
from gopd_mega.config import ModelConfig, OptimConfig
from gopd_mega.optim import StudentOptimizer, build_optimizer
from gopd_mega.parallel import ModelGroups
from gopd_mega.platform import device, on_gpu, setup_platform

IGNORE = -100
TokenLossFn = Callable[[torch.Tensor, slice], torch.Tensor]
TokenLossFnBuilder = Callable[[torch.Tensor], TokenLossFn]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Transformer-Engine spec names -> canonical (local spec) names.
_TE_RENAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def ffn_size(cfg: ModelConfig) -> int:
    """cfg.ffn_hidden_size, or 4H (gelu) / 8H/3 rounded up to a multiple of 64 (swiglu)."""
    if cfg.ffn_hidden_size is not None:
        return cfg.ffn_hidden_size
    if cfg.activation == "swiglu":
        return -(-(8 * cfg.hidden_size // 3) // 64) * 64
    return 4 * cfg.hidden_size


def _layer_spec(cfg: ModelConfig):
    """Transformer-Engine spec when TE imports (GPU clusters), megatron's local spec otherwise."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_layernorm)
    except Exception:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization="RMSNorm")


def _hidden_gpt_class():
    from megatron.core.models.gpt import GPTModel

    class HiddenGPT(GPTModel):
        """GPTModel whose last stage returns the final hidden states [S, b, H] (after the final
        norm, which lives in the decoder block) instead of logits: the output layer is applied by
        the fused kernels."""

        def _postprocess(self, hidden_states, *args, **kwargs):
            return hidden_states

    return HiddenGPT


_COLUMN_PARALLEL = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias",
                    "word_embeddings.weight", "output_layer.weight")
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")


def _partition_dim(canonical: str) -> int | None:
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


class ShardedGPT:
    """A megatron-core GPTModel on one layout; see the module docstring for conventions."""

    def __init__(self, cfg: ModelConfig, groups: ModelGroups, *, trainable: bool = False,
                 optim: OptimConfig | None = None, total_steps: int | None = None,
                 name: str = "model"):
        setup_platform()
        from megatron.core.transformer import TransformerConfig

        if (cfg.tp, cfg.pp) != (groups.tp, groups.pp):
            raise ValueError(f"{name}: config layout tp={cfg.tp}, pp={cfg.pp} != groups tp={groups.tp}, pp={groups.pp}")
        if cfg.padded_vocab % cfg.tp:
            raise ValueError(f"{name}: padded vocab {cfg.padded_vocab} is not divisible by tp={cfg.tp}")
        self.cfg, self.groups, self.name, self.trainable = cfg, groups, name, trainable
        dtype = _DTYPES[cfg.params_dtype]
        self.tconfig = TransformerConfig(
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
            pipeline_dtype=dtype,
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            use_cpu_initialization=not on_gpu(),
            perform_initialization=False,  # we initialise per canonical tensor (layout-free)
            sequence_parallel=False,
            variable_seq_lengths=True,  # micro-batches may differ in rows; p2p sends shapes
            moe_token_dispatcher_type="alltoall",  # (no MoE; the default refuses variable_seq_lengths)
            calculate_per_token_loss=True,  # our losses are already globally normalised sums
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
        )
        self.model = _hidden_gpt_class()(
            config=self.tconfig,
            transformer_layer_spec=_layer_spec(cfg),
            vocab_size=cfg.padded_vocab,
            max_sequence_length=cfg.max_seq_len,
            pre_process=groups.is_first_stage,
            post_process=groups.is_last_stage,
            share_embeddings_and_output_weights=cfg.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(cfg.rope_base),
            pg_collection=groups.pg,
        ).to(device())
        if groups.is_last_stage and getattr(self.model.decoder, "final_layernorm", None) is None:
            # HiddenGPT relies on the decoder block applying the final norm (0.16 - 0.19 do).
            raise RuntimeError("this megatron-core no longer applies the final norm in the decoder block")
        self._layer_offset = groups.pp_rank * (cfg.num_layers // cfg.pp)
        self.layout = [self._param_info(n, p) for n, p in self.model.named_parameters()]
        self._params = dict(self.model.named_parameters())
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        for info in self.layout:  # 0.16 tags parameters only when it initialises them itself
            p = self._params[info.local_name]
            if not hasattr(p, "tensor_model_parallel"):
                set_tensor_model_parallel_attributes(p, info.partition_dim is not None, info.partition_dim or 0, 1)
        self._init_weights()
        self.optimizer: StudentOptimizer | None = None
        if trainable:
            self.model.train()
            if optim is not None:
                build_optimizer(self, optim, total_steps)
        else:
            self.model.eval()
            for p in self.model.parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------ layout and weights

    def _canonical(self, local_name: str) -> str:
        name = local_name
        if name.startswith("decoder.layers."):
            parts = name.split(".")
            parts[2] = str(int(parts[2]) + self._layer_offset)
            name = ".".join(parts)
        for te, local in _TE_RENAMES.items():
            if name.endswith(te):
                name = name[: -len(te)] + local
        if name == "output_layer.weight" and self.cfg.tie_embeddings:
            name = "embedding.word_embeddings.weight"  # last stage's copy of the tied weight (PP>1)
        return name

    def _param_info(self, local_name: str, p: torch.nn.Parameter) -> ParamInfo:
        canonical = self._canonical(local_name)
        return ParamInfo(
            local_name=local_name,
            canonical_name=canonical,
            partition_dim=_partition_dim(canonical),
            tp_rank=self.groups.tp_rank,
            tp_size=self.cfg.tp,
            vocab_padded=canonical in ("embedding.word_embeddings.weight", "output_layer.weight"),
            gated=canonical.endswith("mlp.linear_fc1.weight") and self.cfg.activation == "swiglu",
        )

    def param_layout(self) -> list[ParamInfo]:
        """For each local parameter: canonical name, TP partition dim (None: replicated), this
        TP rank and size, whether its rows are the padded vocab, whether it is a [gate; up]
        shard. Enough to stream full (e.g. HF-converted) tensors straight into this rank's shard
        with :meth:`shard_of`."""
        return list(self.layout)

    def shard_of(self, info: ParamInfo, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of canonical full tensor ``full`` for parameter ``info``."""
        if info.vocab_padded:
            rows = full[: self.cfg.vocab_size]
            full = torch.zeros((self.cfg.padded_vocab,) + tuple(full.shape[1:]), dtype=full.dtype)
            full[: rows.shape[0]] = rows
        if info.partition_dim is None or info.tp_size == 1:
            return full
        if info.gated:
            gate, up = full.chunk(2, dim=0)
            return torch.cat([gate.chunk(info.tp_size, 0)[info.tp_rank], up.chunk(info.tp_size, 0)[info.tp_rank]])
        return full.chunk(info.tp_size, dim=info.partition_dim)[info.tp_rank]

    def _unshard(self, info: ParamInfo, shards: list[torch.Tensor]) -> torch.Tensor:
        if info.partition_dim is None or len(shards) == 1:
            full = shards[0]
        elif info.gated:
            halves = [s.chunk(2, dim=0) for s in shards]
            full = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        else:
            full = torch.cat(shards, dim=info.partition_dim)
        return full[: self.cfg.vocab_size] if info.vocab_padded else full

    def _full_shape(self, info: ParamInfo, local: torch.Tensor) -> tuple[int, ...]:
        shape = list(local.shape)
        if info.partition_dim is not None:
            shape[info.partition_dim] *= info.tp_size
        if info.vocab_padded:
            shape[0] = self.cfg.vocab_size
        return tuple(shape)

    @torch.no_grad()
    def _init_weights(self) -> None:
        for info in self.layout:
            p = self._params[info.local_name]
            shape = self._full_shape(info, p)
            if info.canonical_name.endswith("bias"):
                full = torch.zeros(shape)
            elif "norm" in info.canonical_name.rsplit(".", 2)[-2]:
                full = torch.ones(shape)
            else:
                gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + zlib.crc32(info.canonical_name.encode()))
                full = torch.randn(shape, generator=gen) * self.cfg.init_std
            p.copy_(self.shard_of(info, full))

    @torch.no_grad()
    def full_state_dict(self, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """{canonical name: full unsharded CPU tensor}, gathered over TP and PP, on every rank.
        ``tensors`` ({local name: tensor shaped like that parameter}, e.g. fp32 master weights or
        Adam moments): gather those instead of the weights, in their own dtype."""
        g = self.groups
        local: dict[str, torch.Tensor] = {}
        for info in self.layout:
            if info.local_name == "output_layer.weight" and self.cfg.tie_embeddings:
                continue  # a copy of the first stage's embedding
            p = (self._params if tensors is None else tensors)[info.local_name].detach()
            if info.partition_dim is not None and g.tp > 1:
                shards = [torch.empty_like(p) for _ in range(g.tp)]
                dist.all_gather(shards, p.contiguous(), group=g.pg.tp)
            else:
                shards = [p]
            local[info.canonical_name] = self._unshard(info, [s.cpu() for s in shards])
        if g.pp == 1:
            return local
        stages: list[dict] = [None] * g.pp  # type: ignore[list-item]
        dist.all_gather_object(stages, local, group=g.pg.pp)
        return {k: v for stage in stages for k, v in stage.items()}

    @torch.no_grad()
    def load_full_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Shard canonical full tensors onto this rank (vocab tensors may carry any number of
        rows >= vocab_size; rows past vocab_size are ignored)."""
        missing = [i.canonical_name for i in self.layout if i.canonical_name not in sd]
        if missing:
            raise KeyError(f"{self.name}: state dict lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for info in self.layout:
            p = self._params[info.local_name]
            p.copy_(self.shard_of(info, sd[info.canonical_name].to(torch.float32)).to(p.dtype))
        if self.optimizer is not None:  # the fp32 masters get the full-precision values (gopd_mega.optim)
            self.optimizer.load_master_state({i.local_name: self.shard_of(i, sd[i.canonical_name].float()) for i in self.layout})

    @torch.no_grad()
    def copy_weights_from(self, other: "ShardedGPT") -> None:
        """Copy another model's weights (same config and layout), e.g. reference = initial student."""
        if (other.cfg.tp, other.cfg.pp) != (self.cfg.tp, self.cfg.pp):
            raise ValueError(f"{self.name}: copy_weights_from needs the same layout")
        for name, p in self._params.items():
            p.copy_(other._params[name])

    def shard_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's model shard {local megatron name: CPU tensor} (checkpoints, same layout)."""
        return {n: p.detach().cpu().clone() for n, p in self._params.items()}

    @torch.no_grad()
    def load_shard_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`shard_state_dict` (same layout)."""
        for name, p in self._params.items():
            p.copy_(sd[name])

    def _shard_file(self, directory: str) -> str:
        return os.path.join(directory, f"{self.name}_tp{self.groups.tp_rank}_pp{self.groups.pp_rank}.pt")

    def save(self, directory: str) -> None:
        """Write this rank's model shard (+ optimizer state) to ``directory``; DP rank 0 writes,
        every rank returns after all have finished (collective over the world)."""
        optim = self.optimizer.state_dict() if self.optimizer else None  # collective over DP (optim)
        if self.groups.dp_rank == 0:
            os.makedirs(directory, exist_ok=True)
            state = {"model": self.shard_state_dict(), "optim": optim}
            torch.save(state, self._shard_file(directory))
        dist.barrier()

    @torch.no_grad()
    def load(self, directory: str) -> None:
        """Read this rank's shard written by :meth:`save` with the same layout."""
        state = torch.load(self._shard_file(directory), map_location=device(), weights_only=False)
        self.load_shard_state_dict(state["model"])
        if self.optimizer is not None and state["optim"] is not None:
            self.optimizer.load_state_dict(state["optim"])

    # ------------------------------------------------------------------ parallel plumbing

    def _output_weight(self) -> torch.Tensor:
        return self.model.shared_embedding_or_output_weight() if self.cfg.tie_embeddings else self.model.output_layer.weight

    def _vocab_shard(self) -> tuple[int, int]:
        """(vocab_start, vocab_valid) of this TP rank's output rows."""
        per = self.cfg.padded_vocab // self.cfg.tp
        start = self.groups.tp_rank * per
        return start, max(0, min(per, self.cfg.vocab_size - start))

    def _my_rows(self, n: int) -> tuple[torch.Tensor, list[int]]:
        """Rows of the full batch this DP rank handles, and every DP rank's row count."""
        parts = torch.tensor_split(torch.arange(n), self.groups.dp)
        return parts[self.groups.dp_rank], [len(p) for p in parts]

    def _gather_rows(self, local: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """All-gather row blocks of (possibly) different sizes over DP -> the full batch."""
        if self.groups.dp == 1:
            return local
        width = max(counts)
        padded = torch.zeros((width,) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        out = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(out, padded, group=self.groups.pg.dp)
        return torch.cat([o[:c] for o, c in zip(out, counts)])

    def _from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        """Broadcast a last-stage result to every stage of this rank's pipeline."""
        if self.groups.pp > 1:
            dist.broadcast(t, src=self.groups.last_stage_global_rank, group=self.groups.pg.pp)
        return t

    def _aligned_targets(self, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Targets [n*S]: tokens[:, j] where loss_mask[:, j] and j >= 1, else IGNORE."""
        tgt = tokens.clone()
        keep = loss_mask.bool().clone()
        keep[:, 0] = False
        tgt[~keep] = IGNORE
        return tgt.reshape(-1)

    @staticmethod
    def _aligned_hidden(hidden: torch.Tensor) -> torch.Tensor:
        """[S, n, H] megatron output -> [n*S, H] where row i*S+j is the state that predicts
        token j (the state of position j-1; position 0 gets a dummy, it is always ignored)."""
        h = hidden.transpose(0, 1)  # [n, S, H]
        h = torch.cat([h[:, :1], h[:, :-1]], dim=1)
        return h.reshape(-1, h.shape[-1])

    def _run(self, rows: list[torch.Tensor], batch: dict[str, torch.Tensor], loss_func,
             forward_only: bool, micro_batch_size: int):
        """Megatron's pipeline schedule over micro-batches ``rows`` (index tensors into the
        local ``batch``). Returns the per-micro-batch dicts from the last stage ([] elsewhere)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        dev = device()
        S = batch["tokens"].shape[1]

        def data():
            for r in rows:
                yield {k: v[r].to(dev) for k, v in batch.items()} | {"rows": r}

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            n = mb["tokens"].shape[0]
            positions = torch.arange(S, device=dev).unsqueeze(0).expand(n, S)
            hidden = model(input_ids=mb["tokens"], position_ids=positions, attention_mask=None)
            return hidden, partial(loss_func, mb)

        kwargs = {}
        if self.groups.pp > 1:
            kwargs["p2p_communicator"] = P2PCommunicator(pp_group=self.groups.pg.pp, config=self.tconfig)
        fb = get_forward_backward_func(pp_size=self.groups.pp, vp_size=None)
        return fb(
            forward_step_func=forward_step,
            data_iterator=data(),
            model=[self.optimizer.ddp if self.optimizer is not None else self.model],  # megatron DDP (optim)
            num_microbatches=len(rows),
            seq_length=S,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
            pg_collection=self.groups.pg,
            **kwargs,
        )

    def _kernel_kwargs(self, temperature: float) -> dict:
        start, valid = self._vocab_shard()
        logits = None if self.cfg.logits_dtype == "float32" else _DTYPES[self.cfg.params_dtype]
        return dict(vocab_start=start, vocab_valid=valid, group=self.groups.pg.tp,
                    temperature=temperature, ignore_index=IGNORE, logits_dtype=logits)

    # ------------------------------------------------------------------ public compute

    @torch.no_grad()
    def logprobs(self, tokens: torch.Tensor, loss_mask: torch.Tensor, temperature: float = 1.0,
                 micro_batch_size: int | None = None, return_entropy: bool = False):
        """log p of tokens[:, j] given tokens[:, :j] -> fp32 [N, S] (0 at j=0 and where
        loss_mask is 0) on every rank; with ``return_entropy`` also the entropy [N, S]."""
        N, S = tokens.shape
        mine, counts = self._my_rows(N)
        batch = {"tokens": tokens[mine], "loss_mask": loss_mask[mine]}
        n = len(mine)
        mbs = micro_batch_size or max(1, n)
        rows = list(torch.arange(n).split(mbs)) if n else []
        weight = self._output_weight() if self.groups.is_last_stage else None

        def loss_func(mb, hidden):
            h = self._aligned_hidden(hidden)
            tgt = self._aligned_targets(mb["tokens"], mb["loss_mask"])
            logp, ent = kernels.linear_logprob_inference(h, weight, tgt, return_entropy=True, **self._kernel_kwargs(temperature))
            out = {"logp": logp.view(-1, S).float(), "entropy": ent.view(-1, S).float()}
            return torch.zeros((), device=h.device), torch.tensor(0, dtype=torch.int), out

        was_training = self.model.training
        self.model.eval()
        try:
            results = self._run(rows, batch, loss_func, True, mbs) if rows else []
        finally:
            self.model.train(was_training)
        out = torch.zeros(2, n, S, device=device())
        if self.groups.is_last_stage and results:
            out[0] = torch.cat([r["logp"] for r in results])
            out[1] = torch.cat([r["entropy"] for r in results])
        out = self._from_last_stage(out)
        full = self._gather_rows(out.transpose(0, 1).contiguous(), counts).transpose(0, 1)
        mask = loss_mask.to(full.device).float()
        mask[:, 0] = 0
        logp, ent = (full[0] * mask).cpu(), (full[1] * mask).cpu()
        return (logp, ent) if return_entropy else logp

    def train_step(self, tokens: torch.Tensor, loss_mask: torch.Tensor,
                   token_loss_fn_builder: TokenLossFnBuilder, micro_batch_size: int,
                   temperature: float = 1.0) -> dict:
        """One optimizer step on the full batch (every rank passes the same tokens/loss_mask).

        For each micro-batch, ``token_loss_fn_builder(rows)`` is called with ``rows`` = the
        micro-batch's row indices into the FULL batch (LongTensor [n]); it returns
        ``fn(logp_chunk, sl) -> per-token loss [len(logp_chunk)]`` where ``sl`` slices the
        micro-batch's flattened [n * S] tokens in the aligned order (flat index i * S + j is
        token j of row rows[i]; position 0 and loss_mask == 0 are ignored: their logp is 0 and
        their loss is dropped). Loss = sum of fn over all tokens of the full batch, so the builder
        must bake the global normalisation into its weights (e.g. objective.token_weights).

        Clips and applies AdamW at the optimizer's current LR; the caller advances the LR
        schedule with ``optimizer.step_schedule()`` once per update.

        Returns loss (full batch), grad_norm (before clipping), lr, skipped, logp [N, S]
        (detached, from this forward, 0 where loss_mask is 0), entropy (token mean over
        loss_mask).
        """
        if self.optimizer is None:
            raise RuntimeError(f"{self.name}: train_step needs trainable=True and an optimizer "
                               "(gopd_mega.optim.build_optimizer or optim=...)")
        N, S = tokens.shape
        mine, counts = self._my_rows(N)
        batch = {"tokens": tokens[mine], "loss_mask": loss_mask[mine]}
        n = len(mine)
        rows = list(torch.arange(n).split(micro_batch_size)) if n else []
        weight = self._output_weight() if self.groups.is_last_stage else None

        def loss_func(mb, hidden):
            h = self._aligned_hidden(hidden)
            tgt = self._aligned_targets(mb["tokens"], mb["loss_mask"])
            fn = token_loss_fn_builder(mine[mb["rows"]])
            # dW goes straight into the fp32 main_grad of megatron's DDP (gopd_mega.optim)
            loss, logp, ent = kernels.linear_logprob_loss(h, weight, tgt, fn, grad_weight_acc=self.optimizer.output_grad_acc(weight),
                                                          **self._kernel_kwargs(temperature))
            loss = self.optimizer.mark_output_grad(loss, weight)
            out = {"loss": loss.detach().reshape(()).float(), "logp": logp.view(-1, S).float(), "entropy": ent.view(-1, S).float()}
            return loss, torch.tensor(0, dtype=torch.int), out

        self.model.train()
        self.optimizer.zero_grad()
        results = self._run(rows, batch, loss_func, False, micro_batch_size) if rows else []
        stats = self.optimizer.step()  # megatron finalize_model_grads + optimizer step (gopd_mega.optim)

        out = torch.zeros(2, n, S, device=device())
        loss = torch.zeros((), device=device(), dtype=torch.float64)
        if self.groups.is_last_stage and results:
            out[0] = torch.cat([r["logp"] for r in results])
            out[1] = torch.cat([r["entropy"] for r in results])
            loss += sum(float(r["loss"]) for r in results)
        out = self._from_last_stage(out)
        loss = self._from_last_stage(loss)
        if self.groups.dp > 1:
            dist.all_reduce(loss, group=self.groups.pg.dp)
        full = self._gather_rows(out.transpose(0, 1).contiguous(), counts).transpose(0, 1).cpu()
        mask = loss_mask.float().clone()
        mask[:, 0] = 0
        entropy = float((full[1] * mask).sum() / mask.sum().clamp(min=1))
        return {"loss": float(loss), "logp": full[0] * mask, "entropy": entropy, **stats}

    @torch.no_grad()
    def next_token_logits(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """fp32 [N, vocab_size] logits of the token after tokens[i, :lengths[i]] (real vocab only,
        gathered over TP) on every rank. Materialises [N, V]: meant for sampling."""
        N, S = tokens.shape
        mine, counts = self._my_rows(N)
        batch = {"tokens": tokens[mine], "lengths": lengths[mine]}
        n = len(mine)
        rows = [torch.arange(n)] if n else []
        weight = self._output_weight() if self.groups.is_last_stage else None
        V = self.cfg.vocab_size

        def loss_func(mb, hidden):
            last = hidden[mb["lengths"] - 1, torch.arange(hidden.shape[1], device=hidden.device)]  # [n, H]
            z = last.float() @ weight.float().t()  # [n, Vp/tp]
            if self.groups.tp > 1:
                parts = [torch.empty_like(z) for _ in range(self.groups.tp)]
                dist.all_gather(parts, z.contiguous(), group=self.groups.pg.tp)
                z = torch.cat(parts, dim=1)
            return torch.zeros((), device=z.device), torch.tensor(0, dtype=torch.int), {"logits": z[:, :V]}

        was_training = self.model.training
        self.model.eval()
        try:
            results = self._run(rows, batch, loss_func, True, max(1, n)) if rows else []
        finally:
            self.model.train(was_training)
        out = torch.zeros(n, V, device=device())
        if self.groups.is_last_stage and results:
            out = results[0]["logits"].contiguous()
        out = self._from_last_stage(out)
        return self._gather_rows(out, counts).cpu()
