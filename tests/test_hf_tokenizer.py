"""HFTokenizer (the project's Tokenizer protocol over a local HF tokenizer) and vocabulary checks.

Tokenizers are built locally (``tokenizers`` word-level models), nothing is downloaded.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import pytest

from gopd_mega.hf import HFTokenizer, TokenizerMismatch, check_same_vocab
from helpers import WORDS, make_tokenizer

def test_protocol(tmp_path):
    tok = HFTokenizer(make_tokenizer(tmp_path / "t", eos_list=[3, 1]))
    ids = tok.encode("hello world")
    assert ids == [7, 8] and tok.bos_id is None
    assert tok.stop_ids == [3, 1] and tok.eos_id == 3 and tok.pad_id == 0
    assert tok.vocab_size == 16
    assert tok.decode(ids + [3, 9, 10]) == "hello world"  # stops at the first stop id


def test_bos_is_what_hf_prepends(tmp_path):
    tok = HFTokenizer(make_tokenizer(tmp_path / "t", bos=True))
    assert tok.bos_id == 4 and tok.encode("the answer") == [9, 10]
    assert tok.stop_ids == [1]  # no generation_config.json: the tokenizer's eos


def test_chat_template_non_thinking(tmp_path):
    tok = HFTokenizer(make_tokenizer(tmp_path / "t"))
    text = tok.apply_chat_template("hello world")
    assert text == "<|im_start|>user hello world<|im_end|> <|im_start|>assistant <no_think> "
    assert "<no_think>" not in tok.apply_chat_template("hello", enable_thinking=True)


def test_same_vocab_and_padding_only_differences(tmp_path):
    a = HFTokenizer(make_tokenizer(tmp_path / "a"))
    b = HFTokenizer(make_tokenizer(tmp_path / "b"))
    check_same_vocab(a, b, 16, 16, ("student", "teacher"))
    check_same_vocab(a, b, 16, 64, ("student", "teacher"))  # e.g. 151936 vs 152064 rows


def test_mismatch_names_both_models(tmp_path):
    a = HFTokenizer(make_tokenizer(tmp_path / "a"))
    swapped = HFTokenizer(make_tokenizer(tmp_path / "b", words=["world", "hello"] + WORDS[2:]))
    with pytest.raises(TokenizerMismatch, match=r"student-4B.*teacher-math.*'hello', 7, 8"):
        check_same_vocab(a, swapped, None, None, ("student-4B", "teacher-math"))
    with pytest.raises(TokenizerMismatch, match=r"teacher \(a\): model has 10 embedding rows"):
        check_same_vocab(a, a, 16, 10, ("student", "teacher (a)"))


def test_check_compatible_reads_config_vocab(tmp_path):
    a_dir, b_dir = make_tokenizer(tmp_path / "a"), make_tokenizer(tmp_path / "b", words=WORDS + ["extra"])
    (a_dir / "config.json").write_text(json.dumps({"vocab_size": 24}))
    a = HFTokenizer(a_dir)
    a.check_compatible(a_dir, "teacher 'math'")
    with pytest.raises(TokenizerMismatch, match=r"student .*a\).*teacher 'code' .*b\)"):
        a.check_compatible(b_dir, "teacher 'code'")
