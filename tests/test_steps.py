"""The per-step algorithms (gopd_mega.steps): one registry, one interface, picked by objective.kind."""

from __future__ import annotations

import inspect

import pytest

from gopd_mega import steps
from gopd_mega.config import OBJECTIVE_KINDS, ConfigError, ObjectiveConfig
from gopd_mega.objective import LossSettings

INTERFACE = ("score", "update", "metrics", "describe", "progress_key", "reference_logp")


def test_registry_and_config_kinds_agree():
    """config.OBJECTIVE_KINDS (what objective.kind accepts, kept in config so that it imports no
    trainer code) names exactly the steps.STEPS classes."""
    assert tuple(steps.STEPS) == OBJECTIVE_KINDS
    for kind, cls in steps.STEPS.items():
        assert issubclass(cls, steps.Step) and not inspect.isabstract(cls), kind
    for kind in OBJECTIVE_KINDS:
        ObjectiveConfig(kind=kind).validate("objective")  # every registered kind is accepted
    with pytest.raises(ConfigError, match="objective.kind.*'gopd', 'grpo'"):
        ObjectiveConfig(kind="ppo").validate("objective")


def test_objective_config_is_loss_settings():
    """The loss fields are LossSettings' (defined once); ObjectiveConfig adds the rest."""
    cfg = ObjectiveConfig(lam=1.25, clip_eps_high=0.28)
    assert isinstance(cfg, LossSettings)
    assert (cfg.lam, cfg.clip_eps_high, cfg.aggregation) == (1.25, 0.28, "seq-mean-token-mean")
    assert not hasattr(cfg, "loss_settings")


def test_trainer_reexports():
    from gopd_mega import trainer

    for name in ("rows_by_teacher", "score_teachers", "score_teachers_top_k", "gopd_loss_builder",
                 "advantage_loss_builder", "RewardFn", "Models", "Distiller"):
        assert hasattr(trainer, name), name
    assert trainer.gopd_loss_builder is steps.gopd_loss_builder


class _Fake:
    """The parts of a Distiller a Step reads when it is built."""

    def __init__(self, kind, reward):
        self.cfg = type("Cfg", (), {"objective": ObjectiveConfig(kind=kind)})()
        self.reward = reward


@pytest.mark.parametrize("kind", OBJECTIVE_KINDS)
def test_step_of_each_kind_has_the_interface(kind):
    step = steps.build_step(_Fake(kind, reward=lambda prompt, ids: 0.0))
    assert isinstance(step, steps.STEPS[kind])
    for name in INTERFACE:
        assert hasattr(step, name), (kind, name)
    assert isinstance(step.describe(), str) and isinstance(step.progress_key, str)
    assert step.settings is step.cfg.objective  # the loss settings are the run's ObjectiveConfig
    for name in ("score", "update", "metrics"):
        params = list(inspect.signature(getattr(step, name)).parameters)
        assert params[0] == "batch", (kind, name, params)


def test_grpo_step_needs_a_reward():
    with pytest.raises(ValueError, match="reward function"):
        steps.build_step(_Fake("grpo", reward=None))
    steps.build_step(_Fake("gopd", reward=None))  # G-OPD needs none
