"""Batched KV-cache decoding of a ShardedGPT for the embedded rollout engine.

One :class:`CachedDecoder` serves one ``generate`` call: a prefill over the prompts, then one
forward of one token per still-active row per step, each attention layer keeping its K/V. Cost
per step is O(context) instead of O(context^2) for the no-cache path (which re-runs the whole
prefix; gopd_mega.rollout.embedded).

What it uses of megatron-core (0.16.1): ``StaticInferenceContext`` passed as
``inference_context`` to ``GPTModel.forward``. Each attention layer then writes its new K/V at
cache slots [sequence_len_offset, sequence_len_offset + sq) of the context's
``key_value_memory_dict[layer_number]`` ([max_seq, batch, kv_heads_per_rank, d] tensors),
attends to slots [0, offset + sq) and applies RoPE by SLOT index (one position row for the
whole batch). What it does not do, and what this module adds:
- CPU: the attention layer allocates its cache with ``device=torch.cuda.current_device()``; we
  pre-fill ``key_value_memory_dict`` on the model's device, so that allocation is never reached.
- Ragged prompts: static batching has one shared slot offset, no per-row lengths. Prompts are
  LEFT-padded to the longest prompt L (row i has pad_i = L - len_i pad slots in front), so every
  row's next token goes to the same slot. An explicit boolean attention mask [n, 1, sq, sk]
  (True = masked) hides pad slots (and the future, in the prefill) from every query. Row i's
  token j then sits at RoPE position pad_i + j instead of j: RoPE scores depend only on the
  query-key distance, so the attention is the same function of the tokens; only rounding
  differs (fp32 ~1e-6 on the logits, see tests/test_kv_decode.py).
  The explicit mask is honoured by megatron's local ``DotProductAttention`` (it masks with any
  given mask; ``attn_mask_type`` is unused there). The Transformer-Engine core attention
  follows ``attn_mask_type`` instead (causal in the prefill, no_mask in decode) and would let
  rows see pad slots, so with TE the rows are decoded in BUCKETS of equal prompt length (no pad
  slots; one forward per bucket and step), the logits concatenated in row order.
- Finished rows: dropped from the cache (the batch dimension of every layer's K/V is
  re-indexed to the rows still active), so they cost nothing and cannot change other rows.
- Row split over DP (like ``ShardedGPT.next_token_logits``): each DP rank decodes its fixed
  share of the rows; logits are all-gathered over DP every step.
- PP > 1: each step runs megatron's forward-only pipeline schedule (one micro-batch); every
  stage keeps the K/V of its own layers in its own context; the last stage's logits are
  broadcast over the pipeline.

Logits: fp32 [n, vocab_size] = final hidden state (after the final norm) of each row's last
slot times the output weight shard (fp32 matmul, as next_token_logits), all-gathered over TP,
padding ids sliced off. Every rank of the model returns the same logits (on the CPU).

Collective: every rank of the model makes the same calls with the same arguments.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gopd_mega.model.inference import stage_of
from gopd_mega.platform import device


def _core_attention_is_local(model) -> bool:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return all(isinstance(layer.self_attention.core_attention, DotProductAttention) for layer in model.decoder.layers)


def supports_kv_cache(model) -> bool:
    """True for a ShardedGPT-like object (``.model`` a megatron GPTModel, ``.groups``, ``.cfg``)."""
    try:
        from megatron.core.models.gpt import GPTModel
    except ImportError:  # pragma: no cover - megatron is a dependency
        return False
    return isinstance(getattr(model, "model", None), GPTModel) and hasattr(model, "groups") and hasattr(model, "cfg")


class _Bucket:
    """Rows decoded together with one KV cache (left-padded to a common length): megatron's
    StaticInferenceContext, or with the fast path (``stage``) one preallocated tensor."""

    def __init__(
        self, sharded, rows: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int, stage=None
    ):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.rows = rows  # global row ids, in order
        n = len(rows)
        L = int(lengths.max())
        self.pad = (L - lengths).to(device())  # [n] pad slots in front of each row
        left = torch.zeros((n, L), dtype=torch.int64)
        for i in range(n):
            left[i, L - int(lengths[i]) :] = tokens[i, : int(lengths[i])]
        self.prompt = left
        # The token sampled at the last step is never fed back: L + max_new - 1 slots suffice.
        self.slots = L + max(1, max_new_tokens - 1)
        self.ctx = self.cache = None
        self._offset = 0
        if stage is not None:
            self.cache = stage.new_cache(n, self.slots, device())
            return
        self.ctx = StaticInferenceContext(max_batch_size=n, max_sequence_length=self.slots)
        dtype = next(sharded.model.parameters()).dtype
        for layer in sharded.model.decoder.layers:  # this stage's layers; shapes as megatron's own
            attn = layer.self_attention
            slots, heads = self.ctx.max_sequence_length, attn.num_query_groups_per_partition
            self.ctx.key_value_memory_dict[attn.layer_number] = (
                torch.zeros((slots, n, heads, attn.key_hidden_size), dtype=dtype, device=device()),
                torch.zeros((slots, n, heads, attn.val_hidden_size), dtype=dtype, device=device()),
            )

    @property
    def offset(self) -> int:
        """Slots already filled (the next token goes to this slot)."""
        return self.ctx.sequence_len_offset if self.ctx is not None else self._offset

    def advance(self, sq: int) -> None:
        if self.ctx is not None:
            self.ctx.increment_sequence_len_offset(sq)
        else:
            self._offset += sq

    def __len__(self) -> int:
        return len(self.rows)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the rows whose global ids are in ``rows`` (sorted)."""
        sel = torch.isin(self.rows, rows)
        if bool(sel.all()):
            return
        idx = sel.nonzero().squeeze(1)
        self.rows = self.rows[idx]
        idx_dev = idx.to(device())
        self.pad = self.pad[idx_dev]
        if self.cache is not None:
            self.cache = self.cache.index_select(2, idx_dev)
            return
        for k, (key, value) in list(self.ctx.key_value_memory_dict.items()):  # type: ignore[union-attr]  # set by start()
            self.ctx.key_value_memory_dict[k] = (key.index_select(1, idx_dev), value.index_select(1, idx_dev))  # type: ignore[union-attr]  # set by start()

    def mask(self, sq: int, causal: bool = False) -> torch.Tensor | None:
        """Boolean [n, 1, sq, sk] (True = masked) for ``sq`` new slots after the current offset;
        None when no row has pad slots and ``causal`` is False (megatron then applies its own
        causal mask, sq == sk, in the prefill and none in decode: what any core attention, TE's
        included, does); ``causal``: the mask whenever it hides anything (the fast path)."""
        if not bool(self.pad.any()) and not (causal and sq > 1):
            return None
        start = self.offset
        sk = start + sq
        k = torch.arange(sk, device=device())
        q = torch.arange(start, sk, device=device())
        future = k[None, :] > q[:, None]  # [sq, sk]
        before = k[None, :] < self.pad[:, None]  # [n, sk]
        return (future[None] | before[:, None]).unsqueeze(1)


class CachedDecoder:
    """KV-cache decoding of ``sharded`` (a ShardedGPT) for one batch of prompts.

    ``prefill()`` returns the next-token logits after each prompt, fp32 [N, vocab_size];
    ``step(active, new)`` feeds token ``new[j]`` to row ``active[j]`` (global row ids, sorted,
    the rows still decoding) and returns their next-token logits [len(active), vocab_size].
    Rows missing from ``active`` are dropped for good. Use it as a context manager: inside, the
    model is in eval mode (megatron's attention uses the cache only when not training) and the
    cache is held; on exit the model's mode is restored and the cache freed. See the module
    docstring.
    """

    def __init__(
        self,
        sharded,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        max_new_tokens: int,
        bucketed: bool | None = None,
        fast: bool = True,
    ):
        """``tokens`` [N, S] right-padded prompts with ``lengths`` [N]; ``bucketed``: one bucket
        per prompt length (no pad slots) instead of one left-padded batch; None = only when the
        core attention ignores explicit masks (Transformer Engine). ``fast``: decode with
        gopd_mega.model.inference when it supports the model (``self.fast_path_off`` says
        why not otherwise); False: megatron's own forward with its StaticInferenceContext."""
        if not supports_kv_cache(sharded):
            raise TypeError(f"CachedDecoder needs a ShardedGPT (megatron GPTModel), got {type(sharded).__name__}")
        N = tokens.shape[0]
        if tokens.dim() != 2 or lengths.shape != (N,) or N == 0:
            raise ValueError(
                f"CachedDecoder: tokens must be [N, S] and lengths [N], got {tuple(tokens.shape)} "
                f"and {tuple(lengths.shape)}"
            )
        if int(lengths.min()) < 1 or int(lengths.max()) > tokens.shape[1]:
            raise ValueError(f"CachedDecoder: prompt lengths must be in [1, {tokens.shape[1]}], got {lengths.tolist()}")
        if max_new_tokens < 1:
            raise ValueError(f"CachedDecoder: max_new_tokens must be >= 1, got {max_new_tokens}")
        self.sharded = sharded
        self.groups = sharded.groups
        self.n_total = N
        parts = torch.tensor_split(torch.arange(N), self.groups.dp)
        self.dp_rows = list(parts)  # every DP rank's fixed share of the rows
        mine = parts[self.groups.dp_rank]
        self.stage, self.fast_path_off = (
            stage_of(sharded.model, sharded.tconfig, sharded.groups) if fast else (None, "fast=False")
        )
        if self.stage is not None:
            bucketed = bool(bucketed)  # the fast path honours the mask: one bucket unless asked
        elif bucketed is None:
            bucketed = not _core_attention_is_local(sharded.model)
        if not bucketed:
            keys = [mine] if len(mine) else []
        else:  # Transformer Engine attention: no pad slots, one bucket per prompt length
            keys = [mine[lengths[mine] == L] for L in torch.unique(lengths[mine]).tolist()]
        self.buckets = [_Bucket(sharded, r, tokens[r], lengths[r], max_new_tokens, self.stage) for r in keys]
        if self.stage is not None:  # RoPE tables of every slot, once for all layers and steps
            slots = max([b.slots for b in self.buckets], default=1)
            self.cos, self.sin = self.stage.rope_tables(slots, device())
        self.vocab = sharded.cfg.vocab_size
        self.active = torch.arange(N)
        self.started = False

    def __enter__(self) -> CachedDecoder:
        self._was_training = self.sharded.model.training
        self.sharded.model.eval()
        return self

    def __exit__(self, *exc) -> None:
        self.sharded.model.train(self._was_training)
        self.buckets = []

    # ---------------------------------------------------------------- model side

    def _output_weight(self) -> torch.Tensor:
        m = self.sharded.model
        return m.shared_embedding_or_output_weight() if self.sharded.cfg.tie_embeddings else m.output_layer.weight

    def _forward(self, bucket: _Bucket, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` [n, sq] at the bucket's next slots -> fp32 logits [n, vocab_size]
        (the last slot's) on the last stage; zeros of that shape on the other stages."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        g = self.groups
        n, sq = tokens.shape
        dev = device()
        weight = self._output_weight() if g.is_last_stage else None
        if self.stage is not None:
            logits = self._fast_forward(bucket, tokens.to(dev), weight)
            bucket.advance(sq)
            return logits
        ctx = bucket.ctx
        mask = bucket.mask(sq)
        start = ctx.sequence_len_offset  # type: ignore[union-attr]  # set by start()
        positions = torch.arange(start, start + sq, device=dev).unsqueeze(0).expand(n, sq)
        model = self.sharded.model
        if g.pp == 1:
            hidden = model(input_ids=tokens.to(dev), position_ids=positions, attention_mask=mask, inference_context=ctx)
            logits = self._logits(hidden[-1], weight)  # type: ignore[arg-type]  # set by start()
        else:
            out: dict = {}

            def forward_step(data_iterator, m):
                next(data_iterator)
                h = m(input_ids=tokens.to(dev), position_ids=positions, attention_mask=mask, inference_context=ctx)
                return h, loss_func

            def loss_func(h):
                out["logits"] = self._logits(h[-1], weight)
                return torch.zeros((), device=h.device), torch.tensor(0, dtype=torch.int), {}

            from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

            fb = get_forward_backward_func(pp_size=g.pp, vp_size=None)
            fb(
                forward_step_func=forward_step,
                data_iterator=iter([None]),
                model=[model],
                num_microbatches=1,
                seq_length=sq,
                micro_batch_size=n,
                forward_only=True,
                pg_collection=g.pg,
                p2p_communicator=P2PCommunicator(pp_group=g.pg.pp, config=self.sharded.tconfig),
            )
            logits = out["logits"] if g.is_last_stage else torch.zeros(n, self.vocab, device=dev)
            dist.broadcast(logits, src=g.last_stage_global_rank, group=g.pg.pp)
        bucket.advance(sq)
        return logits

    def _fast_forward(self, bucket: _Bucket, tokens: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """_forward on the fast path (gopd_mega.model.inference), without autograd."""
        g = self.groups
        n, sq = tokens.shape
        start = bucket.offset
        mask = bucket.mask(sq, causal=True)
        with torch.inference_mode():
            last = self.stage.forward(  # type: ignore[union-attr]  # set by start()
                tokens,
                bucket.cache,  # type: ignore[arg-type]  # set by start()
                start,
                self.cos[start : start + sq],
                self.sin[start : start + sq],
                None if mask is None else ~mask,
            )
            logits = self._logits(last, weight) if g.is_last_stage else torch.zeros(n, self.vocab, device=tokens.device)  # type: ignore[arg-type]  # set by start()
        logits = logits.clone()  # a normal tensor again (inference tensors cannot enter autograd later)
        if g.pp > 1:
            dist.broadcast(logits, src=g.last_stage_global_rank, group=g.pg.pp)
        return logits

    def _logits(self, last: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """[n, H] final hidden state of every row's newest slot (left padding) -> fp32 logits."""
        z = last.float() @ weight.float().t()  # [n, Vp/tp]
        if self.groups.tp > 1:
            parts = [torch.empty_like(z) for _ in range(self.groups.tp)]
            dist.all_gather(parts, z.contiguous(), group=self.groups.pg.tp)
            z = torch.cat(parts, dim=1)
        return z[:, : self.vocab].contiguous()

    # ---------------------------------------------------------------- rows and DP

    def _run(self, feed) -> torch.Tensor:
        """Logits of this DP rank's active rows (in global row order), gathered over DP."""
        parts, rows = [], []
        for b in self.buckets:
            if len(b):
                parts.append(self._forward(b, feed(b)))
                rows.append(b.rows)
        dev = device()
        if parts:
            order = torch.cat(rows).argsort()
            local = torch.cat(parts)[order.to(dev)]
        else:
            local = torch.zeros(0, self.vocab, device=dev)
        g = self.groups
        if g.dp == 1:
            return local.cpu()
        counts = [int(torch.isin(r, self.active).sum()) for r in self.dp_rows]
        width = max(counts)
        padded = torch.zeros(width, self.vocab, device=dev)
        padded[: local.shape[0]] = local
        out = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(out, padded, group=g.pg.dp)
        return torch.cat([o[:c] for o, c in zip(out, counts)]).cpu()

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        """fp32 [N, vocab_size] logits of the token after each prompt."""
        if self.started:
            raise RuntimeError("CachedDecoder.prefill: already called")
        if self.sharded.model.training:
            raise RuntimeError("CachedDecoder.prefill: use the decoder as a context manager (eval mode)")
        self.started = True
        return self._run(lambda b: b.prompt)

    @torch.no_grad()
    def step(self, active: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Feed ``new[j]`` to row ``active[j]``; fp32 [len(active), vocab_size] logits."""
        if not self.started:
            raise RuntimeError("CachedDecoder.step: call prefill() first")
        active = torch.as_tensor(active, dtype=torch.int64)
        new = torch.as_tensor(new, dtype=torch.int64)
        if active.shape != new.shape or not bool(torch.isin(active, self.active).all()):
            raise ValueError(
                f"CachedDecoder.step: active {active.tolist()} must be a subset of the rows still "
                f"decoding with one new token each (got {new.numel()} tokens)"
            )
        self.active = active
        for b in self.buckets:
            b.keep(active)
        pos = {int(r): j for j, r in enumerate(active)}

        def feed(b):
            return new[[pos[int(r)] for r in b.rows]].unsqueeze(1)

        return self._run(feed)
