"""Exported models and checkpoints get the modes the umask gives ordinary files, so an SGLang
server running as another user can read a disk weight sync (safetensors alone writes 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from gopd_mega.checkpoint import save_rng_state, write_manifest
from gopd_mega.config import ModelConfig
from gopd_mega.model_io import build_model, save_model_dir
from helpers import TINY


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(root):
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def test_exports_and_checkpoint_files_honour_the_umask(tmp_path, umask):
    from gopd_mega.hf import export_hf

    model = build_model(ModelConfig(**TINY), trainable=False, name="m")
    save_model_dir(model, tmp_path / "student")
    export_hf(model, tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_rng_state(ckpt / "rng_00000.safetensors")
    write_manifest(ckpt, 1)
    for root in ("student", "hf", "ckpt"):
        modes = _modes(tmp_path / root)
        assert any(name.endswith(".safetensors") for name in modes)
        for name, mode in modes.items():
            want = (0o777 if (tmp_path / root / name).is_dir() else 0o666) & ~umask
            assert mode == want, f"{root}/{name}: {oct(mode)}, want {oct(want)}"
