"""ShardedGPT: one megatron-core GPT model (student, teacher or reference) on its own TP/PP layout.

The public face of gopd_mega.model; each job lives in one file there:
    gopd_mega/model/build.py    how a model is built (ModelConfig -> TransformerConfig, spec, GPTModel)
    gopd_mega/model/weights.py  canonical weight names, shard / unshard, init, full state dicts
    gopd_mega/model/batch.py    how a batch is packed (token-budget micro-batches, DP balance)
    gopd_mega/model/forward.py  how a step runs (pipeline schedule -> kernels -> gathered results)
This class ties them together and owns checkpoint I/O; gradient finalisation and the update
are megatron's DDP and optimizer (gopd_mega/optim.py).

SPMD: the trainer holds the FULL batch on every rank; each model packs its DP rank's share of the
rows into micro-batches, runs them through its own PP group and returns full-batch results on
every rank. Public tensors are [N, S] right-padded token ids / loss masks, causal attention,
positions 0..S-1 per row (packing is internal and exact: it changes no result).

Alignment convention used everywhere (logprobs, train_step, token_loss_fn):
    logp[i, j] = log p(tokens[i, j] | tokens[i, :j]) for j >= 1 where loss_mask[i, j] == 1, else 0.
``token_loss_fn(logp [R], flat_index [R]) -> per-token loss [R]``: flat_index = i * S + j into
the full batch's [N * S] (the callback reads its per-token weights / teacher log-probs there).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from gopd_mega.config import ModelConfig, OptimConfig
from gopd_mega.model import transfer
from gopd_mega.model import weights as W
from gopd_mega.model.build import (
    DTYPES,
    build_gpt,
    check_platform_support,
    ffn_size,
    has_transformer_engine,
    transformer_config,
)
from gopd_mega.model.forward import IGNORE, ForwardStats, HiddenLoss, PipelineForward, TokenLossFn
from gopd_mega.model.transfer import ScoredHidden
from gopd_mega.model.weights import ParamInfo
from gopd_mega.optim import StudentOptimizer, build_optimizer
from gopd_mega.parallel import ModelGroups
from gopd_mega.platform import device, setup_platform

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "IGNORE",
    "ForwardStats",
    "HiddenLoss",
    "ParamInfo",
    "ScoredHidden",
    "ShardedGPT",
    "TokenLossFn",
    "ffn_size",
]

DEFAULT_MAX_TOKENS = {"thd": 4096, "mask": 512}
"""Token budget of one micro-batch forward when neither the call nor the model sets one: with
Transformer Engine (THD attention) / without it (a [T, T] block-diagonal mask: attention cost
grows with the square of the budget, e.g. for the embedded rollout engine's decode steps)."""


class ShardedGPT:
    """A megatron-core GPTModel on one layout; see the module docstring for conventions."""

    def __init__(
        self,
        cfg: ModelConfig,
        groups: ModelGroups,
        *,
        trainable: bool = False,
        optim: OptimConfig | None = None,
        total_steps: int | None = None,
        name: str = "model",
        max_tokens_per_micro_batch: int | None = None,
    ):
        setup_platform()
        if (cfg.tp, cfg.pp) != (groups.tp, groups.pp):
            raise ValueError(f"{name}: config layout tp={cfg.tp}, pp={cfg.pp} != groups tp={groups.tp}, pp={groups.pp}")
        if cfg.padded_vocab % cfg.tp:
            raise ValueError(f"{name}: padded vocab {cfg.padded_vocab} is not divisible by tp={cfg.tp}")
        check_platform_support(cfg, name)
        self.cfg, self.groups, self.name, self.trainable = cfg, groups, name, trainable
        self.tconfig = transformer_config(cfg)
        self.model = build_gpt(cfg, groups, self.tconfig)
        self.layout = W.build_layout(self.model, cfg, groups)
        self._params = dict(self.model.named_parameters())
        W.init_weights(self._params, self.layout, cfg)
        self.max_tokens_per_micro_batch = (
            max_tokens_per_micro_batch or DEFAULT_MAX_TOKENS["thd" if has_transformer_engine() else "mask"]
        )
        """Default token budget of one micro-batch forward (a call's ``max_tokens`` overrides it)."""
        self.optimizer: StudentOptimizer | None = None
        if trainable:
            self.model.train()
            if optim is not None:
                build_optimizer(self, optim, total_steps)
        else:
            self.model.eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
        # Last: it runs whatever module self.model is by now (e.g. a DDP wrapper of it).
        self.forward = PipelineForward(self.model, cfg, groups, self.tconfig, self._output_weight)

    @property
    def stats(self) -> ForwardStats:
        """Counters of this rank's forwards (calls, max tokens in one forward, positions computed
        and scored); ``model.stats.reset()`` zeroes them."""
        return self.forward.stats

    # ------------------------------------------------------------------ layout and weights

    def param_layout(self) -> list[ParamInfo]:
        """For each local parameter: canonical name, TP partition dim (None: replicated), this
        TP rank and size, whether its rows are the padded vocab, whether it is a [gate; up]
        shard. Enough to stream full (e.g. HF-converted) tensors straight into this rank's shard
        with :meth:`shard_of`."""
        return list(self.layout)

    def shard_of(self, info: ParamInfo, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of canonical full tensor ``full`` for parameter ``info``."""
        return W.shard_of(self.cfg, info, full)

    def full_state_dict(self, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """{canonical name: full unsharded CPU tensor}, gathered over TP and PP, on every rank.
        ``tensors`` ({local name: tensor shaped like that parameter}, e.g. fp32 master weights or
        Adam moments): gather those instead of the weights, in their own dtype."""
        return W.gather_full_state_dict(
            self._params if tensors is None else tensors, self.layout, self.cfg, self.groups
        )

    def load_full_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Shard canonical full tensors onto this rank (vocab tensors may carry any number of
        rows >= vocab_size; rows past vocab_size are ignored)."""
        W.load_full_state_dict(self._params, self.layout, self.cfg, sd, self.name)
        if self.optimizer is not None:  # the fp32 masters get the full-precision values, one shard at a time
            for info in self.layout:
                self.optimizer.load_master_weight(info.local_name, self.shard_of(info, sd[info.canonical_name].float()))

    @torch.no_grad()
    def load_local_weight(self, local_name: str, shard: torch.Tensor) -> None:
        """Set one local parameter from this rank's shard of a checkpoint tensor (any float dtype,
        shaped like the parameter): the weight gets it in its own dtype and, when the model has
        an optimizer, the fp32 master gets it at full precision (streaming loaders, e.g.
        gopd_mega.hf's, call this per tensor)."""
        p = self._params.get(local_name)
        if p is None:
            raise KeyError(f"{self.name}: no local parameter named {local_name!r}")
        if tuple(shard.shape) != tuple(p.shape):
            raise ValueError(
                f"{self.name}: {local_name} gets a tensor of shape {tuple(shard.shape)}, "
                f"the parameter is {tuple(p.shape)}"
            )
        if self.optimizer is not None:
            self.optimizer.load_master_weight(local_name, shard)
        else:
            p.copy_(shard.to(p.device, p.dtype))

    @torch.no_grad()
    def copy_weights_from(self, other: ShardedGPT) -> None:
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
        state = torch.load(self._shard_file(directory), map_location=device(), weights_only=True)
        self.load_shard_state_dict(state["model"])
        if self.optimizer is not None and state["optim"] is not None:
            self.optimizer.load_state_dict(state["optim"])

    def _output_weight(self) -> torch.Tensor:
        return (
            self.model.shared_embedding_or_output_weight()
            if self.cfg.tie_embeddings
            else self.model.output_layer.weight
        )

    # ------------------------------------------------------------------ public compute

    def _budget(self, max_tokens: int | None) -> int:
        return self.max_tokens_per_micro_batch if max_tokens is None else max_tokens

    def logprobs(
        self,
        tokens: torch.Tensor,
        loss_mask: torch.Tensor,
        temperature: float = 1.0,
        micro_batch_size: int | None = None,
        return_entropy: bool = False,
        *,
        max_tokens: int | None = None,
    ):
        """log p of tokens[:, j] given tokens[:, :j] -> fp32 [N, S] (0 at j=0 and where
        loss_mask is 0) on every rank; with ``return_entropy`` also the entropy [N, S].
        Micro-batches hold at most ``max_tokens`` packed positions (default: the model's
        max_tokens_per_micro_batch) and at most ``micro_batch_size`` sequences (None: no cap)."""
        logp, ent = self.forward.logprobs(tokens, loss_mask, temperature, self._budget(max_tokens), micro_batch_size)
        return (logp, ent) if return_entropy else logp

    def train_step(
        self,
        tokens: torch.Tensor,
        loss_mask: torch.Tensor,
        token_loss_fn: TokenLossFn | HiddenLoss,
        micro_batch_size: int | None = None,
        temperature: float = 1.0,
        *,
        max_tokens: int | None = None,
    ) -> dict:
        """One optimizer step on the full batch (every rank passes the same tokens/loss_mask).

        ``token_loss_fn(logp, flat_index) -> per-token loss`` is called on chunks of the scored
        tokens: logp [R] (differentiable), flat_index [R] = i * S + j into the full batch's
        [N * S] (only j >= 1 with loss_mask 1 are scored). Loss = sum of fn over all scored
        tokens of the full batch, so fn must bake the global normalisation into its weights
        (e.g. objective.token_weights). Micro-batches as in :meth:`logprobs`.

        ``token_loss_fn`` may instead be a :class:`HiddenLoss` (a loss of the scored positions'
        final hidden states and the output shard: the full-vocabulary and top-k estimators,
        gopd_mega.model.distill); its per-token outputs (``keys``) come back as [N, S] too.

        Clips and applies AdamW at the optimizer's current LR; the optimizer's ``step()`` then
        advances the LR schedule by this update (also when the update is skipped).

        Returns loss (full batch), grad_norm (before clipping), lr, skipped (no update: the loss
        or the norm was not finite, or fp16 overflowed), overflow, logp [N, S]
        (detached, from this forward, 0 where loss_mask is 0), entropy (token mean over
        loss_mask).
        """
        if self.optimizer is None:
            raise RuntimeError(
                f"{self.name}: train_step needs trainable=True and an optimizer "
                "(gopd_mega.optim.build_optimizer or optim=...)"
            )
        self.optimizer.zero_grad()
        budget = self._budget(max_tokens)
        if isinstance(token_loss_fn, HiddenLoss):
            out = self.forward.hidden_loss_and_grads(
                tokens, loss_mask, token_loss_fn, temperature, budget, micro_batch_size, grads=self.optimizer
            )
        else:
            out = self.forward.loss_and_grads(
                tokens, loss_mask, token_loss_fn, temperature, budget, micro_batch_size, grads=self.optimizer
            )
        # megatron's finalize_model_grads + clip + AdamW (gopd_mega.optim); no update on a non-finite loss or norm
        stats = self.optimizer.step(loss=out["loss"])
        mask = loss_mask.float().clone()
        mask[:, 0] = 0
        entropy = float((out.pop("entropy") * mask).sum() / mask.sum().clamp(min=1))
        return {**out, "entropy": entropy, **stats}

    # ------------------------------------------------------------------ for other models' estimators

    def hidden_states_for(
        self,
        student: ShardedGPT,
        tokens: torch.Tensor,
        loss_mask: torch.Tensor,
        rows: torch.Tensor | None = None,
        *,
        max_tokens: int | None = None,
    ) -> ScoredHidden | None:
        """COLLECTIVE. This model's final hidden states (after the final norm, in its own dtype)
        of the scored positions of batch ``rows`` (default: all), computed in its own layout and
        delivered to ``student``'s ranks (gopd_mega.model.transfer): on each rank of the
        student's last pipeline stage, the positions the student's DP rank there scores in
        ``student.train_step(tokens, loss_mask, ...)`` (flat indices into the full [N * S]) that
        lie in ``rows``; None on the student's other stages. Memory: [positions x hidden]."""
        N, S = tokens.shape
        rows = torch.arange(N) if rows is None else torch.as_tensor(rows, dtype=torch.long).sort().values
        sub = self.forward.scored_hidden(tokens[rows], loss_mask[rows], self._budget(max_tokens))
        if sub is not None:  # flat indices of the sub-batch -> of the full batch (rows ascending: still sorted)
            f = sub.flat.cpu()
            sub = ScoredHidden((rows[f // S] * S + f % S).to(sub.flat.device), sub.hidden)
        return transfer.deliver(
            sub,
            self.groups,
            transfer.dp_positions(loss_mask, self.groups.dp, rows),
            student.groups,
            transfer.dp_positions(loss_mask, student.groups.dp),
            self.cfg.hidden_size,
            DTYPES[self.cfg.params_dtype],
            device(),
        )

    @torch.no_grad()
    def full_output_weight(self) -> torch.Tensor:
        """COLLECTIVE. [vocab_size, H] the real rows of the output layer (the embedding when
        tied), gathered over TP and PP, on every rank, in the model's dtype."""
        V, H = self.cfg.vocab_size, self.cfg.hidden_size
        if self.groups.is_last_stage:
            w = self._output_weight().detach()
            if self.groups.tp > 1:
                parts = [torch.empty_like(w) for _ in range(self.groups.tp)]
                dist.all_gather(parts, w.contiguous(), group=self.groups.pg.tp)
                w = torch.cat(parts)
            full = w[:V].contiguous()
        else:
            full = torch.empty(V, H, dtype=DTYPES[self.cfg.params_dtype], device=device())
        if self.groups.pp > 1:
            dist.broadcast(full, src=self.groups.last_stage_global_rank, group=self.groups.pg.pp)
        return full

    @torch.no_grad()
    def output_weight_on(self, student: ShardedGPT) -> torch.Tensor | None:
        """COLLECTIVE; once per run (build time). This model's output-layer rows of the student's
        vocabulary partition, [student.cfg.padded_vocab / student.tp, H] (zero past the real
        vocabulary), on the student's last-stage ranks (None elsewhere): the head the
        full-vocabulary kernel pairs with :meth:`hidden_states_for`. On the student's own layout
        and vocabulary (e.g. reference = the initial student) it is this model's shard itself.
        Otherwise the full weight is gathered once on every rank (transient [V, H]) and cut."""
        same = (self.cfg.tp, self.cfg.pp, self.cfg.padded_vocab, self.cfg.vocab_size) == (
            student.cfg.tp,
            student.cfg.pp,
            student.cfg.padded_vocab,
            student.cfg.vocab_size,
        )
        if same:
            return self._output_weight().detach() if student.groups.is_last_stage else None
        full = self.full_output_weight()
        return transfer.vocab_rows_on(full, student.cfg, student.groups) if student.groups.is_last_stage else None

    def top_k_logprobs(
        self,
        tokens: torch.Tensor,
        loss_mask: torch.Tensor,
        k: int,
        temperature: float = 1.0,
        *,
        max_tokens: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """COLLECTIVE. (ids [N, S, k] long, logp [N, S, k], target_logp [N, S]) on every rank: the
        k most likely next tokens at each scored position (id -1 elsewhere) and the log-prob of
        the token there (what an SGLang server returns with top_logprobs_num)."""
        return self.forward.top_k(tokens, loss_mask, k, temperature, self._budget(max_tokens))

    def logprobs_at(
        self,
        tokens: torch.Tensor,
        loss_mask: torch.Tensor,
        ids: torch.Tensor,
        temperature: float = 1.0,
        *,
        max_tokens: int | None = None,
    ) -> torch.Tensor:
        """COLLECTIVE. fp32 [N, S, K] log p(ids[i, j, k] | tokens[i, :j]) at the scored
        positions (0 elsewhere and where an id is < 0), on every rank."""
        return self.forward.logprobs_at(tokens, loss_mask, ids, temperature, self._budget(max_tokens))

    def next_token_logits(
        self, tokens: torch.Tensor, lengths: torch.Tensor, *, max_tokens: int | None = None
    ) -> torch.Tensor:
        """fp32 [N, vocab_size] logits of the token after tokens[i, :lengths[i]] (real vocab only,
        gathered over TP) on every rank. Materialises [N, V]: meant for sampling."""
        return self.forward.next_token_logits(tokens, lengths, self._budget(max_tokens))
