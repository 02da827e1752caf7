"""A full or read-only disk: one line naming the path and the space needed, exit status 2, and the
previous checkpoint kept intact. The file systems are small tmpfs mounts (the test needs root;
it is skipped where mounting is not allowed)."""

from __future__ import annotations

import contextlib
import subprocess

import pytest

from gopd_mega.checkpoint import CheckpointManager
from helpers import cli_fails, cli_recipe


@contextlib.contextmanager
def small_fs(path, size: str, read_only: bool = False):
    """A tmpfs of ``size`` (e.g. '160k') mounted at ``path`` for the test."""
    path.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _run(tmp_path, out, model, steps=2):
    recipe = cli_recipe(model, model, tmp_path)
    recipe["train"].update(out_dir=str(out), steps=steps, save_every=1)
    recipe["data"]["domains"] = ["add"]
    return recipe


@pytest.mark.parametrize("when", ["checked before the write", "found during the write"])
def test_full_disk_names_the_space_and_keeps_the_previous_checkpoint(capsys, tmp_path, two_head_model,
                                                                     monkeypatch, when):
    """One checkpoint of this model (~110 KiB) fits in 200 KiB, two do not. The second save is
    refused by the space check, or (check disabled) fails with ENOSPC in DCP's writes."""
    if when == "found during the write":
        import gopd_mega.checkpoint as checkpoint
        import gopd_mega.hf.train_state as train_state

        for module in (checkpoint, train_state):
            monkeypatch.setattr(module, "require_space", lambda *a, **k: None)
    with small_fs(tmp_path / "fs", "200k") as fs:
        out = fs / "run"
        line = cli_fails(capsys, tmp_path, _run(tmp_path, out, two_head_model))
        ckpts = out / "checkpoints"
        assert line.startswith("gopd-train: error: checkpoint step_000002: ")
        if when == "checked before the write":
            assert f"not enough space in {ckpts}: it needs about " in line and "KiB are free" in line
        else:
            assert "no space left writing " in line and f"KiB are free in {ckpts}" in line
        assert line.endswith(f"the previous checkpoint {ckpts / 'step_000001'} is kept")
        assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000001"]  # no .partial left
        assert CheckpointManager(out).resume_point() == (ckpts / "step_000001", [])


def test_read_only_out_dir(capsys, tmp_path, two_head_model):
    with small_fs(tmp_path / "ro", "64k", read_only=True) as fs:
        line = cli_fails(capsys, tmp_path, _run(tmp_path, fs / "run", two_head_model))
        assert line == f"gopd-train: error: config field 'train.out_dir': cannot create {fs / 'run'}: Read-only file system"
        line = cli_fails(capsys, tmp_path, _run(tmp_path, fs, two_head_model))
        assert line == f"gopd-train: error: config field 'train.out_dir': cannot write in {fs}: Read-only file system"
