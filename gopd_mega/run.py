"""Assemble a G-OPD run from a validated RunConfig: process groups, models, data, engine.

Build order matters in a distributed world: every rank builds the same models in the same order
(process groups are collective), student first, then the reference, then the teachers.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from gopd_mega.config import ModelConfig, RunConfig
from gopd_mega.data import synthetic
from gopd_mega.evaluation import evaluate_config
from gopd_mega.metrics import is_rank0
from gopd_mega.model_io import load_weights, resolve_model_config
from gopd_mega.models import ShardedGPT
from gopd_mega.optim import build_optimizer
from gopd_mega.parallel import build_model_groups
from gopd_mega.platform import init_distributed
from gopd_mega.rollout import make_engine
from gopd_mega.trainer import Models


def build_model(cfg: ModelConfig, trainable: bool, name: str) -> ShardedGPT:
    """A ShardedGPT on its own layout, with the weights of ``cfg.load`` if given."""
    cfg = resolve_model_config(cfg)
    groups = build_model_groups(cfg.tp, cfg.pp, name=name)
    model = ShardedGPT(cfg, groups, trainable=trainable)
    if cfg.load is not None:
        load_weights(model, cfg.load)
    return model


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
            raise ValueError(
                f"vocabulary mismatch: {name} has vocab_size={v_other} (load={model.cfg.load}), the "
                f"student has {v_student}; log-probs of different vocabularies cannot be compared"
                + (" (the student could sample ids this model cannot score)" if padded_only else "")
            )


def build_models(cfg: RunConfig, tokenizer) -> Models:
    init_distributed()
    student = build_model(cfg.student, trainable=True, name="student")
    if cfg.objective.reference == "initial":
        # pi_ref = the student before distillation: a frozen copy on the student's layout.
        reference = ShardedGPT(student.cfg, student.groups, trainable=False)
        reference.copy_weights_from(student)
    else:
        ref_cfg = dataclasses.replace(student.cfg, load=cfg.objective.reference)
        reference = build_model(ref_cfg, trainable=False, name="reference")
    teachers = {t.name: build_model(t.model, trainable=False, name=f"teacher '{t.name}'") for t in cfg.teachers}
    others = {"reference": reference, **{f"teacher '{k}'": v for k, v in teachers.items()}}
    check_vocab(student, others, tokenizer)
    needed = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    for name, model in {"student": student, **others}.items():
        if model.cfg.max_seq_len < needed:
            raise ValueError(f"{name} handles {model.cfg.max_seq_len} tokens, but data.max_prompt_len + "
                             f"rollout.max_new_tokens = {needed}")
    # The embedded engine samples from its own copy of the student, refreshed after each update
    # (as a separate inference engine would be); SGLang gets exported checkpoints instead.
    sampler = ShardedGPT(student.cfg, student.groups, trainable=False) if cfg.rollout.engine == "embedded" else None
    engine = make_engine(cfg.rollout, model=sampler, tokenizer=tokenizer)
    if sampler is not None:
        engine.update_weights(student)
    return Models(student=student, reference=reference, teachers=teachers, engine=engine)


def synthetic_evaluator(cfg: RunConfig, models: Models, tokenizer, held_out: dict[str, list[dict]]) -> Callable[[], dict]:
    """Held-out accuracy of the rollout engine (= the current student) on the synthetic domains,
    greedy and/or sampled as ``cfg.eval`` asks: the trainer's periodic evaluation."""
    return lambda: evaluate_config(models.engine, held_out, tokenizer, synthetic.check, cfg.eval, cfg.rollout,
                                   seed=cfg.data.seed, prompt_field=cfg.data.prompt_field)


def verifier_reward(records: list[dict], tokenizer, verify: Callable[[dict, str], float]) -> Callable:
    """GRPO's reward hook (trainer.RewardFn) from a ``verify(record, response_text) -> reward``:
    the prompt's source record (``Prompt.index`` into ``records``) and the decoded response."""
    return lambda prompt, response_ids: verify(records[prompt.index], tokenizer.decode(response_ids))


def synthetic_reward(cfg: RunConfig, records: list[dict], tokenizer) -> Callable:
    """GRPO reward for the synthetic domains: 1 for an exact answer, else 0."""
    return verifier_reward(records, tokenizer, synthetic.verifier(cfg.data.prompt_field, cfg.data.teacher_field))


def build_student_optimizer(cfg: RunConfig, models: Models):
    return build_optimizer(models.student, cfg.optim, total_steps=cfg.train.steps)


def report(message: str) -> None:
    if is_rank0():
        print(message, flush=True)
