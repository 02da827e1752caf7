"""G-OPD (or GRPO, objective.kind=grpo) training from a recipe: ``gopd-train --recipe RECIPE.yaml [section.field=value ...]``.

    python -m gopd_mega.cli --recipe recipes/example_synthetic.yaml objective.lam=1.25
    torchrun --nproc-per-node 8 -m gopd_mega.cli --recipe my_run.yaml student.tp=2

Prompts come from ``data.source``: 'synthetic' (the arithmetic domains, character tokenizer) or
a local dataset file/directory (parquet/JSONL/arrow/saved dataset) read with the student's own
Hugging Face tokenizer and chat template. The trained student is written to
``<train.out_dir>/student`` (gopd-mega model directory) and, for a Hugging Face student, also
exported as a Hugging Face checkpoint to ``<train.out_dir>/hf``.

Errors a user can fix (a bad config field, an unreadable or incomplete dataset, a checkpoint or
tokenizer that does not fit: :func:`user_errors`) are printed as ONE line naming the file, line
or field, by rank 0 only, and every rank exits with status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gopd_mega.config import ConfigError, RunConfig, load_config
from gopd_mega.data import synthetic
from gopd_mega.data.prompts import DataError, PromptDataset
from gopd_mega.data.tokenizer import CharTokenizer
from gopd_mega.model_io import is_hf_dir, save_model_dir
from gopd_mega.run import build_models, build_student_optimizer, report, synthetic_evaluator, synthetic_reward
from gopd_mega.trainer import Distiller


def load_prompts(cfg: RunConfig):
    """(tokenizer, training records, held-out records by domain or None) for the data source."""
    if cfg.data.source == "synthetic":
        records, held_out = synthetic.from_config(cfg.data)
        return CharTokenizer(), records, held_out
    from gopd_mega.hf import HFTokenizer, load_prompt_records

    if cfg.student.load is None or not is_hf_dir(cfg.student.load):
        raise ConfigError("config field 'student.load': data.source is a dataset file, so the student must be a "
                          "Hugging Face model directory (its tokenizer is used)")
    tokenizer = HFTokenizer(cfg.student.load)
    # No verifier ships for free-form datasets: periodic evaluation is for the synthetic domains.
    return tokenizer, load_prompt_records(cfg.data, tokenizer), None


def train(cfg: RunConfig) -> Distiller:
    tokenizer, records, held_out = load_prompts(cfg)
    models = build_models(cfg, tokenizer)
    if hasattr(tokenizer, "check_compatible"):
        for teacher in cfg.teachers:
            tokenizer.check_compatible(teacher.model.load, f"teacher '{teacher.name}'")
    try:
        data = PromptDataset.from_config(records, tokenizer, cfg.data, teachers=[t.name for t in cfg.teachers] or None)
    except DataError as exc:  # 'record i ...': say which file the records came from
        raise DataError(f"{cfg.data.source}: {exc}") from None
    report(str(data.filter_summary))
    evaluate = synthetic_evaluator(cfg, models, tokenizer, held_out) if held_out else None
    reward = None
    if cfg.objective.kind == "grpo":
        if cfg.data.source != "synthetic":
            raise ValueError(f"objective.kind='grpo' on data.source={cfg.data.source!r}: no verifier for this dataset "
                             "is wired in yet (only the synthetic domains' checker is)")
        reward = synthetic_reward(cfg, records, tokenizer)
    distiller = Distiller(cfg, models, data, build_student_optimizer(cfg, models), evaluate, reward=reward)
    distiller.fit()
    out = Path(cfg.train.out_dir)
    save_model_dir(models.student, out / "student")
    if cfg.student.load is not None and is_hf_dir(cfg.student.load):
        from gopd_mega.hf import export_hf

        export_hf(models.student, out / "hf", source_dir=cfg.student.load)
        report(f"Hugging Face checkpoint: {out / 'hf'}")
    return distiller


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message alone tells the user what to fix (no traceback needed)."""
    from gopd_mega.hf.families import UnsupportedCheckpoint
    from gopd_mega.hf.safetensors_io import CheckpointError
    from gopd_mega.hf.tokenizer import TokenizerMismatch

    return ConfigError, DataError, CheckpointError, TokenizerMismatch, UnsupportedCheckpoint


def report_user_error(exc: BaseException) -> None:
    """One line on stderr, from rank 0 only (every rank of a torchrun job fails the same way)."""
    if int(os.environ.get("RANK", "0")) == 0:
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"gopd-train: error: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="YAML or TOML recipe (RunConfig sections)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    args = parser.parse_args(argv)
    try:
        train(load_config(args.recipe, args.overrides))
    except Exception as exc:
        if not isinstance(exc, user_errors()):
            raise
        report_user_error(exc)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
