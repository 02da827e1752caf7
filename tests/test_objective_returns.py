"""objective.returns = 'sequence': the return-to-go advantage with a leave-one-out baseline
(objective.sequence_advantage) and where each mode's updates converge (token: the per-token
target q_t at every prefix; sequence: pi* ~ pi_T^lam pi_ref^(1-lam) over whole responses)."""

from __future__ import annotations

import itertools

import pytest
import torch

from gopd_mega.objective import clipped_policy_loss, gopd_advantage, sequence_advantage, tilted_target


# ----------------------------------------------------------------------------- a. against a loop

def _ragged_batch(B, S, seed):
    g = torch.Generator().manual_seed(seed)
    o, t, r = (-3.0 * torch.rand(B, S, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        start = int(torch.randint(1, 4, (), generator=g))
        length = int(torch.randint(0 if b == 1 else 1, S - start + 1, (), generator=g))  # row 1 may be empty
        mask[b, start:start + length] = True
    return o, t, r, mask


def _loop_advantage(o, t, r, lam, mask, group_size):
    """The definition, written out element by element in float64."""
    B, S = mask.shape
    rows = []
    for b in range(B):
        pos = [i for i in range(S) if mask[b, i]]
        rho = [lam * float(t[b, i]) + (1 - lam) * (0.0 if r is None else float(r[b, i])) - float(o[b, i]) for i in pos]
        rows.append([sum(rho[j:]) for j in range(len(rho))])  # G by response position j
    out = torch.zeros(B, S, dtype=torch.float64)
    n = group_size if group_size > 1 else B
    for b in range(B):
        first = b // n * n
        pos = [i for i in range(S) if mask[b, i]]
        for j, i in enumerate(pos):
            others = [rows[c][j] for c in range(first, first + n) if c != b and len(rows[c]) > j]
            base = sum(others) / len(others) if others else 0.0
            out[b, i] = rows[b][j] - base
    return out


@pytest.mark.parametrize("lam, group_size, with_ref", [(1.0, 1, True), (1.0, 2, True), (1.5, 1, True), (1.5, 2, True),
                                                       (1.0, 1, False), (1.0, 2, False)])
def test_sequence_advantage_matches_a_loop(lam, group_size, with_ref):
    o, t, r, mask = _ragged_batch(8, 11, seed=int(lam * 10) + group_size)
    ref = r if with_ref else None
    got = sequence_advantage(o, t, ref, lam, mask, group_size)
    want = _loop_advantage(o, t, ref, lam, mask, group_size)
    assert got.dtype == torch.float32 and not got.requires_grad
    assert (got[~mask] == 0).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_sequence_advantage_by_hand():
    """Two rows, one group, lam = 1, o = 0: rho = t. Row 0 (prompt at 0) rho = [1, 2] -> G = [3, 2];
    row 1 rho = [4] -> G = [4]. Leave-one-out: row 0 position 0 minus row 1's 4, position 1 has
    no other row (b = 0); row 1 minus row 0's 3."""
    t = torch.tensor([[9.0, 1.0, 2.0], [9.0, 4.0, 9.0]])
    mask = torch.tensor([[False, True, True], [False, True, False]])
    got = sequence_advantage(torch.zeros(2, 3), t, None, 1.0, mask, group_size=2)
    assert got.tolist() == [[0.0, -1.0, 2.0], [0.0, 1.0, 0.0]]
    # group_size 1 makes the whole batch one group: the same here; two prompts: each group on its own
    assert sequence_advantage(torch.zeros(2, 3), t, None, 1.0, mask, group_size=1).tolist() == got.tolist()
    two = torch.cat([t, t]), torch.cat([mask, mask])
    assert sequence_advantage(torch.zeros(4, 3), two[0], None, 1.0, two[1], group_size=2).tolist() == got.tolist() * 2


def test_sequence_advantage_refusals():
    o, t, r, mask = _ragged_batch(4, 8, seed=0)
    with pytest.raises(ValueError, match="ref_logp is needed"):
        sequence_advantage(o, t, None, 1.5, mask)
    with pytest.raises(ValueError, match="groups of 3"):
        sequence_advantage(o, t, r, 1.5, mask, group_size=3)
    holes = mask.clone()
    holes[0] = False
    holes[0, 1] = holes[0, 3] = True
    with pytest.raises(ValueError, match="contiguous"):
        sequence_advantage(o, t, r, 1.5, holes)
