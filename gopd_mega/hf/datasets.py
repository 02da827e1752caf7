"""Prompt records from local datasets (parquet, JSONL/JSON, arrow, ``save_to_disk`` folders).

:func:`load_prompt_records` returns the list of dicts that
:class:`gopd_mega.data.prompts.PromptDataset` consumes, keyed by the configured field names
(``DataConfig.prompt_field`` / ``answer_field`` / ``teacher_field``):

    {prompt_field: str, answer_field: str (if the dataset has it), teacher_field: str (if it has it)}

The prompt column may hold a string or a chat (a list of ``{"role", "content"}`` messages, as in
verl-style parquet files). The teacher route is read from the ``teacher_field`` column, or, when
there is no such column, from the same key nested under ``extra_info`` (the official G-OPD
parquet files: ``extra_info: {opd_teacher: "math"}``).

Unreadable files fail with a one-line :class:`DataError` naming the file, and for JSON lines the
line number of the first record that is not valid JSON (a truncated last line, say).
 With ``DataConfig.chat_template`` the tokenizer's chat template is
applied (Qwen3 in non-thinking mode) and the text of the model's own bos token is stripped from
the front, because PromptDataset prepends ``tokenizer.bos_id`` itself.

The paper's data (:func:`load_paper_mix`), written as records with ``prompt``, ``answer`` and
``opd_teacher``:
  * math, DeepMath-103K style: columns ``question`` (prompt), ``final_answer`` (answer),
    ``difficulty`` (kept when >= ``min_difficulty``; the paper uses 6 -> 57K prompts);
    route ``"math"``; the prompt gets the instruction to put the answer in \\boxed{}.
  * code, Eurus-RL-Code style (verl parquet): ``prompt`` (chat messages or text) and
    ``reward_model.ground_truth`` (the unit tests, a JSON string) as the answer; route ``"code"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gopd_mega.data.prompts import DataError

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def open_dataset(path: str | os.PathLike):
    """A ``datasets.Dataset`` from a local file or folder (the 'train' split of a DatasetDict)."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset path does not exist: {path}")
    kind = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}.get(path.suffix)
    if path.is_dir() and (
        (path / "dataset_info.json").is_file()
        or (path / "dataset_dict.json").is_file()
        or (path / "state.json").is_file()
    ):
        ds = datasets.load_from_disk(str(path))
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".parquet", ".jsonl", ".json"))
        if not files:
            raise DataError(f"{path}: folder holds no saved dataset and no parquet/JSONL files")
        kind = "parquet" if files[0].suffix == ".parquet" else "json"
        ds = _load_files(datasets, kind, files)
    elif path.suffix == ".arrow":
        ds = datasets.Dataset.from_file(str(path))
    elif kind is not None:
        ds = _load_files(datasets, kind, [path])
    else:
        raise DataError(
            f"{path}: unknown dataset format (expected .parquet, .jsonl, .json, .csv, .arrow or a saved dataset folder)"
        )
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: dataset has splits {list(ds)} but no 'train' split")
        ds = ds["train"]
    if len(ds) == 0:
        raise DataError(f"{path}: the dataset has no records")
    return ds


def _load_files(datasets, kind: str, files: list[Path]):
    """``datasets.load_dataset`` of local files; a failure becomes a DataError that names the
    file (and, for JSON lines, the line) instead of datasets' generation error."""
    # datasets logs its own multi-line ERROR before raising; ours replaces it (progress bars stay).
    for f in files:
        if kind in ("json", "csv") and _blank(f):
            raise DataError(f"{f}: the file is empty (no records)")
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    except Exception as exc:  # re-raised as a DataError naming the file
        if kind == "json":
            for f in files:
                _check_json_lines(f)
        cause = str(exc.__cause__ or exc).strip().splitlines()
        where = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} {kind} files)"
        raise DataError(
            f"{where}: cannot be read as {kind}: {type(exc).__name__}: {cause[0] if cause else ''}"
        ) from exc
    finally:
        datasets.logging.set_verbosity(verbosity)


def _blank(path: Path) -> bool:
    """Whether a text file holds nothing but white space (read in chunks: files may be large)."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            if chunk.strip():
                return False
    return True


def _check_json_lines(path: Path) -> None:
    """Raise a DataError naming the first line of ``path`` that is not a JSON value (a file
    that is one JSON document as a whole passes)."""
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8", errors="replace"))
            return  # one JSON document (an array or an object): not a JSON-lines problem
        except json.JSONDecodeError:
            pass
    with open(path, encoding="utf-8", errors="replace") as lines:  # streamed: files may be large
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                line = line.rstrip("\n")
                shown = line if len(line) <= 60 else line[:57] + "..."
                raise DataError(
                    f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}): {shown!r}; "
                    "a JSONL file needs one complete JSON object per line"
                ) from None


def _require(ds, path, field: str, setting: str) -> None:
    if field not in ds.column_names:
        raise DataError(f"{path}: dataset has no field {field!r} (its columns: {ds.column_names}); set {setting}")


def _nested_route(row: dict, field: str) -> Any:
    """``row['extra_info'][field]`` (verl-style parquet files keep the route there), or None."""
    extra = row.get("extra_info")
    return extra.get(field) if isinstance(extra, dict) else None


def _prompt_text(value: Any, tokenizer, chat_template: bool, where: str) -> str:
    is_chat = isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value)
    if not chat_template:
        if is_chat:
            raise DataError(f"{where}: the prompt is a chat (list of messages); set data.chat_template=true")
        if not isinstance(value, str):
            raise DataError(f"{where}: the prompt must be a string, got {type(value).__name__}")
        return value
    if tokenizer is None:
        raise DataError("data.chat_template=true needs the model's tokenizer")
    text = tokenizer.apply_chat_template(value if is_chat else str(value))
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        text = text[len(bos) :]  # PromptDataset prepends bos_id itself
    return text


def load_prompt_records(cfg, tokenizer=None, path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Records for PromptDataset from the dataset at ``path`` (default ``cfg.source``).

    ``cfg`` is a :class:`gopd_mega.config.DataConfig`. A missing prompt field raises DataError
    naming the file and the field.
    """
    path = Path(path if path is not None else cfg.source)
    ds = open_dataset(path)
    _require(ds, path, cfg.prompt_field, "data.prompt_field")
    keep = [f for f in (cfg.answer_field, cfg.teacher_field) if f in ds.column_names]
    nested = cfg.teacher_field not in ds.column_names and "extra_info" in ds.column_names
    records = []
    for i, row in enumerate(ds):
        rec = {
            cfg.prompt_field: _prompt_text(row[cfg.prompt_field], tokenizer, cfg.chat_template, f"{path} record {i}")
        }
        for f in keep:
            if row[f] is not None:
                rec[f] = str(row[f])
        if nested and _nested_route(row, cfg.teacher_field) is not None:
            rec[cfg.teacher_field] = str(_nested_route(row, cfg.teacher_field))
        records.append(rec)
    return records


def _ground_truth(row: dict, path, i: int) -> str:
    rm = row.get("reward_model")
    if isinstance(rm, dict) and rm.get("ground_truth") is not None:
        return str(rm["ground_truth"])
    for f in ("tests", "test_cases", "answer"):
        if row.get(f) is not None:
            return str(row[f])
    raise DataError(
        f"{path} record {i}: code prompt without tests (expected reward_model.ground_truth, tests or test_cases)"
    )


def load_paper_mix(
    math: str | os.PathLike | None = None,
    code: str | os.PathLike | None = None,
    min_difficulty: float | None = 6.0,
    tokenizer=None,
    chat_template: bool = True,
) -> list[dict[str, Any]]:
    """The paper's multi-teacher prompt mix as ``{prompt, answer, opd_teacher}`` records."""
    records: list[dict[str, Any]] = []
    if math is not None:
        ds = open_dataset(math)
        _require(ds, math, "question", "the math file (DeepMath-style 'question')")
        _require(ds, math, "final_answer", "the math file (DeepMath-style 'final_answer')")
        for i, row in enumerate(ds):
            if min_difficulty is not None and row.get("difficulty") is not None and row["difficulty"] < min_difficulty:
                continue
            text = f"{row['question']}\n{MATH_INSTRUCTION}"
            records.append(
                {
                    "prompt": _prompt_text(text, tokenizer, chat_template, f"{math} record {i}"),
                    "answer": str(row["final_answer"]),
                    "opd_teacher": "math",
                }
            )
    if code is not None:
        ds = open_dataset(code)
        _require(ds, code, "prompt", "the code file (Eurus-RL-Code-style 'prompt')")
        for i, row in enumerate(ds):
            records.append(
                {
                    "prompt": _prompt_text(row["prompt"], tokenizer, chat_template, f"{code} record {i}"),
                    "answer": _ground_truth(row, code, i),
                    "opd_teacher": "code",
                }
            )
    if not records:
        raise DataError("load_paper_mix: no records (give math= and/or code= files)")
    return records
