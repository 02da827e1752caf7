"""Character tokenizer and synthetic arithmetic domains."""

import pytest

from gopd_mega.data import CharTokenizer, check, make_datasets, make_split
from gopd_mega.data.synthetic import is_held_out


def test_tokenizer_round_trip_and_specials(tmp_path):
    tok = CharTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    text = "47+385=432"
    ids = tok.encode(text)
    assert len(ids) == len(text) and min(ids) > 2
    assert tok.decode(ids) == text
    # decode drops bos/pad and stops at eos
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id] + tok.encode("99") + [tok.pad_id]) == text
    assert tok.stop_ids == [tok.eos_id]
    tok.save(tmp_path)
    again = CharTokenizer.load(tmp_path)
    assert again.vocab_size == tok.vocab_size and again.encode(text) == ids
    with pytest.raises(ValueError, match="'#'"):
        tok.encode("1#2")


def test_synthetic_is_deterministic_and_split_disjoint():
    a_train, a_eval = make_datasets(["add", "mul"], 300, 50, seed=3)
    b_train, b_eval = make_datasets(["add", "mul"], 300, 50, seed=3)
    assert a_train == b_train and a_eval == b_eval
    c_train, _ = make_datasets(["add", "mul"], 300, 50, seed=4)
    assert c_train != a_train
    assert len(a_train) == 600 and {d: len(v) for d, v in a_eval.items()} == {"add": 50, "mul": 50}
    train_prompts = {r["prompt"] for r in a_train}
    assert len(train_prompts) == 600  # distinct
    for domain, recs in a_eval.items():
        assert len({r["prompt"] for r in recs}) == 50
        assert all(r["opd_teacher"] == domain for r in recs)
        assert not train_prompts & {r["prompt"] for r in recs}
    # the held-out pool does not depend on the seed: no leakage across runs with other seeds
    other_train, _ = make_split("mul", 2000, 10, seed=99)
    assert not {r["prompt"] for r in other_train} & {r["prompt"] for r in a_eval["mul"]}
    assert all(is_held_out(r["prompt"]) for recs in a_eval.values() for r in recs)


def test_records_and_checker():
    train, _ = make_datasets(["add", "mul"], 100, 10, seed=0)
    for r in train:
        a, b = r["prompt"].rstrip("=").replace("*", "+").split("+")
        expected = int(a) + int(b) if "+" in r["prompt"] else int(a) * int(b)
        assert r["answer"] == str(expected)
        assert 2 <= len(a) <= 3 and 1 <= len(b) <= 3
        assert check(r["opd_teacher"], r["prompt"], r["answer"])
        assert check(r["opd_teacher"], r["prompt"], f" {r['answer']} ")
        assert not check(r["opd_teacher"], r["prompt"], str(expected + 1))
        assert not check(r["opd_teacher"], r["prompt"], r["answer"] + "0")
        assert not check(r["opd_teacher"], r["prompt"], "")
    assert check("add", "47+385=", "432") and not check("add", "47+385=", "431")
    assert check("mul", "12*34=", "408") and not check("mul", "12*34=", "4O8")
    with pytest.raises(KeyError, match="unknown synthetic domain 'div'"):
        check("div", "4/2=", "2")


def test_pool_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="distinct held-out prompts"):
        make_split("mul", 10, 100_000, seed=0)
