"""objective.estimator = full_vocab / top_k across layouts (gloo, 2 and 3 processes): the same run
at TP = 1 and with the student at TP = 2 or 3 beside teachers and a reference in other layouts
(TP = 1 at another hidden size, PP = 2, their own TP), with sequence parallelism, at DP = 2 with
the overlapped gradient reduce, or at PP = 2, gives the same losses, gradient norms and reverse
KLs over 3 steps; every rank reports the same numbers.

What differs between layouts: the vocab-parallel logsumexps split over 2 or 3 ranks (3: uneven
shards, 16/16/12 of 44 ids), the row-parallel all-reduces, and where the hidden states travel
(point to point between DP shards of different sizes). fp32: only summation order changes, ~1e-7
relative per quantity; rtol 1e-5 leaves headroom for 3 Adam steps amplifying it, as in
tests/test_parallel_layouts.py.
"""

from __future__ import annotations

import pytest

from dist_utils import run_distributed
from helpers import make_distiller, run_cfg, save_random_model

pytestmark = pytest.mark.distributed

KEYS = ("loss", "grad_norm", "reverse_kl", "log_z", "reverse_kl/add", "reverse_kl/mul")


def _dirs(root, heads: int, groups: int, widths: tuple[int, int, int, int]) -> dict:
    arch = dict(num_attention_heads=heads, num_query_groups=groups)
    s, a, m, r = widths
    return {"student": save_random_model(root / "s", 1, hidden_size=s, ffn_hidden_size=2 * s, init_std=0.1, **arch),
            "add": save_random_model(root / "a", 2, hidden_size=a, ffn_hidden_size=2 * a, init_std=0.3, **arch),
            "mul": save_random_model(root / "m", 3, hidden_size=m, ffn_hidden_size=2 * m, init_std=0.3, **arch),
            "ref": save_random_model(root / "r", 4, hidden_size=r, ffn_hidden_size=2 * r, init_std=0.2, **arch)}


def _train(dirs, out_dir, runs: list[tuple[str, str, dict]]) -> dict:
    """3 steps of each (name, estimator, overrides); the per-step metrics of each run by name."""
    out = {}
    for name, estimator, layout in runs:
        layout = dict(layout)
        ref = f"{{load: {dirs['ref']}, tp: {layout.pop('ref_tp', 1)}, {layout.pop('ref_arch', '')}}}"
        cfg = run_cfg(dirs, out_dir / name, 3, **{"objective.estimator": estimator, "objective.top_k": 6,
                                                   "objective.reference": ref, **layout})
        out[name] = [m[k] for m in make_distiller(cfg).fit() for k in KEYS]
    return out


def _check(results: list[dict], base: dict) -> None:
    for rank in results:
        assert rank == results[0]  # every rank reports the full-batch numbers
        for name, steps in rank.items():
            assert steps == pytest.approx(base[name.split(" ")[0]], rel=1e-5, abs=1e-7), name


@pytest.fixture(scope="module")
def four_heads(tmp_path_factory):
    return _dirs(tmp_path_factory.mktemp("fh"), 4, 2, (32, 48, 32, 40))


def test_student_tp2_beside_teachers_tp1_pp2_and_reference_tp2(four_heads, tmp_path):
    base = _train(four_heads, tmp_path / "one", [("full_vocab", "full_vocab", {}), ("top_k", "top_k", {})])
    assert base["full_vocab"][KEYS.index("log_z")] != 0  # lam = 1.25: the reference matters
    layout = {"student.tp": 2, "teachers.1.model.pp": 2, "ref_tp": 2}  # teacher 'add': TP=1 (DP=2), width 48
    runs = [("full_vocab", "full_vocab", layout), ("top_k", "top_k", layout),
            # sequence parallelism: the kernel leaves dh to the hidden states' all-gather backward
            # (the embedded engine's KV-cache decode does not run under SP: kv_cache off)
            ("full_vocab sp", "full_vocab", {**layout, "student.sequence_parallel": True, "rollout.kv_cache": False}),
            ("top_k sp", "top_k", {**layout, "student.sequence_parallel": True, "rollout.kv_cache": False}),
            # the student at DP=2 with the overlapped gradient reduce (DDP's hooks on the output weight)
            ("full_vocab dp2", "full_vocab", {"optim.overlap_grad_reduce": True}),
            # the student at PP=2: only its last stage receives hidden states and computes the loss
            ("full_vocab pp2", "full_vocab", {"student.pp": 2, "ref_tp": 2}),
            ("top_k pp2", "top_k", {"student.pp": 2})]
    _check(run_distributed(_train, 2, (four_heads, tmp_path / "two", runs)), base)


def test_student_tp3_uneven_vocab_shards(tmp_path):
    dirs = _dirs(tmp_path / "m", 6, 3, (48, 36, 48, 24))
    base = _train(dirs, tmp_path / "one", [("full_vocab", "full_vocab", {}), ("top_k", "top_k", {})])
    # (validation checks tp against the head counts of the config, also for a loaded model: give them)
    arch = {f"{m}.{k}": v for m in ("student", "teachers.1.model")
            for k, v in (("num_attention_heads", 6), ("num_query_groups", 3), ("hidden_size", 48))}
    layout = {"student.tp": 3, "teachers.1.model.tp": 3, "ref_tp": 3, **arch,  # teacher 'add': TP=1 (DP=3), width 36
              "ref_arch": "num_attention_heads: 6, num_query_groups: 3, hidden_size: 24"}
    runs = [("full_vocab", "full_vocab", layout), ("top_k", "top_k", layout)]
    _check(run_distributed(_train, 3, (dirs, tmp_path / "three", runs)), base)
