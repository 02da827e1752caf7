"""Evaluation harness: fixture benchmark files (published formats) + a scripted engine with canned
responses; the scores must equal hand-computed avg@k and pass@k."""

import itertools
import json
from collections import defaultdict
from pathlib import Path

import pytest

from gopd_mega.data.tokenizer import Tokenizer
from gopd_mega.eval import (BenchmarkError, SamplingSettings, evaluate_benchmark, evaluate_records, load_benchmark,
                            markdown_table, pass_at_k, scores, write_report)
from gopd_mega.rollout.base import FINISH_STOP, RolloutEngine, pack_rollouts
from gopd_mega.verify import CodeVerifier, MathVerifier, SandboxLimits, SyntheticVerifier
from gopd_mega.verify import sandbox

FIX = Path(__file__).parent / "fixtures" / "benchmarks"
needs_sandbox = pytest.mark.skipif(sandbox.isolation_error() is not None, reason="sandbox isolation unavailable here")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 3..258; 0 pad, 1 bos, 2 eos."""

    def encode(self, text):
        return [b + 3 for b in text.encode()]

    def decode(self, ids):
        out = []
        for i in ids:
            if i == 2:
                break
            if i >= 3:
                out.append(i - 3)
        return bytes(out).decode(errors="replace")

    vocab_size = property(lambda self: 259)
    pad_id = property(lambda self: 0)
    eos_id = property(lambda self: 2)
    bos_id = property(lambda self: 1)


TOK = ByteTokenizer()


class ScriptedEngine(RolloutEngine):
    """Answers the j-th request for a prompt with script[prompt][j] (whatever the batching)."""

    def __init__(self, script):
        self.script = script
        self.seen = defaultdict(int)
        self.calls = []

    def generate(self, prompts, *, temperature, top_p=1.0, max_new_tokens, greedy=False, seed=0):
        self.calls.append({"temperature": temperature, "top_p": top_p, "greedy": greedy, "n": len(prompts)})
        responses = []
        for p in prompts:
            assert p[0] == TOK.bos_id
            text = TOK.decode(p[1:])
            key = next(k for k in self.script if text.startswith(k))
            responses.append(TOK.encode(self.script[key][self.seen[key]]) + [TOK.eos_id])
            self.seen[key] += 1
        return pack_rollouts(prompts, responses, [[0.0] * len(r) for r in responses], [FINISH_STOP] * len(prompts), TOK.pad_id)

    def update_weights(self, source=None):
        pass


def test_pass_at_k_matches_counting_subsets():
    for n, c, k in [(5, 2, 3), (4, 1, 2), (6, 0, 2), (6, 6, 1), (7, 3, 7)]:
        samples = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    assert scores([[True, False], [False, False]], ks=(1, 2, 4)) == {"avg@2": 0.25, "pass@1": 0.25, "pass@2": 0.5}
    with pytest.raises(ValueError, match="same, non-zero number"):
        scores([[True], [True, False]])


def test_math_benchmark_scores_by_hand():
    bench = load_benchmark("aime24", FIX / "aime24.jsonl")
    assert [r["answer"] for r in bench.records] == ["9", "30", "210"]
    script = {  # k = 4 samples each: 3, 0 and 4 correct
        "Find the remainder": [r"so \boxed{9}", r"\boxed{9}", r"\boxed{10}", r"$\boxed{9}$."],
        "How many positive divisors": [r"\boxed{31}"] * 4,
        "Compute $1+2": [r"\boxed{210}", r"\boxed{\frac{420}{2}}", r"\boxed{210}", r"\boxed{210.0}"],
    }
    engine = ScriptedEngine(script)
    bench.verifier = MathVerifier(workers=2)
    try:
        res = evaluate_benchmark(engine, TOK, bench, SamplingSettings(samples=4, batch_size=5), pass_ks=[2])
    finally:
        bench.verifier.close()
    # avg@4 = (3/4 + 0/4 + 4/4) / 3; pass@2: 1 - C(1,2)/C(4,2) = 1, 0, 1 -> 2/3; pass@4: 1, 0, 1 -> 2/3
    assert res.scores["avg@4"] == pytest.approx((0.75 + 0 + 1) / 3)
    assert res.scores["pass@1"] == pytest.approx((0.75 + 0 + 1) / 3)
    assert res.scores["pass@2"] == pytest.approx(2 / 3)
    assert res.scores["pass@4"] == pytest.approx(2 / 3)
    assert [p["correct"] for p in res.per_problem] == [3, 0, 4]
    assert res.stop_rate == 1.0
    # the paper's sampling settings are the defaults, and sampling is never greedy
    assert all(c["temperature"] == 1.0 and c["top_p"] == 1.0 and not c["greedy"] for c in engine.calls)
    assert sum(c["n"] for c in engine.calls) == 12 and max(c["n"] for c in engine.calls) == 5


def test_other_math_formats_parquet_and_latex_answers():
    aime25 = load_benchmark("aime25", FIX / "aime25.parquet")
    hmmt = load_benchmark("hmmt25", FIX / "hmmt25.jsonl")
    assert [r["answer"] for r in aime25.records] == ["1.5", "101"]
    assert [r["answer"] for r in hmmt.records] == [r"\frac{1}{3}", r"\sqrt{2}"]
    assert hmmt.records[0]["prompt"].endswith(r"put your final answer within \boxed{}.")
    v = MathVerifier()
    try:
        for bench, script, expected in [
            (aime25, {"What is": [r"\boxed{\frac{3}{2}}"], "Find the least": [r"\boxed{103}"]}, 0.5),
            (hmmt, {"Compute": [r"\boxed{0.3333333333333333}"], "Solve": [r"\boxed{2^{1/2}}"]}, 1.0),
        ]:
            bench.verifier = v
            res = evaluate_benchmark(ScriptedEngine(script), TOK, bench, SamplingSettings(samples=1))
            assert res.scores["avg@1"] == pytest.approx(expected), bench.name
    finally:
        v.close()


HE_OK_0 = "```python\ndef running_max(numbers: List[int]) -> List[int]:\n    out = []\n    for x in numbers:\n        out.append(max(out[-1], x) if out else x)\n    return out\n```"
HE_BAD_0 = "```python\ndef running_max(numbers):\n    return list(numbers)\n```"
HE_OK_1 = "```python\ndef mean(xs):\n    return sum(xs) / len(xs)\n```"
HE_OK_1B = "Here:\n```python\nimport math\n\ndef mean(xs):\n    return math.fsum(xs) / len(xs)\n```"
LCB_OK_0 = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
LCB_BAD_0 = "```python\na, b = map(int, input().split())\nprint(a - b)\n```"
LCB_BAD_1 = "```python\nclass Solution:\n    def maxPair(self, nums: List[int]) -> int:\n        return max(nums) * 2\n```"
LCB_OK_1_BUT_ONLY_PUBLIC = "```python\nclass Solution:\n    def maxPair(self, nums):\n        return 8\n```"


@needs_sandbox
def test_code_benchmarks_scores_by_hand():
    verifier = CodeVerifier(workers=2, limits=SandboxLimits(timeout_s=60, stop_on_failure=True))  # roomy: loaded machines
    he = load_benchmark("humaneval_plus", FIX / "humaneval_plus.jsonl")
    lcb = load_benchmark("livecodebench", FIX / "livecodebench.jsonl")
    mbpp = load_benchmark("mbpp_plus", FIX / "mbpp_plus.jsonl")
    # the private LiveCodeBench tests (base64/zlib/pickle) are decoded and kept
    assert [len(r["tests"]) for r in lcb.records] == [3, 2]
    assert lcb.records[1]["tests"][1] == {"fn": "maxPair", "args": [[-1, -2]], "expected": -3}
    results = {}
    for bench, script in [
        (he, {"Complete the following Python function. Give the complete function (with its imports) in a ```python code block.\n```python\nfrom typing": [HE_OK_0, HE_BAD_0],
              "Complete the following Python function. Give the complete function (with its imports) in a ```python code block.\n```python\ndef mean": [HE_OK_1, HE_OK_1B]}),
        (lcb, {"Read two integers": [LCB_BAD_0, LCB_OK_0], "Given a list nums": [LCB_BAD_1, LCB_OK_1_BUT_ONLY_PUBLIC]}),
        (mbpp, {"Write the Python function described below.": ["```python\ndef shared(a, b):\n    return sorted(set(a).intersection(b))\n```"]}),
    ]:
        bench.verifier = verifier
        k = 1 if bench.name == "mbpp_plus" else 2
        results[bench.name] = evaluate_benchmark(ScriptedEngine(script), TOK, bench, SamplingSettings(samples=k, batch_size=3))
    # HumanEval+: task 0 1/2 correct (the wrong one fails the canonical diff test), task 1 2/2
    assert [p["correct"] for p in results["humaneval_plus"].per_problem] == [1, 2]
    assert results["humaneval_plus"].scores == pytest.approx({"avg@2": 0.75, "pass@1": 0.75, "pass@2": 1.0})
    # LiveCodeBench: stdin task 1/2; functional task 0/2 (the hard-coded answer fails a private test)
    assert [p["correct"] for p in results["livecodebench"].per_problem] == [1, 0]
    assert results["livecodebench"].scores == pytest.approx({"avg@2": 0.25, "pass@1": 0.25, "pass@2": 0.5})
    assert results["mbpp_plus"].scores == {"avg@1": 1.0, "pass@1": 1.0}


def test_evaluate_records_for_training_and_report(tmp_path):
    records = [{"prompt": "12+30=", "opd_teacher": "add"}, {"prompt": "7*8=", "opd_teacher": "mul"}]
    engine = ScriptedEngine({"12+30=": ["42", "42"], "7*8=": ["56", "55"]})
    m = evaluate_records(engine, TOK, records, SyntheticVerifier(), samples=2, max_new_tokens=8, name="arith")
    assert m["eval/arith/avg@2"] == pytest.approx(0.75)  # (2/2 + 1/2) / 2
    assert m["eval/arith/pass@2"] == pytest.approx(1.0)
    assert m["eval/arith/response_len"] == pytest.approx(3.0)  # two digits + eos
    assert m["eval/arith/stop_rate"] == 1.0
    with pytest.raises(ValueError, match="no records"):
        evaluate_records(engine, TOK, [], SyntheticVerifier())

    from gopd_mega.eval.harness import BenchmarkResult
    res = BenchmarkResult("aime24", "math", 3, 4, {"avg@4": 7 / 12, "pass@1": 7 / 12, "pass@4": 2 / 3}, 10.0, 0.5)
    paths = write_report([res], tmp_path / "out", title="t")
    data = json.loads(paths["json"].read_text())
    assert data["benchmarks"][0]["scores"]["avg@4"] == pytest.approx(7 / 12)
    table = paths["markdown"].read_text()
    assert "| aime24 | 3 | 4 | 58.3 | 58.3 | 66.7 | 10.0 | 0.50 |" in table
    assert paths["plot"].stat().st_size > 1000 and paths["plot"].read_bytes()[:4] == b"\x89PNG"
    assert markdown_table([res]).count("\n") >= 3


def test_bad_benchmark_files(tmp_path):
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"question_text": "x", "answer": 1}) + "\n")
    with pytest.raises(BenchmarkError, match=r"b.jsonl record 0: missing field 'problem'"):
        load_benchmark("aime24", bad)
    with pytest.raises(BenchmarkError, match="unknown name"):
        load_benchmark("mystery", bad)
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_benchmark("aime24", tmp_path / "nope.jsonl")
    # a pickle that names a global is refused, not executed
    import base64, pickle, zlib
    evil = base64.b64encode(zlib.compress(pickle.dumps(print))).decode()
    row = {"question_content": "q", "public_test_cases": "[]", "private_test_cases": evil, "metadata": "{}"}
    lcb = tmp_path / "lcb.jsonl"
    lcb.write_text(json.dumps(row) + "\n")
    with pytest.raises(BenchmarkError, match="refusing to unpickle builtins.print"):
        load_benchmark("livecodebench", lcb)


def test_training_evaluator_callable():
    from gopd_mega.eval import training_evaluator

    add = [{"prompt": "1+1=", "opd_teacher": "add"}, {"prompt": "2+2=", "opd_teacher": "add"}]
    mul = [{"prompt": "3*3=", "opd_teacher": "mul"}]
    engine = ScriptedEngine({"1+1=": ["2"] * 10, "2+2=": ["5"] * 10, "3*3=": ["9"] * 10})
    evaluate = training_evaluator(engine, TOK, {"add": (add, SyntheticVerifier()), "mul": (mul, SyntheticVerifier())},
                                  max_new_tokens=4, max_prompts=2)
    m = evaluate()
    assert m["eval/add/avg@1"] == 0.5 and m["eval/mul/avg@1"] == 1.0
    assert m["eval/mean/avg@1"] == 0.75  # unweighted over datasets
    assert "eval/add/greedy" not in m and m["eval/mean/pass@1"] == 0.75
    assert evaluate()["eval/add/avg@1"] == 0.5  # callable again (every eval_every steps)
    # greedy decoding of the datasets: one response per prompt, engine called with greedy=True
    greedy = training_evaluator(engine, TOK, {"add": (add, SyntheticVerifier())}, max_new_tokens=4, greedy=True,
                                sampled=False)()
    assert greedy["eval/add/greedy"] == 0.5 and greedy["eval/mean/greedy"] == 0.5 and "eval/add/avg@1" not in greedy
    assert "eval/add/greedy_response_len" in greedy and "eval/add/greedy_stop_rate" in greedy
    assert engine.calls[-1]["greedy"] is True and not any(c["greedy"] for c in engine.calls[:-1])
