"""Assemble a G-OPD run from a validated RunConfig: process groups, models, data, engine.

Build order matters in a distributed world: every rank builds the same models in the same order
(process groups are collective), student first (its optimizer, also collective, before its
weights load), then the reference, then the teachers.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gopd_mega.config import ConfigError, ModelConfig, RunConfig
from gopd_mega.data import synthetic
from gopd_mega.data.prompts import DataError, PromptDataset
from gopd_mega.eval.domains import evaluate_config
from gopd_mega.metrics import is_rank0
from gopd_mega.model.distill import Projection
from gopd_mega.model_io import build_model
from gopd_mega.models import ShardedGPT
from gopd_mega.optim import build_optimizer
from gopd_mega.platform import init_distributed
from gopd_mega.rollout import make_engine
from gopd_mega.rollout.collective import run_on_rank0
from gopd_mega.rollout.coordinator import RolloutCoordinator
from gopd_mega.rollout.pool import SGLangPool
from gopd_mega.rollout.servers import ServerScorer
from gopd_mega.rollout.weight_sync import make_weight_sync
from gopd_mega.trainer import Distiller, Models


def check_vocab(student: ShardedGPT, others: dict[str, ShardedGPT], tokenizer) -> None:
    """Teachers and the reference must score the student's tokens with the same vocabulary.

    Equal sizes are required, except for Hugging Face checkpoints whose tokenizers agree on every
    real id and differ only in padded rows (e.g. 151936 vs 152064 for Qwen): then a model may have
    MORE rows than the student (it scores every id the student can sample), never fewer.
    """
    for name, model in others.items():
        v_other, v_student = model.cfg.vocab_size, student.cfg.vocab_size
        if v_other == v_student:
            continue
        padded_only = hasattr(tokenizer, "check_compatible") and model.cfg.load is not None
        if padded_only:
            tokenizer.check_compatible(model.cfg.load, name)  # raises on any real-id difference
        if not padded_only or v_other < v_student:
            raise ConfigError(
                f"vocabulary mismatch: {name} has vocab_size={v_other} (load={model.cfg.load}), the "
                f"student has {v_student}; log-probs of different vocabularies cannot be compared"
                + (" (the student could sample ids this model cannot score)" if padded_only else "")
            )


def build_models(cfg: RunConfig, tokenizer) -> Models:
    init_distributed(timeout_s=cfg.train.dist_timeout_s)
    # The student's optimizer first (collective, same on every rank), then its weights: the
    # loaders write the checkpoint's full precision into the fp32 masters.
    student = build_model(
        cfg.student,
        trainable=True,
        name="student",
        where="student",
        optim=cfg.optim,
        total_steps=student_total_steps(cfg),
    )
    ref = cfg.objective.reference
    reference: Any  # a ShardedGPT, or a ServerScorer (below)
    if cfg.objective.reference_server is not None:
        reference = None  # served by SGLang: built below
    elif isinstance(ref, ModelConfig):
        # A reference with its own layout (e.g. teacher-sized, at the teachers' TP).
        reference = build_model(ref, trainable=False, name="reference", where="objective.reference")
    elif ref == "initial":
        # pi_ref = the student before distillation: a frozen copy on the student's layout.
        reference = ShardedGPT(student.cfg, student.groups, trainable=False)
        reference.copy_weights_from(student)
    else:
        # A checkpoint path: on the student's layout (its tp, pp and dtypes).
        ref_cfg = dataclasses.replace(student.cfg, load=ref)
        reference = build_model(ref_cfg, trainable=False, name="reference", where="objective.reference")
    teachers: dict[str, Any] = {}  # a ShardedGPT, or a ServerScorer with the same logprobs()
    local_copies: dict[str, ShardedGPT] = {}
    for i, t in enumerate(cfg.teachers):
        local = (
            build_model(t.model, trainable=False, name=f"teacher '{t.name}'", where=f"teachers[{i}].model")
            if t.model.load or t.server is None
            else None
        )  # a served teacher may have no local copy
        if t.server is not None:
            teachers[t.name] = ServerScorer(server_pool(t.server, cfg.rollout, tokenizer), f"teacher '{t.name}'")
            if local is not None:
                local_copies[t.name] = local  # kept only for the start-up scoring check
        else:
            teachers[t.name] = local
    if cfg.objective.reference_server is not None:
        reference = ServerScorer(server_pool(cfg.objective.reference_server, cfg.rollout, tokenizer), "reference")
    others = {
        k: v
        for k, v in {
            "reference": reference,
            **{f"teacher '{k}'": v for k, v in teachers.items()},
            **{f"teacher '{k}' (check copy)": v for k, v in local_copies.items()},
        }.items()
        if isinstance(v, ShardedGPT)
    }
    check_vocab(student, others, tokenizer)
    projections, reference_projection = {}, None
    if cfg.objective.estimator == "full_vocab":  # the heads on the student's vocabulary partition, once
        projections = {name: Projection(t, student, f"teacher '{name}'") for name, t in teachers.items()}
        if cfg.objective.lam != 1.0:
            reference_projection = Projection(reference, student, "reference")
    needed = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    for name, model in {"student": student, **others}.items():
        if model.cfg.max_seq_len < needed:
            raise ConfigError(
                f"{name} handles {model.cfg.max_seq_len} tokens, but data.max_prompt_len + "
                f"rollout.max_new_tokens = {needed}"
            )
    # The embedded engine samples from its own copy of the student, refreshed after each update
    # (as a separate inference engine would be); SGLang gets exported checkpoints instead.
    sampler = ShardedGPT(student.cfg, student.groups, trainable=False) if cfg.rollout.engine == "embedded" else None
    engine = make_engine(cfg.rollout, model=sampler, tokenizer=tokenizer)
    if sampler is not None:
        engine.update_weights(student)
    rollout = build_rollout(cfg, engine, teachers, reference)
    return Models(
        student=student,
        reference=reference,
        teachers=teachers,
        engine=engine,
        rollout=rollout,
        check_copies=local_copies,
        projections=projections,
        reference_projection=reference_projection,
    )


def build_distiller(
    cfg: RunConfig,
    tokenizer,
    records: list[dict] | None = None,
    *,
    data=None,
    held_out: dict[str, list[dict]] | None = None,
    eval_set: list[dict] | None = None,
    eval_where: str | None = None,
    verifiers: RecordVerifiers | None = None,
    reward: Callable | None = None,
) -> Distiller:
    """A run ready to :meth:`~gopd_mega.trainer.Distiller.fit`: the one place models, prompts,
    evaluation, reward and optimizer are put together (the CLI, the demo, the benchmark and the
    tests all come here). In this order, the same on every rank:

    1. :func:`build_models` (collective; the student's optimizer before its weights), then a
       Hugging Face tokenizer is checked against every teacher's;
    2. the prompts: ``data`` if given (anything with PromptDataset's interface), else
       ``PromptDataset.from_config(records, ...)`` routed by the teachers' names (a DataError
       names ``data.source``);
    3. the periodic evaluation: :func:`synthetic_evaluator` on ``held_out`` (synthetic domains,
       unless data.verifier='none'), or :func:`dataset_evaluator` on ``eval_set`` (dataset
       records, ``eval_where`` names them, graded by ``verifiers``), or none;
    4. GRPO's reward (objective.kind='grpo'): ``reward`` if given, else :func:`synthetic_reward`
       for data.source='synthetic' or :func:`dataset_reward` by ``verifiers``;
    5. the student's optimizer (:func:`build_student_optimizer`) and the Distiller.

    ``verifiers`` (a RecordVerifiers) stays the caller's to close: it holds worker processes."""
    models = build_models(cfg, tokenizer)
    if hasattr(tokenizer, "check_compatible"):
        for teacher in cfg.teachers:
            tokenizer.check_compatible(teacher.model.load, f"teacher '{teacher.name}'")
    if data is None:
        if records is None:
            raise ValueError("build_distiller: give the prompts' records or a data object")
        try:
            data = PromptDataset.from_config(
                records, tokenizer, cfg.data, teachers=[t.name for t in cfg.teachers] or None
            )
        except DataError as exc:  # 'record i ...': say which file the records came from
            raise DataError(f"{cfg.data.source}: {exc}") from None
    evaluate = None
    if held_out and cfg.data.verifier != "none":
        evaluate = synthetic_evaluator(cfg, models, tokenizer, held_out)
    elif eval_set is not None:
        if verifiers is None:
            raise ValueError("build_distiller: an eval_set is graded by verifiers (a RecordVerifiers)")
        evaluate = dataset_evaluator(cfg, models, tokenizer, eval_set, eval_where or "the evaluation set", verifiers)
    elif cfg.train.eval_every:
        report(
            "train.eval_every is set but there is nothing to evaluate on (a dataset file needs "
            "data.eval_source or data.eval_holdout, and a verifier): no periodic evaluation"
        )
    if cfg.objective.kind == "grpo" and reward is None:
        if records is None:
            raise ValueError("build_distiller: GRPO's reward needs the prompts' records (or pass reward=)")
        if cfg.data.source == "synthetic":
            reward = synthetic_reward(cfg, records, tokenizer)
        elif verifiers is None:
            raise ValueError(
                "build_distiller: GRPO on a dataset file takes its reward from verifiers (a RecordVerifiers)"
            )
        else:
            reward = dataset_reward(cfg, records, data, tokenizer, verifiers)
    return Distiller(cfg, models, data, build_student_optimizer(cfg, models), evaluate, reward=reward)


def server_pool(urls, rollout_cfg, tokenizer) -> SGLangPool:
    """An SGLang pool for a teacher or reference server (scoring only)."""
    r = rollout_cfg
    return SGLangPool(
        urls,
        pad_id=tokenizer.pad_id,
        stop_ids=tokenizer.stop_ids,
        timeout=r.request_timeout_s,
        timeout_per_token=r.request_timeout_per_token_s,
        chunk_size=r.request_batch,
        max_inflight=r.max_inflight_per_server,
        version=r.sglang_version,
    )


def hf_source_dir(load: str | None) -> str | None:
    """``load`` when it is a Hugging Face folder (its tokenizer files go with each export)."""
    if load is None or not (Path(load) / "config.json").is_file():
        return None
    try:
        return load if "model_type" in json.loads((Path(load) / "config.json").read_text()) else None
    except (OSError, json.JSONDecodeError):
        return None


def build_rollout(cfg: RunConfig, engine, teachers: dict, reference) -> RolloutCoordinator:
    """The rollout coordinator; for server engines first a /health check of every server (rollout,
    teachers, reference), which names any that does not answer."""
    pools = [engine] if not engine.spmd else []
    pools += [m.pool for m in [*teachers.values(), reference] if isinstance(m, ServerScorer)]
    for pool in pools:  # the rollout servers also run a release whose weight-sync protocol the client speaks
        run_on_rank0(lambda: pool.check_health(protocol=pool is engine), "SGLang health check")  # noqa: B023 - called now
    sync = None
    if not engine.spmd:
        sync = make_weight_sync(
            cfg.rollout, engine, out_dir=cfg.train.out_dir, source_dir=hf_source_dir(cfg.student.load)
        )
    return RolloutCoordinator(engine, weight_sync=sync, overlap=cfg.rollout.overlap, colocate=cfg.rollout.colocate)


def synthetic_evaluator(
    cfg: RunConfig, models: Models, tokenizer, held_out: dict[str, list[dict]]
) -> Callable[[], dict]:
    """Held-out accuracy of the rollout engine (= the current student) on the synthetic domains,
    exact, greedy and/or sampled as ``cfg.eval`` asks: the trainer's periodic evaluation, named
    ``eval/<domain>/exact``, ``.../greedy``, ``.../avg@1``, ... and ``eval/mean/<metric>``
    (gopd_mega/eval/metrics.py)."""
    engine = models.rollout.shared_engine() if models.rollout is not None else models.engine
    return lambda: evaluate_config(
        engine,
        held_out,
        tokenizer,
        synthetic.check,
        cfg.eval,
        cfg.rollout,
        seed=cfg.data.seed,
        prompt_field=cfg.data.prompt_field,
        model=models.student,
        answer_of=synthetic.answer,
    )


def verifier_reward(records: list[dict], tokenizer, verify: Callable[[dict, str], Any]) -> Callable:
    """GRPO's reward hook (trainer.RewardFn) from a ``verify(record, response_text)`` returning a
    reward or a :class:`gopd_mega.verify.Verdict` (its ``.reward``): the prompt's source record
    (``Prompt.index`` into ``records``) and the decoded response."""

    def reward(prompt, response_ids) -> float:
        out = verify(records[prompt.index], tokenizer.decode(response_ids))
        return float(getattr(out, "reward", out))

    return reward


class RecordVerifiers:
    """The verifier of each record as ``data.verifier`` chooses it (see DataConfig.verifier), built
    once per kind on first use; callable as a verifier ``(record, response_text) -> Verdict``.

    Code verification needs the sandbox's isolation unless ``data.code_isolation`` is false: the
    first code verifier built checks it and raises ConfigError naming that field."""

    def __init__(self, data_cfg):
        self.cfg = data_cfg
        self._built: dict[str, object] = {}

    def kind(self, record: dict) -> str | None:
        """'math', 'code', 'synthetic' or None (no verifier for this record)."""
        choice = self.cfg.verifier
        if choice == "none":
            return None
        if choice != "auto":
            return choice
        if self.cfg.source == "synthetic":
            return "synthetic"
        route = record.get(self.cfg.teacher_field)
        return route if route in ("math", "code") else None

    @property
    def tests_field(self) -> str:
        return self.cfg.tests_field or self.cfg.answer_field

    def get(self, kind: str):
        if kind not in self._built:
            from gopd_mega.verify import CodeVerifier, MathVerifier, SandboxLimits, SyntheticVerifier

            if kind == "math":
                self._built[kind] = MathVerifier(answer_field=self.cfg.answer_field)
            elif kind == "code":
                if self.cfg.code_isolation:
                    from gopd_mega.verify.sandbox import isolation_error

                    why = isolation_error()
                    if why is not None:
                        raise ConfigError(
                            f"config field 'data.code_isolation': code verification cannot isolate "
                            f"generated programs here ({why}); set data.code_isolation=false to run "
                            "them with resource limits only"
                        )
                limits = SandboxLimits(stop_on_failure=True, isolate=self.cfg.code_isolation)
                self._built[kind] = CodeVerifier(tests_field=self.tests_field, limits=limits)
            elif kind == "synthetic":
                self._built[kind] = SyntheticVerifier(
                    prompt_field=self.cfg.prompt_field, domain_field=self.cfg.teacher_field
                )
            else:
                raise ValueError(f"no verifier kind {kind!r}")
        return self._built[kind]

    def check(self, record: dict, where: str) -> str | None:
        """The record's verifier kind, after checking it has the fields that verifier reads
        (DataError naming ``where`` and the field otherwise); None if it has no verifier."""
        kind = self.kind(record)
        if kind == "math" and record.get(self.cfg.answer_field) is None:
            raise DataError(
                f"{where}: a math record needs its gold answer in data.answer_field={self.cfg.answer_field!r}"
            )
        if kind == "code":
            from gopd_mega.verify import normalize_tests

            if record.get(self.tests_field) is None:
                raise DataError(
                    f"{where}: a code record needs its unit tests in data.tests_field "
                    f"(here {self.tests_field!r}; null means data.answer_field)"
                )
            try:
                normalize_tests(record[self.tests_field], f"field {self.tests_field!r}")
            except ValueError as exc:
                raise DataError(f"{where}: {exc}") from None
        if kind == "synthetic" and record.get(self.cfg.teacher_field) is None:
            raise DataError(
                f"{where}: the synthetic verifier needs the record's domain in data.teacher_field="
                f"{self.cfg.teacher_field!r}"
            )
        return kind

    def __call__(self, record: dict, response: str):
        kind = self.kind(record)
        if kind is None:
            raise DataError(
                f"no verifier for a record routed {record.get(self.cfg.teacher_field)!r} "
                f"(data.verifier={self.cfg.verifier!r})"
            )
        return self.get(kind)(record, response)

    def close(self) -> None:
        for v in self._built.values():
            if hasattr(v, "close"):
                v.close()
        self._built.clear()


def dataset_reward(cfg: RunConfig, records: list[dict], data, tokenizer, verifiers: RecordVerifiers) -> Callable:
    """GRPO reward for a dataset file: every prompt that is trained on (``data``: the
    PromptDataset) must have a verifier and the fields it reads, checked here before training."""
    for p in data.prompts:
        where = f"{cfg.data.source} record {p.index}"
        kind = verifiers.check(records[p.index], where)
        if kind is None:
            raise DataError(
                f"{where}: no verifier for its route {records[p.index].get(cfg.data.teacher_field)!r} "
                f"(data.teacher_field={cfg.data.teacher_field!r}; data.verifier='auto' maps 'math' and "
                "'code'): set data.verifier to math, code or synthetic"
            )
        verifiers.get(kind)  # build now: a sandbox refusal stops the run here
    return verifier_reward(records, tokenizer, verifiers)


def dataset_evaluator(
    cfg: RunConfig, models: Models, tokenizer, eval_records: list[dict], where: str, verifiers: RecordVerifiers
) -> Callable[[], dict]:
    """The trainer's periodic evaluation on held-out dataset records: each verifier kind's records
    (at most eval.max_prompts of each; prompts longer than data.max_prompt_len are dropped and
    counted) decoded greedily (eval.greedy: ``eval/<kind>/greedy``, ...) and/or sampled once at the
    rollout settings (eval.sampled: ``eval/<kind>/avg@1``, ``.../pass@1``, ``.../response_len``,
    ``.../stop_rate``) by :func:`gopd_mega.eval.harness.training_evaluator`, with
    ``eval/mean/<metric>`` over the kinds (gopd_mega/eval/metrics.py)."""
    from gopd_mega.eval.harness import training_evaluator

    if cfg.eval.exact:
        raise ConfigError(
            f"config field 'eval.exact': exact evaluation needs one reference answer per prompt "
            f"(synthetic domains); {where} is graded by verifiers, set eval.exact=false"
        )
    if not (cfg.eval.greedy or cfg.eval.sampled):
        raise ConfigError(
            f"config field 'eval.sampled': {where} is evaluated greedily (eval.greedy) and/or by one sample "
            "per prompt (eval.sampled); both are false"
        )
    kept = PromptDataset(
        eval_records,
        tokenizer,
        max_prompt_len=cfg.data.max_prompt_len,
        prompt_field=cfg.data.prompt_field,
        answer_field=cfg.data.answer_field,
        teacher_field=cfg.data.teacher_field,
    )
    report(f"evaluation set {where}: {kept.filter_summary}")
    groups: dict[str, list[dict]] = {}
    unverified = 0
    for p in kept.prompts:
        kind = verifiers.check(eval_records[p.index], f"{where} record {p.index}")
        if kind is None:
            unverified += 1
        else:
            groups.setdefault(kind, []).append(eval_records[p.index])
    if not groups:
        raise ConfigError(
            f"config field 'data.verifier': none of the {len(kept.prompts)} held-out records of {where} "
            f"has a verifier (data.verifier={cfg.data.verifier!r}; 'auto' needs data.teacher_field "
            "values 'math' or 'code')"
        )
    if unverified:
        report(f"evaluation set {where}: {unverified} records have no verifier for their route and are not evaluated")
    report(
        "evaluation set "
        + ", ".join(f"{k}: {len(v)} records" for k, v in groups.items())
        + f" (at most eval.max_prompts={cfg.eval.max_prompts} of each)"
    )
    datasets = {kind: (recs, verifiers.get(kind)) for kind, recs in groups.items()}
    engine = models.rollout.shared_engine() if models.rollout is not None else models.engine
    r = cfg.rollout
    return training_evaluator(
        engine,
        tokenizer,
        datasets,
        samples=1,
        temperature=r.temperature,
        top_p=r.top_p,
        max_new_tokens=r.max_new_tokens,
        seed=cfg.data.seed,
        chat_template=False,
        max_prompts=cfg.eval.max_prompts,
        prompt_field=cfg.data.prompt_field,
        greedy=cfg.eval.greedy,
        sampled=cfg.eval.sampled,
    )


def synthetic_reward(cfg: RunConfig, records: list[dict], tokenizer) -> Callable:
    """GRPO reward for the synthetic domains: 1 for an exact answer, else 0."""
    return verifier_reward(records, tokenizer, synthetic.verifier(cfg.data.prompt_field, cfg.data.teacher_field))


def student_total_steps(cfg: RunConfig) -> int:
    """Optimizer updates of a run: the student's LR schedule spans steps * updates_per_rollout."""
    return cfg.train.steps * cfg.train.updates_per_rollout


def build_student_optimizer(cfg: RunConfig, models: Models):
    """AdamW of the student (its LR schedule spans every update, :func:`student_total_steps`):
    the one :func:`build_models` built before loading the student's weights, or a new one for a
    student built without it (collective then)."""
    if models.student.optimizer is not None:
        return models.student.optimizer
    return build_optimizer(models.student, cfg.optim, total_steps=student_total_steps(cfg))


def report(message: str) -> None:
    if is_rank0():
        print(message, flush=True)
