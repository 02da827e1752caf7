"""evaluate(): per-domain accuracy with an oracle stand-in model through the embedded engine."""

import pytest
import torch

from gopd_mega.config import EvalConfig, RolloutConfig
from gopd_mega.data import CharTokenizer, check, make_datasets
from gopd_mega.data.synthetic import get_domain
from gopd_mega.evaluation import evaluate, evaluate_config
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
    assert m["eval/greedy/add/acc"] == 1.0 and m["eval/sampled/add/acc"] == 1.0
    assert "eval/sampled/mean_response_len" in m and "eval/greedy/add/stop_rate" in m
