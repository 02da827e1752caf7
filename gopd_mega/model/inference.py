"""The inference forward of one pipeline stage of a megatron GPTModel (local layer spec) as plain
torch ops on its own parameters: the embedded engine's decode (with a preallocated KV cache,
gopd_mega.rollout.kv_decode) and the forward-only scoring of teachers and the reference
(gopd_mega.model.forward, packed micro-batches, no cache).

Why: megatron's modules are written for training. In a decode step of a few rows each linear
layer goes through an ``autograd.Function`` (even under no_grad), RoPE is applied per layer from
the angles, GQA expands the whole cache with ``repeat_interleave`` at every step, and the masked
softmax is not fused: on CPU that overhead is a third of a SmolLM2-135M decode step. This module
computes the same functions of the same parameters (no copy of them: the model's own tensors, so a
weight update is seen at once). Forward-only scoring of SmolLM2-135M on 8 x 64 tokens: 2.0 CPU-s
through megatron's modules, 1.3 through this path (1 thread; transformers' own forward: 1.3).

    x = embedding(ids)                              (vocab-parallel: masked lookup + TP all-reduce)
    per layer:  h = rms_norm(x); qkv = h W_qkv^T (+ b)
                q, k, v from megatron's layout [ng, (np/ng + 2), d] per query group
                q, k = q_norm(q), k_norm(k)                     (qk_layernorm)
                q, k = rotate(q, k) by slot position            (cos/sin once per call, all layers)
                cache[layer, :, :, slots] = k, v                 ([n, ng, slots, d], preallocated)
                a = SDPA(q grouped [n, ng, g * sq, d], cache)    (GQA without expanding the cache)
                x = x + all_reduce_tp(a W_proj^T)
                x = x + all_reduce_tp(act(rms_norm(x) W_fc1^T) W_fc2^T)
    last stage: final rms_norm

GQA without expansion: the g = np/ng query heads of one KV group are stacked along the query
axis, so one SDPA call of [n, ng, g * sq, d] queries against [n, ng, sk, d] keys computes every
head against its own group's cache. The mask (pad slots, and the future in a prefill) is tiled
g times along that axis.

Same rounding as megatron's path except where the op differs: SDPA's softmax (the scores are
the same products; megatron fills masked scores with -10000, SDPA with -inf: both give exactly
0 weight in fp32) and matmul shapes. Tests (tests/test_kv_decode.py) check greedy tokens equal
and log-probs within fp32 rounding of the megatron path for TP=2, PP=2 and DP=2.

:func:`stage_of` says whether a model is supported and why not: the local layer spec (megatron's
own modules with torch RMSNorm), RoPE (not interleaved, no YaRN), no linear biases except the QKV
bias, num_query_groups divisible by TP, dense MLP. Anything else (Transformer Engine's fused
modules, MoE, ...) keeps megatron's path (gopd_mega.rollout.kv_decode).

PP > 1: each stage runs its own layers and hands [n, sq, H] to the next stage with a blocking
send/recv over the model's PP group (every stage makes the same calls in the same order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class _Norm:
    shape: tuple[int, ...]
    weight: torch.Tensor
    eps: float | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.shape, self.weight, self.eps)


@dataclass
class _Layer:
    ln1: _Norm
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    q_norm: _Norm | None
    k_norm: _Norm | None
    proj_w: torch.Tensor
    ln2: _Norm
    fc1_w: torch.Tensor
    fc2_w: torch.Tensor


def _norm(module, what: str) -> _Norm:
    if not isinstance(module, torch.nn.RMSNorm):
        raise _Unsupported(f"{what} is {type(module).__name__}, not a torch RMSNorm")
    return _Norm(tuple(module.normalized_shape), module.weight, module.eps)


class _Unsupported(Exception):
    pass


class Stage:
    """The parameters of this rank's pipeline stage as plain tensors (views of the model's own)
    and the shapes the fast forward needs. Build with :func:`stage_of`."""

    def __init__(self, model, cfg, g):
        from megatron.core.transformer.dot_product_attention import DotProductAttention
        from megatron.core.transformer.identity_op import IdentityOp

        self.groups = g
        if getattr(model, "position_embedding_type", "rope") != "rope" or not hasattr(model, "rotary_pos_emb"):
            raise _Unsupported("position embedding is not RoPE")
        if cfg.rotary_interleaved or getattr(cfg, "multi_latent_attention", False):
            raise _Unsupported("interleaved RoPE / multi-latent attention")
        if getattr(model, "rotary_percent", 1.0) != 1.0:
            raise _Unsupported("partial rotary embedding")
        if type(model.rotary_pos_emb).__name__ != "RotaryEmbedding":
            raise _Unsupported(f"rotary embedding {type(model.rotary_pos_emb).__name__}")
        if getattr(cfg, "num_moe_experts", None):
            raise _Unsupported("MoE layers")
        if cfg.fp32_residual_connection or cfg.apply_residual_connection_post_layernorm:
            raise _Unsupported("fp32 / post-layernorm residual connection")
        if cfg.num_query_groups % g.tp:
            raise _Unsupported(f"num_query_groups={cfg.num_query_groups} not divisible by tp={g.tp}")
        if getattr(cfg, "attention_output_gate", False):
            raise _Unsupported("gated attention output")
        self.first, self.last = g.is_first_stage, g.is_last_stage
        if self.first:
            emb = model.embedding.word_embeddings
            self.embedding = emb.weight
            self.vocab_start = emb.vocab_start_index
            self.vocab_end = emb.vocab_end_index
        self.layers = []
        self.scale = None
        for layer in model.decoder.layers:
            attn, mlp = layer.self_attention, layer.mlp
            core = attn.core_attention
            if not isinstance(core, DotProductAttention):
                raise _Unsupported(f"core attention {type(core).__name__}")
            if self.scale is None:
                self.scale = float(core.softmax_scale)
                self.heads = attn.num_attention_heads_per_partition
                self.groups_kv = attn.num_query_groups_per_partition
                self.head_dim = attn.hidden_size_per_attention_head
            for lin in (attn.linear_proj, mlp.linear_fc1, mlp.linear_fc2):
                if getattr(lin, "bias", None) is not None:
                    raise _Unsupported(f"bias on {type(lin).__name__}")
            if type(mlp).__name__ != "MLP":
                raise _Unsupported(f"MLP {type(mlp).__name__}")
            qn, kn = (
                None if isinstance(m, IdentityOp) else m
                for m in (getattr(attn, "q_layernorm", None), getattr(attn, "k_layernorm", None))
            )
            self.layers.append(
                _Layer(
                    ln1=_norm(layer.input_layernorm, "input_layernorm"),
                    qkv_w=attn.linear_qkv.weight,
                    qkv_b=getattr(attn.linear_qkv, "bias", None),
                    q_norm=None if qn is None else _norm(qn, "q_layernorm"),
                    k_norm=None if kn is None else _norm(kn, "k_layernorm"),
                    proj_w=attn.linear_proj.weight,
                    ln2=_norm(layer.pre_mlp_layernorm, "pre_mlp_layernorm"),
                    fc1_w=mlp.linear_fc1.weight,
                    fc2_w=mlp.linear_fc2.weight,
                )
            )
        self.gated = cfg.gated_linear_unit
        self.act = cfg.activation_func
        if getattr(cfg, "activation_func_clamp_value", None) is not None:
            raise _Unsupported("activation clamp")
        self.final = _norm(model.decoder.final_layernorm, "final_layernorm") if self.last else None
        self.rope = model.rotary_pos_emb
        self.hidden = cfg.hidden_size
        self.dtype = next(model.parameters()).dtype
        pp = g.pg.pp
        self.prev = None if self.first else dist.get_global_rank(pp, g.pp_rank - 1)
        self.next = None if self.last else dist.get_global_rank(pp, g.pp_rank + 1)

    # ---------------------------------------------------------------- per call
    def rope_tables(self, slots: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [slots, d] of megatron's rotary embedding (rotate-half convention), as megatron
        computes them per layer: cos(angle) cast to the activation dtype."""
        freqs = self.rope.get_emb(slots).to(device).reshape(slots, -1)  # [slots, d] fp32 angles
        return freqs.cos().to(self.dtype), freqs.sin().to(self.dtype)

    def new_cache(self, n: int, slots: int, device) -> torch.Tensor:
        """K and V for every local layer: [layers, 2, n, ng, slots, d], preallocated once."""
        return torch.zeros(
            (len(self.layers), 2, n, self.groups_kv, slots, self.head_dim), dtype=self.dtype, device=device
        )

    # ---------------------------------------------------------------- the forward
    def _tp_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups.tp > 1:
            dist.all_reduce(x, group=self.groups.pg.tp)
        return x

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.groups.tp == 1:
            return F.embedding(ids, self.embedding)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        x = F.embedding((ids - self.vocab_start).masked_fill(outside, 0), self.embedding)
        x.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self._tp_sum(x)

    @staticmethod
    def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat((-t2, t1), dim=-1) * sin

    def _layers(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keep: torch.Tensor | None, kv
    ) -> torch.Tensor:
        """This stage's layers on x [n, sq, H]. ``cos``/``sin`` [sq, d] of the new positions;
        ``keep`` bool [n | 1, 1, sq, sk] (True = attend) or None; ``kv(i, k, v)`` -> the keys and
        values layer i attends to, [n, ng, sk, d], given the new ones [n, ng, sq, d]."""
        n, sq, _ = x.shape
        ng, g, d = self.groups_kv, self.heads // self.groups_kv, self.head_dim
        cos, sin = cos[:, None, None, :], sin[:, None, None, :]  # broadcast over [n, sq, ng, g|1, d]
        if keep is not None:  # tile over the g heads stacked on the query axis
            b, sk = keep.shape[0], keep.shape[-1]
            keep = keep.unsqueeze(2).expand(b, 1, g, sq, sk).reshape(b, 1, g * sq, sk)
        for i, L in enumerate(self.layers):
            qkv = F.linear(L.ln1(x), L.qkv_w, L.qkv_b).view(n, sq, ng, g + 2, d)
            q, k, v = qkv[:, :, :, :g], qkv[:, :, :, g : g + 1], qkv[:, :, :, g + 1 :]
            if L.q_norm is not None:
                q = L.q_norm(q)
            if L.k_norm is not None:
                k = L.k_norm(k)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            keys, values = kv(i, k.squeeze(3).transpose(1, 2), v.squeeze(3).transpose(1, 2))
            qg = q.permute(0, 2, 3, 1, 4).reshape(n, ng, g * sq, d)  # [n, ng, g * sq, d]
            a = F.scaled_dot_product_attention(qg, keys, values, attn_mask=keep, scale=self.scale)
            a = a.view(n, ng, g, sq, d).permute(0, 3, 1, 2, 4).reshape(n, sq, ng * g * d)
            x = x + self._tp_sum(F.linear(a, L.proj_w))
            h = F.linear(L.ln2(x), L.fc1_w)
            if self.gated:
                h1, h2 = h.chunk(2, dim=-1)
                h = self.act(h1) * h2
            else:
                h = self.act(h)
            x = x + self._tp_sum(F.linear(h, L.fc2_w))
        return x

    def _input(self, ids: torch.Tensor) -> torch.Tensor:
        """The stage's input [n, sq, H]: the embedding (first stage) or the previous stage's output."""
        if self.first:
            return self._embed(ids)
        x = torch.empty((*ids.shape, self.hidden), dtype=self.dtype, device=ids.device)
        dist.recv(x, src=self.prev)
        return x

    def _output(self, x: torch.Tensor) -> bool:
        """Hand x to the next stage; True on the last stage (which keeps it)."""
        if not self.last:
            dist.send(x.contiguous(), dst=self.next)
        return self.last

    def forward(
        self,
        ids: torch.Tensor,
        cache: torch.Tensor,
        start: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keep: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Feed ``ids`` [n, sq] at cache slots [start, start + sq). ``cos``/``sin`` [sq, d] of those
        slots; ``keep`` bool [n, 1, sq, start + sq] (True = attend) or None (no mask: decode of
        rows without pad slots). Returns the last slot's final hidden state [n, H] on the last
        stage, None elsewhere."""
        sk = start + ids.shape[1]

        def kv(i, k, v):  # write the new K/V into the preallocated cache, attend to every filled slot
            kc, vc = cache[i, 0], cache[i, 1]  # [n, ng, slots, d]
            kc[:, :, start:sk] = k
            vc[:, :, start:sk] = v
            return kc[:, :, :sk], vc[:, :, :sk]

        x = self._layers(self._input(ids), cos, sin, keep, kv)
        return self.final(x[:, -1]) if self._output(x) else None

    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
        """A forward without cache (scoring): ``ids`` [n, T] at RoPE ``positions`` [T] (shared by
        the rows; packed sequences restart at 0), ``keep`` bool [n | 1, 1, T, T] (True = attend).
        Final hidden states [T, n, H] (megatron's layout) on the last stage, None elsewhere."""
        emb = self.rope.get_emb(int(positions.max()) + 1)
        freqs = emb.to(ids.device).reshape(emb.shape[0], -1)[positions.to(ids.device)]
        cos, sin = freqs.cos().to(self.dtype), freqs.sin().to(self.dtype)
        x = self._layers(self._input(ids), cos, sin, keep, lambda i, k, v: (k, v))
        return self.final(x).transpose(0, 1) if self._output(x) else None


def stage_of(model, tconfig, groups) -> tuple[Stage | None, str]:
    """(Stage, "") when this path supports the GPTModel ``model`` (its TransformerConfig and
    gopd_mega.parallel.ModelGroups), else (None, why not)."""
    try:
        return Stage(model, tconfig, groups), ""
    except _Unsupported as e:
        return None, str(e)
