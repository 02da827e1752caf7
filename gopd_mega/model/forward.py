"""How a step runs: the ONE scaffold that takes packed micro-batches through megatron's pipeline
schedule and scores them with ``kernels``.

    full batch [N, S] (every rank)  --gopd_mega.model.batch-->  this DP rank's packed micro-batches
    for each micro-batch (megatron get_forward_backward_func, over this model's PP group):
        hidden [T, 1, H] = HiddenGPT(tokens [1, T], position_ids, block-diagonal mask | THD)
        h = hidden[score_pos]                       [R, H]  only positions whose target is a response token
        kernels: logp [R] (forward only) | loss + grads (train, fused)   over the vocab-parallel weight
    results scattered by flat_index into [C, N * S] on the last stage
        -> broadcast over PP from the last stage -> SUM over DP (each index has one DP owner)

Log-probs: logp[i, j] = log p(tokens[i, j] | tokens[i, :j]) / temperature-scaled, for loss_mask
1 and j >= 1, else 0. Train: loss = sum over scored tokens of token_loss_fn(logp, flat_index),
with flat_index = i * S + j into the full batch (the callback reads its per-token weights there);
gradients accumulate into megatron DDP's fp32 main_grad buffers (the output layer's dW straight
from the fused kernel). Finalising them (DP/TP/PP reductions) and the optimizer step are the
caller's (ShardedGPT.train_step -> gopd_mega.optim.StudentOptimizer.step).

For the estimators that need more than the sampled token (objective.estimator, gopd_mega.model.
distill) the same scaffold also trains on a :class:`HiddenLoss` of h and the weight shard, hands
out h itself (``scored_hidden``, on the last stage, for gopd_mega.model.transfer), and scores a
model's top-k ids or given ids per position (gopd_mega.model.vocab).

``ForwardStats`` counts what the forwards did on this rank (tests and benchmarks read it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from functools import partial

import torch
import torch.distributed as dist

import kernels
from gopd_mega.config import ModelConfig
from gopd_mega.model import vocab
from gopd_mega.model.batch import MicroBatch, last_token_micro_batches, scoring_micro_batches
from gopd_mega.model.build import DTYPES, has_transformer_engine
from gopd_mega.model.transfer import ScoredHidden
from gopd_mega.parallel import ModelGroups
from gopd_mega.platform import device

IGNORE = -100
TokenLossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""fn(logp [R] fp32 (differentiable), flat_index [R] long into the full batch's [N * S]) ->
per-token loss [R]."""


class HiddenLoss:
    """A student loss of the scored positions' final hidden states, the alternative to a
    TokenLossFn for estimators that need more than the sampled token's log-prob
    (gopd_mega.model.distill):

        loss, per_token = fn(h [R, H] (differentiable), weight (this rank's output shard),
                             flat [R] (into the full batch's [N * S]), kw)

    ``kw``: the vocab-parallel arguments of ``kernels`` (vocab_start, vocab_valid, group,
    temperature, reduce_dh) and, when ``uses_grad_acc``, grad_weight_acc (the weight's fp32
    main_grad, or None: then dW goes through autograd). ``loss`` is a scalar back-propagated with
    gradient 1 (the batch's normalisation baked in); ``per_token`` maps each name in ``keys`` to a
    detached [R] tensor, gathered into [N, S] on every rank like the log-probs."""

    keys: tuple[str, ...] = ()
    uses_grad_acc: bool = False

    def __call__(self, h: torch.Tensor, weight: torch.Tensor, flat: torch.Tensor, kw: dict):
        raise NotImplementedError


@dataclass
class ForwardStats:
    """What this rank's model forwards did since the last reset (one entry per micro-batch)."""

    forward_calls: int = 0
    """Micro-batch forwards run."""
    max_tokens_per_forward: int = 0
    """Most positions in one forward (the packed length T)."""
    positions_computed: int = 0
    """Positions run through the transformer (sum of T)."""
    positions_scored: int = 0
    """Positions whose hidden state reached the output layer / kernel."""

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)

    def as_dict(self) -> dict:
        return asdict(self)


class PipelineForward:
    """The scaffold of one model (see the module docstring); built by ShardedGPT."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: ModelConfig,
        groups: ModelGroups,
        tconfig,
        output_weight: Callable[[], torch.Tensor],
    ):
        self.model, self.cfg, self.groups, self.tconfig = model, cfg, groups, tconfig
        self.output_weight = output_weight
        self.stats = ForwardStats()
        self.thd = has_transformer_engine()
        self.fast_scoring = True
        """Forward-only scoring (``logprobs``) through gopd_mega.model.inference where it serves
        the model (same log-probs to fp32 rounding); False: megatron's own forward."""
        self._stage = None  # (Stage | None, why not), built on first use
        self.padded_layout = cfg.padded_layout
        """ModelConfig.padded_layout: megatron's forward (training) and the plain-torch scoring
        stage (``_run_scoring``) may run a micro-batch of several sequences as a right-padded batch
        [k, L] under a plain causal mask instead of one packed row [1, T] under the block-diagonal
        [T, T] mask, where that costs less (``_use_padded``): the same log-probs, loss and
        gradients to fp32 rounding (masked scores weigh exactly 0 either way). False: always packed."""
        self._causal: dict[int, torch.Tensor] = {}  # L -> [1, 1, L, L] causal mask of the padded layout
        # Sequence parallelism splits the packed length over TP ranks: T must divide by tp.
        self.multiple = cfg.tp if cfg.sequence_parallel else 1

    # ------------------------------------------------------------------ plumbing
    def _kernel_kwargs(self, temperature: float) -> dict:
        per = self.cfg.padded_vocab // self.cfg.tp
        start = self.groups.tp_rank * per
        valid = max(0, min(per, self.cfg.vocab_size - start))
        logits = None if self.cfg.logits_dtype == "float32" else DTYPES[self.cfg.params_dtype]
        # Under SP the hidden all-gather's backward reduce-scatters dh: the kernel must not reduce.
        return {
            "vocab_start": start,
            "vocab_valid": valid,
            "group": self.groups.pg.tp,
            "temperature": temperature,
            "ignore_index": IGNORE,
            "logits_dtype": logits,
            "reduce_dh": not self.cfg.sequence_parallel,
        }

    PADDED_MIN_TOKENS = 128

    def _use_padded(self, mb: MicroBatch) -> bool:
        """Whether megatron's forward runs ``mb`` in the padded layout (see ``padded_layout``):
        only the local spec's explicit mask (not THD), one pipeline stage (the schedule's
        [T, 1, H] activations between stages), no sequence parallelism (T split over TP), several
        sequences, at least PADDED_MIN_TOKENS positions (below, the [T, T] scores cost next to
        nothing and the packed results stay bitwise those of before), and when the estimated cost
        is lower: per position the layers' GEMMs, per attention score (T^2 packed, k * L^2
        padded) its two GEMMs and the mask / softmax passes."""
        if (
            not self.padded_layout
            or self.thd
            or self.groups.pp > 1
            or self.multiple > 1
            or len(mb.cu_seqlens) < 3
            or mb.num_tokens < self.PADDED_MIN_TOKENS
        ):
            return False
        c = self.tconfig
        heads, groups, d = c.num_attention_heads, c.num_query_groups or c.num_attention_heads, c.kv_channels
        per_position = 2 * (
            c.hidden_size * (heads + 2 * groups) * d + heads * d * c.hidden_size + 3 * c.hidden_size * c.ffn_hidden_size
        )
        per_score = heads * (4 * d + 64)
        lens = mb.lengths()
        T, k, L = mb.num_tokens, len(lens), int(lens.max())
        return k * L * per_position + k * L * L * per_score < T * per_position + T * T * per_score

    def _causal_mask(self, L: int, dev) -> torch.Tensor:
        if L not in self._causal:
            with torch.inference_mode(False):  # a normal tensor also when first built while scoring
                self._causal[L] = torch.ones(L, L, dtype=torch.bool, device=dev).triu(1)[None, None]
        return self._causal[L]

    def _run(
        self, mbs: list[MicroBatch], loss_func, forward_only: bool, module: torch.nn.Module | None = None
    ) -> list[dict]:
        """Megatron's pipeline schedule over ``mbs``; returns the per-micro-batch dicts of
        ``loss_func`` on the last stage ([] elsewhere and when there is nothing to run).
        ``module``: what the schedule runs (the DDP wrapper of a trained model; default the model)."""
        if not mbs:
            return []
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        dev = device()
        stats = self.stats

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            stats.forward_calls += 1
            stats.positions_scored += len(mb.score_pos)
            if self._use_padded(mb):  # [k, L] rows, positions 0..L-1 (megatron's own RoPE positions)
                tokens, index = mb.padded()
                k, L = tokens.shape
                stats.max_tokens_per_forward = max(stats.max_tokens_per_forward, k * L)
                stats.positions_computed += k * L
                hidden = model(input_ids=tokens.to(dev), position_ids=None, attention_mask=self._causal_mask(L, dev))
                # [L, k, H] -> [L * k, 1, H]: the loss reads the scored states at their padded places
                return hidden.reshape(L * k, 1, hidden.shape[-1]), partial(loss_func, replace(mb, score_pos=index))
            kw = {"attention_mask": None}
            if self.thd:
                kw["packed_seq_params"] = mb.packed_seq_params(dev)
            else:
                kw["attention_mask"] = mb.attention_mask(dev)
            stats.max_tokens_per_forward = max(stats.max_tokens_per_forward, mb.num_tokens)
            stats.positions_computed += mb.num_tokens
            hidden = model(input_ids=mb.tokens.to(dev), position_ids=mb.position_ids.to(dev), **kw)
            return hidden, partial(loss_func, mb)

        kwargs = {}
        if self.groups.pp > 1:
            kwargs["p2p_communicator"] = P2PCommunicator(pp_group=self.groups.pg.pp, config=self.tconfig)
        fb = get_forward_backward_func(pp_size=self.groups.pp, vp_size=None)
        return fb(
            forward_step_func=forward_step,
            data_iterator=iter(mbs),
            model=[module or self.model],
            num_microbatches=len(mbs),
            seq_length=max(mb.num_tokens for mb in mbs),
            micro_batch_size=1,
            forward_only=forward_only,
            pg_collection=self.groups.pg,
            **kwargs,
        )

    def _run_eval(self, mbs: list[MicroBatch], loss_func) -> list[dict]:
        """``_run`` forward-only in eval mode (the model's train/eval mode is restored after)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self._run(mbs, loss_func, forward_only=True)
        finally:
            self.model.train(was_training)

    def _inference_stage(self):
        """The plain-torch forward of this stage (gopd_mega.model.inference) for forward-only
        scoring, or None: with Transformer Engine (THD packing), for a model it does not support,
        or when ``fast_scoring`` is off."""
        if not self.fast_scoring or self.thd:
            return None
        if self._stage is None:
            from gopd_mega.model.inference import stage_of

            self._stage = stage_of(self.model, self.tconfig, self.groups)
        return self._stage[0]

    def _run_scoring(self, mbs: list[MicroBatch], loss_func) -> list[dict]:
        """Forward-only micro-batches for scoring: through the plain-torch stage when it serves
        this model (every stage hands its hidden states to the next itself), else ``_run_eval``.
        Returns the last stage's ``loss_func`` dicts, as ``_run``."""
        stage = self._inference_stage()
        if stage is None:
            return self._run_eval(mbs, loss_func)
        dev, stats, results = device(), self.stats, []
        with torch.inference_mode():
            for mb in mbs:
                stats.forward_calls += 1
                stats.positions_scored += len(mb.score_pos)
                if self._use_padded(mb):  # as in ``_run``: [k, L] rows at positions 0..L-1
                    tokens, index = mb.padded()
                    k, L = tokens.shape
                    stats.max_tokens_per_forward = max(stats.max_tokens_per_forward, k * L)
                    stats.positions_computed += k * L
                    hidden = stage.hidden_states(
                        tokens.to(dev), torch.arange(L, device=dev), ~self._causal_mask(L, dev)
                    )
                    if hidden is not None:  # [L, k, H] -> [L * k, 1, H]
                        hidden = hidden.reshape(L * k, 1, hidden.shape[-1])
                    mb = replace(mb, score_pos=index)
                else:
                    stats.max_tokens_per_forward = max(stats.max_tokens_per_forward, mb.num_tokens)
                    stats.positions_computed += mb.num_tokens
                    hidden = stage.hidden_states(mb.tokens.to(dev), mb.position_ids[0].to(dev), ~mb.attention_mask(dev))
                if hidden is not None:
                    results.append(
                        {k: v.clone() if torch.is_tensor(v) else v for k, v in loss_func(mb, hidden)[2].items()}
                    )
        return results

    def _collect(self, results: list[dict], keys: tuple[str, ...], size: int, width: int = 1) -> torch.Tensor:
        """Scatter the last stage's per-micro-batch results (``flat`` indices) into a
        [len(keys), size, width] tensor present on every rank of this model."""
        out = torch.zeros(len(keys), size, width, device=device())
        for r in results:
            for c, k in enumerate(keys):
                out[c, r["flat"]] = r[k].reshape(len(r["flat"]), width)
        if self.groups.pp > 1:
            dist.broadcast(out, src=self.groups.last_stage_global_rank, group=self.groups.pg.pp)
        if self.groups.dp > 1:
            dist.all_reduce(out, group=self.groups.pg.dp)  # each index is written by one DP rank
        return out

    def _scoring(self, tokens, loss_mask, max_tokens, max_rows):
        return scoring_micro_batches(
            tokens.cpu(), loss_mask.cpu(), self.groups.dp, self.groups.dp_rank, max_tokens, max_rows, self.multiple
        )

    @staticmethod
    def _scored_hidden(mb: MicroBatch, hidden: torch.Tensor) -> torch.Tensor:
        """[T, 1, H] -> [R, H]: the states that predict the scored targets."""
        return hidden[mb.score_pos.to(hidden.device), 0]

    def _vocab_kwargs(self, temperature: float) -> dict:
        """The vocab-parallel arguments of a HiddenLoss / gopd_mega.model.vocab."""
        kw = self._kernel_kwargs(temperature)
        return {k: kw[k] for k in ("vocab_start", "vocab_valid", "group", "temperature", "reduce_dh")}

    # ------------------------------------------------------------------ the computations
    @torch.no_grad()
    def logprobs(
        self,
        tokens: torch.Tensor,
        loss_mask: torch.Tensor,
        temperature: float,
        max_tokens: int,
        max_rows: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp, entropy), fp32 [N, S] CPU, 0 at j = 0 and where loss_mask is 0."""
        N, S = tokens.shape
        mbs = self._scoring(tokens, loss_mask, max_tokens, max_rows)
        kw = self._kernel_kwargs(temperature)

        def loss_func(mb, hidden):
            h = self._scored_hidden(mb, hidden)
            logp, ent = kernels.linear_logprob_inference(
                h, self.output_weight(), mb.targets.to(h.device), return_entropy=True, **kw
            )
            out = {"flat": mb.flat_index.to(h.device), "logp": logp.float(), "entropy": ent.float()}
            return torch.zeros((), device=h.device), torch.tensor(0, dtype=torch.int), out

        results = self._run_scoring(mbs, loss_func)
        out = self._collect(results, ("logp", "entropy"), N * S).view(2, N, S).cpu()
        return out[0], out[1]

    def loss_and_grads(
        self,
        tokens: torch.Tensor,
        loss_mask: torch.Tensor,
        token_loss_fn: TokenLossFn,
        temperature: float,
        max_tokens: int,
        max_rows: int | None = None,
        grads=None,
    ) -> dict:
        """Forward + backward of the whole batch: accumulates parameter gradients (not reduced
        over DP/TP/PP) and returns loss (full batch, every rank), logp [N, S] and entropy [N, S].

        ``grads`` (the student's gopd_mega.optim.StudentOptimizer) owns the gradient buffers: the
        schedule runs its megatron DDP wrapper, and the fused kernel adds the output layer's dW
        straight into that weight's fp32 ``main_grad`` (``output_grad_acc`` / ``mark_output_grad``)."""
        N, S = tokens.shape
        mbs = self._scoring(tokens, loss_mask, max_tokens, max_rows)
        kw = self._kernel_kwargs(temperature)

        def loss_func(mb, hidden):
            h = self._scored_hidden(mb, hidden)
            flat = mb.flat_index.to(h.device)
            fn = lambda logp, sl: token_loss_fn(logp, flat[sl])  # noqa: E731  (kernel chunk -> flat ids)
            weight = self.output_weight()
            acc = grads.output_grad_acc(weight) if grads is not None else None
            loss, logp, ent = kernels.linear_logprob_loss(
                h, weight, mb.targets.to(h.device), fn, grad_weight_acc=acc, **kw
            )
            if grads is not None:
                loss = grads.mark_output_grad(loss, weight)
            out = {
                "flat": flat,
                "loss": loss.detach().reshape(()).float(),
                "logp": logp.float(),
                "entropy": ent.float(),
            }
            return loss, torch.tensor(0, dtype=torch.int), out

        return self._train(mbs, loss_func, ("logp", "entropy"), (N, S), grads)

    def _train(self, mbs: list[MicroBatch], loss_func, keys: tuple[str, ...], shape: tuple[int, int], grads) -> dict:
        """Forward + backward of ``mbs`` in train mode (through the DDP wrapper of ``grads``): the
        full-batch loss and each per-token result in ``keys`` as [N, S] CPU, on every rank."""
        N, S = shape
        self.model.train()
        results = self._run(mbs, loss_func, forward_only=False, module=grads.ddp if grads is not None else None)
        out = self._collect(results, keys, N * S).view(len(keys), N, S).cpu()
        loss = torch.zeros((), device=device(), dtype=torch.float64)
        loss += sum(float(r["loss"]) for r in results)
        if self.groups.pp > 1:
            dist.broadcast(loss, src=self.groups.last_stage_global_rank, group=self.groups.pg.pp)
        if self.groups.dp > 1:
            dist.all_reduce(loss, group=self.groups.pg.dp)
        return {"loss": float(loss), **dict(zip(keys, out))}

    def hidden_loss_and_grads(
        self,
        tokens: torch.Tensor,
        loss_mask: torch.Tensor,
        hidden_loss: HiddenLoss,
        temperature: float,
        max_tokens: int,
        max_rows: int | None = None,
        grads=None,
    ) -> dict:
        """:meth:`loss_and_grads` with a :class:`HiddenLoss` instead of a per-token function:
        returns loss, logp and entropy [N, S] of the sampled tokens (one forward-only pass of the
        log-prob kernel, for the metrics) and each of ``hidden_loss.keys`` as [N, S]."""
        N, S = tokens.shape
        mbs = self._scoring(tokens, loss_mask, max_tokens, max_rows)
        kw = self._kernel_kwargs(temperature)
        vkw = self._vocab_kwargs(temperature)

        def loss_func(mb, hidden):
            h = self._scored_hidden(mb, hidden)
            flat = mb.flat_index.to(h.device)
            weight = self.output_weight()
            with torch.no_grad():
                logp, ent = kernels.linear_logprob_inference(
                    h.detach(), weight.detach(), mb.targets.to(h.device), return_entropy=True, **kw
                )
            acc = None
            if grads is not None and hidden_loss.uses_grad_acc:
                acc = grads.output_grad_acc(weight)
                # on h, not on the loss: DDP's hook for the weight then runs after the kernel's
                # backward, which may be where it adds dW into main_grad (kernels.full_vocab_gopd_loss)
                h = grads.mark_output_grad(h, weight)
            loss, per_token = hidden_loss(h, weight, flat, {**vkw, "grad_weight_acc": acc})
            out = {
                "flat": flat,
                "loss": loss.detach().reshape(()).float(),
                "logp": logp.float(),
                "entropy": ent.float(),
                **{k: per_token[k].float() for k in hidden_loss.keys},
            }
            return loss, torch.tensor(0, dtype=torch.int), out

        return self._train(mbs, loss_func, ("logp", "entropy", *hidden_loss.keys), (N, S), grads)

    @torch.no_grad()
    def scored_hidden(
        self, tokens: torch.Tensor, loss_mask: torch.Tensor, max_tokens: int, max_rows: int | None = None
    ) -> ScoredHidden | None:
        """The final hidden states of this DP rank's scored positions of the batch (flat indices
        into ITS [N * S]), in the model's dtype, on every TP rank of the last stage (None on the
        other stages): what gopd_mega.model.transfer.deliver hands on."""
        mbs = self._scoring(tokens, loss_mask, max_tokens, max_rows)

        def loss_func(mb, hidden):
            h = self._scored_hidden(mb, hidden)
            return (
                torch.zeros((), device=h.device),
                torch.tensor(0, dtype=torch.int),
                {"flat": mb.flat_index.to(h.device), "hidden": h.detach()},
            )

        results = self._run_eval(mbs, loss_func)
        if not self.groups.is_last_stage:
            return None
        dev, H = device(), self.cfg.hidden_size
        if not results:
            return ScoredHidden(
                torch.zeros(0, dtype=torch.long, device=dev),
                torch.zeros(0, H, dtype=DTYPES[self.cfg.params_dtype], device=dev),
            )
        flat = torch.cat([r["flat"] for r in results])
        order = flat.argsort()
        return ScoredHidden(flat[order], torch.cat([r["hidden"] for r in results])[order])

    @torch.no_grad()
    def top_k(
        self,
        tokens: torch.Tensor,
        loss_mask: torch.Tensor,
        k: int,
        temperature: float,
        max_tokens: int,
        max_rows: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [N, S, k] long, logp [N, S, k], target_logp [N, S]) fp32 CPU: the k most likely
        next tokens at each scored position (loss_mask 1, j >= 1; else id -1, logp 0) and the
        log-prob of the token there (gopd_mega.model.vocab.top_k_logprobs)."""
        N, S = tokens.shape
        mbs = self._scoring(tokens, loss_mask, max_tokens, max_rows)
        vkw = self._vocab_kwargs(temperature)

        def loss_func(mb, hidden):
            h = self._scored_hidden(mb, hidden)
            ids, lp, tgt = vocab.top_k_logprobs(h, self.output_weight(), mb.targets.to(h.device), k, **vkw)
            out = {"flat": mb.flat_index.to(h.device), "ids": ids.float(), "logp": lp, "target": tgt}
            return torch.zeros((), device=h.device), torch.tensor(0, dtype=torch.int), out

        results = self._run_eval(mbs, loss_func)
        for r in results:  # unscored positions stay 0 in the collected tensors: mark them id -1
            r["ids"] = r["ids"] + 1
        ids = self._collect(results, ("ids",), N * S, k)[0].view(N, S, k).cpu().long() - 1
        lp = self._collect(results, ("logp",), N * S, k)[0].view(N, S, k).cpu()
        tgt = self._collect(results, ("target",), N * S)[0].view(N, S).cpu()
        return ids, lp, tgt

    @torch.no_grad()
    def logprobs_at(
        self,
        tokens: torch.Tensor,
        loss_mask: torch.Tensor,
        ids: torch.Tensor,
        temperature: float,
        max_tokens: int,
        max_rows: int | None = None,
    ) -> torch.Tensor:
        """fp32 [N, S, K] CPU log p(ids[i, j, k] | tokens[i, :j]) at the scored positions (0
        elsewhere and where an id is < 0)."""
        N, S = tokens.shape
        K = ids.shape[-1]
        flat_ids = ids.reshape(N * S, K)
        mbs = self._scoring(tokens, loss_mask, max_tokens, max_rows)
        vkw = self._vocab_kwargs(temperature)

        def loss_func(mb, hidden):
            h = self._scored_hidden(mb, hidden)
            lp = vocab.logprobs_at(h, self.output_weight(), flat_ids[mb.flat_index], **vkw)
            out = {"flat": mb.flat_index.to(h.device), "logp": lp}
            return torch.zeros((), device=h.device), torch.tensor(0, dtype=torch.int), out

        results = self._run_eval(mbs, loss_func)
        return self._collect(results, ("logp",), N * S, K)[0].view(N, S, K).cpu()

    @torch.no_grad()
    def next_token_logits(self, tokens: torch.Tensor, lengths: torch.Tensor, max_tokens: int) -> torch.Tensor:
        """fp32 [N, vocab_size] CPU logits of the token after tokens[i, :lengths[i]]."""
        N = tokens.shape[0]
        V = self.cfg.vocab_size
        mbs = last_token_micro_batches(
            tokens.cpu(), lengths, self.groups.dp, self.groups.dp_rank, max_tokens, self.multiple
        )

        def loss_func(mb, hidden):
            z = self._scored_hidden(mb, hidden).float() @ self.output_weight().float().t()  # [R, Vp/tp]
            if self.groups.tp > 1:
                parts = [torch.empty_like(z) for _ in range(self.groups.tp)]
                dist.all_gather(parts, z.contiguous(), group=self.groups.pg.tp)
                z = torch.cat(parts, dim=1)
            out = {"flat": mb.flat_index.to(z.device), "logits": z[:, :V]}
            return torch.zeros((), device=z.device), torch.tensor(0, dtype=torch.int), out

        results = self._run_eval(mbs, loss_func)
        return self._collect(results, ("logits",), N, V)[0].cpu()
