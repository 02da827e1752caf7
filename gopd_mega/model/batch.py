"""How a batch is packed: padding-free micro-batches cut by a token budget, balanced over DP.

The public model API takes right-padded [N, S] tensors (tokens, loss_mask). Inside, each DP rank
gets a share of the rows balanced by tokens, and packs them back to back, without padding, into
micro-batches of at most ``max_tokens`` positions each:

    row i is scored at j where loss_mask[i, j] == 1 and j >= 1 (the target tokens[i, j] is predicted
    by the hidden state of position j - 1); it needs the input tokens[i, :L_i] with
    L_i = max{j : loss_mask[i, j] == 1, j >= 1}  (rows with no such j need no forward at all)

A micro-batch of sequences (rows r_0 .. r_{k-1}) is one packed row of T = sum L_r positions:
    tokens        [1, T]  the sequences back to back
    position_ids  [1, T]  0 .. L_r - 1 for each sequence (RoPE positions restart)
    cu_seqlens    [k + 1] int32 offsets of the sequences (TE THD: PackedSeqParams)
    attention     block-diagonal causal: position t attends to t' iff same sequence and t' <= t
                  (local spec: a [1, 1, T, T] bool mask, True = masked out)
    score_pos     [R] packed positions whose hidden state is scored (only response targets)
    targets       [R] the target token ids;  flat_index [R] = i * S + j into the full [N * S]

Cutting: DP shares are formed longest-first, each row to the least-loaded DP rank (tokens); each
share is cut first-fit-decreasing into micro-batches of <= max_tokens positions (and optionally
<= max_rows sequences). A sequence longer than the budget runs alone: never dropped. With
``multiple`` > 1 (sequence parallelism: T must divide by TP) a micro-batch is padded at the end
by a dummy segment that attends only to itself and is never scored; the budget counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MicroBatch:
    """One packed row of sequences (module docstring: shapes and meaning)."""

    rows: torch.Tensor
    """[k] full-batch row indices of the packed sequences, in packing order."""
    tokens: torch.Tensor
    """[1, T] packed input token ids."""
    position_ids: torch.Tensor
    """[1, T] position of each token inside its own sequence."""
    cu_seqlens: torch.Tensor
    """[k + 1] (or [k + 2] with a padding segment) int32 segment offsets, last = T."""
    score_pos: torch.Tensor
    """[R] packed positions whose final hidden state is scored."""
    targets: torch.Tensor
    """[R] target token ids of the scored positions (empty for next-token logits)."""
    flat_index: torch.Tensor
    """[R] where each score goes: i * S + j into the full batch's [N * S] (next-token: row i)."""

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[1])

    def attention_mask(self, device) -> torch.Tensor:
        """[1, 1, T, T] bool, True = masked out: other sequences and the future."""
        seg = torch.repeat_interleave(
            torch.arange(len(self.cu_seqlens) - 1), (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        )
        t = torch.arange(self.num_tokens)
        mask = (seg[:, None] != seg[None, :]) | (t[None, :] > t[:, None])
        return mask[None, None].to(device)

    def lengths(self) -> torch.Tensor:
        """[k'] long: the length of each segment (the sequences, then any padding segment)."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same sequences as a right-padded batch, one per row (the layout where each sequence
        attends only to itself under a plain causal mask, k * L^2 attention scores instead of T^2):
        (tokens [k, L] long (0 after each sequence), score_index [R]: where each scored position's
        hidden state sits in the model's [L, k, H] output flattened to [L * k, H], in score_pos
        order). L = the longest segment."""
        lens = self.lengths()
        k, L = len(lens), int(lens.max())
        seg = torch.repeat_interleave(torch.arange(k), lens)
        off = torch.arange(self.num_tokens) - self.cu_seqlens[:-1].long()[seg]
        tokens = self.tokens.new_zeros(k, L)
        tokens[seg, off] = self.tokens[0]
        return tokens, off[self.score_pos] * k + seg[self.score_pos]

    def packed_seq_params(self, device):
        """megatron PackedSeqParams for Transformer Engine's THD attention (GPU path)."""
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = self.cu_seqlens.to(device=device, dtype=torch.int32)
        longest = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())
        return PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
        )


def scoring_lengths(loss_mask: torch.Tensor) -> torch.Tensor:
    """[N] input length each row needs: the last scored position j (loss_mask == 1, j >= 1), or
    0 when the row scores nothing."""
    m = loss_mask.bool().clone()
    m[:, 0] = False
    j = torch.arange(m.shape[1]).expand_as(m)
    return (
        torch.where(m, j, torch.zeros_like(j)).amax(dim=1) if m.shape[1] else torch.zeros(m.shape[0], dtype=torch.long)
    )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def balance_rows(lengths: torch.Tensor, parts: int) -> list[list[int]]:
    """Rows with length > 0 split into ``parts`` shares of nearly equal token totals: longest
    first, each to the least-loaded share (lowest index on ties). Deterministic: every rank
    computes the same split. Each share is listed longest first."""
    order = sorted((i for i in range(len(lengths)) if lengths[i] > 0), key=lambda i: (-int(lengths[i]), i))
    loads = [0] * parts
    shares: list[list[int]] = [[] for _ in range(parts)]
    for i in order:
        p = min(range(parts), key=lambda q: (loads[q], q))
        shares[p].append(i)
        loads[p] += int(lengths[i])
    return shares


def cut_micro_batches(
    rows: list[int], lengths: torch.Tensor, max_tokens: int, max_rows: int | None = None, multiple: int = 1
) -> list[list[int]]:
    """First-fit-decreasing: ``rows`` into bins of <= max_tokens positions (rounded up to
    ``multiple``) and <= max_rows rows. A row longer than the budget gets a bin of its own."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_micro_batch must be >= 1, got {max_tokens}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"micro_batch_size (rows per micro-batch) must be >= 1, got {max_rows}")
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(rows, key=lambda r: (-int(lengths[r]), r)):
        n = int(lengths[i])
        for b in range(len(bins)):
            if _round_up(loads[b] + n, multiple) <= max_tokens and (max_rows is None or len(bins[b]) < max_rows):
                bins[b].append(i)
                loads[b] += n
                break
        else:
            bins.append([i])
            loads.append(n)
    return bins


def _pack(tokens: torch.Tensor, lengths: torch.Tensor, rows: list[int], multiple: int):
    """Packed [1, T] tokens and positions, segment offsets, and each row's start offset."""
    lens = [int(lengths[i]) for i in rows]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    total = starts[-1]
    pad = _round_up(total, multiple) - total
    ids = torch.cat([tokens[i, :n] for i, n in zip(rows, lens)] + [tokens.new_zeros(pad)])
    pos = torch.cat([torch.arange(n) for n in lens] + [torch.arange(pad)])
    cu = torch.tensor(starts + ([total + pad] if pad else []), dtype=torch.int32)
    return ids[None].long(), pos[None], cu, starts[:-1]


def scoring_micro_batches(
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    dp: int,
    dp_rank: int,
    max_tokens: int,
    max_rows: int | None = None,
    multiple: int = 1,
) -> list[MicroBatch]:
    """This DP rank's packed micro-batches for log-probs / training: every response token (loss
    mask 1, j >= 1) of the full [N, S] batch is scored by exactly one DP rank."""
    if tokens.shape != loss_mask.shape or tokens.dim() != 2:
        raise ValueError(f"tokens {tuple(tokens.shape)} and loss_mask {tuple(loss_mask.shape)} must both be [N, S]")
    S = tokens.shape[1]
    lengths = scoring_lengths(loss_mask)
    scored = loss_mask.bool().clone()
    scored[:, 0] = False
    out = []
    for rows in cut_micro_batches(balance_rows(lengths, dp)[dp_rank], lengths, max_tokens, max_rows, multiple):
        ids, pos, cu, starts = _pack(tokens, lengths, rows, multiple)
        score_pos, targets, flat = [], [], []
        for i, s in zip(rows, starts):
            j = scored[i].nonzero().flatten()  # 1 <= j <= L_i
            score_pos.append(s + j - 1)
            targets.append(tokens[i, j])
            flat.append(i * S + j)
        out.append(
            MicroBatch(
                torch.tensor(rows), ids, pos, cu, torch.cat(score_pos), torch.cat(targets).long(), torch.cat(flat)
            )
        )
    return out


def last_token_micro_batches(
    tokens: torch.Tensor, lengths: torch.Tensor, dp: int, dp_rank: int, max_tokens: int, multiple: int = 1
) -> list[MicroBatch]:
    """This DP rank's packed micro-batches scoring the last input position of each row
    (tokens[i, :lengths[i]]); flat_index is the row."""
    lengths = torch.as_tensor(lengths).long().cpu()
    if lengths.shape != tokens.shape[:1] or (lengths < 1).any() or (lengths > tokens.shape[1]).any():
        raise ValueError(
            f"lengths must be [N={tokens.shape[0]}] with values in 1..{tokens.shape[1]}, got {lengths.tolist()}"
        )
    out = []
    for rows in cut_micro_batches(balance_rows(lengths, dp)[dp_rank], lengths, max_tokens, None, multiple):
        ids, pos, cu, starts = _pack(tokens, lengths, rows, multiple)
        last = torch.tensor([s + int(lengths[i]) - 1 for i, s in zip(rows, starts)])
        out.append(
            MicroBatch(torch.tensor(rows), ids, pos, cu, last, torch.zeros(0, dtype=torch.long), torch.tensor(rows))
        )
    return out


def scored_flat_index(loss_mask: torch.Tensor, rows) -> torch.Tensor:
    """[P] ascending flat indices i * S + j (into the [N * S] batch ``loss_mask`` belongs to) of the
    scored positions (loss_mask 1, j >= 1) of batch rows ``rows``."""
    S = loss_mask.shape[1]
    rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    scored = loss_mask[rows].bool().clone()
    if scored.numel():
        scored[:, 0] = False
    i, j = scored.nonzero(as_tuple=True)
    return (rows[i] * S + j).sort().values
