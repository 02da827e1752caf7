"""Prompt records from local parquet / JSONL / arrow / saved datasets, and the paper's data mix."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import pytest

from gopd_mega.config import DataConfig
from gopd_mega.data.prompts import DataError, PromptDataset
from gopd_mega.hf import HFTokenizer, load_paper_mix, load_prompt_records

from helpers import make_tokenizer

ROWS = [{"q": "hello world", "a": "42", "opd_teacher": "math"},
        {"q": "the answer", "a": "7", "opd_teacher": "code"}]


def write(tmp_path, kind):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in ROWS))
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        ds.to_parquet(str(path))
    elif kind == "saved":
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    else:  # a DatasetDict folder with a train split
        path = tmp_path / "dict"
        datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved", "dict"])
def test_formats_feed_prompt_dataset(kind, tmp_path):
    path = write(tmp_path, kind)
    cfg = DataConfig(source=str(path), prompt_field="q", answer_field="a", max_prompt_len=64)
    tok = HFTokenizer(make_tokenizer(tmp_path / "tok"))
    records = load_prompt_records(cfg, tok)
    assert records == [{"q": "hello world", "a": "42", "opd_teacher": "math"},
                       {"q": "the answer", "a": "7", "opd_teacher": "code"}]
    data = PromptDataset.from_config(records, tok, cfg, teachers=["math", "code"])
    assert [p.teacher for p in data.prompts] == ["math", "code"] and data.prompts[0].ids == [7, 8]


def test_chat_template_applied(tmp_path):
    path = write(tmp_path, "jsonl")
    cfg = DataConfig(source=str(path), prompt_field="q", answer_field="a", chat_template=True)
    records = load_prompt_records(cfg, HFTokenizer(make_tokenizer(tmp_path / "tok")))
    assert records[0]["q"] == "<|im_start|>user hello world<|im_end|> <|im_start|>assistant <no_think> "


def test_missing_prompt_field_names_file_and_field(tmp_path):
    path = write(tmp_path, "parquet")
    cfg = DataConfig(source=str(path), prompt_field="problem")
    with pytest.raises(DataError, match=r"d\.parquet: dataset has no field 'problem'.*data\.prompt_field"):
        load_prompt_records(cfg)


def test_paper_mix(tmp_path):
    import datasets

    math = tmp_path / "deepmath.parquet"
    datasets.Dataset.from_list([
        {"question": "What is 6*7?", "final_answer": "42", "difficulty": 6.5},
        {"question": "What is 1+1?", "final_answer": "2", "difficulty": 2.0},
    ]).to_parquet(str(math))
    code = tmp_path / "eurus_code.parquet"
    datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": "Write f."}],
         "reward_model": {"ground_truth": json.dumps({"inputs": ["1"], "outputs": ["2"]}), "style": "rule"}},
    ]).to_parquet(str(code))
    tok = HFTokenizer(make_tokenizer(tmp_path / "tok"))
    records = load_paper_mix(math=math, code=code, tokenizer=tok)
    assert [r["opd_teacher"] for r in records] == ["math", "code"]  # difficulty 2 < 6 dropped
    assert records[0]["answer"] == "42" and "\\boxed{}" in records[0]["prompt"]
    assert records[1]["prompt"].startswith("<|im_start|>user Write f.")
    assert json.loads(records[1]["answer"]) == {"inputs": ["1"], "outputs": ["2"]}
    with pytest.raises(DataError, match=r"eurus_code\.parquet: dataset has no field 'question'"):
        load_paper_mix(math=code)


def test_teacher_route_nested_under_extra_info(tmp_path):
    """The official G-OPD parquet files keep the route as extra_info.opd_teacher."""
    import datasets

    path = tmp_path / "official.parquet"
    datasets.Dataset.from_list([
        {"q": "hello world", "extra_info": {"index": 0, "opd_teacher": "math"}},
        {"q": "the answer", "extra_info": {"index": 1, "opd_teacher": "code"}},
    ]).to_parquet(str(path))
    cfg = DataConfig(source=str(path), prompt_field="q", max_prompt_len=64)
    records = load_prompt_records(cfg)
    assert [r["opd_teacher"] for r in records] == ["math", "code"]
    tok = HFTokenizer(make_tokenizer(tmp_path / "tok"))
    data = PromptDataset.from_config(records, tok, cfg, teachers=["math", "code"])
    assert [p.teacher for p in data.prompts] == ["math", "code"]
    # a configured teacher_field is looked up under extra_info too; records given directly as well
    renamed = DataConfig(source=str(path), prompt_field="q", teacher_field="index")
    assert [r["index"] for r in load_prompt_records(renamed)] == ["0", "1"]
    direct = PromptDataset([{"q": "hello world", "extra_info": {"opd_teacher": "code"}}], tok,
                           max_prompt_len=64, teachers=["math", "code"], prompt_field="q")
    assert direct.prompts[0].teacher == "code"


def test_truncated_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "cut.jsonl"
    lines = [json.dumps(r) for r in ROWS] + [json.dumps(ROWS[0])[:15]]  # a write cut short
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source=str(path), prompt_field="q")
    with pytest.raises(DataError, match=r"cut\.jsonl:3: not valid JSON") as err:
        load_prompt_records(cfg)
    assert "\n" not in str(err.value)
    folder = tmp_path / "many"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    (folder / "b.jsonl").write_text(lines[0] + "\n" + lines[2] + "\n")
    with pytest.raises(DataError, match=r"b\.jsonl:2: not valid JSON"):
        load_prompt_records(DataConfig(source=str(folder), prompt_field="q"))


def test_missing_column_names_column_file_and_columns(tmp_path):
    path = write(tmp_path, "jsonl")
    with pytest.raises(DataError, match=r"d\.jsonl: dataset has no field 'problem' \(its columns: \['q', 'a', 'opd_teacher'\]\)"):
        load_prompt_records(DataConfig(source=str(path), prompt_field="problem"))
