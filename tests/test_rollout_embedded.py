"""Embedded rollout engine with pure-torch stand-in models (no megatron)."""

import pytest
import torch

from gopd_mega.rollout import EmbeddedEngine, sample_tokens
from gopd_mega.rollout.base import pack_rollouts

V, PAD, EOS = 12, 0, 2


class Bigram:
    """Logits depend only on the last token: table[last]."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def next_token_logits(self, tokens, lengths):
        assert tokens.dtype == torch.int64 and lengths.dtype == torch.int64
        assert tokens.shape[1] == int(lengths.max())
        self.calls.append((tokens.clone(), lengths.clone()))
        return self.table[tokens[torch.arange(len(lengths)), lengths - 1]].float()

    def copy_weights_from(self, other):
        self.table = other.table.clone()


def random_table(seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, V, generator=g) * scale


def engine(table):
    return EmbeddedEngine(Bigram(table), pad_id=PAD, stop_ids=[EOS])


def test_greedy_is_argmax_and_stops_at_eos():
    table = torch.zeros(V, V)
    # 3 -> 5 -> 7 -> eos ; 4 -> 4 -> 4 ... (never stops)
    table[3, 5] = table[5, 7] = table[7, EOS] = 10.0
    table[4, 4] = table[6, 4] = 10.0
    eng = engine(table)
    out = eng.generate([[1, 3], [1, 6, 4]], temperature=1.0, max_new_tokens=5, greedy=True)
    assert out.response_ids(0) == [5, 7, EOS] and out.finish_reasons[0] == "stop"
    assert out.response_ids(1) == [4, 4, 4, 4, 4] and out.finish_reasons[1] == "length"
    assert out.prompt_lens.tolist() == [2, 3] and out.response_lens.tolist() == [3, 5]
    assert out.tokens.shape == (2, 8)
    assert out.tokens[0].tolist() == [1, 3, 5, 7, EOS, PAD, PAD, PAD]
    assert out.loss_mask[0].tolist() == [False, False, True, True, True, False, False, False]
    assert out.loss_mask[1].tolist() == [False] * 3 + [True] * 5
    assert (out.sampler_logp[~out.loss_mask] == 0).all()
    # finished rows are not fed to the model again
    assert [len(c[1]) for c in eng.model.calls] == [2, 2, 2, 1, 1]


def test_greedy_argmax_random_logits():
    table = random_table(1)
    out = engine(table).generate([[1]] * 3, temperature=0.7, max_new_tokens=6, greedy=True)
    for i in range(3):
        seq = out.tokens[i, :1 + out.response_lens[i]].tolist()
        for prev, nxt in zip(seq[:-1], seq[1:]):
            assert nxt == int(table[prev].argmax())


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 1.0), (1.5, 0.8)])
def test_sampler_logp_is_full_softmax_at_temperature(temperature, top_p):
    table = random_table(2)
    out = engine(table).generate([[1, 4], [1], [1, 7, 9]], temperature=temperature, top_p=top_p,
                                 max_new_tokens=8, seed=3)
    # recompute independently, in fp64, from the table and the produced tokens
    ref = torch.log_softmax(table.double() / temperature, dim=-1)
    for i in range(len(out)):
        start, n = int(out.prompt_lens[i]), int(out.response_lens[i])
        for t in range(start, start + n):
            prev, tok = int(out.tokens[i, t - 1]), int(out.tokens[i, t])
            assert out.sampler_logp[i, t].item() == pytest.approx(ref[prev, tok].item(), abs=1e-5)
        assert out.loss_mask[i].sum() == n


def test_same_seed_same_samples_different_seed_differs():
    table = random_table(3, scale=0.5)  # flat: many distinct samples
    prompts = [[1, 5]] * 8
    a = engine(table).generate(prompts, temperature=1.0, max_new_tokens=10, seed=7)
    b = engine(table).generate(prompts, temperature=1.0, max_new_tokens=10, seed=7)
    c = engine(table).generate(prompts, temperature=1.0, max_new_tokens=10, seed=8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.sampler_logp, b.sampler_logp)
    assert not torch.equal(a.tokens, c.tokens)
    assert len({tuple(a.response_ids(i)) for i in range(8)}) > 1  # rows are not copies of each other


def test_top_p_keeps_only_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.1, 0.05])
    logits = probs.log().expand(4000, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    toks, logp = sample_tokens(logits, temperature=1.0, top_p=0.75, greedy=False, generator=g)
    # nucleus for 0.75: {1 (0.5), 2 (0.3)}; renormalised 0.625 / 0.375
    assert set(toks.tolist()) == {1, 2}
    frac = (toks == 1).float().mean().item()
    assert abs(frac - 0.625) < 0.04
    assert torch.allclose(logp, probs.log()[toks], atol=1e-6)  # full-softmax log-prob, not renormalised
    # tiny top_p: only the top token
    toks, _ = sample_tokens(logits, temperature=1.0, top_p=1e-3, greedy=False, generator=g)
    assert (toks == 1).all()
    # top_p = 1: every token with mass appears, with roughly its probability
    toks, _ = sample_tokens(logits, temperature=1.0, top_p=1.0, greedy=False, generator=g)
    counts = torch.bincount(toks, minlength=5).float() / len(toks)
    assert torch.allclose(counts, probs, atol=0.03)


def test_zero_probability_tokens_never_sampled():
    logits = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")]]).expand(2000, -1).contiguous()
    toks, _ = sample_tokens(logits, temperature=1.0, top_p=1.0, greedy=False, generator=torch.Generator().manual_seed(1))
    assert set(toks.tolist()) == {0, 2}


def test_update_weights_copies_from_student():
    a, b = random_table(4), random_table(5)
    eng = engine(a)
    student = Bigram(b)
    eng.update_weights(student)
    assert torch.equal(eng.model.table, b)
    eng.update_weights(None)  # sampling from the student object itself: nothing to do
    out = eng.generate([[1]], temperature=1.0, max_new_tokens=3, greedy=True)
    assert out.response_ids(0)[0] == int(b[1].argmax())


def test_bad_inputs():
    eng = engine(random_table())
    with pytest.raises(ValueError, match="empty prompt"):
        eng.generate([[1], []], temperature=1.0, max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        eng.generate([[1]], temperature=0.0, max_new_tokens=2)
    with pytest.raises(ValueError, match="1 response tokens but 2 log-probs"):
        pack_rollouts([[1]], [[3]], [[0.0, 0.0]], ["stop"], PAD)
