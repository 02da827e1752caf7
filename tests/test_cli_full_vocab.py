"""objective.estimator=full_vocab through the CLI under torchrun: the student at TP=2, the teacher
at TP=1 with another hidden size (48 vs 32), in a setting where the one-sample estimator barely
moves: a wide vocabulary (4096 ids), a near-uniform student (init std 0.02: entropy 8.31 of
log 4096 = 8.32 nats), a peaked teacher (most of its mass on 8 ids at every prefix).

A sampled token lands on one of the teacher's 8 ids with probability 8/4096 per position, so the
paper's estimator sees almost nothing but large negative advantages of tokens the teacher does not
want and its reverse KL stays where it was; the exact expectation moves mass towards those ids at
every position. Measured (this recipe; reverse KL to the teacher, nats per token): full_vocab
7.24 at step 1, still 6.6 at step 6 (Adam first has to build a direction every student hidden
state shares), 0.21 at step 8 and 0.01 at step 9 (TP=2; TP=1: 0.20, 0.01); sampled 7.24 -> 7.37
at step 8, 7.53 at step 10.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dist_utils import subprocess_env
from gopd_mega.config import ModelConfig, load_config
from gopd_mega.model_io import build_model, save_model_dir

ROOT = Path(__file__).resolve().parent.parent
V = 4096
ARCH = dict(num_layers=2, num_attention_heads=4, num_query_groups=2, vocab_size=V, max_seq_len=24)
FAVOURED = slice(100, 108)


def _models(root: Path) -> tuple[str, str]:
    student = build_model(ModelConfig(**ARCH, hidden_size=32, ffn_hidden_size=64, init_std=0.02, seed=1), False, "s")
    save_model_dir(student, root / "student")
    teacher = build_model(ModelConfig(**ARCH, hidden_size=48, ffn_hidden_size=96, init_std=0.02, seed=2,
                                      tie_embeddings=False), False, "t")
    sd = teacher.full_state_dict()
    sd["embedding.word_embeddings.weight"][:, 0] = 1.0  # one direction in every hidden state ...
    sd["output_layer.weight"][FAVOURED, 0] = 2.0  # ... that the favoured ids' logits read: a peak everywhere
    teacher.load_full_state_dict(sd)
    save_model_dir(teacher, root / "teacher")
    return str(root / "student"), str(root / "teacher")


def _recipe(tmp_path: Path) -> Path:
    student, teacher = _models(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""
student: {{load: {student}}}
teachers:
  - {{name: add, model: {{load: {teacher}}}}}
  - {{name: mul, model: {{load: {teacher}}}}}
objective: {{lam: 1.0}}
rollout: {{max_new_tokens: 6}}
optim: {{lr: 0.1, warmup_steps: 0}}
data: {{num_train: 64, num_eval: 8, max_prompt_len: 12}}
train: {{steps: 10, prompts_per_step: 8, progress: false}}
""")
    return path


def _reverse_kl(out_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["reverse_kl"] for r in rows if r.get("phase") == "train"]


@pytest.mark.distributed
def test_full_vocab_torchrun_student_tp2_teacher_tp1_other_width(tmp_path):
    recipe = _recipe(tmp_path)
    out = tmp_path / "full_vocab"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "gopd_mega.cli", "--recipe", str(recipe), "objective.estimator=full_vocab", "student.tp=2",
           f"train.out_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_config(recipe).teachers[0].model.tp == 1  # the teacher stays at TP=1 (DP=2), width 48
    kl = _reverse_kl(out)
    assert len(kl) == 10 and kl[0] > 6.0, kl
    assert min(kl[-3:]) < 0.25 * kl[0], kl  # the exact estimator: measured 7.24 -> 0.21 at step 8
    assert (out / "student").is_dir()

    # the one-sample estimator in the same setting (one process: the layout is not the point here)
    from gopd_mega.cli import train

    train(load_config(recipe, ["objective.estimator=sampled", f"train.out_dir={tmp_path / 'sampled'}"]))
    sampled = _reverse_kl(tmp_path / "sampled")
    assert min(sampled[-3:]) > 0.8 * sampled[0], sampled  # barely moves: measured 7.24 -> 7.53 at step 10
