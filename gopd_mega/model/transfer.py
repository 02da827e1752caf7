"""How one model's per-position results reach another model's ranks when the two have different
layouts: the final hidden states and the output layer a teacher or the reference hands the
student for the full-vocabulary estimator.

Every model is laid over the WHOLE world (gopd_mega.parallel: rank = tp + TP * (dp + DP * pp)), so
every rank can compute every model's row split of a batch (gopd_mega.model.batch.balance_rows is
deterministic). For a batch [N, S]:

    the student's DP rank e scores the positions G_e of its rows, on its LAST pipeline stage
    (every TP rank there holds the full [R, H_s] hidden states of its positions);
    the source model's DP rank d computed the positions F_d of its rows (its own split, of the
    rows routed to it), held by each of its last-stage TP ranks.

:func:`deliver` gives each student last-stage rank the rows F_d ∩ G_e of every source DP rank d,
point to point: from itself when it is one of the source's last-stage ranks of DP rank d, else
from that DP rank's (tp 0, last stage) rank. A rank receives only its own positions [|G_e|, H];
nothing of the size of the batch is held anywhere.

:func:`vocab_rows_on` cuts a full output-layer weight to the rows of another layout's vocabulary
partition (the student's), padded like that layout's shard; done once at build time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from gopd_mega.config import ModelConfig
from gopd_mega.model.batch import balance_rows, scored_flat_index, scoring_lengths
from gopd_mega.parallel import ModelGroups


@dataclass
class ScoredHidden:
    """Final hidden states of some scored positions of a batch, looked up by flat index."""

    flat: torch.Tensor
    """[P] ascending flat indices i * S + j into the batch's [N * S]."""
    hidden: torch.Tensor
    """[P, H] the hidden state that predicts each of those targets (after the final norm)."""

    def at(self, flat: torch.Tensor) -> torch.Tensor:
        """[R, H] the rows of ``flat`` (every one of them must be held here)."""
        flat = flat.to(self.flat.device)
        pos = torch.searchsorted(self.flat, flat)
        found = pos < self.flat.numel()
        found[found.clone()] = self.flat[pos[found]] == flat[found]
        if not bool(found.all()):
            raise RuntimeError(
                f"hidden states of positions {flat[~found][:5].tolist()} were not delivered to this rank"
            )
        return self.hidden[pos]


def coords(groups: ModelGroups, rank: int) -> tuple[int, int, int]:
    """(tp_rank, dp_rank, pp_rank) of global ``rank`` in the layout of ``groups``."""
    return rank % groups.tp, (rank // groups.tp) % groups.dp, rank // (groups.tp * groups.dp)


def dp_positions(loss_mask: torch.Tensor, dp: int, rows=None) -> list[torch.Tensor]:
    """For each DP rank of a model with ``dp`` ranks scoring batch rows ``rows`` (default all, in
    that order, as a sub-batch ``loss_mask[rows]``): the flat indices (of the FULL batch) it scores."""
    rows = torch.arange(loss_mask.shape[0]) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    shares = balance_rows(scoring_lengths(loss_mask[rows]), dp)
    return [scored_flat_index(loss_mask, rows[torch.tensor(share, dtype=torch.long)]) for share in shares]


def deliver(
    local: ScoredHidden | None,
    src: ModelGroups,
    src_flat: list[torch.Tensor],
    dst: ModelGroups,
    dst_flat: list[torch.Tensor],
    width: int,
    dtype: torch.dtype,
    device,
) -> ScoredHidden | None:
    """COLLECTIVE (every rank calls it with the same index sets). ``local``: what this rank computed
    in the source layout (its DP rank's positions, on its last stage; None elsewhere). ``src_flat``
    / ``dst_flat``: each DP rank's positions in the source / destination layout. Returns the rows
    of this rank's destination DP rank on the destination's last stage (None on other stages)."""
    me, world = dist.get_rank(), dist.get_world_size()
    _, d_me, p_src = coords(src, me)
    holds = p_src == src.pp - 1  # a source last-stage rank holds F_{d_me}

    def holder(d: int, rank: int) -> bool:
        _, dd, pp = coords(src, rank)
        return dd == d and pp == src.pp - 1

    def sender(d: int) -> int:
        return 0 + src.tp * (d + src.dp * (src.pp - 1))

    receivers = [r for r in range(world) if coords(dst, r)[2] == dst.pp - 1]
    ops, inbox = [], []
    if holds and coords(src, me)[0] == 0:  # the designated sender of F_{d_me}
        for r in receivers:
            if r == me or holder(d_me, r):
                continue  # r has these rows itself
            want = src_flat[d_me][torch.isin(src_flat[d_me], dst_flat[coords(dst, r)[1]])]
            if want.numel():
                ops.append(dist.P2POp(dist.isend, local.at(want).contiguous(), r))  # type: ignore[union-attr]  # this rank holds want
    pieces = []
    if me in receivers:
        mine = dst_flat[coords(dst, me)[1]]
        for d in range(src.dp):
            want = src_flat[d][torch.isin(src_flat[d], mine)]
            if not want.numel():
                continue
            if holds and d == d_me:
                pieces.append((want, local.at(want)))  # type: ignore[union-attr]  # this rank holds want
            else:
                buf = torch.empty(want.numel(), width, dtype=dtype, device=device)
                ops.append(dist.P2POp(dist.irecv, buf, sender(d)))
                inbox.append(buf)
                pieces.append((want, buf))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    if me not in receivers:
        return None
    if not pieces:
        return ScoredHidden(
            torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, width, dtype=dtype, device=device)
        )
    flat = torch.cat([f.to(device) for f, _ in pieces])
    hidden = torch.cat([h for _, h in pieces])
    order = flat.argsort()
    return ScoredHidden(flat[order], hidden[order])


def vocab_rows_on(full: torch.Tensor, cfg: ModelConfig, groups: ModelGroups) -> torch.Tensor:
    """Rows of ``full`` [V, H] (a model's real output-layer rows) on the vocabulary partition of
    the layout (cfg, groups): [cfg.padded_vocab / tp, H], rows past ``min(V, cfg.vocab_size)`` zero
    (the destination masks its padding rows; a source with more rows than the destination's
    vocab_size loses the ids that model cannot produce)."""
    per = cfg.padded_vocab // groups.tp
    start = groups.tp_rank * per
    stop = min(start + per, cfg.vocab_size, full.shape[0])
    out = torch.zeros(per, full.shape[1], dtype=full.dtype, device=full.device)
    if stop > start:
        out[: stop - start] = full[start:stop]
    return out
