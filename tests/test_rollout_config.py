"""The rollout part of the configuration: SGLang time limits, releases, served models at T != 1,
and checkpoints by default on a fleet."""

import pytest

from gopd_mega.config import ConfigError, RunConfig, build_config


@pytest.fixture
def base(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    return {"teachers": [{"name": "math", "model": {"load": str(teacher)}}]}


def _cfg(base, *overrides):
    return build_config(RunConfig, base, list(overrides))


def test_served_teacher_or_reference_needs_temperature_one(base):
    """SGLang's prefill log-probs ignore the temperature: refused at T != 1, with why."""
    with pytest.raises(ConfigError, match=r"teachers\[0\]\.server.*ignore the sampling temperature.*0\.7"):
        _cfg(base, "teachers.0.server=http://h:1", "rollout.temperature=0.7")
    with pytest.raises(ConfigError, match=r"objective\.reference_server.*ignore the sampling temperature"):
        _cfg(base, "objective.reference_server=http://h:2", "rollout.temperature=1.5")
    _cfg(base, "teachers.0.server=http://h:1", "rollout.temperature=1.0")
    _cfg(base, "rollout.temperature=0.7")  # a teacher scored in the trainer takes any temperature


def test_checkpoints_by_default_with_sglang_servers(base):
    assert _cfg(base).train.save_every == 0
    assert _cfg(base, "rollout.engine=sglang", "rollout.sglang_url=http://h:1").train.save_every == 10
    assert _cfg(base, "rollout.engine=sglang", "rollout.sglang_url=http://h:1", "train.save_every=0").train.save_every == 0


@pytest.mark.parametrize("override,field", [
    ("rollout.request_timeout_s=0", "rollout.request_timeout_s"),
    ("rollout.request_timeout_per_token_s=-1", "rollout.request_timeout_s"),
    ("rollout.max_inflight_per_server=0", "rollout.request_batch"),
    ("rollout.sglang_version=latest", "rollout.sglang_version"),
])
def test_bad_rollout_settings_name_the_field(base, override, field):
    with pytest.raises(ConfigError, match=rf"^config field '{field.replace('.', '[.]')}'"):
        _cfg(base, override)
