"""GRPO (objective.kind='grpo'): the group-normalised advantage against an fp64 reference, the
token loss's gradient, config checks, and a short RL run in the Distiller loop whose success rises."""

from __future__ import annotations

import statistics

import pytest
import torch

from gopd_mega.config import ConfigError, RunConfig, build_config
from gopd_mega.data import synthetic
from gopd_mega.data.prompts import PromptDataset
from gopd_mega.data.tokenizer import CharTokenizer
from gopd_mega.objective import LossSettings, grpo_advantage, advantage_token_loss, k3_kl
from gopd_mega.run import build_distiller, build_models, build_student_optimizer, synthetic_reward, verifier_reward
from gopd_mega.trainer import Distiller

TOK = CharTokenizer()


def _reference_advantage(rewards: list[float], n: int, eps: float = 1e-6) -> list[float]:
    """verl's GRPO in plain Python floats (fp64): per group, (r - mean) / (sample std + eps)."""
    out = []
    for g in range(0, len(rewards), n):
        group = rewards[g:g + n]
        if n == 1:
            out += group
            continue
        mean, std = statistics.fmean(group), statistics.stdev(group)  # stdev: n - 1 (Bessel)
        out += [(r - mean) / (std + eps) for r in group]
    return out


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_grpo_advantage_matches_fp64_formula(n):
    gen = torch.Generator().manual_seed(n)
    binary = (torch.rand(6 * n, generator=gen) > 0.5).double()
    binary[:n] = 1.0  # an all-correct group: zero advantage (0 / (0 + eps))
    graded = torch.randn(6 * n, generator=gen, dtype=torch.float64) * 3 + 1
    for rewards in (binary, graded):
        got = grpo_advantage(rewards, n)
        want = torch.tensor(_reference_advantage(rewards.tolist(), n), dtype=torch.float64)
        assert got.dtype == torch.float32 and got.shape == rewards.shape
        # float32 output of an fp64 computation: relative rounding 2^-24 ~ 6e-8; |A| <= sqrt(n-1)
        # for binary rewards and a few units for graded ones, so 1e-6 absolute is generous.
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    if n > 1:
        assert got.view(-1, n).double().sum(dim=1).abs().max() < 1e-5  # each group is centred


def test_grpo_advantage_rejects_bad_groups():
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantage(torch.zeros(8), 3)
    with pytest.raises(ValueError, match="1-D"):
        grpo_advantage(torch.zeros(2, 4), 4)


def test_advantage_token_loss_gradient_is_advantage_plus_k3():
    """One update per batch (ratio 1): d loss / d s_t = -A_t * w_t + beta * (1 - exp(r_t - s_t))."""
    gen = torch.Generator().manual_seed(0)
    s = (torch.rand(64, generator=gen, dtype=torch.float64) * -3).requires_grad_()
    r = s.detach() + torch.randn(64, generator=gen, dtype=torch.float64) * 0.3
    q = s.detach() + torch.randn(64, generator=gen, dtype=torch.float64) * 0.1
    a = torch.randn(64, generator=gen, dtype=torch.float64)
    settings = LossSettings(kl_coef=0.05, is_cap=5.0)
    loss, clipped = advantage_token_loss(s, advantage=a, ref_logp=r, sampler_logp=q, old_logp=None, settings=settings)
    loss.sum().backward()
    w = torch.exp(s.detach() - q).clamp(max=5.0)
    want = -a * w + 0.05 * (1.0 - torch.exp(r - s.detach()))
    torch.testing.assert_close(s.grad, want, rtol=1e-12, atol=1e-12)
    assert not clipped.any()
    # k3 is a non-negative KL estimate, zero where the policy equals the reference
    assert (k3_kl(s.detach(), r) >= 0).all() and k3_kl(r, r).abs().max() == 0
    with pytest.raises(ValueError, match="ref_logp"):
        advantage_token_loss(s, advantage=a, ref_logp=None, sampler_logp=None, old_logp=None, settings=settings)


def _grpo_cfg(tmp_path, steps, **extra) -> RunConfig:
    data = {
        "student": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 64,
                    "vocab_size": TOK.vocab_size, "max_seq_len": 16, "seed": 3},
        "objective": {"kind": "grpo", "kl_coef": 0.01},
        "rollout": {"max_new_tokens": 3, "samples_per_prompt": 8},
        "optim": {"lr": 3e-3},
        "data": {"domains": ["add"], "num_train": 64, "num_eval": 8, "max_prompt_len": 8},
        "train": {"steps": steps, "prompts_per_step": 16, "micro_batch_size": 128, "out_dir": str(tmp_path),
                  "progress": False},
    }
    return build_config(RunConfig, data, [f"{k}={v}" for k, v in extra.items()])


def test_grpo_config_checks(tmp_path):
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        _grpo_cfg(tmp_path, 1, **{"rollout.samples_per_prompt": 1})
    with pytest.raises(ConfigError, match="objective.kind"):
        _grpo_cfg(tmp_path, 1, **{"objective.kind": "ppo"})
    with pytest.raises(ConfigError, match="kl_coef"):
        _grpo_cfg(tmp_path, 1, **{"objective.kind": "gopd"})  # gopd: kl_coef must be 0 (and teachers given)


def _success(engine, prompts, reward, seed) -> float:
    out = engine.generate([p.ids for p in prompts], temperature=1.0, top_p=1.0, max_new_tokens=3, seed=seed)
    return sum(reward(p, out.response_ids(i)) for i, p in enumerate(prompts)) / len(prompts)


def test_grpo_run_raises_success(tmp_path):
    """A random tiny model learns a verifiable format reward ("the answer starts with a digit")
    within 15 GRPO steps, through the same Distiller loop and checkpointing as G-OPD.

    Before: a random model's first token is one of 10 digits out of ~45 ids: success ~ 0.22;
    measured over 256 samples its sampling std is ~0.03. Asking for a rise of 0.25 (8 std) makes
    a chance pass impossible, while a working GRPO reaches ~0.7 (measured 0.24 -> 0.68; with the
    advantage's sign flipped it fell to 0.08)."""
    cfg = _grpo_cfg(tmp_path, 15)
    records, _ = synthetic.from_config(cfg.data)
    reward = verifier_reward(records, TOK, lambda rec, text: float(text[:1].isdigit()))
    distiller = build_distiller(cfg, TOK, records, reward=reward)
    models, data = distiller.m, distiller.data
    probe = [data[i] for i in range(32)] * 8
    before = _success(models.engine, probe, reward, seed=7)
    history = distiller.fit()
    after = _success(models.engine, probe, reward, seed=7)
    assert before < 0.45, before
    assert after >= before + 0.25, (before, after, [round(m["reward_mean"], 2) for m in history])
    for m in history:
        assert 0.0 <= m["success_rate"] <= 1.0 and 0.0 <= m["flat_groups"] <= 1.0 and m["kl_ref"] >= -1e-6
    assert (tmp_path / "metrics.jsonl").exists()


def test_grpo_needs_reward_and_synthetic_verifier(tmp_path):
    cfg = _grpo_cfg(tmp_path, 1)
    records, _ = synthetic.from_config(cfg.data)
    models = build_models(cfg, TOK)
    data = PromptDataset.from_config(records, TOK, cfg.data)
    with pytest.raises(ValueError, match="reward"):
        Distiller(cfg, models, data, build_student_optimizer(cfg, models))
    # the synthetic checker as a reward: exact answers score 1, anything else 0
    reward = synthetic_reward(cfg, records, TOK)
    p = data[0]
    assert reward(p, TOK.encode(p.answer) + [TOK.eos_id]) == 1.0
    assert reward(p, TOK.encode(p.answer + "1")) == 0.0


@pytest.mark.parametrize("name", ["qwen3_4b_grpo_math", "qwen3_4b_grpo_code"])
def test_paper_grpo_recipes_validate(name, tmp_path):
    """The teacher recipes are valid GRPO configs once their placeholder paths exist."""
    from gopd_mega.config import read_recipe

    (tmp_path / "data.parquet").touch()
    cfg = build_config(RunConfig, read_recipe(f"recipes/{name}.yaml"),
                       [f"student.load={tmp_path}", f"data.source={tmp_path / 'data.parquet'}"])
    assert cfg.objective.kind == "grpo" and cfg.rollout.samples_per_prompt == 8
    assert cfg.train.prompts_per_step == 128 and cfg.optim.lr == 1e-6 and not cfg.teachers
