"""Errors users make come out of the CLI as ONE line naming the file, line or field (exit status
2, printed by rank 0 only), not as a traceback."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from helpers import cli_fails, cli_recipe


@pytest.fixture(scope="module")
def hf_student(tmp_path_factory):
    from gopd_mega.hf.testing import tiny_hf_model
    from helpers import make_tokenizer

    d = tmp_path_factory.mktemp("hf") / "student"
    tiny_hf_model("llama", d, vocab_size=16)
    make_tokenizer(d)
    return str(d)


def test_mislabelled_field_is_named_itself(capsys, tmp_path, two_head_model):
    line = cli_fails(capsys, tmp_path, cli_recipe(two_head_model, two_head_model, tmp_path), ["train.micro_batch_size=0"])
    assert "'train.micro_batch_size'" in line and "train.steps" not in line


def test_only_rank0_prints(capsys, tmp_path, two_head_model):
    cli_fails(capsys, tmp_path, cli_recipe(two_head_model, two_head_model, tmp_path), ["train.micro_batch_size=0"], rank="1")


@pytest.mark.parametrize("override, field", [("student.tp=4", "student.tp"),
                                             ("teachers.0.model.tp=4", "teachers[0].model.tp")])
def test_tp_that_does_not_divide_the_loaded_heads_names_the_config_field(capsys, tmp_path, two_head_model, override, field):
    line = cli_fails(capsys, tmp_path, cli_recipe(two_head_model, two_head_model, tmp_path), [override])
    assert f"'{field}'" in line and "tp=4 does not divide num_attention_heads=2" in line
    assert "model at" not in line and two_head_model in line  # the checkpoint the heads came from


def test_truncated_jsonl_line(capsys, tmp_path, hf_student):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "hello world"}) + "\n" + '{"prompt": "the ans' + "\n")
    line = cli_fails(capsys, tmp_path, cli_recipe(hf_student, hf_student, tmp_path, source=str(data)))
    assert f"{data}:2: not valid JSON" in line


def test_missing_column(capsys, tmp_path, hf_student):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"question": "hello world", "answer": "1"}) + "\n")
    line = cli_fails(capsys, tmp_path, cli_recipe(hf_student, hf_student, tmp_path, source=str(data)))
    assert f"{data}: dataset has no field 'prompt'" in line and "['question', 'answer']" in line
    assert "data.prompt_field" in line


def test_dataset_source_needs_an_hf_student(capsys, tmp_path, two_head_model):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "hello world"}) + "\n")
    line = cli_fails(capsys, tmp_path, cli_recipe(two_head_model, two_head_model, tmp_path, source=str(data)))
    assert "'student.load'" in line


def test_unknown_teacher_route_names_the_file(capsys, tmp_path, hf_student):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "hello world", "extra_info": {"opd_teacher": "physics"}}) + "\n")
    recipe = cli_recipe(hf_student, hf_student, tmp_path, source=str(data))
    recipe["teachers"].append({"name": "code", "model": {"load": hf_student}})
    line = cli_fails(capsys, tmp_path, recipe)
    assert f"{data}: record 0 routes to teacher 'physics'" in line and "['add', 'code']" in line


def test_tp_larger_than_the_world_names_the_field(capsys, tmp_path, two_head_model):
    line = cli_fails(capsys, tmp_path, cli_recipe(two_head_model, two_head_model, tmp_path), ["student.tp=2"])
    assert "config field 'student.tp'" in line and "does not divide the world size 1" in line


def test_out_dir_that_is_a_file(capsys, tmp_path, two_head_model):
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = cli_fails(capsys, tmp_path, cli_recipe(two_head_model, two_head_model, tmp_path), [f"train.out_dir={afile}"])
    assert line == f"gopd-train: error: config field 'train.out_dir': {afile} is a file, not a directory"
    line = cli_fails(capsys, tmp_path, cli_recipe(two_head_model, two_head_model, tmp_path), [f"train.out_dir={afile}/run"])
    assert f"config field 'train.out_dir': cannot create {afile}/run: Not a directory" in line


@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_non_finite_config_values(capsys, tmp_path, two_head_model, value):
    for field in ("optim.lr", "rollout.temperature"):
        line = cli_fails(capsys, tmp_path, cli_recipe(two_head_model, two_head_model, tmp_path), [f"{field}={value}"])
        assert f"config field '{field}': must be a finite number" in line


def test_hf_folder_without_tokenizer(capsys, tmp_path):
    from gopd_mega.hf.testing import tiny_hf_model

    bare = tmp_path / "bare"
    tiny_hf_model("llama", bare, vocab_size=16)
    capsys.readouterr()  # its progress bar
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "hello world"}) + "\n")
    line = cli_fails(capsys, tmp_path, cli_recipe(str(bare), str(bare), tmp_path, source=str(data)))
    assert f"config field 'student.load': {bare}: no tokenizer in this Hugging Face folder" in line


def test_broken_config_json(capsys, tmp_path, hf_student, two_head_model):
    import shutil

    broken = tmp_path / "broken_hf"
    shutil.copytree(hf_student, broken)
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "hello world"}) + "\n")
    line = cli_fails(capsys, tmp_path, cli_recipe(str(broken), str(broken), tmp_path, source=str(data)))
    assert f"{broken}/config.json: not valid JSON" in line
    gopd = tmp_path / "broken_dir"
    shutil.copytree(two_head_model, gopd)
    (gopd / "model_config.json").write_text("{")
    line = cli_fails(capsys, tmp_path, cli_recipe(str(gopd), two_head_model, tmp_path))
    assert f"{gopd}/model_config.json: not valid JSON" in line


def test_empty_jsonl(capsys, tmp_path, hf_student):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    line = cli_fails(capsys, tmp_path, cli_recipe(hf_student, hf_student, tmp_path, source=str(data)))
    assert line == f"gopd-train: error: {data}: the file is empty (no records)"
