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
             "--samples-math", 2, "--samples-code", 2, "--max-new-tokens", 4, "--no-chat-template", "--pass-k", 2, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    by_name = {b["name"]: b for b in data["benchmarks"]}
    assert by_name["aime24"]["problems"] == 3 and by_name["livecodebench"]["problems"] == 2
    for b in by_name.values():
        assert b["samples"] == 2 and set(b["scores"]) == {"avg@2", "pass@1", "pass@2"}
        assert 0 < b["mean_response_len"] <= 4
        assert b["settings"]["temperature"] == 1.0 and b["settings"]["top_p"] == 1.0
        assert sum(p["samples"] for p in b["per_problem"]) == 2 * b["problems"]
    assert "| aime24 | 3 | 2 |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "| livecodebench | 2 | 2 |" in r.stdout
