"""gopd-train as a user runs it (a subprocess per run): SIGTERM mid-run saves a checkpoint and
exits 75, and the rerun finishes exactly like a run that was never stopped; kill -9 mid-run, then a
rerun, leaves metrics.jsonl with every step once. Tiny synthetic models, CPU."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from dist_utils import subprocess_env
from helpers import REPO, run_until
from helpers import TINY_RECIPE_STEPS as STEPS

pytestmark = pytest.mark.slow


def cli(tiny_recipe, out, *overrides):
    return subprocess.Popen([sys.executable, "-m", "gopd_mega.cli", "--recipe", str(tiny_recipe), f"train.out_dir={out}",
                             *overrides], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def steps_logged(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tiny_recipe, tmp_path_factory):
    """The final student of a run that was never stopped."""
    out = tmp_path_factory.mktemp("straight") / "run"
    rc, _, err = finish(cli(tiny_recipe, out))
    assert rc == 0, err
    return load_file(str(out / "student" / "model.safetensors"))


def _assert_same_student(out, straight):
    final = load_file(str(out / "student" / "model.safetensors"))
    assert final.keys() == straight.keys()
    assert all((final[k] == straight[k]).all() for k in final), "the resumed run differs from the straight one"


def test_sigterm_saves_exits_75_and_the_rerun_finishes_as_if_never_stopped(tiny_recipe, straight, tmp_path):
    out = tmp_path / "run"
    proc = cli(tiny_recipe, out)
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

    rc, stdout, err = finish(cli(tiny_recipe, out))
    assert rc == 0, err
    assert f"resumed from {out / 'checkpoints' / f'step_{step:06d}'} at step {step}" in stdout
    assert steps_logged(out) == list(range(1, STEPS + 1))
    _assert_same_student(out, straight)


def test_kill_9_then_resume_logs_every_step_once(tiny_recipe, straight, tmp_path):
    out = tmp_path / "run"
    proc = cli(tiny_recipe, out, "train.save_every=2")
    run_until(proc, "[train 3]")  # step 3 logged; the newest checkpoint is step 2
    proc.kill()
    finish(proc)
    assert 3 in steps_logged(out)
    rc, stdout, err = finish(cli(tiny_recipe, out, "train.save_every=2"))
    assert rc == 0, err
    assert "resumed from" in stdout
    assert steps_logged(out) == list(range(1, STEPS + 1))  # rows after the resumed step were dropped, then logged again
    _assert_same_student(out, straight)
