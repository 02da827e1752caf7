"""gopd-train as a user runs it (a subprocess per run): SIGTERM mid-run saves a checkpoint and
exits 75, and the rerun finishes exactly like a run that was never stopped; kill -9 mid-run, then a
rerun, leaves metrics.jsonl with every step once. Tiny synthetic models, CPU."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dist_utils import subprocess_env
from gopd_mega.config import ModelConfig
from gopd_mega.data.tokenizer import CharTokenizer
from gopd_mega.model_io import build_model, save_model_dir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TOK = CharTokenizer()
STEPS = 6


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A recipe of tiny models; ``train.out_dir`` is given per run."""
    root = tmp_path_factory.mktemp("signals")
    for name, seed, std in (("student", 1, 0.02), ("teacher", 2, 0.3)):
        cfg = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
                          vocab_size=TOK.vocab_size, max_seq_len=32, seed=seed, init_std=std)
        save_model_dir(build_model(cfg, trainable=False, name=name), root / name)
    path = root / "recipe.json"
    path.write_text(json.dumps({
        "student": {"load": str(root / "student")}, "teachers": [{"name": "add", "model": {"load": str(root / "teacher")}}],
        "rollout": {"max_new_tokens": 4}, "optim": {"lr": 1e-3},
        "data": {"max_prompt_len": 12, "num_train": 16, "num_eval": 2, "domains": ["add"]},
        "train": {"steps": STEPS, "prompts_per_step": 2, "progress": False}}))
    return path


def cli(recipe, out, *overrides):
    return subprocess.Popen([sys.executable, "-m", "gopd_mega.cli", "--recipe", str(recipe), f"train.out_dir={out}",
                             *overrides], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def run_until(proc, text: str) -> str:
    """Read the run's stdout until a line holding ``text``; returns what was read."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"the run ended before printing {text!r}: {''.join(seen)}{proc.stderr.read()}")


def steps_logged(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(recipe, tmp_path_factory):
    """The final student of a run that was never stopped."""
    out = tmp_path_factory.mktemp("straight") / "run"
    rc, _, err = finish(cli(recipe, out))
    assert rc == 0, err
    return load_file(str(out / "student" / "model.safetensors"))


def _assert_same_student(out, straight):
    final = load_file(str(out / "student" / "model.safetensors"))
    assert final.keys() == straight.keys()
    assert all((final[k] == straight[k]).all() for k in final), "the resumed run differs from the straight one"


def test_sigterm_saves_exits_75_and_the_rerun_finishes_as_if_never_stopped(recipe, straight, tmp_path):
    out = tmp_path / "run"
    proc = cli(recipe, out)
    run_until(proc, "[train 2]")
    proc.send_signal(signal.SIGTERM)
    rc, stdout, err = finish(proc)
    assert rc == 75, err
    lines = [x for x in err.splitlines() if x.startswith("gopd-train:")]
    assert len(lines) == 1 and lines[0].startswith("gopd-train: stopped by SIGTERM after step "), err
    step = int(lines[0].split("after step ")[1].split(":")[0])
    assert 2 <= step < STEPS and "Traceback" not in err
    assert f"checkpoint {out / 'checkpoints' / f'step_{step:06d}'} saved" in lines[0]
    assert "got SIGTERM: the run stops after this step" in stdout
    assert not (out / "student").exists()  # the final model is written only by a finished run

    rc, stdout, err = finish(cli(recipe, out))
    assert rc == 0, err
    assert f"resumed from {out / 'checkpoints' / f'step_{step:06d}'} at step {step}" in stdout
    assert steps_logged(out) == list(range(1, STEPS + 1))
    _assert_same_student(out, straight)


def test_kill_9_then_resume_logs_every_step_once(recipe, straight, tmp_path):
    out = tmp_path / "run"
    proc = cli(recipe, out, "train.save_every=2")
    run_until(proc, "[train 3]")  # step 3 logged; the newest checkpoint is step 2
    proc.kill()
    finish(proc)
    assert 3 in steps_logged(out)
    rc, stdout, err = finish(cli(recipe, out, "train.save_every=2"))
    assert rc == 0, err
    assert "resumed from" in stdout
    assert steps_logged(out) == list(range(1, STEPS + 1))  # rows after the resumed step were dropped, then logged again
    _assert_same_student(out, straight)
