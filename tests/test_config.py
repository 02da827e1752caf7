"""Configuration: recipes, overrides and errors that name the field."""

import re

import pytest

from gopd_mega.config import ConfigError, RunConfig, build_config, load_config


@pytest.fixture
def teacher_dir(tmp_path):
    d = tmp_path / "teacher"
    d.mkdir()
    return str(d)


def _base(teacher_dir):
    return {"teachers": [{"name": "add", "model": {"load": teacher_dir}}]}


def test_yaml_and_toml_recipes_with_overrides(tmp_path, teacher_dir):
    (tmp_path / "r.yaml").write_text(
        f"objective:\n  lam: 1.25\nteachers:\n  - name: math\n    model: {{load: {teacher_dir}, tp: 2}}\n"
    )
    cfg = load_config(tmp_path / "r.yaml", ["optim.lr=1e-5", "teachers.0.model.tp=1", "train.steps=7"])
    assert cfg.objective.lam == 1.25 and cfg.optim.lr == 1e-5 and cfg.train.steps == 7
    assert cfg.teachers[0].name == "math" and cfg.teachers[0].model.tp == 1
    (tmp_path / "r.toml").write_text(f'[objective]\nlam = 0.5\n[[teachers]]\nname = "code"\n[teachers.model]\nload = "{teacher_dir}"\n')
    assert load_config(tmp_path / "r.toml").objective.lam == 0.5


@pytest.mark.parametrize(
    "override, field",
    [
        ("objective.lam=-0.5", "objective.lam"),
        ("student.tp=3", "student.tp"),  # 3 does not divide 4 heads
        ("student.num_query_groups=3", "student.num_query_groups"),
        ("student.pp=3", "student.pp"),
        ("teachers.0.model.load=/does/not/exist", "teachers[0].model.load"),
        ("objective.aggregation=sum", "objective.aggregation"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("optim.lr=fast", "optim.lr"),
        ("train.stepz=3", "train.stepz"),
        ("bogus.x=1", "bogus"),
        ("student.max_seq_len=8", "student.max_seq_len"),
        ("student.logits_dtype=bf16", "student.logits_dtype"),
        # each field is named itself, not the first of a group of checks
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("train.prompts_per_step=0", "train.prompts_per_step"),
        ("train.save_every=-1", "train.save_every"),
        ("train.keep_last=-1", "train.keep_last"),
        ("rollout.samples_per_prompt=0", "rollout.samples_per_prompt"),
        ("objective.clip_eps_high=-0.1", "objective.clip_eps_high"),
        ("objective.reference_metrics_every=-1", "objective.reference_metrics_every"),
        ("objective.reference_metrics_every=2.5", "objective.reference_metrics_every"),
        ("objective.returns=tokens", "objective.returns"),
        ("optim.min_lr=1.0", "optim.min_lr"),
        ("optim.weight_decay=-1", "optim.weight_decay"),
        ("optim.grad_clip=-1", "optim.grad_clip"),
        ("optim.beta2=1.5", "optim.beta2"),
        ("data.domains=[]", "data.domains"),
    ],
)
def test_invalid_values_name_the_field(teacher_dir, override, field):
    with pytest.raises(ConfigError, match=re.escape(f"'{field}'")):
        build_config(RunConfig, _base(teacher_dir), [override])


def test_teacher_needs_weights_and_unique_routes(teacher_dir):
    with pytest.raises(ConfigError, match="teachers\\[0\\].model.load"):
        build_config(RunConfig, {"teachers": [{"name": "add"}]})
    with pytest.raises(ConfigError, match="unique"):
        build_config(RunConfig, {"teachers": [{"name": "a", "model": {"load": teacher_dir}}] * 2})
    with pytest.raises(ConfigError, match="teachers"):
        build_config(RunConfig, {})


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def _float_fields(cls, where=""):
    """(section.field, dataclass) for every float field of cls and the dataclasses inside it."""
    import dataclasses
    import typing

    out = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        options = typing.get_args(hint) or (hint,)
        if float in options:
            out.append(f"{where}{f.name}")
        elif dataclasses.is_dataclass(hint) and f.name != "reference":
            out += _float_fields(hint, f"{where}{f.name}.")
    return out


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_field_refuses_nan_and_inf(teacher_dir, value):
    """e.g. optim.lr=.inf ran to exit 0 and exported a NaN model, rollout.temperature=.nan too."""
    fields = _float_fields(RunConfig) + ["teachers.0.model.init_std"]
    assert {"optim.lr", "rollout.temperature", "objective.lam", "train.dist_timeout_s", "student.rope_base"} <= set(fields)
    for field in fields:
        where = field.replace("teachers.0.model", "teachers[0].model")
        with pytest.raises(ConfigError, match=re.escape(f"config field '{where}': must be a finite number")):
            build_config(RunConfig, _base(teacher_dir), [f"{field}={value}"])


@pytest.mark.parametrize("override, field", [("student.norm_epsilon=0", "student.norm_epsilon"),
                                             ("student.rope_base=-1", "student.rope_base"),
                                             ("student.init_std=-0.1", "student.init_std"),
                                             ("optim.eps=0", "optim.eps"),
                                             ("train.max_consecutive_skips=0", "train.max_consecutive_skips"),
                                             ("train.dist_timeout_s=0", "train.dist_timeout_s")])
def test_float_ranges(teacher_dir, override, field):
    with pytest.raises(ConfigError, match=re.escape(f"'{field}'")):
        build_config(RunConfig, _base(teacher_dir), [override])


def test_yaml_booleans_for_string_fields(tmp_path, teacher_dir):
    """YAML 1.1 reads `off` as False: for rollout.server_check that means 'off'; elsewhere the
    message says to quote the word instead of 'expected str, got False'."""
    (tmp_path / "r.yaml").write_text(f"teachers: [{{name: add, model: {{load: {teacher_dir}}}}}]\n"
                                     "rollout: {server_check: off}\n")
    assert load_config(tmp_path / "r.yaml").rollout.server_check == "off"
    assert load_config(None, ["rollout.server_check=off"] + [f"teachers=[{{name: a, model: {{load: {teacher_dir}}}}}]"]) \
        .rollout.server_check == "off"
    with pytest.raises(ConfigError, match="'rollout.server_check': expected a string, got the boolean True: YAML reads "
                                          "an unquoted on/off/yes/no/true/false as a boolean; quote the word"):
        build_config(RunConfig, _base(teacher_dir), ["rollout.server_check=on"])
    with pytest.raises(ConfigError, match="'train.log_backend': expected a string, got the boolean False"):
        build_config(RunConfig, _base(teacher_dir), ["train.log_backend=no"])


def test_the_reference_is_needed_where_it_does_not_cancel():
    from gopd_mega.config import ObjectiveConfig

    assert not ObjectiveConfig(lam=1.0).needs_reference()  # OPD: the reference cancels
    assert ObjectiveConfig(lam=1.25).needs_reference() and ObjectiveConfig(lam=0.5).needs_reference()
    assert not ObjectiveConfig(kind="grpo", lam=1.25).needs_reference()  # lambda is a G-OPD setting
    assert ObjectiveConfig(kind="grpo", kl_coef=0.01).needs_reference()


def test_sequence_returns_need_sampled_gopd(teacher_dir):
    """objective.returns: 'sequence' is a return over the sampled tokens of G-OPD: refused for
    GRPO and for the per-position expectation estimators, accepted otherwise."""
    assert build_config(RunConfig, _base(teacher_dir)).objective.returns == "token"
    ok = build_config(RunConfig, _base(teacher_dir), ["objective.returns=sequence", "objective.lam=1.5"])
    assert ok.objective.returns == "sequence"
    with pytest.raises(ConfigError, match="'objective.returns': 'sequence' is a G-OPD setting"):
        build_config(RunConfig, {"teachers": []}, ["objective.kind=grpo", "objective.returns=sequence",
                                                   "rollout.samples_per_prompt=2"])
    for estimator in ("full_vocab", "top_k"):
        with pytest.raises(ConfigError, match=f"'objective.returns': 'sequence' needs estimator 'sampled': '{estimator}' "
                                              "is a per-position expectation"):
            build_config(RunConfig, _base(teacher_dir), ["objective.returns=sequence", f"objective.estimator={estimator}"])
