"""The G-OPD / ExOPD objective: the one place its math is written.

Pure torch, importable without megatron-core, Triton or any server.

Notation (all per sampled token y_t of a response, at the rollout temperature):
    s_t  = log pi_theta(y_t | x, y<t)     student, recomputed by the trainer
    t_t  = log pi_star(y_t | x, y<t)      the teacher that this prompt routes to
    r_t  = log pi_ref(y_t | x, y<t)       reference (default: the student's initial weights)
    q_t  = log pi_sampler(y_t | x, y<t)   what the rollout engine reported when it sampled y_t
    o_t  = log pi_old(y_t | x, y<t)       trainer's log-prob before this update (= s_t detached
                                          when each batch is used for one update, as in the paper)

Implicit reward   R_t = lambda * (t_t - r_t)
Advantage         A_t = lambda * (t_t - r_t) - (o_t - r_t)
                      = lambda * t_t + (1 - lambda) * r_t - o_t                 (detached)
lambda = 1 is OPD (r cancels); 0 < lambda < 1 interpolates towards pi_ref; lambda > 1 is ExOPD.

The per-position target (over the whole vocabulary v, at one prefix h_t):
    g_t(v)   = lambda * log pi_star(v | h_t) + (1 - lambda) * log pi_ref(v | h_t)
    log Z_t  = logsumexp_v g_t(v)
    log q_t  = g_t - log Z_t                                           (tilted_target)
Returns (objective.returns; sequence_advantage):
    'token'     A_t as above: no return over later tokens (discount 0, the paper's official code).
                At each prefix the expected update is -grad KL(pi_theta(. | h_t) || q_t), so its
                fixed point is the PER-TOKEN target pi_theta(. | h_t) = q_t at every prefix.
    'sequence'  A_t = G_t - b_t with the return-to-go G_t = sum_{k >= t} rho_k over the response
                tokens of the same sequence, rho_k = A_k of 'token', and b_t the leave-one-out
                mean of G at the same response position over the other sequences of the group
                (one prompt's samples; the whole batch without groups). E[sum_t grad s_t G_t] is
                the gradient of E_y[sum_t rho_t] = -KL(pi_theta(. | x) || pi*) + log Z(x), so the
                fixed point is the SEQUENCE-LEVEL target
                    pi*(y | x) = pi_star(y | x)^lambda pi_ref(y | x)^(1 - lambda) / Z(x)
                               = prod_t q_t(y_t | h_t) * exp(sum_t log Z_t(h_t)) / Z(x),
                the paper's stated optimum. b_t depends on other sequences only (independent
                samples), never on y_t or later tokens of its own row, so it adds no bias.
                Cost: pi_old from one extra no-grad student forward.
The two targets differ by the per-prefix normalisers: pi* up-weights the prefixes whose Z_t is
large, the per-token target ignores them. They coincide at lambda = 1 (Z_t = 1: both are
pi_star) and differ otherwise.

Full-vocabulary estimator (full_vocab_token_loss): instead of the one sampled token, the exact
expectation over the next token at each visited prefix,
    L_t = sum_v p_theta(v | h_t) (log p_theta(v | h_t) - g_t(v)) = KL(p_theta(. | h_t) || q_t) - log Z_t,
whose gradient is E_{y_t ~ p_theta}[ grad of -A_t * ratio_t ] with no sampling variance
(kernels.full_vocab_gopd_loss computes it from hidden states without [tokens x vocab] logits).

Policy loss per token (PPO clip eps, dual clip c, truncated importance weight w):
    rho_t = exp(s_t - o_t)
    l_t   = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))
    l_t   = min(l_t, -A_t c)                 where A_t < 0   (dual clip)
    w_t   = min(exp(o_t - q_t), w_max)       detached: sampler/trainer mismatch correction
    loss  = sum_t  omega_t * w_t * l_t       omega_t = aggregation weight (see token_weights)

Aggregation: "token-mean" (every token of the batch weighs the same) or "seq-mean-token-mean"
(mean over tokens within each sequence, then mean over sequences: the paper's official runs).

GRPO (how the paper makes its domain teachers; same policy loss, IS weight and aggregation):
responses i = 1..n of one prompt form a group, each gets a verifier reward R_i, and
    A_i   = (R_i - mean_g R) / (std_g R + eps)      std_g = SAMPLE std (n - 1), eps = 1e-6,
                                                    as verl's compute_grpo_outcome_advantage
    A_t   = A_i for every response token t of sequence i                    (detached)
    l_t   = clipped policy loss of A_t (above) * w_t + beta * k3_t
    k3_t  = exp(r_t - s_t) - (r_t - s_t) - 1        KL(pi_theta || pi_ref) estimator ("k3",
                                                    verl's low_var_kl), clamped to [-10, 10]
with r_t the reference (the policy before RL) and beta = kl_coef (0 turns the term off).
A group of one response has A = R (mean 0, std 1), as in verl.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Aggregation = Literal["token-mean", "seq-mean-token-mean"]
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean")


@dataclass
class LossSettings:
    """Hyper-parameters of the policy loss (G-OPD and GRPO alike): the one place these fields
    are defined. gopd_mega.config.ObjectiveConfig extends this class (an ObjectiveConfig is a
    LossSettings, validated there); tests and kernels build a bare one."""

    lam: float = 1.0
    """Reward scaling lambda: 1 = OPD, (0, 1) interpolates to the reference, > 1 = ExOPD."""
    clip_eps_low: float = 0.2
    """PPO clip: ratio floor is 1 - clip_eps_low."""
    clip_eps_high: float = 0.2
    """PPO clip: ratio ceiling is 1 + clip_eps_high."""
    dual_clip: float | None = 3.0
    """Dual-clip constant c (> 1) for negative advantages; None disables it."""
    is_cap: float | None = 5.0
    """Cap of the token-level truncated importance weight exp(old - sampler); None disables it."""
    aggregation: str = "seq-mean-token-mean"
    """'token-mean' or 'seq-mean-token-mean' (the paper's)."""
    kl_coef: float = 0.0
    """GRPO only: coefficient of the k3 KL(pi_theta || pi_ref) loss term (verl's kl_loss_coef
    with low_var_kl; 0 = off, and the reference is then not scored)."""


def implicit_reward(teacher_logp: torch.Tensor, ref_logp: torch.Tensor, lam: float) -> torch.Tensor:
    """R_t = lambda * (log pi_star - log pi_ref), per token."""
    return lam * (teacher_logp - ref_logp)


def tilted_target(teacher_logp: torch.Tensor, ref_logp: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-position target q_t ~ pi_star^lambda * pi_ref^(1 - lambda) over the vocabulary.

    ``teacher_logp``, ``ref_logp`` [..., V]: full-vocabulary log-probs of one prefix each (same
    vocabulary, same temperature). Returns (log q [..., V], log Z [...]) in the inputs' dtype
    (pass float64 for a reference). At lambda = 1, log q = teacher_logp and log Z = 0.
    """
    if teacher_logp.shape != ref_logp.shape:
        raise ValueError(f"tilted_target: teacher_logp {tuple(teacher_logp.shape)} vs ref_logp {tuple(ref_logp.shape)}")
    g = lam * teacher_logp + (1.0 - lam) * ref_logp
    log_z = torch.logsumexp(g, dim=-1)
    return g - log_z.unsqueeze(-1), log_z


def full_vocab_token_loss(
    student_logits: torch.Tensor,
    teacher_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    lam: float,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact expectation over the next token of the per-token G-OPD objective (a reference).

    Per position t (the Rao-Blackwellised form of what the sampled advantage estimates):
        log p = log_softmax(student_logits / temperature)
        g     = lam * teacher_logp + (1 - lam) * ref_logp        (log q + log Z, tilted_target)
        L_t   = sum_v p(v) (log p(v) - g(v)) = KL(p || q) - log Z
        dL_t / dz_u = p(u) (log p(u) - g(u) - L_t),   z = student_logits / temperature
    Its expected value under y_t ~ p equals that of the sampled loss -A_t * ratio_t (ratio 1),
    and so does its gradient; minimising it drives p to q at every visited prefix.

    ``student_logits`` [..., V] raw logits (differentiable); ``teacher_logp`` / ``ref_logp``
    [..., V] full-vocabulary log-probs AT ``temperature`` (detached here). ``ref_logp`` may be None
    iff lam == 1 and ``teacher_logp`` None iff lam == 0 (its weight is then 0). Returns
    (loss [...], log_z [...]) in the promoted dtype, at least float32 (pass float64 for a
    reference); log_z is detached. Masking and aggregation are the caller's (multiply by the
    token weights).
    """
    if temperature <= 0:
        raise ValueError(f"full_vocab_token_loss: temperature must be > 0, got {temperature}")
    if ref_logp is None and lam != 1.0:
        raise ValueError(f"full_vocab_token_loss: lam={lam} needs ref_logp (None only at lam=1)")
    if teacher_logp is None and lam != 0.0:
        raise ValueError(f"full_vocab_token_loss: lam={lam} needs teacher_logp (None only at lam=0)")
    given = [x for x in (teacher_logp, ref_logp) if x is not None]  # at least one, by the above
    for name, x in (("teacher_logp", teacher_logp), ("ref_logp", ref_logp)):
        if x is not None and x.shape != student_logits.shape:
            raise ValueError(
                f"full_vocab_token_loss: {name} {tuple(x.shape)} vs student_logits {tuple(student_logits.shape)}"
            )
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, given[0].dtype), torch.float32)
    log_p = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    if teacher_logp is not None and ref_logp is not None:
        log_q, log_z = tilted_target(teacher_logp.detach().to(dtype), ref_logp.detach().to(dtype), lam)
    else:  # lam = 1 (teacher only) or lam = 0 (reference only): q is that model itself
        log_q = given[0].detach().to(dtype)
        log_z = torch.zeros(log_q.shape[:-1], dtype=dtype, device=log_q.device)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return kl - log_z, log_z


def gopd_advantage(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, ref_logp: torch.Tensor | None, lam: float
) -> torch.Tensor:
    """A_t = lambda * (t - r) - (s - r), detached. ``student_logp`` is the trainer's own log-prob.
    ``ref_logp=None`` is allowed at lambda = 1 only, where r cancels: A_t = t - s."""
    with torch.no_grad():
        if ref_logp is None:
            if lam != 1.0:
                raise ValueError(
                    f"gopd_advantage: ref_logp is needed at lambda = {lam} (it cancels only at lambda = 1)"
                )
            return teacher_logp - student_logp
        return implicit_reward(teacher_logp, ref_logp, lam) - (student_logp - ref_logp)


def sequence_advantage(
    old_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    lam: float,
    mask: torch.Tensor,
    group_size: int = 1,
) -> torch.Tensor:
    """The return-to-go advantage of objective.returns = 'sequence' (module docstring, "Returns").

    All [B, S], one row per sequence; ``mask`` marks each row's response tokens, which are
    contiguous. ``old_logp`` is pi_old (o_t); ``ref_logp`` None is allowed at lambda = 1 only.
        rho_t = lambda t_t + (1 - lambda) r_t - o_t                     (gopd_advantage)
        G_t   = sum_{k >= t, k in the response} rho_k                   (reverse cumulative sum)
        b_t   = mean of G at the same response position j = t - (row's first response index)
                over the OTHER rows of the group that have a token at position j; 0 if none
        A_t   = G_t - b_t on response tokens, 0 elsewhere                (detached, float32)
    Groups are consecutive blocks of ``group_size`` rows (one prompt's samples); group_size = 1
    means the whole batch is one group. The baseline is leave-one-out so that it depends only on
    the other rows, which are independent samples: it is not a function of y_t or any later token
    of its own row, so E[grad log pi(y_t | h_t) b_t] = 0 and the gradient stays unbiased (a mean
    that included the row itself would contain G_t / n and scale the expected gradient by
    (n - 1) / n, differently for positions that fewer rows reach).
    Computed in float64. Unbiased for the sequence objective under token-mean aggregation or
    equal lengths; seq-mean-token-mean weighs each sequence by 1 / its length, as in token mode.
    """
    if mask.shape != old_logp.shape:
        raise ValueError(f"sequence_advantage: mask {tuple(mask.shape)} vs old_logp {tuple(old_logp.shape)}")
    B, S = mask.shape
    if group_size < 1 or B % group_size:
        raise ValueError(f"sequence_advantage: {B} rows do not split into groups of {group_size}")
    with torch.no_grad():
        f64 = torch.float64
        rho = gopd_advantage(
            old_logp.to(f64), teacher_logp.to(f64), None if ref_logp is None else ref_logp.to(f64), lam
        )
        m = mask.to(torch.bool)
        lengths = m.sum(dim=1)
        start = torch.where(lengths > 0, m.to(torch.int8).argmax(dim=1), torch.zeros_like(lengths))
        pos = torch.arange(S, device=m.device)
        if not torch.equal(m, (pos >= start[:, None]) & (pos < (start + lengths)[:, None])):
            raise ValueError("sequence_advantage: each row's response tokens must be contiguous in mask")
        rho = torch.where(m, rho, torch.zeros_like(rho))
        ret = torch.flip(torch.cumsum(torch.flip(rho, [1]), dim=1), [1])  # G_t, 0 after the response
        # Align by response position j: g[b, j] = G[b, start_b + j] for j < length_b.
        L = int(lengths.max()) if B else 0
        if L == 0:
            return torch.zeros((B, S), dtype=torch.float32, device=m.device)
        j = torch.arange(L, device=m.device)
        valid = j[None, :] < lengths[:, None]
        idx = (start[:, None] + j[None, :]).clamp(max=S - 1)
        g = torch.where(valid, torch.gather(ret, 1, idx), torch.zeros((), dtype=f64, device=m.device))
        n = group_size if group_size > 1 else B
        gs, vs = g.view(-1, n, L), valid.view(-1, n, L).to(f64)
        others = vs.sum(dim=1, keepdim=True) - vs
        base = torch.where(others > 0, (gs.sum(dim=1, keepdim=True) - gs) / others.clamp(min=1.0), torch.zeros_like(gs))
        adv = ((gs - base) * vs).view(B, L)
        out = torch.zeros((B, S), dtype=f64, device=m.device).scatter_add_(1, idx, adv)
        return out.to(torch.float32)


def truncated_importance_weight(old_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float | None) -> torch.Tensor:
    """w_t = min(exp(o_t - q_t), cap), detached. ``cap=None`` turns the correction off (w = 1)."""
    if cap is None:
        return torch.ones_like(old_logp)
    with torch.no_grad():
        return torch.exp(old_logp - sampler_logp).clamp(max=cap)


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantage: torch.Tensor,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss with dual clip. Returns (loss [...], clipped bool [...])."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantage * ratio
    clipped = -advantage * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if dual_clip is not None:
        lower = -advantage * dual_clip
        dual = (advantage < 0) & (loss > lower)
        loss = torch.where(dual, lower, loss)
        was_clipped = was_clipped | dual
    return loss, was_clipped


def token_weights(
    mask: torch.Tensor,
    aggregation: str,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
) -> torch.Tensor:
    """Aggregation weights omega [B, S] so that the batch loss is sum(omega * l).

    ``mask`` [B, S] marks response tokens. ``num_tokens`` / ``num_sequences`` are the global
    normalisers when a batch is split into micro-batches or data-parallel shards (default: this
    batch's own counts), so that summing the micro-batch losses gives the full-batch loss.
    """
    mask = mask.to(torch.float32)
    if aggregation == "token-mean":
        denom = mask.sum() if num_tokens is None else torch.tensor(float(num_tokens))
        return mask / denom.clamp(min=1.0)
    if aggregation == "seq-mean-token-mean":
        lengths = mask.sum(dim=-1, keepdim=True)
        present = (lengths > 0).to(torch.float32)
        n_seq = present.sum() if num_sequences is None else torch.tensor(float(num_sequences))
        return mask / lengths.clamp(min=1.0) * present / n_seq.clamp(min=1.0)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def gopd_token_loss(
    logp: torch.Tensor,
    *,
    teacher_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    sampler_logp: torch.Tensor | None,
    old_logp: torch.Tensor | None,
    settings: LossSettings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token G-OPD loss (before aggregation), differentiable in ``logp``.

    Elementwise in every argument, so it can be evaluated on any slice of tokens (the fused
    kernels call it chunk by chunk). ``old_logp=None`` means one update per batch: o_t = s_t
    detached, the ratio is 1 and the clip never binds. ``sampler_logp=None`` disables the
    truncated importance weight. ``ref_logp=None``: lambda = 1 only (see gopd_advantage).
    Returns (loss, advantage, clipped).
    """
    old = logp.detach() if old_logp is None else old_logp
    advantage = gopd_advantage(old, teacher_logp, ref_logp, settings.lam)
    loss, clipped = clipped_policy_loss(
        logp, old, advantage, settings.clip_eps_low, settings.clip_eps_high, settings.dual_clip
    )
    if sampler_logp is not None:
        loss = loss * truncated_importance_weight(old, sampler_logp, settings.is_cap)
    return loss, advantage, clipped


def gopd_loss(
    logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    teacher_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    sampler_logp: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    settings: LossSettings | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Aggregated G-OPD loss over a [B, S] batch plus detached metrics.

    ``settings`` None: the defaults, ``LossSettings()`` (a fresh one: the dataclass is mutable).
    ``weights`` overrides the aggregation weights (e.g. computed once for the global batch with
    :func:`token_weights`); by default they come from ``mask`` and ``settings.aggregation``.
    """
    for name, other in (("teacher_logp", teacher_logp), ("ref_logp", ref_logp), ("mask", mask)):
        if other.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(other.shape)}, logp has {tuple(logp.shape)}")
    settings = LossSettings() if settings is None else settings
    omega = token_weights(mask, settings.aggregation) if weights is None else weights
    loss_tok, advantage, clipped = gopd_token_loss(
        logp,
        teacher_logp=teacher_logp,
        ref_logp=ref_logp,
        sampler_logp=sampler_logp,
        old_logp=old_logp,
        settings=settings,
    )
    loss = (omega * loss_tok).sum()
    return loss, token_metrics(logp, mask, teacher_logp, ref_logp, advantage, clipped, settings.lam)


def token_metrics(
    logp: torch.Tensor,
    mask: torch.Tensor,
    teacher_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantage: torch.Tensor,
    clipped: torch.Tensor,
    lam: float,
) -> dict[str, float]:
    """Token-mean diagnostics over the response tokens of a batch (``implicit_reward`` only when
    ``ref_logp`` is given)."""
    m = mask.to(torch.float32)
    n = m.sum().clamp(min=1.0)

    def mean(x: torch.Tensor) -> float:
        return float((x.detach().to(torch.float32) * m).sum() / n)

    out = {
        # single-sample estimate of KL(pi_theta || pi_star) per token
        "reverse_kl": mean(logp - teacher_logp),
        "implicit_reward": None if ref_logp is None else mean(implicit_reward(teacher_logp, ref_logp, lam)),
        "advantage": mean(advantage),
        "clip_frac": mean(clipped.to(torch.float32)),
        "tokens": float(n),
    }
    return {k: v for k, v in out.items() if v is not None}


# ----------------------------------------------------------------------------- GRPO

GRPO_EPS = 1e-6
"""Added to the group std, as verl."""


def grpo_advantage(rewards: torch.Tensor, group_size: int, eps: float = GRPO_EPS) -> torch.Tensor:
    """Group-normalised advantage [N] of sequence rewards [N] laid out as consecutive groups.

    Rows ``g * group_size .. (g + 1) * group_size - 1`` are the responses to prompt g.
    A_i = (R_i - mean_g) / (std_g + eps) with the sample std (Bessel-corrected), as verl's GRPO;
    a group of one gives A = R. Computed in float64, returned as float32.
    """
    if rewards.dim() != 1:
        raise ValueError(f"grpo_advantage: rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"grpo_advantage: {rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.detach().to(torch.float64).view(-1, group_size)
    if group_size == 1:
        return r.view(-1).to(torch.float32)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=True)
    return ((r - mean) / (std + eps)).view(-1).to(torch.float32)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(r - s) - (r - s) - 1, clamped to
    [-10, 10] (verl's low_var_kl); differentiable in ``logp``, >= 0, and 0 where s == r."""
    d = ref_logp - logp
    return (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)


def advantage_token_loss(
    logp: torch.Tensor,
    *,
    advantage: torch.Tensor,
    ref_logp: torch.Tensor | None,
    sampler_logp: torch.Tensor | None,
    old_logp: torch.Tensor | None,
    settings: LossSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token policy loss of a precomputed advantage (before aggregation), elementwise like
    :func:`gopd_token_loss`: GRPO's (``advantage`` = the sequence advantage of
    :func:`grpo_advantage` broadcast to its tokens) and G-OPD's with returns = 'sequence'
    (:func:`sequence_advantage`).

    The policy term is :func:`clipped_policy_loss` times the truncated IS weight, exactly as in
    G-OPD's token mode; ``settings.kl_coef * k3`` is added when ``kl_coef > 0`` (``ref_logp`` then
    required; GRPO only: config keeps kl_coef = 0 for G-OPD). Returns (loss, clipped).
    """
    old = logp.detach() if old_logp is None else old_logp
    loss, clipped = clipped_policy_loss(
        logp, old, advantage, settings.clip_eps_low, settings.clip_eps_high, settings.dual_clip
    )
    if sampler_logp is not None:
        loss = loss * truncated_importance_weight(old, sampler_logp, settings.is_cap)
    if settings.kl_coef > 0:
        if ref_logp is None:
            raise ValueError("advantage_token_loss: kl_coef > 0 needs ref_logp")
        loss = loss + settings.kl_coef * k3_kl(logp, ref_logp)
    return loss, clipped


# ----------------------------------------------------------------------------- top-k estimator

TOP_K_TAIL_FLOOR = 1e-6
"""Least tail mass used in a log: a teacher's top-k can cover all of its mass numerically (or,
served in bf16, sum to slightly more than 1)."""


def top_k_token_loss(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    lam: float,
    mask: torch.Tensor | None = None,
    tail_floor: float = TOP_K_TAIL_FLOOR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-position G-OPD loss on the teacher's top-k plus one tail bucket (estimator top_k).

    ``*_logp`` [..., K]: each model's log-probs at the same K ids per position, the teacher's
    top-k ids plus the sampled token; ``mask`` [..., K] bool marks the entries that are in K_t
    (False: a duplicate of the sampled token, or an id the student cannot produce). ``ref_logp``
    may be None iff lam == 1. Every model's vocabulary is coarsened to K_t and one tail bucket
    holding its remaining mass (1 - sum over K_t, floored at ``tail_floor`` inside a log), and on
    those |K_t| + 1 outcomes the loss is the full-vocabulary one:

        g(v) = lam * log pi_T(v) + (1 - lam) * log pi_ref(v)      v in K_t or the tail
        L_t  = sum_v p(v) (log p(v) - g(v)) = KL(p~ || q~) - log Z~      (tilted_target)

    Differentiable in ``student_logp`` (the student's tail mass is 1 - its mass on K_t). At
    lam = 1 it is the reverse KL between the coarsened distributions: never above the exact one
    (merging outcomes loses information), equal when the tail is empty or when student and
    teacher are proportional inside it. Returns (loss [...], log_z [...]).
    """
    if (ref_logp is None) and lam != 1.0:
        raise ValueError("top_k_token_loss: ref_logp is needed unless lam == 1")
    if mask is None:
        mask = torch.ones(student_logp.shape, dtype=torch.bool, device=student_logp.device)
    off = torch.tensor(-1e4, dtype=student_logp.dtype, device=student_logp.device)  # mass exp(-1e4) = 0

    def with_tail(lp: torch.Tensor) -> torch.Tensor:
        lp = torch.where(mask, lp, off)
        tail = (1.0 - torch.where(mask, lp.exp(), torch.zeros_like(lp)).sum(-1)).clamp(min=tail_floor)
        return torch.cat([lp, tail.log().unsqueeze(-1)], dim=-1)

    teacher = with_tail(teacher_logp.to(student_logp.dtype))
    ref = teacher if ref_logp is None else with_tail(ref_logp.to(student_logp.dtype))
    log_q, log_z = tilted_target(teacher, ref, lam)
    g = log_q + log_z.unsqueeze(-1)
    p_in = torch.where(mask, student_logp.exp(), torch.zeros_like(student_logp))
    p_tail = (1.0 - p_in.sum(-1)).clamp(min=0.0)
    log_p = with_tail(student_logp)
    p = torch.cat([p_in, p_tail.unsqueeze(-1)], dim=-1)
    return (p * (log_p - g)).sum(-1), log_z
