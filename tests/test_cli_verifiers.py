"""gopd-train with a dataset file and a verifier: GRPO rewards from MathVerifier, periodic
evaluation of held-out records, and the data.verifier / tests_field / eval fields' errors.

The student is a tiny random Qwen3 whose word-level tokenizer (built here, nothing downloaded)
has '\\boxed{0}' ... '\\boxed{2}' as single tokens, so sampled responses often contain a boxed
answer and some of them are right: the rewards are not all zero.
"""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from gopd_mega.config import ConfigError, RunConfig, build_config

WORDS = ["What", "is", "plus", "?"] + [str(i) for i in range(10)] + [f"\\boxed{{{i}}}" for i in range(3)]
SPECIALS = ["<pad>", "<|endoftext|>", "<unk>"]
GRPO = {"objective": {"kind": "grpo"}, "rollout": {"samples_per_prompt": 2}}


def _student(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gopd_mega.hf.testing import tiny_hf_model

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(directory)
    tiny_hf_model("qwen3", directory, vocab_size=len(vocab), max_position_embeddings=64)
    return directory


def _math_rows(n):
    rows = []
    for i in range(n):
        a, b = i % 2, (i // 2) % 2  # answers 0..2: a boxed token is right about 1 time in 3
        rows.append({"question": f"What is {a} plus {b} ?", "final": str(a + b)})
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_grpo_on_a_math_dataset_rewards_from_math_verifier(tmp_path, monkeypatch):
    from gopd_mega import cli
    from gopd_mega.verify import MathVerifier

    student = _student(tmp_path / "student")
    data = _write_jsonl(tmp_path / "train.jsonl", _math_rows(8))
    held = _write_jsonl(tmp_path / "held.jsonl", _math_rows(3))
    calls: list[tuple[dict, str, float]] = []
    original = MathVerifier.__call__

    def counting(self, record, response):
        verdict = original(self, record, response)
        calls.append((dict(record), response, verdict.reward))
        return verdict

    monkeypatch.setattr(MathVerifier, "__call__", counting)
    out = tmp_path / "run"
    cli.main(["--recipe", str(_recipe(tmp_path, student, data)), f"train.out_dir={out}",
              f"data.eval_source={held}", "data.verifier=math", "train.eval_every=1", "eval.max_prompts=2"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["phase"] == "train"]
    evals = [r for r in rows if r["phase"] == "eval"]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [1, 2]
    # 2 steps x 2 prompts x 4 samples rewards, then each evaluation's 2 prompts x 1 sample
    # (training_evaluator judges through MathVerifier.batch, not __call__: not counted here).
    assert len(calls) == 2 * 2 * 4
    for step, r in enumerate(train):
        step_calls = calls[step * 8:(step + 1) * 8]
        assert all(rec["final"] for rec, _, _ in step_calls)  # the gold came from data.answer_field
        want = sum(rw for _, _, rw in step_calls) / 8
        assert r["reward_mean"] == pytest.approx(want, abs=1e-6)  # float32 mean of 0/1 values
    # an independent MathVerifier agrees with every reward that was used
    fresh = MathVerifier(answer_field="final")
    try:
        for rec, response, rw in calls:
            assert original(fresh, rec, response).reward == rw, response
    finally:
        fresh.close()
    # the random student writes boxed numbers, some right: the check above is not all zeros
    assert any(rw == 1.0 for _, _, rw in calls) and any(rw == 0.0 for _, _, rw in calls)
    for r in evals:
        assert 0.0 <= r["eval/math/avg@1"] <= 1.0 and "eval/math/stop_rate" in r and "eval/mean/avg@1" in r


def test_auto_verifier_and_holdout_through_the_cli(tmp_path, capsys):
    """data.verifier auto reads the route column ('math'); eval_holdout keeps 2 records out of
    training and evaluates them every 2 steps and after the last (step 3)."""
    from gopd_mega import cli

    student = _student(tmp_path / "student")
    rows = [dict(r, domain="math") for r in _math_rows(6)]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    cli.main(["--recipe", str(_recipe(tmp_path, student, data)), f"train.out_dir={out}", "data.teacher_field=domain",
              "data.eval_holdout=2", "train.eval_every=2", "train.steps=3"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in rows] == [("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("eval", 3)]
    assert "reward_mean" in rows[0] and "eval/math/avg@1" in rows[2]
    printed = capsys.readouterr().out
    assert "prompt filter: kept 4/4" in printed and "evaluation set math: 2 records" in printed


def _recipe(tmp_path, student, data, extra=""):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
student: {{load: {student}}}
objective: {{kind: grpo, kl_coef: 0.0}}
rollout: {{max_new_tokens: 4, samples_per_prompt: 4}}
optim: {{lr: 1.0e-3}}
data: {{source: {data}, prompt_field: question, answer_field: final, max_prompt_len: 16{extra}}}
train: {{steps: 2, prompts_per_step: 2, progress: false, out_dir: {tmp_path / 'run'}}}
""")
    return recipe


class _CodePoints:
    """A tokenizer of Unicode code points (any text round-trips), no bos."""

    bos_id = None

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_auto_routes_math_and_code_records(tmp_path):
    """'auto' picks the verifier from the route field; unrouted records fail GRPO with the record
    and the field named; the reward of a right / wrong boxed answer is 1 / 0."""
    from gopd_mega.data.prompts import DataError, PromptDataset
    from gopd_mega.run import RecordVerifiers, dataset_reward

    data = _write_jsonl(tmp_path / "d.jsonl", [{"q": "1+1", "a": "2", "r": "math"}])
    cfg = build_config(RunConfig, {"data": {"source": str(data), "prompt_field": "q", "answer_field": "a", "teacher_field": "r",
                                 "code_isolation": False},
                        "objective": {"kind": "grpo"}, "rollout": {"samples_per_prompt": 2}})
    tok = _CodePoints()
    records = [{"q": "1+1", "a": "2", "r": "math"},
               {"q": "print", "a": json.dumps([{"stdin": "", "expected_stdout": "7"}]), "r": "code"}]
    verifiers = RecordVerifiers(cfg.data)
    try:
        assert [verifiers.kind(r) for r in records] == ["math", "code"]
        ds = PromptDataset(records, tok, max_prompt_len=16, prompt_field="q", answer_field="a", teacher_field="r")
        reward = dataset_reward(cfg, records, ds, tok, verifiers)
        right, wrong = tok.encode("so \\boxed{2}"), tok.encode("\\boxed{3}")
        assert reward(ds[0], right) == 1.0 and reward(ds[0], wrong) == 0.0
        assert reward(ds[1], tok.encode("```python\nprint(7)\n```")) == 1.0
        assert reward(ds[1], tok.encode("print(8)")) == 0.0
        stray = records + [{"q": "x", "a": "1", "r": "chat"}]
        ds = PromptDataset(stray, tok, max_prompt_len=16, prompt_field="q", answer_field="a", teacher_field="r")
        with pytest.raises(DataError, match=r"record 2: no verifier for its route 'chat'.*data.verifier"):
            dataset_reward(cfg, stray, ds, tok, verifiers)
        bad = [{"q": "x", "a": "not json", "r": "code"}]
        ds = PromptDataset(bad, tok, max_prompt_len=16, prompt_field="q", answer_field="a", teacher_field="r")
        with pytest.raises(DataError, match=r"record 0: field 'a': tests are a string but not JSON"):
            dataset_reward(cfg, bad, ds, tok, verifiers)
    finally:
        verifiers.close()


def test_code_reward_through_the_trainer_path_with_isolation(tmp_path):
    """The GRPO reward of a code record, with the sandbox's isolation on (the default): programs run
    in their own namespaces and the verdicts match the tests."""
    from gopd_mega.data.prompts import PromptDataset
    from gopd_mega.run import RecordVerifiers, dataset_reward
    from gopd_mega.verify import sandbox

    why = sandbox.isolation_error()
    if why:
        pytest.skip(f"no sandbox isolation here: {why}")
    tests = json.dumps([{"stdin": "3\n", "expected_stdout": "9"}, {"stdin": "4\n", "expected_stdout": "16"}])
    records = [{"q": "square", "a": tests, "r": "code"}]
    data = _write_jsonl(tmp_path / "d.jsonl", records)
    cfg = build_config(RunConfig, {"data": {"source": str(data), "prompt_field": "q", "answer_field": "a", "teacher_field": "r"},
                                   "objective": {"kind": "grpo"}, "rollout": {"samples_per_prompt": 2}})
    assert cfg.data.code_isolation
    tok = _CodePoints()
    verifiers = RecordVerifiers(cfg.data)
    try:
        ds = PromptDataset(records, tok, max_prompt_len=16, prompt_field="q", answer_field="a", teacher_field="r")
        reward = dataset_reward(cfg, records, ds, tok, verifiers)
        assert reward(ds[0], tok.encode("```python\nn = int(input())\nprint(n * n)\n```")) == 1.0
        assert reward(ds[0], tok.encode("```python\nprint(9)\n```")) == 0.0  # passes one test of two
        assert reward(ds[0], tok.encode("```python\nimport socket\nsocket.create_connection(('127.0.0.1', 9))\n```")) == 0.0
    finally:
        verifiers.close()


def test_code_verification_without_isolation_is_a_config_error(tmp_path, monkeypatch):
    from gopd_mega.run import RecordVerifiers
    from gopd_mega.verify import sandbox

    monkeypatch.setattr(sandbox, "isolation_error", lambda: "sandbox isolation needs root (euid is 1000)")
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p"}])
    cfg = build_config(RunConfig, {"data": {"source": str(data), "verifier": "code"}, **GRPO})
    with pytest.raises(ConfigError, match=r"'data.code_isolation'.*needs root.*data.code_isolation=false"):
        RecordVerifiers(cfg.data).get("code")


@pytest.mark.parametrize("data, field, message", [
    ({"verifier": "maths"}, "data.verifier", "must be one of auto, math, code, synthetic, none"),
    ({"verifier": "math"}, "data.verifier", "needs a dataset file"),
    ({"eval_holdout": 3}, "data.eval_holdout", "synthetic data is held out by num_eval"),
    ({"source": "FILE", "eval_holdout": -1}, "data.eval_holdout", "must be >= 0"),
    ({"source": "FILE", "eval_source": "/nonexistent.jsonl"}, "data.eval_source", "does not exist"),
    ({"source": "FILE", "eval_source": "FILE", "eval_holdout": 2}, "data.eval_holdout", "not both"),
    ({"source": "FILE", "eval_holdout": 2, "verifier": "none"}, "data.verifier", "cannot be evaluated"),
    ({"source": "FILE", "tests_field": ""}, "data.tests_field", "non-empty"),
])
def test_verifier_fields_errors_name_the_field(tmp_path, data, field, message):
    path = str(_write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p"}]))
    data = {k: (path if v == "FILE" else v) for k, v in data.items()}
    with pytest.raises(ConfigError, match=rf"'{field}'.*{message}"):
        build_config(RunConfig, {"data": data, "teachers": [{"name": "t", "server": "http://127.0.0.1:1"}]})


def test_grpo_with_no_verifier_names_the_field():
    with pytest.raises(ConfigError, match=r"'data.verifier'.*grpo.*'none'"):
        build_config(RunConfig, {"data": {"verifier": "none"}, "objective": {"kind": "grpo"}, "rollout": {"samples_per_prompt": 2}})


def test_cli_holdout_larger_than_the_file_is_one_line(tmp_path, capsys):
    from gopd_mega import cli

    student = _student(tmp_path / "student")
    data = _write_jsonl(tmp_path / "train.jsonl", _math_rows(3))
    capsys.readouterr()  # the tiny model's save progress bars
    with pytest.raises(SystemExit) as exc:
        cli.main(["--recipe", str(_recipe(tmp_path, student, data)), "data.eval_holdout=3"])
    assert exc.value.code == 2
    # (datasets' progress bars also go to stderr)
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("gopd-train: error:")]
    assert len(err) == 1 and "'data.eval_holdout'" in err[0] and "leaves none to train on" in err[0]
