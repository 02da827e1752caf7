"""G-OPD (or GRPO, objective.kind=grpo) training from a recipe:
``gopd-train --recipe RECIPE.yaml [section.field=value ...]``.

    python -m gopd_mega.cli --recipe recipes/example_synthetic.yaml objective.lam=1.25
    torchrun --nproc-per-node 8 -m gopd_mega.cli --recipe my_run.yaml student.tp=2

Prompts come from ``data.source``: 'synthetic' (the arithmetic domains, character tokenizer) or
a local dataset file/directory (parquet/JSONL/arrow/saved dataset) read with the student's own
Hugging Face tokenizer and chat template. GRPO rewards and the periodic evaluation of held-out
records (``data.eval_source`` or ``data.eval_holdout``) come from the verifier ``data.verifier``
picks (math, code in the sandbox, synthetic; 'auto': from each record's route). The trained student is written to
``<train.out_dir>/student`` (gopd-mega model directory) and, for a Hugging Face student, also
exported as a Hugging Face checkpoint to ``<train.out_dir>/hf``.

Errors a user can fix (a bad config field, an unreadable or incomplete dataset, a checkpoint or
tokenizer that does not fit, a full or read-only disk, training that turned non-finite, a dead or
stopped rank: :func:`user_errors`) are printed as ONE line naming the file, line, field, rank or
URL, once (by rank 0, or by the failing rank when only it knows), and every rank exits with
status 2. SIGTERM, SIGINT and SIGUSR1 stop the run after the current step with a checkpoint, exit
status 75. Anything else is a bug and keeps its traceback (gopd_mega/failures.py has the codes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path

from gopd_mega.config import ConfigError, RunConfig, load_config
from gopd_mega.data import synthetic
from gopd_mega.data.prompts import DataError
from gopd_mega.data.tokenizer import CharTokenizer
from gopd_mega.failures import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_STOPPED,
    PeerFailed,
    StopRequested,
    TrainingError,
    diagnose,
    is_collective_failure,
    mark_failed,
    rank,
    report_here,
    start_heartbeat,
)
from gopd_mega.hf.safetensors_io import CheckpointError
from gopd_mega.model_io import is_hf_dir, save_model_dir
from gopd_mega.platform import init_distributed
from gopd_mega.run import RecordVerifiers, build_distiller, report
from gopd_mega.storage import StorageError
from gopd_mega.trainer import Distiller


def load_prompts(cfg: RunConfig):
    """(tokenizer, training records, held-out records by domain or None) for the data source."""
    if cfg.data.source == "synthetic":
        records, held_out = synthetic.from_config(cfg.data)
        return CharTokenizer(), records, held_out
    from gopd_mega.hf import HFTokenizer

    if cfg.student.load is None or not is_hf_dir(cfg.student.load):
        raise ConfigError(
            "config field 'student.load': data.source is a dataset file, so the student must be a "
            "Hugging Face model directory (its tokenizer is used)"
        )
    try:
        tokenizer = HFTokenizer(cfg.student.load)
    except CheckpointError as exc:
        raise ConfigError(f"config field 'student.load': {exc}") from None
    return tokenizer, load_dataset_records(cfg, tokenizer, cfg.data.source), None


def load_dataset_records(cfg: RunConfig, tokenizer, path: str) -> list[dict]:
    """The records of a dataset file (gopd_mega.hf.load_prompt_records), plus, when a code
    verifier may read them, each record's unit tests from ``data.tests_field`` as stored (a
    list/dict is kept as its JSON text, which the code verifier parses)."""
    from gopd_mega.hf import load_prompt_records, open_dataset

    records = load_prompt_records(cfg.data, tokenizer, path)
    tests_field = cfg.data.tests_field or cfg.data.answer_field
    if cfg.data.verifier in ("auto", "code"):
        ds = open_dataset(path)
        if tests_field in ds.column_names:
            for rec, value in zip(records, ds[tests_field]):
                if value is not None:
                    rec[tests_field] = value if isinstance(value, str) else json.dumps(value)
    return records


def split_holdout(cfg: RunConfig, records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records): ``data.eval_holdout`` records drawn with ``data.seed``
    (file order kept in both parts)."""
    n, k = len(records), cfg.data.eval_holdout
    if k >= n:
        raise ConfigError(
            f"config field 'data.eval_holdout': holding out {k} of the {n} records of "
            f"{cfg.data.source} leaves none to train on"
        )
    held = set(random.Random(f"{cfg.data.seed}:eval_holdout").sample(range(n), k))
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def check_out_dir(path: str) -> None:
    """``train.out_dir`` is (or can be made) a directory this process can write (every rank checks)."""
    where = "config field 'train.out_dir'"
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{where}: {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot create {out}: {exc.strerror}") from None
    probe = out / f".write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot write in {out}: {exc.strerror}") from None


def train(cfg: RunConfig) -> Distiller:
    check_out_dir(cfg.train.out_dir)
    init_distributed(timeout_s=cfg.train.dist_timeout_s)
    start_heartbeat()  # a dead or stopped rank can then be named (gopd_mega.failures.diagnose)
    tokenizer, records, held_out = load_prompts(cfg)
    eval_set, eval_where = None, None
    if cfg.data.eval_holdout:
        records, eval_set = split_holdout(cfg, records)
        eval_where = f"{cfg.data.source} (data.eval_holdout={cfg.data.eval_holdout})"
    elif cfg.data.eval_source is not None:
        eval_set, eval_where = load_dataset_records(cfg, tokenizer, cfg.data.eval_source), cfg.data.eval_source
    verifiers = RecordVerifiers(cfg.data)
    try:
        distiller = build_distiller(
            cfg, tokenizer, records, held_out=held_out, eval_set=eval_set, eval_where=eval_where, verifiers=verifiers
        )
        report(str(distiller.data.filter_summary))
        distiller.fit()
    finally:
        verifiers.close()  # the math verifier's worker processes
    models = distiller.m
    out = Path(cfg.train.out_dir)
    save_model_dir(models.student, out / "student")
    if cfg.student.load is not None and is_hf_dir(cfg.student.load):
        from gopd_mega.hf import export_hf

        export_hf(models.student, out / "hf", source_dir=cfg.student.load)
        report(f"Hugging Face checkpoint: {out / 'hf'}")
    return distiller


REPORTER_GRACE_S = 30.0
"""How long a rank that does not print a user error waits before exiting (see main)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message alone tells the user what to fix (no traceback needed)."""
    from gopd_mega.hf.families import UnsupportedCheckpoint
    from gopd_mega.hf.tokenizer import TokenizerMismatch

    return (
        ConfigError,
        DataError,
        CheckpointError,
        TokenizerMismatch,
        UnsupportedCheckpoint,
        StorageError,
        TrainingError,
    )


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def report_user_error(exc: BaseException) -> None:
    """One line on stderr, from the rank that reports it (rank 0 unless only another rank knows)."""
    if report_here(exc):
        print(f"gopd-train: error: {_one_line(exc)}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="YAML or TOML recipe (RunConfig sections)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    args = parser.parse_args(argv)
    timeout_s = None
    try:
        cfg = load_config(args.recipe, args.overrides)
        timeout_s = cfg.train.dist_timeout_s
        train(cfg)
    except StopRequested as stop:
        if rank() == 0:
            print(f"gopd-train: {stop}", file=sys.stderr, flush=True)
        _exit(EXIT_STOPPED)
    except PeerFailed:
        _exit(EXIT_ERROR)  # the rank that failed says why
    except KeyboardInterrupt:  # Ctrl-C before the training loop (inside it, SIGINT saves and stops)
        if rank() == 0:
            print("gopd-train: interrupted before training started; nothing was saved", file=sys.stderr, flush=True)
        _exit(EXIT_INTERRUPTED)
    except Exception as exc:
        if isinstance(exc, user_errors()):
            report_user_error(exc)
            mark_failed(_one_line(exc), printed=report_here(exc))
            if not report_here(exc) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # The reporting rank meets the same error; were this rank to exit first, torchrun
                # would stop the reporter before it printed. It stops this one when the reporter exits.
                time.sleep(REPORTER_GRACE_S)
            _exit(EXIT_ERROR)
        if not is_collective_failure(exc):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun stops the survivors: first say who is lost
        # A peer died, stopped or failed: name it once, then leave at once (a clean shutdown of
        # the process group could wait on the peer that is gone).
        message, here = diagnose(exc, timeout_s)
        if here and message:
            print(f"gopd-train: error: {_one_line(message)}", file=sys.stderr, flush=True)
        _exit(EXIT_ERROR, now=True)


def _exit(code: int, now: bool = False) -> None:
    """Leave with ``code``. In a multi-process job at once (os._exit): torchrun stops the other
    workers as soon as one exits, and a worker still shutting down would end by its SIGTERM
    instead of its own code."""
    if now or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
