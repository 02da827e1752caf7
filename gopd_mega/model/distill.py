"""The student's loss for the estimators that need more of the teachers than the sampled token's
log-prob (objective.estimator; the README's "Estimators" says what each one estimates):

    full_vocab  each teacher and the reference hand the final hidden states of the student's
                scored positions to the student's ranks, in their own layouts
                (ShardedGPT.hidden_states_for, gopd_mega.model.transfer); their output layers are
                re-sharded ONCE, at build time, to the student's vocabulary partition
                (:class:`Projection`). Each student micro-batch then calls
                kernels.full_vocab_gopd_loss on its own hidden states and output shard (dW into
                main_grad), once per teacher whose rows it holds: [positions x hidden] per model,
                never [positions x vocab].
    top_k       the teacher's top-k log-probs and the sampled token's per position (a local
                model's or an SGLang server's), the reference's log-probs at those ids; the
                student's log-probs at the same ids (gopd_mega.model.vocab) go into
                objective.top_k_token_loss.

Both losses are :class:`gopd_mega.model.forward.HiddenLoss` callables for ShardedGPT.train_step,
weighted per position by the aggregation weights (objective.token_weights). Neither uses an
importance weight or the PPO clip: at each visited prefix the expectation over the next token is
taken under the student itself (what the sampled estimator's truncated weight
min(exp(logp_old - logp_sampler), c) corrects the sampled token towards), and the target
q_t ~ pi_T^lam pi_ref^(1-lam) does not depend on the student, so there is no ratio to clip. The
prefixes are the sampler's, as for the sampled estimator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gopd_mega.model import vocab
from gopd_mega.model.build import DTYPES
from gopd_mega.model.forward import HiddenLoss
from gopd_mega.model.transfer import ScoredHidden
from gopd_mega.objective import top_k_token_loss
from kernels import full_vocab_gopd_loss

PER_TOKEN = ("token_loss", "log_z", "reverse_kl")
"""Per-position outputs of both losses: L_t (the estimated G-OPD loss before weighting), log Z_t of
the target q_t, and KL(pi_theta || pi_T) at that prefix (full_vocab: exact; top_k: between the
coarsened distributions, a lower bound)."""


class Projection:
    """A frozen model (teacher or reference) as the full-vocabulary estimator sees it from the
    student's layout. Built once per run (collective): ``head`` = its output-layer rows of the
    student's vocabulary partition (ShardedGPT.output_weight_on), on the student's last-stage
    ranks; :meth:`hidden` delivers its final hidden states of a batch to the student's ranks."""

    def __init__(self, model, student, name: str):
        self.model, self.student, self.name = model, student, name
        head = model.output_weight_on(student)
        # in the student's dtype, as the hidden states at use: the kernel's Triton path takes one
        # dtype for all three models
        self.head = None if head is None else head.to(DTYPES[student.cfg.params_dtype])

    def hidden(
        self, tokens: torch.Tensor, loss_mask: torch.Tensor, rows=None, *, max_tokens: int | None = None
    ) -> ScoredHidden | None:
        """COLLECTIVE: see ShardedGPT.hidden_states_for."""
        return self.model.hidden_states_for(self.student, tokens, loss_mask, rows, max_tokens=max_tokens)


def _kernel_kwargs(kw: dict) -> dict:
    return {k: kw[k] for k in ("temperature", "group", "vocab_start", "vocab_valid", "reduce_dh")}


class FullVocabLoss(HiddenLoss):
    """sum_t token_weight_t * L_t with L_t = KL(pi_theta || q_t) - log Z_t exact over the
    vocabulary, from the delivered hidden states (see the module docstring).

    ``teachers``: [(ScoredHidden, head)] per teacher; ``route`` [n] long: the teacher index of each
    batch row; ``reference``: (ScoredHidden, head), or None at lam == 1 (it cancels);
    ``token_weight`` [n * S] aggregation weights; ``S`` the batch's width. The hidden states are
    those of this rank (None off the student's last stage, which computes no loss)."""

    keys = PER_TOKEN
    uses_grad_acc = True

    def __init__(self, teachers: list, route: torch.Tensor, reference, token_weight: torch.Tensor, lam: float, S: int):
        if (reference is None) != (lam == 1.0):
            raise ValueError("FullVocabLoss: the reference is needed iff lam != 1")
        self.teachers, self.route, self.reference = teachers, route, reference
        self.token_weight, self.lam, self.S = token_weight.reshape(-1), float(lam), S

    def __call__(self, h, weight, flat, kw):
        kkw = _kernel_kwargs(kw)
        which = self.route[flat.cpu() // self.S]
        total = (h * 0).sum()  # connected to the graph even for a micro-batch no teacher claims
        value = torch.zeros((), dtype=torch.float64, device=h.device)
        out = {k: torch.zeros(flat.shape, device=h.device) for k in self.keys}
        for k, (hidden, head) in enumerate(self.teachers):
            sel = (which == k).nonzero().flatten().to(h.device)
            if not sel.numel():
                continue
            f = flat[sel]
            h_t = hidden.at(f).to(h.dtype)
            h_r, w_r = (
                (None, None) if self.reference is None else (self.reference[0].at(f).to(h.dtype), self.reference[1])
            )
            tw = self.token_weight[f.cpu()].to(h.device)
            loss, log_z = full_vocab_gopd_loss(
                h[sel],
                weight,
                h_t,
                head,
                h_r,
                w_r,
                lam=self.lam,
                token_weight=tw,
                grad_weight_acc=kw.get("grad_weight_acc"),
                **kkw,
            )
            total = total + loss.sum()
            value = value + (tw.double() * loss.detach().double()).sum()
            out["token_loss"][sel], out["log_z"][sel] = loss.detach().float(), log_z.detach().float()
            if self.lam == 1.0:
                out["reverse_kl"][sel] = loss.detach().float()
            else:  # one more forward pass (student and teacher), no gradient: KL to the teacher itself
                with torch.no_grad():
                    kl, _ = full_vocab_gopd_loss(
                        h[sel].detach(), weight.detach(), h_t, head, None, None, lam=1.0, **kkw
                    )
                out["reverse_kl"][sel] = kl.float()
        # the gradient of sum_k loss_k.sum(), which the kernel weighs by token_weight (upstream
        # gradient 1 per token: kernels.full_vocab_gopd_loss); the value sum_t w_t L_t
        return total - total.detach() + value.to(total.dtype), out


@dataclass
class TopK:
    """What the top-k estimator knows of a batch [n, S], per position, over K = k + 1 ids: the
    teacher's top-k and the sampled token (objective.top_k_token_loss)."""

    ids: torch.Tensor
    """[n, S, K] long token ids; the last slot is the sampled token tokens[i, j]."""
    mask: torch.Tensor
    """[n, S, K] bool: which ids belong to K_t (False off the scored positions, for an invalid id,
    and for the sampled token's slot when it is already in the teacher's top-k)."""
    teacher_logp: torch.Tensor
    """[n, S, K] the teacher's log-probs at ``ids``."""
    ref_logp: torch.Tensor | None = None
    """[n, S, K] the reference's log-probs at ``ids`` (None at lam == 1)."""

    @classmethod
    def from_teacher(
        cls,
        tokens: torch.Tensor,
        loss_mask: torch.Tensor,
        ids: torch.Tensor,
        logp: torch.Tensor,
        target_logp: torch.Tensor,
        vocab_size: int,
    ) -> TopK:
        """From a teacher's top-k ``ids``/``logp`` [n, S, k] and the sampled tokens' log-probs
        ``target_logp`` [n, S] (ShardedGPT.top_k_logprobs, ServerScorer.top_k_logprobs). Ids the
        student cannot produce (>= its ``vocab_size``, or < 0) leave K_t: their mass joins the tail."""
        scored = loss_mask.bool().clone()
        scored[:, 0] = False
        ids = ids.long()
        top_ok = scored[..., None] & (ids >= 0) & (ids < vocab_size)
        in_top = ((ids == tokens[..., None]) & top_ok).any(-1)
        all_ids = torch.cat([ids.clamp(min=-1), tokens[..., None].long()], dim=-1)
        mask = torch.cat([top_ok, (scored & ~in_top)[..., None]], dim=-1)
        t = torch.cat([logp.float(), target_logp.float()[..., None]], dim=-1)
        return cls(all_ids, mask, torch.where(mask, t, torch.zeros_like(t)))

    def rows(self, rows: torch.Tensor) -> TopK:
        return TopK(
            self.ids[rows],
            self.mask[rows],
            self.teacher_logp[rows],
            None if self.ref_logp is None else self.ref_logp[rows],
        )


class TopKLoss(HiddenLoss):
    """sum_t token_weight_t * L_t with L_t = objective.top_k_token_loss of the student's
    log-probs at the TopK ids (differentiable, vocab-parallel: gopd_mega.model.vocab)."""

    keys = PER_TOKEN
    uses_grad_acc = False  # the weight's gradient goes through autograd (DDP's hook)

    def __init__(self, top: TopK, token_weight: torch.Tensor, lam: float):
        if (top.ref_logp is None) != (lam == 1.0):
            raise ValueError("TopKLoss: the reference's log-probs are needed iff lam != 1")
        K = top.ids.shape[-1]
        self.ids, self.mask = top.ids.reshape(-1, K), top.mask.reshape(-1, K)
        self.teacher = top.teacher_logp.reshape(-1, K)
        self.ref = None if top.ref_logp is None else top.ref_logp.reshape(-1, K)
        self.token_weight, self.lam = token_weight.reshape(-1), float(lam)

    def __call__(self, h, weight, flat, kw):
        f, dev = flat.cpu(), h.device
        mask = self.mask[f].to(dev)
        ids = torch.where(mask, self.ids[f], torch.full_like(self.ids[f], -1)).to(dev)
        logp = vocab.logprobs_at(
            h, weight, ids, **{k: kw[k] for k in ("vocab_start", "vocab_valid", "group", "temperature", "reduce_dh")}
        )
        teacher = self.teacher[f].to(dev)
        ref = None if self.ref is None else self.ref[f].to(dev)
        loss, log_z = top_k_token_loss(logp, teacher, ref, self.lam, mask)
        tw = self.token_weight[f].to(dev)
        kl = loss.detach() if self.lam == 1.0 else top_k_token_loss(logp.detach(), teacher, None, 1.0, mask)[0]
        return (tw * loss).sum(), {"token_loss": loss.detach(), "log_z": log_z.detach(), "reverse_kl": kl}
