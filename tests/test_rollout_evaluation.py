"""evaluate(): per-domain accuracy with an oracle stand-in model through the embedded engine."""

import math

import pytest
import torch

from gopd_mega.config import EvalConfig, RolloutConfig
from gopd_mega.data import CharTokenizer, check, make_datasets
from gopd_mega.data.synthetic import get_domain
from gopd_mega.eval.domains import answer_probability, evaluate, evaluate_config
from gopd_mega.rollout import EmbeddedEngine

TOK = CharTokenizer()


class Oracle:
    """Writes the right answer for 'add' and a wrong one (answer + 1) for 'mul', then eos."""

    def next_token_logits(self, tokens, lengths):
        logits = torch.full((len(lengths), TOK.vocab_size), -20.0)
        for i, n in enumerate(lengths.tolist()):
            text = TOK.decode(tokens[i, :n].tolist())
            prompt, done = text.split("=", 1)
            prompt += "="
            domain = "add" if "+" in prompt else "mul"
            answer = get_domain(domain).solve(prompt)
            if domain == "mul":
                answer = str(int(answer) + 1)
            nxt = TOK.encode(answer[len(done)])[0] if len(done) < len(answer) else TOK.eos_id
            logits[i, nxt] = 20.0
        return logits


def test_evaluate_accuracy_per_domain():
    _, held = make_datasets(["add", "mul"], 10, 12, seed=0)
    eng = EmbeddedEngine(Oracle(), pad_id=TOK.pad_id, stop_ids=TOK.stop_ids)
    for greedy in (True, False):
        res = evaluate(eng, held, TOK, check, greedy=greedy, temperature=1.0, max_new_tokens=8, seed=0, batch_size=5)
        assert res.accuracy == {"add": 1.0, "mul": 0.0}
        assert res.stop_rate == {"add": 1.0, "mul": 1.0}
        expected_add = sum(len(r["answer"]) + 1 for r in held["add"]) / 12
        assert res.response_len["add"] == pytest.approx(expected_add)
        assert res.mean_accuracy == 0.5
    # max_new_tokens too small: nothing is correct and nothing stops
    res = evaluate(eng, held, TOK, check, greedy=True, max_new_tokens=1, max_prompts=4)
    assert res.accuracy == {"add": 0.0, "mul": 0.0} and res.stop_rate["add"] == 0.0
    assert res.mean_response_len == 1.0


def test_evaluate_config_metrics():
    _, held = make_datasets(["add"], 10, 6, seed=1)
    eng = EmbeddedEngine(Oracle(), pad_id=TOK.pad_id, stop_ids=TOK.stop_ids)
    m = evaluate_config(eng, held, TOK, check, EvalConfig(max_prompts=3), RolloutConfig(max_new_tokens=8))
    # one naming scheme with the datasets (gopd_mega/eval/metrics.py): sampled once = avg@1 = pass@1
    assert m["eval/add/greedy"] == 1.0 and m["eval/add/avg@1"] == 1.0 and m["eval/add/pass@1"] == 1.0
    assert m["eval/add/stop_rate"] == 1.0 and "eval/add/greedy_stop_rate" in m and "eval/add/greedy_response_len" in m
    assert m["eval/mean/greedy"] == 1.0 and m["eval/mean/avg@1"] == 1.0 and "eval/mean/response_len" in m


class NoisyOracle:
    """Puts probability Q on the oracle's next token and spreads 1 - Q evenly over the rest, both for
    sampling (next_token_logits) and for scoring (logprobs): p(reference + eos) = Q ** (len + 1)."""

    Q = 0.8

    @staticmethod
    def _best(text: str) -> int:
        """The right next token of an 'add' prompt and partial answer (eos off the right path)."""
        if "=" not in text:
            return TOK.eos_id
        prompt, done = text.split("=", 1)
        answer = get_domain("add").solve(prompt + "=")
        return TOK.encode(answer[len(done)])[0] if answer.startswith(done) and len(done) < len(answer) else TOK.eos_id

    def next_token_logits(self, tokens, lengths):
        best = torch.tensor([self._best(TOK.decode(tokens[i, :n].tolist())) for i, n in enumerate(lengths.tolist())])
        logits = torch.full((len(lengths), TOK.vocab_size), math.log((1 - self.Q) / (TOK.vocab_size - 1)))
        logits[torch.arange(len(lengths)), best] = math.log(self.Q)
        return logits

    def logprobs(self, tokens, loss_mask, temperature=1.0):
        out = torch.zeros(tokens.shape)
        for j in range(1, tokens.shape[1]):
            logits = self.next_token_logits(tokens[:, :j], torch.full((len(tokens),), j)) / temperature
            out[:, j] = torch.log_softmax(logits, -1).gather(1, tokens[:, j:j + 1]).squeeze(1)
        return out * loss_mask


def test_answer_probability_is_the_expected_sampled_accuracy():
    from gopd_mega.data.synthetic import answer

    _, held = make_datasets(["add"], 10, 40, seed=2)
    model = NoisyOracle()
    exact = answer_probability(model, held, TOK, answer, max_prompts=40)
    expected = sum(NoisyOracle.Q ** (len(r["answer"]) + 1) for r in held["add"]) / 40
    assert exact.accuracy["add"] == pytest.approx(expected, rel=1e-6)  # fp32 log-probs, <= 5 tokens
    assert exact.response_len == {}
    # sampling agrees: 40 prompts x 25 draws, binomial std <= 0.016; 4 std
    eng = EmbeddedEngine(model, pad_id=TOK.pad_id, stop_ids=TOK.stop_ids)
    draws = [evaluate(eng, held, TOK, check, greedy=False, max_new_tokens=8, seed=s).accuracy["add"] for s in range(25)]
    assert sum(draws) / 25 == pytest.approx(expected, abs=4 * 0.5 / math.sqrt(1000))
    # at temperature 2 the reference is less likely; nucleus sampling is refused
    hot = answer_probability(model, held, TOK, answer, temperature=2.0).accuracy["add"]
    assert hot < exact.accuracy["add"]
    with pytest.raises(ValueError, match="top_p must be 1"):
        answer_probability(model, held, TOK, answer, top_p=0.9)


def test_evaluate_config_exact_needs_the_model():
    _, held = make_datasets(["add"], 10, 6, seed=1)
    eng = EmbeddedEngine(Oracle(), pad_id=TOK.pad_id, stop_ids=TOK.stop_ids)
    cfg = EvalConfig(max_prompts=3, exact=True, sampled=False)
    with pytest.raises(ValueError, match="eval.exact needs the model"):
        evaluate_config(eng, held, TOK, check, cfg, RolloutConfig(max_new_tokens=8))
    from gopd_mega.data.synthetic import answer

    m = evaluate_config(eng, held, TOK, check, cfg, RolloutConfig(max_new_tokens=8), model=NoisyOracle(), answer_of=answer)
    assert 0 < m["eval/add/exact"] < 1 and m["eval/add/greedy"] == 1.0 and "eval/add/avg@1" not in m
    assert m["eval/mean/exact"] == m["eval/add/exact"]
