"""gopd-eval through a subprocess: input errors (fast), and one end-to-end run of a tiny random
Hugging Face model with a byte-level tokenizer through the embedded engine (slow: model build)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gopd_mega.verify import sandbox

from dist_utils import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "benchmarks"


def _cli(*args, timeout=600):
    env = subprocess_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "gopd_mega.eval.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


def test_bad_arguments(tmp_path):
    r = _cli("--model", tmp_path, "--bench", f"mystery={FIX / 'aime24.jsonl'}", "--out", tmp_path / "o")
    assert r.returncode == 2 and "benchmark 'mystery': unknown name" in r.stderr
    r = _cli("--model", tmp_path, "--bench", "aime24", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--bench must be NAME=VALUE" in r.stderr
    r = _cli("--model", tmp_path / "nope", "--bench", f"aime24={FIX / 'aime24.jsonl'}", "--out", tmp_path / "o")
    assert r.returncode == 2 and "no such folder" in r.stderr
    r = _cli("--model", tmp_path, "--bench", f"aime24={FIX / 'aime24.jsonl'}", "--out", tmp_path / "o")
    assert r.returncode == 2 and "no Hugging Face tokenizer" in r.stderr
    bench = f"aime24={FIX / 'aime24.jsonl'}"
    r = _cli("--model", tmp_path, "--bench", bench, "--out", tmp_path / "o", "--oracle-teacher", tmp_path)
    assert r.returncode == 2 and "--oracle-teacher and --oracle-reference go together" in r.stderr
    r = _cli("--model", tmp_path, "--bench", bench, "--out", tmp_path / "o", "--oracle-teacher", tmp_path,
             "--oracle-reference", tmp_path / "nope")
    assert r.returncode == 2 and "--oracle-reference" in r.stderr and "no such folder" in r.stderr
    r = _cli("--model", tmp_path, "--bench", bench, "--out", tmp_path / "o", "--oracle-teacher", tmp_path,
             "--oracle-reference", tmp_path, "--oracle-lambdas", "1,nan")
    assert r.returncode == 2 and "--oracle-lambdas: need finite lambdas >= 0" in r.stderr


def _tiny_model_with_byte_tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gopd_mega.hf.testing import tiny_hf_model

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tiny_hf_model("llama", directory, vocab_size=len(vocab), max_position_embeddings=512)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(directory)
    return directory


@pytest.mark.slow
@pytest.mark.skipif(sandbox.isolation_error() is not None, reason="sandbox isolation unavailable here")
def test_end_to_end_tiny_hf_model(tmp_path):
    model = _tiny_model_with_byte_tokenizer(tmp_path / "model")
    out = tmp_path / "out"
    r = _cli("--model", model, "--bench", f"aime24={FIX / 'aime24.jsonl'}", "--bench", f"livecodebench={FIX / 'livecodebench.jsonl'}",
             "--samples-math", 2, "--samples-code", 2, "--max-new-tokens", 4, "--no-chat-template", "--pass-k", 2, "--greedy",
             "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    by_name = {b["name"]: b for b in data["benchmarks"]}
    assert by_name["aime24"]["problems"] == 3 and by_name["livecodebench"]["problems"] == 2
    for b in by_name.values():
        assert b["samples"] == 2 and set(b["scores"]) == {"greedy", "avg@2", "pass@1", "pass@2"}
        assert 0 < b["mean_response_len"] <= 4
        assert b["settings"]["temperature"] == 1.0 and b["settings"]["top_p"] == 1.0
        assert sum(p["samples"] for p in b["per_problem"]) == 2 * b["problems"]
    assert "| aime24 | 3 | 2 |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "| livecodebench | 2 | 2 |" in r.stdout


@pytest.mark.slow
def test_oracle_rows_on_reference_answers(tmp_path):
    """--oracle-teacher/--oracle-reference: with reference = the evaluated model, the lambda-0 target
    is that model, so its answer log-probability equals the model's own and its log Z_t is 0; at
    lambda 1 log Z_t is 0 too (the target is the teacher, another random model)."""
    from gopd_mega.hf.testing import tiny_hf_model

    model = _tiny_model_with_byte_tokenizer(tmp_path / "model")
    teacher = tmp_path / "teacher"
    tiny_hf_model("llama", teacher, seed=7, vocab_size=259, max_position_embeddings=512)
    out = tmp_path / "out"
    r = _cli("--model", model, "--bench", f"aime24={FIX / 'aime24.jsonl'}", "--samples-math", 1, "--max-new-tokens", 2,
             "--no-chat-template", "--out", out, "--oracle-teacher", teacher, "--oracle-reference", model,
             "--oracle-lambdas", "0,1,1.5")
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads((out / "results.json").read_text())["oracle"]["benchmarks"]["aime24"]
    assert row["problems"] == 3 and set(row["targets"]) == {"0", "1", "1.5"}
    assert row["targets"]["0"]["log_prob"] == pytest.approx(row["model"]["log_prob"], abs=1e-3)
    assert abs(row["targets"]["0"]["mean_log_z"]) < 1e-6 and abs(row["targets"]["1"]["mean_log_z"]) < 1e-6
    assert row["targets"]["1"]["log_prob"] != pytest.approx(row["model"]["log_prob"], abs=1e-2)
    assert row["targets"]["1.5"]["mean_log_z"] > 0  # Hoelder: sum pT^lam pref^(1-lam) >= 1 for lam > 1
    assert "target lam 1.5" in (out / "results.md").read_text() and "target lam 1.5" in r.stdout
