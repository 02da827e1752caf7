"""Checkpoints that verify and fall back, never load a '.partial', leave no half-deleted
directory, and run no code from the files a resume reads (tiny megatron-core models, CPU).

One real run saves steps 1..3 (module fixture); each test works on a copy of its directory.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from gopd_mega.checkpoint import CheckpointManager, write_manifest
from gopd_mega.hf.safetensors_io import CheckpointError
from helpers import make_distiller, run_cfg


@pytest.fixture(scope="module")
def saved(model_dirs, tmp_path_factory):
    """(out_dir with checkpoints of steps 1, 2, 3 and metrics.jsonl, the finished Distiller)."""
    out = tmp_path_factory.mktemp("saved") / "run"
    run = make_distiller(run_cfg(model_dirs, out, 3, **{"train.save_every": 1, "train.prompts_per_step": 2}))
    run.fit()
    return out, run


@pytest.fixture()
def copy(saved, tmp_path):
    """A fresh copy of the saved run's out_dir."""
    dst = tmp_path / "run"
    shutil.copytree(saved[0], dst)
    return dst


def _ck(out, step):
    return out / "checkpoints" / f"step_{step:06d}"


def test_corrupt_newest_falls_back_and_says_why(model_dirs, copy, capsys):
    """The newest checkpoint with a truncated weight file is skipped (named, with the reason) and
    the run resumes from the one before; metrics.jsonl then has each step once."""
    distcp = _ck(copy, 3) / "train_state" / "__0_0.distcp"
    with open(distcp, "r+b") as f:
        f.truncate(distcp.stat().st_size // 2)
    path, skipped = CheckpointManager(copy).resume_point()
    assert path == _ck(copy, 2)
    assert len(skipped) == 1 and "step_000003" in skipped[0] and "train_state/__0_0.distcp" in skipped[0]
    # A flipped byte of the same size is caught by the checksum.
    distcp2 = _ck(copy, 2) / "train_state" / "__0_0.distcp"
    data = bytearray(distcp2.read_bytes())
    data[len(data) // 2] ^= 0xFF
    distcp2.write_bytes(bytes(data))
    path, skipped = CheckpointManager(copy).resume_point()
    assert path == _ck(copy, 1) and "sha256" in skipped[1]

    run = make_distiller(run_cfg(model_dirs, copy, 4, **{"train.save_every": 1, "train.prompts_per_step": 2}))
    history = run.fit()
    out = capsys.readouterr().out
    assert "checkpoint skipped: step_000003" in out and "checkpoint skipped: step_000002" in out
    assert f"resumed from {_ck(copy, 1)} at step 1" in out
    assert len(history) == 3 and run.step == 4
    steps = [json.loads(x)["step"] for x in (copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # rows 2 and 3 of the first attempt were dropped, then logged again


def test_nothing_verifies_is_an_error_not_a_fresh_start(copy):
    for step in (1, 2, 3):
        (_ck(copy, step) / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies: step_000003: trainer_state.json has 2 "
                                              "bytes, the manifest says .*; step_000002: .*; step_000001: .*"):
        CheckpointManager(copy).resume_point()


def test_partial_is_never_loaded_and_is_removed(copy):
    """A save killed after its manifest but before the rename: a '.partial' that looks complete
    (today's main loaded it), with a higher step. Never a candidate; removed on resume."""
    partial = _ck(copy, 3).with_name("step_000009.partial")
    shutil.copytree(_ck(copy, 3), partial)
    state = json.loads((partial / "trainer_state.json").read_text())
    (partial / "trainer_state.json").write_text(json.dumps({**state, "step": 9}))
    write_manifest(partial, 9)
    (partial / "COMPLETE").write_text("ok\n")  # main's marker, too
    path, skipped = CheckpointManager(copy).resume_point()
    assert path == _ck(copy, 3) and skipped == []
    assert not partial.exists()


def test_resume_chooses_by_the_manifest_not_the_name(copy):
    os.rename(_ck(copy, 2), _ck(copy, 9))  # step 2's files under a newer-looking name
    mgr = CheckpointManager(copy)
    assert mgr.resume_point() == (_ck(copy, 3), [])
    assert [p.name for p in mgr.complete()] == ["step_000001", "step_000009", "step_000003"]


def test_interrupted_keep_last_leaves_no_half_deleted_checkpoint(copy, monkeypatch):
    """A deletion killed half-way leaves only a '.deleting' directory, which resume removes."""
    import gopd_mega.checkpoint as checkpoint

    real = shutil.rmtree

    def killed(path, *a, **k):  # deletes one file, then the process "dies"
        os.remove(next(e.path for e in os.scandir(path) if e.is_file()))
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        CheckpointManager(copy, keep_last=2).prune(keep=_ck(copy, 3))
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real)
    names = sorted(p.name for p in (copy / "checkpoints").iterdir())
    assert names == ["latest", "step_000001.deleting", "step_000002", "step_000003"]
    assert CheckpointManager(copy).resume_point() == (_ck(copy, 3), [])
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["latest", "step_000002", "step_000003"]


class Payload:
    """Unpickling it runs ``touch MARKER``: what a hostile checkpoint would do."""

    marker = None

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _payload_pickle(marker) -> bytes:
    Payload.marker = marker
    return pickle.dumps(Payload())


def _plant(ckpt, rel, data: bytes, step=3):
    (ckpt / rel).write_bytes(data)
    write_manifest(ckpt, step)  # a forger rewrites the manifest too: the checksums still pass


@pytest.mark.parametrize("where", ["train_state/.metadata", "metadata_bytes_entry", "train_state/__0_0.distcp",
                                   "rng_00000.safetensors", "rng_00000.pt"])
def test_planted_pickle_payload_never_runs_on_resume(saved, copy, tmp_path, where):
    """Each file a resume reads gets a pickle whose unpickling would create a marker file; the
    checksums are rewritten to match. Loading refuses (or ignores the file), and the marker
    never appears (today's main ran it from the RNG file and from DCP's metadata)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    _, run = saved
    ckpt, marker = _ck(copy, 3), tmp_path / "PWNED"
    if where == "metadata_bytes_entry":
        # Real DCP metadata in which one entry claims to be bytes: DCP's planner would torch.load
        # those bytes with weights_only=False.
        meta_path = ckpt / "train_state" / ".metadata"
        meta = pickle.loads(meta_path.read_bytes())
        meta.state_dict_metadata["scalars/adam_step"] = BytesStorageMetadata()
        _plant(ckpt, "train_state/.metadata", pickle.dumps(meta))
        distcp = ckpt / "train_state" / "__0_0.distcp"
        distcp.write_bytes(distcp.read_bytes() + _payload_pickle(marker))
        write_manifest(ckpt, 3)
    elif where == "train_state/__0_0.distcp":
        # A torch.save archive of the payload appended to the data file, and the metadata pointed
        # at it: DCP reads each tensor with torch.load (weights_only=True) from its offset.
        import io

        Payload.marker = marker
        buf = io.BytesIO()
        torch.save(Payload(), buf)
        distcp, meta_path = ckpt / where, ckpt / "train_state" / ".metadata"
        meta = pickle.loads(meta_path.read_bytes())
        index = next(i for i in meta.storage_data if i.fqn == "scalars/adam_step")
        info = meta.storage_data[index]
        info.offset, info.length = distcp.stat().st_size, len(buf.getvalue())
        distcp.write_bytes(distcp.read_bytes() + buf.getvalue())
        _plant(ckpt, "train_state/.metadata", pickle.dumps(meta))
    else:
        _plant(ckpt, where, _payload_pickle(marker))
    before = {k: v.clone() for k, v in run.m.student.full_state_dict().items()}
    mgr = CheckpointManager(copy)
    assert mgr.resume_point()[0] == ckpt  # the checksums verify: only the readers stand in the way
    if where == "rng_00000.pt":  # main's RNG file name: nothing reads it any more
        mgr.load(ckpt, run.m.student, run.optimizer)
    else:
        with pytest.raises(CheckpointError) as info:
            mgr.load(ckpt, run.m.student, run.optimizer)
        assert str(ckpt) in str(info.value)
        # nothing was half-loaded into the model when the metadata was refused up front
        if where.endswith(".metadata") or where == "metadata_bytes_entry":
            after = run.m.student.full_state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)
    assert not marker.exists(), f"the payload in {where} ran"


def test_metrics_truncate_to_the_resumed_step_in_jsonl_and_tensorboard(tmp_path):
    """What an interrupted attempt logged after the resumed step is dropped from metrics.jsonl,
    and TensorBoard purges it (its purge_step), so every step reads back once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gopd_mega.metrics import MetricsLogger

    first = MetricsLogger(tmp_path, "both", console_every=0)
    for step in range(1, 6):
        first.log(step, {"loss": float(step)})
    first.log(5, {"acc": 0.5}, prefix="eval")
    first._jsonl.write('{"step": 6, "pha')  # a line cut short by kill -9
    first.close()
    again = MetricsLogger(tmp_path, "both", console_every=0)
    assert again.truncate(3) == 4  # steps 4 and 5, the eval row of step 5, the cut line
    for step in (4, 5):
        again.log(step, {"loss": 10.0 * step})
    again.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
