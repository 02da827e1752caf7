"""The targets G-OPD trains towards, computed exactly: what a student at lambda could reach.

For a prompt x routed to teacher pi_T, with reference pi_ref, all at the rollout temperature
(objective.py's notation; g_t(v) = lam log pi_T(v | h_t) + (1 - lam) log pi_ref(v | h_t)):

- The PER-TOKEN target (the fixed point of the paper's advantage, objective.returns = 'token'):
      q(y | x)   = prod_t q_t(y_t | h_t),   q_t = exp(g_t - log Z_t),   log Z_t = logsumexp_v g_t(v)
  Its accuracy on a reference answer y* (answer tokens, then eos) is q(y* | x): one teacher-forced
  forward of the teacher and of the reference with every vocabulary entry scored at the answer's
  positions (:func:`per_token_target`). Exact for any task with one reference answer.
- The SEQUENCE-LEVEL target (objective.returns = 'sequence'; the optimum the paper states):
      pi*(y | x) = W(y) / Z(x),   W(y) = pi_T(y | x)^lam pi_ref(y | x)^(1 - lam),   Z(x) = sum_y W(y)
  over every response y (up to max_new_tokens tokens, ended by a stop token or the limit).
  Z(x) satisfies the soft-Bellman recursion
      Z(h) = sum_v w(v | h) * (1 if v stops or h v reaches the limit, else Z(h v)),   w = exp(g)
  over the response tree (:func:`sequence_target`). With V tokens and L steps the tree has about
  V^(L-1) inner prefixes (44^4 = 3.7 M for the demo's tasks), too many for a CPU, so the recursion
  runs over a beam: at each depth the ``beam`` prefixes of largest weight (the max over the lambdas
  asked and lambda = 1, so the teacher's likely responses are kept too) plus the reference
  answer's own prefix. Every W is positive, so the weight summed over the enumerated responses is
  a LOWER bound on Z(x), and W(y*) / Z_enumerated an UPPER bound on the target's accuracy, exact
  when the beam holds the whole tree. The returned coverage (the teacher's and the reference's
  probability mass of the enumerated responses: Z at lambda = 1 and 0) says how much of the tree
  the beam saw. For lambda > 1 no finite search can bound Z from above in general: a response the
  reference finds far less likely than the teacher has an unbounded weight (the extrapolation
  cliff), which is why the bound is one-sided.
- The mean log Z (per token along the answer: mean log Z_t; per sequence: log Z(x)) is the
  extrapolation diagnostic: it is 0 at lambda = 1 and grows with lambda where the teacher's log
  ratio to the reference is large on rare tokens.

Models are :class:`gopd_mega.models.ShardedGPT` (``logprobs_at``, ``next_token_logits``); every
function here is collective like those (every rank calls it with the same arguments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gopd_mega.objective import tilted_target


@dataclass
class PerTokenTarget:
    """Per prompt [N]: log q(y* | x) of the per-token target, and the mean log Z_t over the
    answer's positions, per lambda (dict keyed by lambda)."""

    log_prob: dict[float, torch.Tensor]
    mean_log_z: dict[float, torch.Tensor]

    def accuracy(self, lam: float) -> float:
        """Expected accuracy of sampling from the target: mean over prompts of q(y* | x)."""
        return float(self.log_prob[lam].exp().mean())


def full_vocab_logprobs(model, tokens: torch.Tensor, loss_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 [N, S, V] log p(v | tokens[i, :j]) for every real id v at the scored positions j
    (loss_mask; 0 elsewhere). Materialises [N, S, V]: meant for small vocabularies or batches."""
    n, s = tokens.shape
    ids = torch.arange(model.cfg.vocab_size).expand(n, s, -1)
    return model.logprobs_at(tokens, loss_mask, ids, temperature)


def per_token_target(
    teacher, reference, tokens: torch.Tensor, loss_mask: torch.Tensor, lams: list[float], temperature: float = 1.0
) -> PerTokenTarget:
    """The per-token target's probability of each row's answer.

    ``tokens`` [N, S] = [bos] prompt answer [eos] (``data.prompts.sft_batch``), ``loss_mask``
    [N, S] on the answer and eos. ``teacher`` scores every row (route rows to their teacher
    before calling), ``reference`` is pi_ref. One teacher-forced forward of each model."""
    mask = loss_mask.clone()
    mask[:, 0] = False
    lp_t = full_vocab_logprobs(teacher, tokens, mask, temperature).double()
    lp_r = full_vocab_logprobs(reference, tokens, mask, temperature).double()
    m = mask.double()
    n_pos = m.sum(1).clamp(min=1)
    nxt = tokens.clamp(min=0).unsqueeze(-1)
    log_prob, mean_log_z = {}, {}
    for lam in lams:
        log_q, log_z = tilted_target(lp_t, lp_r, lam)
        log_prob[lam] = (log_q.gather(-1, nxt).squeeze(-1) * m).sum(1)
        mean_log_z[lam] = (log_z * m).sum(1) / n_pos
    return PerTokenTarget(log_prob, mean_log_z)


@dataclass
class SequenceTarget:
    """Per prompt [N], per lambda: log W(y*) and log Z_enumerated (a lower bound of log Z(x));
    ``coverage_teacher`` / ``coverage_reference`` [N]: each model's probability mass of the
    enumerated responses; ``exact`` [N] bool: the beam held the whole tree."""

    log_w_answer: dict[float, torch.Tensor]
    log_z: dict[float, torch.Tensor]
    coverage_teacher: torch.Tensor
    coverage_reference: torch.Tensor
    exact: torch.Tensor

    def accuracy_upper(self, lam: float) -> float:
        """Mean over prompts of W(y*) / Z_enumerated: an upper bound on the target's expected
        accuracy (exact where ``exact``)."""
        return float((self.log_w_answer[lam] - self.log_z[lam]).exp().mean())

    def mean_log_z(self, lam: float) -> float:
        """Mean over prompts of log Z_enumerated: a lower bound on the mean log Z(x)."""
        return float(self.log_z[lam].mean())


def _next_logprobs(model, prefixes: list[list[int]], temperature: float) -> torch.Tensor:
    """float64 [n, V] log p(. | prefix) for each token list in ``prefixes``."""
    lengths = torch.tensor([len(p) for p in prefixes])
    tokens = torch.zeros(len(prefixes), int(lengths.max()), dtype=torch.long)
    for i, p in enumerate(prefixes):
        tokens[i, : len(p)] = torch.tensor(p)
    logits = model.next_token_logits(tokens, lengths).double()
    return torch.log_softmax(logits / temperature, dim=-1)


def sequence_target(
    teacher,
    reference,
    prompts: list[list[int]],
    answers: list[list[int]],
    lams: list[float],
    *,
    stop_ids: list[int],
    max_new_tokens: int,
    beam: int,
    temperature: float = 1.0,
) -> SequenceTarget:
    """The sequence-level target over the response tree, by a beam of the soft-Bellman recursion.

    ``prompts``: each row's context ([bos] + prompt ids); ``answers``: its reference response
    (answer ids then a stop id, at most ``max_new_tokens`` long). ``teacher`` scores every row.
    At each depth, the ``beam`` inner prefixes of each row with the largest max-over-lambdas
    weight are expanded (the answer's prefix always): one forward of each model per expanded
    prefix. A response ends at a stop id or at ``max_new_tokens`` tokens, as the rollout engine's.
    """
    if beam < 1 or max_new_tokens < 1:
        raise ValueError(f"sequence_target: need beam >= 1 and max_new_tokens >= 1, got {beam}, {max_new_tokens}")
    for i, a in enumerate(answers):
        if not a or a[-1] not in stop_ids or len(a) > max_new_tokens or any(t in stop_ids for t in a[:-1]):
            raise ValueError(
                f"sequence_target: answer {i} must be tokens then one stop id, at most {max_new_tokens} long, got {a}"
            )
    n = len(prompts)
    all_lams = sorted(set(lams) | {0.0, 1.0})
    lam_t = torch.tensor(all_lams, dtype=torch.float64)  # [K]
    stop = torch.zeros(teacher.cfg.vocab_size, dtype=torch.bool)
    stop[stop_ids] = True
    log_z = torch.full((n, len(all_lams)), -math.inf, dtype=torch.float64)
    log_w_answer = torch.full((n, len(all_lams)), -math.inf, dtype=torch.float64)
    # the frontier: (row, response prefix, log pi_T(prefix), log pi_ref(prefix))
    frontier: list[tuple[int, list[int], float, float]] = [(i, [], 0.0, 0.0) for i in range(n)]
    complete = torch.ones(n, dtype=torch.bool)  # no prefix of this row was left out of the beam
    for depth in range(max_new_tokens):
        contexts = [prompts[i] + resp for i, resp, _, _ in frontier]
        lp_t = _next_logprobs(teacher, contexts, temperature)
        lp_r = _next_logprobs(reference, contexts, temperature)
        base_t = torch.tensor([f[2] for f in frontier], dtype=torch.float64)
        base_r = torch.tensor([f[3] for f in frontier], dtype=torch.float64)
        # log W of every child, per lambda: [n_frontier, V, K]
        cum_t = (base_t[:, None] + lp_t)[..., None]
        cum_r = (base_r[:, None] + lp_r)[..., None]
        log_w = lam_t * cum_t + (1.0 - lam_t) * cum_r
        last = depth + 1 == max_new_tokens
        ends = stop.expand_as(lp_t) | last  # children that are whole responses
        rows = torch.tensor([f[0] for f in frontier])
        ended = torch.where(ends[..., None], log_w, torch.full_like(log_w, -math.inf)).logsumexp(1)  # [n_frontier, K]
        for j, (i, resp, _, _) in enumerate(frontier):
            log_z[i] = torch.logaddexp(log_z[i], ended[j])
            a = answers[i]
            if resp == a[:depth] and len(a) == depth + 1:  # on the answer's path, and the answer ends here
                log_w_answer[i] = log_w[j, a[depth]]
        if last:
            break
        # the next frontier: per row, the beam best inner children (and the answer's prefix)
        score = log_w.max(-1).values.masked_fill(ends, -math.inf)  # [n_frontier, V]
        nxt = []
        for i in range(n):
            js = (rows == i).nonzero().flatten()
            if len(js) == 0:
                continue
            cand = score[js].flatten()
            finite = int(torch.isfinite(cand).sum())
            keep = set(cand.topk(min(beam, finite)).indices.tolist()) if finite else set()
            complete[i] &= finite <= beam
            a = answers[i]
            if depth + 1 < len(a):  # force the answer's next prefix into the beam
                for j_local, j in enumerate(js.tolist()):
                    if frontier[j][1] == a[:depth]:
                        keep.add(j_local * lp_t.shape[1] + a[depth])
            V = lp_t.shape[1]
            for flat in sorted(keep):
                j = int(js[flat // V])
                v = flat % V
                _, resp, _, _ = frontier[j]
                nxt.append((i, [*resp, v], float(base_t[j] + lp_t[j, v]), float(base_r[j] + lp_r[j, v])))
        frontier = nxt
        if not frontier:
            break
    idx = {lam: all_lams.index(lam) for lam in all_lams}
    return SequenceTarget(
        log_w_answer={lam: log_w_answer[:, idx[lam]] for lam in lams},
        log_z={lam: log_z[:, idx[lam]] for lam in lams},
        coverage_teacher=log_z[:, idx[1.0]].exp(),
        coverage_reference=log_z[:, idx[0.0]].exp(),
        exact=complete,
    )
