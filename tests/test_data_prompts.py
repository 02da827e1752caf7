"""PromptDataset: filtering, errors, routing, resumable order; sft_batch layout."""

import logging

import pytest
import torch

from gopd_mega.data import CharTokenizer, DataError, PromptDataset, make_datasets, sft_batch


@pytest.fixture
def tok():
    return CharTokenizer()


def _records(n=20):
    return [{"prompt": f"{i}+{i}=", "answer": str(2 * i), "opd_teacher": "add" if i % 2 else "mul"} for i in range(n)]


def test_prompts_tokenised_with_bos(tok):
    ds = PromptDataset(_records(), tok, max_prompt_len=32, teachers=["add", "mul"])
    p = ds[3]
    assert p.ids == [tok.bos_id] + tok.encode("3+3=") and p.text == "3+3=" and p.answer == "6"
    assert p.teacher == "add" and p.index == 3


def test_length_filter_counted_and_reported(tok, caplog):
    recs = [{"prompt": "1+1="}, {"prompt": "123+456="}, {"prompt": "12345+67890="}, {"prompt": "2+2="}]
    with caplog.at_level(logging.WARNING, logger="gopd_mega.data.prompts"):
        ds = PromptDataset(recs, tok, max_prompt_len=9)
    s = ds.filter_summary
    assert (s.total, s.kept, s.dropped, s.longest) == (4, 3, 1, 13)
    assert "dropped 1" in str(s) and "longest prompt: 13" in str(s)
    assert "dropped 1" in caplog.text
    assert [p.index for p in ds.prompts] == [0, 1, 3]


def test_empty_dataset_errors(tok):
    with pytest.raises(DataError, match="empty"):
        PromptDataset([], tok, max_prompt_len=8)
    with pytest.raises(DataError, match="empty after filtering.*dropped 2"):
        PromptDataset([{"prompt": "123456789"}, {"prompt": "1234567890"}], tok, max_prompt_len=4)


def test_missing_prompt_field_names_field_and_record(tok):
    recs = [{"prompt": "1+1="}, {"question": "2+2="}]
    with pytest.raises(DataError, match=r"record 1 has no prompt field 'prompt'.*question"):
        PromptDataset(recs, tok, max_prompt_len=8)
    with pytest.raises(DataError, match="record 0 has no prompt field 'question'"):
        PromptDataset(recs, tok, max_prompt_len=8, prompt_field="question")


def test_unknown_teacher_route(tok):
    with pytest.raises(DataError, match=r"record 0 routes to teacher 'mul'.*known teachers: \['add', 'code'\]"):
        PromptDataset(_records(), tok, max_prompt_len=32, teachers=["add", "code"])
    # no teacher field: fine with one teacher, an error with several
    ds = PromptDataset([{"prompt": "1+1="}], tok, max_prompt_len=8, teachers=["only"])
    assert ds[0].teacher == "only"
    with pytest.raises(DataError, match="no teacher field 'opd_teacher'"):
        PromptDataset([{"prompt": "1+1="}], tok, max_prompt_len=8, teachers=["a", "b"])


def test_shuffle_covers_each_epoch_and_resumes(tok):
    ds = PromptDataset(_records(10), tok, max_prompt_len=32, seed=5)
    first_epoch = [p.index for p in ds.next_batch(10)]
    assert sorted(first_epoch) == list(range(10)) and first_epoch != list(range(10))
    ds.next_batch(3)
    state = ds.state_dict()
    assert state["epoch"] == 1 and state["index"] == 3 and state["seed"] == 5
    expected = [[p.index for p in ds.next_batch(4)] for _ in range(5)]  # crosses epoch boundaries
    fresh = PromptDataset(_records(10), tok, max_prompt_len=32, seed=123)
    fresh.load_state_dict(state)
    assert [[p.index for p in fresh.next_batch(4)] for _ in range(5)] == expected
    # same seed, fresh object: same order from the start
    again = PromptDataset(_records(10), tok, max_prompt_len=32, seed=5)
    assert [p.index for p in again.next_batch(10)] == first_epoch


def test_from_config_with_synthetic(tok):
    from gopd_mega.config import DataConfig

    cfg = DataConfig(num_train=50, num_eval=5)
    train, _ = make_datasets(cfg.domains, cfg.num_train, cfg.num_eval, cfg.seed)
    ds = PromptDataset.from_config(train, tok, cfg, teachers=["add", "mul"])
    assert len(ds) == 100 and ds.filter_summary.dropped == 0
    assert {p.teacher for p in ds.prompts} == {"add", "mul"}


def test_sft_batch_layout(tok):
    recs = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "10+20=", "answer": "30"}]
    tokens, mask = sft_batch(recs, tok, max_len=16)
    assert tokens.shape == (2, 10) and tokens.dtype == torch.int64 and mask.dtype == torch.bool
    row0 = [tok.bos_id] + tok.encode("1+2=3") + [tok.eos_id]
    assert tokens[0, :7].tolist() == row0 and tokens[0, 7:].eq(tok.pad_id).all()
    assert mask[0].nonzero().flatten().tolist() == [5, 6]
    assert mask[1].nonzero().flatten().tolist() == [7, 8, 9]
    assert tok.decode(tokens[1][mask[1]].tolist()) == "30"
    with pytest.raises(DataError, match="record 1 is 10 tokens long, more than max_len=8"):
        sft_batch(recs, tok, max_len=8)
