"""Typed, validated configuration.

One dataclass per component, a docstring under every field, validation in ``__post_init__``.
A run is described by a recipe file (YAML or TOML) whose top-level sections match
:class:`RunConfig`'s fields, plus command-line overrides ``section.field=value`` (the value is
parsed as YAML, so ``optim.lr=1e-5`` and ``objective.lam=1.25`` do what they say). Unknown keys,
bad values and missing files fail at start with an error that names the field.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gopd_mega.objective import AGGREGATIONS, LossSettings


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field (``section.field``)."""


def _fail(where: str, message: str) -> None:
    raise ConfigError(f"config field '{where.lstrip('.')}': {message}")


@dataclass
class ModelConfig:
    """Architecture, weights and parallel layout of one megatron-core GPT model."""

    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Model width."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int | None = None
    """Key/value heads (GQA); None means num_attention_heads (plain multi-head attention)."""
    ffn_hidden_size: int | None = None
    """MLP inner width; None means 4 * hidden_size (or 8/3 * hidden_size rounded for swiglu)."""
    kv_channels: int | None = None
    """Per-head width; None means hidden_size // num_attention_heads."""
    vocab_size: int = 32
    """Real vocabulary size (the tokenizer's). The output layer may be padded beyond it."""
    padded_vocab_size: int | None = None
    """Rows of the embedding/output weight; None pads vocab_size up to a multiple of 8 * tp."""
    max_seq_len: int = 64
    """Longest prompt + response the model is built for."""
    tie_embeddings: bool = True
    """Share the input embedding and the output layer weight."""
    qk_layernorm: bool = False
    """RMSNorm on queries and keys per head (Qwen3)."""
    add_qkv_bias: bool = False
    """Bias on the fused QKV projection (Qwen2)."""
    activation: str = "swiglu"
    """'swiglu' (gated SiLU, Llama/Qwen) or 'gelu'."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    rope_base: float = 10000.0
    """Rotary embedding base (theta)."""
    init_std: float = 0.02
    """Std of the random initialisation (when no weights are loaded)."""
    seed: int = 1234
    """Seed of the random initialisation."""
    load: str | None = None
    """Weights to load: a gopd-mega model directory or a Hugging Face model directory; the
    architecture fields are then read from it (only tp, pp, params_dtype and logits_dtype come
    from here).
    None means random initialisation from ``seed`` with the architecture given here."""
    tp: int = 1
    """Tensor-parallel size of THIS model (each model has its own layout)."""
    pp: int = 1
    """Pipeline-parallel size of THIS model."""
    params_dtype: str = "float32"
    """'float32', 'bfloat16' or 'float16' (non-fp32 needs a GPU)."""
    logits_dtype: str = "float32"
    """The output layer's logits chunk in the log-prob kernels: 'float32' (log-probs accurate to
    ~1e-6 relative) or 'params' (rounded to params_dtype like megatron's own output layer, ~4e-4
    with bf16; about 6% faster and twice the token chunk: benchmarks/RESULTS.md)."""

    def validate(self, where: str = "") -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_seq_len", "tp", "pp"):
            if getattr(self, name) < 1:
                _fail(f"{where}.{name}", f"must be >= 1, got {getattr(self, name)}")
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            _fail(f"{where}.num_query_groups", f"{groups} does not divide num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.tp:
            _fail(f"{where}.tp", f"tp={self.tp} does not divide num_attention_heads={self.num_attention_heads}")
        if groups % self.tp:
            _fail(f"{where}.tp", f"tp={self.tp} does not divide num_query_groups={groups}")
        if self.num_layers % self.pp:
            _fail(f"{where}.pp", f"pp={self.pp} does not divide num_layers={self.num_layers}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            _fail(f"{where}.hidden_size", f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; set kv_channels")
        if self.activation not in ("swiglu", "gelu"):
            _fail(f"{where}.activation", f"must be 'swiglu' or 'gelu', got {self.activation!r}")
        if self.params_dtype not in ("float32", "bfloat16", "float16"):
            _fail(f"{where}.params_dtype", f"must be float32, bfloat16 or float16, got {self.params_dtype!r}")
        if self.logits_dtype not in ("float32", "params"):
            _fail(f"{where}.logits_dtype", f"must be 'float32' or 'params', got {self.logits_dtype!r}")
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            _fail(f"{where}.padded_vocab_size", f"{self.padded_vocab_size} < vocab_size={self.vocab_size}")
        if self.load is not None and not Path(self.load).exists():
            _fail(f"{where}.load", f"path does not exist: {self.load}")

    @property
    def padded_vocab(self) -> int:
        if self.padded_vocab_size is not None:
            return self.padded_vocab_size
        multiple = 8 * self.tp
        return -(-self.vocab_size // multiple) * multiple


@dataclass
class TeacherConfig:
    """One teacher: the prompts whose route field equals ``name`` are scored by it."""

    name: str = "default"
    """Route key matched against each prompt's teacher field (e.g. 'math', 'code')."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The teacher's architecture, weights (``model.load`` is required) and own TP/PP layout."""

    def validate(self, where: str = "") -> None:
        if not self.name:
            _fail(f"{where}.name", "must be a non-empty route key")
        if self.model.load is None:
            _fail(f"{where}.model.load", "a teacher needs weights: set the path of its checkpoint")
        self.model.validate(f"{where}.model")


@dataclass
class ObjectiveConfig:
    """The G-OPD objective (see gopd_mega/objective.py for the math)."""

    lam: float = 1.0
    """Reward scaling lambda: 1 = OPD, (0, 1) interpolates to the reference, > 1 = ExOPD."""
    reference: str = "initial"
    """'initial' = the student's initial weights, or the path of any checkpoint (reward correction)."""
    clip_eps_low: float = 0.2
    """PPO clip: ratio floor is 1 - clip_eps_low."""
    clip_eps_high: float = 0.2
    """PPO clip: ratio ceiling is 1 + clip_eps_high."""
    dual_clip: float | None = 3.0
    """Dual-clip constant c (> 1) for negative advantages; None disables it."""
    is_cap: float | None = 5.0
    """Cap of the token-level truncated importance weight exp(old - sampler); None disables it."""
    aggregation: str = "seq-mean-token-mean"
    """'token-mean' or 'seq-mean-token-mean' (the paper's)."""

    def validate(self, where: str = "") -> None:
        if not (self.lam >= 0.0):
            _fail(f"{where}.lam", f"reward scale lambda must be >= 0, got {self.lam}")
        if self.reference != "initial" and not Path(self.reference).exists():
            _fail(f"{where}.reference", f"must be 'initial' or an existing checkpoint path, got {self.reference!r}")
        if not (0 <= self.clip_eps_low < 1) or self.clip_eps_high < 0:
            _fail(f"{where}.clip_eps_low", f"need 0 <= clip_eps_low < 1 and clip_eps_high >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1:
            _fail(f"{where}.dual_clip", f"must be > 1 or null, got {self.dual_clip}")
        if self.is_cap is not None and self.is_cap <= 0:
            _fail(f"{where}.is_cap", f"must be > 0 or null, got {self.is_cap}")
        if self.aggregation not in AGGREGATIONS:
            _fail(f"{where}.aggregation", f"must be one of {AGGREGATIONS}, got {self.aggregation!r}")

    def loss_settings(self) -> LossSettings:
        return LossSettings(self.lam, self.clip_eps_low, self.clip_eps_high, self.dual_clip, self.is_cap, self.aggregation)


@dataclass
class RolloutConfig:
    """How responses are sampled."""

    engine: str = "embedded"
    """'embedded' (in-process, default) or 'sglang' (a running SGLang server, GPU clusters)."""
    temperature: float = 1.0
    """Sampling temperature; teacher/reference/student log-probs use the same one."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 16
    """Longest response."""
    samples_per_prompt: int = 1
    """Responses per prompt."""
    sglang_url: str | None = None
    """Base URL of the SGLang server (engine='sglang')."""
    kv_cache: bool = True
    """engine='embedded': decode with a KV cache (gopd_mega.rollout.kv_decode); False re-runs
    the whole prefix every step (same tokens and log-probs, quadratic in the response length)."""

    def validate(self, where: str = "") -> None:
        if self.engine not in ("embedded", "sglang"):
            _fail(f"{where}.engine", f"must be 'embedded' or 'sglang', got {self.engine!r}")
        if self.temperature <= 0:
            _fail(f"{where}.temperature", f"must be > 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            _fail(f"{where}.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.samples_per_prompt < 1:
            _fail(f"{where}.max_new_tokens", "max_new_tokens and samples_per_prompt must be >= 1")
        if self.engine == "sglang" and not self.sglang_url:
            _fail(f"{where}.sglang_url", "engine='sglang' needs the server URL")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule of the student."""

    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the cosine/linear decay."""
    schedule: str = "constant"
    """'constant', 'cosine' or 'linear' decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""

    def validate(self, where: str = "") -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            _fail(f"{where}.lr", f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.schedule not in ("constant", "cosine", "linear"):
            _fail(f"{where}.schedule", f"must be constant, cosine or linear, got {self.schedule!r}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            _fail(f"{where}.warmup_steps", "warmup_steps, weight_decay and grad_clip must be >= 0")


@dataclass
class DataConfig:
    """Prompts: a synthetic task set or a local dataset file."""

    source: str = "synthetic"
    """'synthetic' (the project's arithmetic domains) or a path (parquet/JSONL/arrow/saved dataset)."""
    domains: list[str] = field(default_factory=lambda: ["add", "mul"])
    """Synthetic domains to draw prompts from (each is also the prompt's teacher route)."""
    num_train: int = 2000
    """Synthetic training prompts per domain."""
    num_eval: int = 200
    """Held-out prompts per domain."""
    prompt_field: str = "prompt"
    """Dataset column holding the prompt."""
    answer_field: str = "answer"
    """Dataset column holding the reference answer (for evaluation)."""
    teacher_field: str = "opd_teacher"
    """Dataset column naming the teacher of each prompt."""
    max_prompt_len: int = 32
    """Prompts longer than this (in tokens) are filtered out, counted and reported."""
    seed: int = 0
    """Seed of the synthetic data and of the shuffling order."""
    chat_template: bool = False
    """Apply the tokenizer's chat template to each prompt (real models)."""

    def validate(self, where: str = "") -> None:
        if self.source != "synthetic" and not Path(self.source).exists():
            _fail(f"{where}.source", f"dataset path does not exist: {self.source}")
        if self.max_prompt_len < 1:
            _fail(f"{where}.max_prompt_len", f"must be >= 1, got {self.max_prompt_len}")
        if self.source == "synthetic" and (self.num_train < 1 or not self.domains):
            _fail(f"{where}.num_train", "synthetic data needs num_train >= 1 and at least one domain")


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 100
    """Policy updates."""
    prompts_per_step: int = 32
    """Prompts per rollout batch (each gives samples_per_prompt responses)."""
    micro_batch_size: int = 16
    """Sequences per forward/backward micro-batch (gradient accumulation over the batch)."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    out_dir: str = "runs/gopd"
    """Where checkpoints, metrics.jsonl and TensorBoard events go."""
    resume: bool = True
    """Resume from the latest complete checkpoint in out_dir if there is one."""
    seed: int = 0
    """Seed of sampling and data order."""
    log_backend: str = "jsonl"
    """'jsonl', 'tensorboard' or 'both' (the console always gets a line)."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self, where: str = "") -> None:
        if self.steps < 0 or self.prompts_per_step < 1 or self.micro_batch_size < 1:
            _fail(f"{where}.steps", "steps >= 0, prompts_per_step >= 1 and micro_batch_size >= 1 are required")
        if self.log_backend not in ("jsonl", "tensorboard", "both"):
            _fail(f"{where}.log_backend", f"must be jsonl, tensorboard or both, got {self.log_backend!r}")


@dataclass
class EvalConfig:
    """Held-out evaluation."""

    greedy: bool = True
    """Report greedy-decoding accuracy."""
    sampled: bool = True
    """Report accuracy of temperature sampling (rollout temperature)."""
    max_prompts: int = 200
    """Held-out prompts per domain used for evaluation."""

    def validate(self, where: str = "") -> None:
        if self.max_prompts < 1:
            _fail(f"{where}.max_prompts", f"must be >= 1, got {self.max_prompts}")


@dataclass
class RunConfig:
    """A whole G-OPD run."""

    student: ModelConfig = field(default_factory=ModelConfig)
    """The student (trained); its initial weights are also the default reference."""
    teachers: list[TeacherConfig] = field(default_factory=list)
    """One or more teachers, each with its own route key and layout."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """lambda, reference and the policy-loss settings."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop, checkpoints and logging."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""

    def validate(self) -> "RunConfig":
        self.student.validate("student")
        if not self.teachers:
            _fail("teachers", "at least one teacher is required")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            _fail("teachers", f"route keys must be unique, got {names}")
        for i, teacher in enumerate(self.teachers):
            teacher.validate(f"teachers[{i}]")
        for name in ("objective", "rollout", "optim", "data", "train", "eval"):
            getattr(self, name).validate(name)
        prompt_plus_response = self.data.max_prompt_len + self.rollout.max_new_tokens
        for where, model in [("student", self.student)] + [(f"teachers[{i}].model", t.model) for i, t in enumerate(self.teachers)]:
            # A loaded model's length comes from its checkpoint: checked when it is built.
            if model.load is None and model.max_seq_len < prompt_plus_response:
                _fail(f"{where}.max_seq_len", f"{model.max_seq_len} < data.max_prompt_len + rollout.max_new_tokens = {prompt_plus_response}")
        return self


# ----------------------------------------------------------------------------- loading


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from nested dicts, rejecting unknown keys and wrong types."""
    if dataclasses.is_dataclass(cls):
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            _fail(where or cls.__name__, f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            _fail(f"{where}.{unknown[0]}" if where else unknown[0], f"unknown key (known: {sorted(known)})")
        kwargs = {k: _build(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
        return cls(**kwargs)
    origin = typing.get_origin(cls)
    args = typing.get_args(cls)
    if origin is list:
        if not isinstance(data, list):
            _fail(where, f"expected a list, got {type(data).__name__}")
        return [_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(data)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if data is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], data, where)
    if cls is float and isinstance(data, (int, float)) and not isinstance(data, bool):
        return float(data)
    if cls is float and isinstance(data, str):  # PyYAML reads '1e-5' (no dot) as a string
        try:
            return float(data)
        except ValueError:
            _fail(where, f"expected a number, got {data!r}")
    if cls in (int, str, bool) and not (isinstance(data, cls) and not (cls is int and isinstance(data, bool))):
        _fail(where, f"expected {cls.__name__}, got {data!r}")
    if cls is float:
        _fail(where, f"expected a number, got {data!r}")
    return data


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``['optim.lr=1e-5', 'teachers.0.model.tp=2']`` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        node: Any = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return tree


def _merge(base: Any, update: Any) -> Any:
    if isinstance(base, dict) and isinstance(update, dict):
        out = dict(base)
        for k, v in update.items():
            out[k] = _merge(base.get(k), v) if k in base else v
        return out
    if isinstance(base, list) and isinstance(update, dict) and all(k.isdigit() for k in update):
        out = list(base)
        for k, v in update.items():
            i = int(k)
            if i >= len(out):
                raise ConfigError(f"override index {i} is past the end of a list of {len(out)}")
            out[i] = _merge(out[i], v)
        return out
    return update


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or TOML recipe into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"recipe {path} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections")
    return data


def build_config(cls: type, data: dict[str, Any], overrides: list[str] = ()) -> Any:
    """Build and validate ``cls`` from a dict plus overrides."""
    cfg = _build(cls, _merge(data, parse_overrides(list(overrides))), "")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """Load a :class:`RunConfig` from a recipe (or defaults when ``path`` is None) plus overrides."""
    data = read_recipe(path) if path is not None else {}
    return build_config(RunConfig, data, overrides)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a config (for saving next to checkpoints)."""
    return dataclasses.asdict(cfg)
