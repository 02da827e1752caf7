"""Typed, validated configuration.

One dataclass per component, a docstring under every field, and a ``validate(where)`` method that
:func:`build_config` runs at start (``where`` is the field path its errors name).
A run is described by a recipe file (YAML or TOML) whose top-level sections match
:class:`RunConfig`'s fields, plus command-line overrides ``section.field=value`` (the value is
parsed as YAML, so ``optim.lr=1e-5`` and ``objective.lam=1.25`` do what they say). Unknown keys,
bad values and missing files fail at start with an error that names the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gopd_mega.objective import AGGREGATIONS, LossSettings

ESTIMATORS: tuple[str, ...] = ("sampled", "full_vocab", "top_k")
"""objective.estimator choices (see ObjectiveConfig.estimator)."""
OBJECTIVE_KINDS: tuple[str, ...] = ("gopd", "grpo")
"""objective.kind choices: the keys of gopd_mega.steps.STEPS (kept here so that the config does
not import the trainer's torch/megatron modules; tests/test_steps.py checks that they agree)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field (``section.field``)."""


def _fail(where: str, message: str) -> None:
    raise ConfigError(f"config field '{where.lstrip('.')}': {message}")


def _check_finite(cfg: Any, where: str) -> None:
    """Every float field of the dataclass ``cfg`` is a finite number (nan and inf pass most range
    checks unnoticed: ``nan <= 0`` is False)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            _fail(f"{where}.{f.name}", f"must be a finite number, got {value}")


def _urls(value) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [u.strip() for u in items if u and u.strip()]


def _check_urls(where: str, value) -> None:
    urls = _urls(value)
    if not urls:
        _fail(where, "must be a URL or a non-empty list of URLs")
    for u in urls:
        if not (u.startswith(("http://", "https://"))):
            _fail(where, f"{u!r} is not an http(s):// URL")
    if len(set(urls)) != len(urls):
        _fail(where, f"a URL is listed twice: {urls}")


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
    """'float32', 'bfloat16' or 'float16' weights for the forward/backward; a trainable model also
    keeps fp32 master weights in its optimizer (bf16 runs on CPU too)."""
    logits_dtype: str = "float32"
    """The output layer's logits chunk in the log-prob kernels: 'float32' (log-probs accurate to
    ~1e-6 relative) or 'params' (rounded to params_dtype like megatron's own output layer, ~4e-4
    with bf16; twice the tokens per chunk in the same buffer: 195.0 vs 199.3 ms for the student's
    fused loss on an H200, benchmarks/RESULTS.md)."""
    recompute_granularity: str | None = None
    """Activation recompute (megatron TransformerConfig): None (keep activations), 'selective'
    (recompute core attention only) or 'full' (recompute whole layers; needs recompute_method
    and recompute_num_layers). Trades compute for activation memory; results are unchanged."""
    recompute_method: str | None = None
    """With recompute_granularity='full': 'uniform' (checkpoint every recompute_num_layers-layer
    chunk) or 'block' (checkpoint the first recompute_num_layers layers of each stage)."""
    recompute_num_layers: int | None = None
    """With recompute_granularity='full': layers per recompute unit ('uniform') or recomputed
    layers per pipeline stage ('block'). Must be None for 'selective'."""
    padded_layout: bool = True
    """A micro-batch of several sequences may run as a right-padded [k, L] batch under a causal
    mask where that costs less than one packed row under the block-diagonal [T, T] mask (one
    pipeline stage, local spec, no sequence parallelism; gopd_mega.model.forward): the same
    results to fp32 rounding. False: always packed, bitwise as before this option existed."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1): norms and dropout run on [T/tp] slices of
    the packed sequence. Needs Transformer Engine (megatron's local-spec norm refuses it): a
    clear error without it."""
    context_parallel_size: int = 1
    """Context parallelism (split long sequences over ranks). Needs Transformer Engine attention
    and a context-parallel process group: refused with a clear error for now unless 1."""

    def validate(self, where: str = "") -> None:
        _check_finite(self, where)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_seq_len", "tp", "pp"):
            if getattr(self, name) < 1:
                _fail(f"{where}.{name}", f"must be >= 1, got {getattr(self, name)}")
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            _fail(
                f"{where}.num_query_groups", f"{groups} does not divide num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.tp:
            _fail(f"{where}.tp", f"tp={self.tp} does not divide num_attention_heads={self.num_attention_heads}")
        if groups % self.tp:
            _fail(f"{where}.tp", f"tp={self.tp} does not divide num_query_groups={groups}")
        if self.num_layers % self.pp:
            _fail(f"{where}.pp", f"pp={self.pp} does not divide num_layers={self.num_layers}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            _fail(
                f"{where}.hidden_size",
                f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; "
                "set kv_channels",
            )
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
        if self.recompute_granularity not in (None, "selective", "full"):
            _fail(
                f"{where}.recompute_granularity",
                f"must be null, 'selective' or 'full', got {self.recompute_granularity!r}",
            )
        if self.recompute_granularity == "full":
            if self.recompute_method not in ("uniform", "block"):
                _fail(
                    f"{where}.recompute_method",
                    f"recompute_granularity='full' needs 'uniform' or 'block', got {self.recompute_method!r}",
                )
            layers = self.num_layers // self.pp
            if self.recompute_num_layers is None or not 1 <= self.recompute_num_layers <= layers:
                _fail(
                    f"{where}.recompute_num_layers",
                    f"recompute_granularity='full' needs 1..{layers} (layers per stage), "
                    f"got {self.recompute_num_layers}",
                )
        elif self.recompute_method is not None or self.recompute_num_layers is not None:
            _fail(
                f"{where}.recompute_method",
                "recompute_method and recompute_num_layers are only for recompute_granularity='full'",
            )
        if self.sequence_parallel and self.tp < 2:
            _fail(f"{where}.sequence_parallel", f"needs tp > 1, got tp={self.tp}")
        if self.context_parallel_size < 1:
            _fail(f"{where}.context_parallel_size", f"must be >= 1, got {self.context_parallel_size}")
        for name in ("norm_epsilon", "rope_base"):
            if getattr(self, name) <= 0:
                _fail(f"{where}.{name}", f"must be > 0, got {getattr(self, name)}")
        if self.init_std < 0:
            _fail(f"{where}.init_std", f"must be >= 0, got {self.init_std}")

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
    """The teacher's architecture, weights (``model.load`` is required unless ``server`` is set)
    and own TP/PP layout."""
    server: str | list[str] | None = None
    """SGLang server URL(s) serving this teacher: it then scores by prefill on the server(s)
    (max_new_tokens 0, input_token_logprobs) instead of in the trainer. If ``model.load`` is also
    set, that local copy is built only for the start-up scoring check (rollout.server_check)."""

    def validate(self, where: str = "") -> None:
        if not self.name:
            _fail(f"{where}.name", "must be a non-empty route key")
        if self.server is not None and not _urls(self.server):
            _fail(f"{where}.server", "must be a URL or a non-empty list of URLs")
        if self.server is not None:
            _check_urls(f"{where}.server", self.server)
            if self.model.load is None:
                return
        if self.model.load is None:
            _fail(
                f"{where}.model.load", "a teacher needs weights: set the path of its checkpoint (or teachers[i].server)"
            )
        self.model.validate(f"{where}.model")


@dataclass
class ObjectiveConfig(LossSettings):
    """The training objective: G-OPD (default) or GRPO (see gopd_mega/objective.py for the math).

    The policy-loss fields (lam, clip_eps_low, clip_eps_high, dual_clip, is_cap, aggregation,
    kl_coef) are objective.LossSettings', defined and documented there: an ObjectiveConfig is the
    LossSettings the loss functions take."""

    kind: str = "gopd"
    """'gopd' (distil the teachers, lambda-scaled implicit reward) or 'grpo' (RL from a verifier's
    sequence reward with group-normalised advantages; no teachers; rollout.samples_per_prompt is
    the group size). The choices are OBJECTIVE_KINDS (gopd_mega.steps.STEPS: one step class each)."""
    reference: str | ModelConfig = "initial"
    """pi_ref. 'initial' = the student's initial weights (a frozen copy on the student's layout);
    a path = that checkpoint on the student's layout (tp, pp, params_dtype, logits_dtype of
    ``student``); or a model mapping ``{load: PATH, tp: .., pp: .., params_dtype: ..}`` (a
    ModelConfig) for a reference with its own layout, e.g. a teacher-sized one (reward correction)."""
    reference_server: str | list[str] | None = None
    """SGLang server URL(s) serving the reference model (prefill scoring, like teachers[i].server);
    None scores it in the trainer. The server must hold the weights ``reference`` names."""
    reference_metrics_every: int = 0
    """When the loss does not use the reference (``needs_reference()`` is False: G-OPD at
    lambda = 1, where it cancels from the advantage; GRPO without kl_coef), it is not scored, and
    the metrics that need it alone (``implicit_reward``; GRPO's ``kl_ref``) are not logged. N > 0
    scores it for those metrics on every N-th step (logged steps 1, N + 1, 2N + 1, ...); 0 = never."""
    estimator: str = "sampled"
    """How G-OPD's per-position objective is estimated at each visited prefix h_t (README,
    "Estimators"): 'sampled' (the paper's: the sampled token's advantage in the clipped,
    importance-weighted policy loss); 'full_vocab' (the exact expectation over the whole
    vocabulary, KL(pi_theta || q_t) - log Z_t with q_t ~ pi_T^lam pi_ref^(1-lam), from the
    teachers' and reference's final hidden states and output layers in the trainer: no sampling
    variance at the position; local teachers and reference only); 'top_k' (that expectation over
    the teacher's ``top_k`` most likely tokens plus the sampled token, the rest of the vocabulary
    as one tail bucket: works with teachers served by SGLang). The PPO clip and the truncated
    importance weight act on the sampled token, so they apply to 'sampled' only."""
    top_k: int = 20
    """estimator='top_k': how many of the teacher's most likely tokens per position."""
    returns: str = "token"
    """What the sampled G-OPD advantage credits (objective.py, "Returns"): 'token' (the paper's
    official code: each token's own lam t + (1 - lam) r - o, no return over later tokens; fixed
    point: the per-token target q_t ~ pi_T^lam pi_ref^(1-lam) at every prefix) or 'sequence' (the
    return-to-go over the later response tokens minus a leave-one-out baseline over the prompt's
    other samples; fixed point: the sequence-level pi* ~ pi_T(y)^lam pi_ref(y)^(1-lam); one extra
    no-grad student forward per step). The two coincide at lam = 1."""

    def validate(self, where: str = "") -> None:
        _check_finite(self, where)
        if self.kind not in OBJECTIVE_KINDS:
            _fail(f"{where}.kind", f"must be one of {', '.join(repr(k) for k in OBJECTIVE_KINDS)}, got {self.kind!r}")
        if self.estimator not in ESTIMATORS:
            _fail(f"{where}.estimator", f"must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.kind == "grpo" and self.estimator != "sampled":
            _fail(
                f"{where}.estimator",
                f"{self.estimator!r} estimates the G-OPD objective; GRPO's advantage is a "
                "sequence reward: use 'sampled'",
            )
        if self.returns not in ("token", "sequence"):
            _fail(f"{where}.returns", f"must be 'token' or 'sequence', got {self.returns!r}")
        if self.returns == "sequence" and self.kind != "gopd":
            _fail(
                f"{where}.returns",
                "'sequence' is a G-OPD setting (GRPO's advantage is already a sequence reward); use 'token'",
            )
        if self.returns == "sequence" and self.estimator != "sampled":
            _fail(
                f"{where}.returns",
                f"'sequence' needs estimator 'sampled': {self.estimator!r} is a per-position "
                "expectation over the next token at each prefix, which has no return over later tokens",
            )
        if self.estimator == "top_k" and self.top_k < 1:
            _fail(f"{where}.top_k", f"must be >= 1, got {self.top_k}")
        if not (self.kl_coef >= 0.0):
            _fail(f"{where}.kl_coef", f"must be >= 0, got {self.kl_coef}")
        if self.kind == "gopd" and self.kl_coef != 0.0:
            _fail(f"{where}.kl_coef", "is a GRPO setting (G-OPD's KL term is built into its advantage); set it to 0")
        if not (self.lam >= 0.0):
            _fail(f"{where}.lam", f"reward scale lambda must be >= 0, got {self.lam}")
        if (
            isinstance(self.reference_metrics_every, bool)
            or not isinstance(self.reference_metrics_every, int)
            or self.reference_metrics_every < 0
        ):
            _fail(f"{where}.reference_metrics_every", f"must be an integer >= 0, got {self.reference_metrics_every!r}")
        if self.reference_server is not None:
            _check_urls(f"{where}.reference_server", self.reference_server)
        if isinstance(self.reference, ModelConfig):
            if self.reference.load is None:
                _fail(f"{where}.reference.load", "a reference model needs weights: set the path of its checkpoint")
            self.reference.validate(f"{where}.reference")
        elif self.reference != "initial" and self.reference_server is None and not Path(self.reference).exists():
            _fail(
                f"{where}.reference",
                f"must be 'initial', an existing checkpoint path or a model mapping, got {self.reference!r}",
            )
        if not (0 <= self.clip_eps_low < 1):
            _fail(f"{where}.clip_eps_low", f"need 0 <= clip_eps_low < 1, got {self.clip_eps_low}")
        if self.clip_eps_high < 0:
            _fail(f"{where}.clip_eps_high", f"must be >= 0, got {self.clip_eps_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            _fail(f"{where}.dual_clip", f"must be > 1 or null, got {self.dual_clip}")
        if self.is_cap is not None and self.is_cap <= 0:
            _fail(f"{where}.is_cap", f"must be > 0 or null, got {self.is_cap}")
        if self.aggregation not in AGGREGATIONS:
            _fail(f"{where}.aggregation", f"must be one of {AGGREGATIONS}, got {self.aggregation!r}")

    def needs_reference(self) -> bool:
        """Does the loss use pi_ref's log-probs? The one place that decides whether the reference
        is scored every step. G-OPD: lambda != 1 (at lambda = 1 the advantage is
        log pi_teacher - log pi_old: the reference cancels); GRPO: kl_coef > 0."""
        if self.kind == "grpo":
            return self.kl_coef > 0
        return self.lam != 1.0


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
    sglang_url: str | list[str] | None = None
    """SGLang server URL(s) (engine='sglang'): one URL, a list, or one router URL (then list the
    servers behind it in ``sglang_workers``). Requests are split over the servers and a failed
    server's requests are retried on the others."""
    sglang_workers: list[str] | None = None
    """The servers behind a router at ``sglang_url``: weight sync and memory control go to each of
    them directly (a router does not forward those). None: ``sglang_url`` lists the servers."""
    request_timeout_s: float = 60.0
    """Time limit of a request to an SGLang server, in seconds; a /generate request gets
    ``request_timeout_s + request_timeout_per_token_s * max_new_tokens``. A server that exceeds it
    is taken out of the pool (until a /generate probe succeeds and it has synced the current
    weights) and its requests are retried on the others with the same rid."""
    request_timeout_per_token_s: float = 0.1
    """Extra time limit of a /generate request per token of ``max_new_tokens`` (0.1 s: a request
    slower than 10 tokens/s is taken for hung)."""
    request_batch: int = 64
    """Prompts per /generate request to a server (a router gets one request per sample: its
    typed body takes one rid): the unit of work handed to a server and retried elsewhere."""
    max_inflight_per_server: int = 256
    """Most rows this client has in flight on one server (through a router: per server behind
    it); more wait on the client side, where no time limit runs."""
    send_seed: bool = False
    """Send sampling_seed per request (seed + row index); otherwise the server's RNG is used."""
    sglang_version: str | None = None
    """The SGLang release the servers run, when they do not report one the client knows (e.g. a
    source build reporting 0.0.0.dev0): its protocol is used. None: ask each server
    (/get_server_info); supported: 0.5.9 to 0.5.23."""
    weight_sync: str = "disk"
    """How the servers get new weights after each step: 'disk' (bf16 HF export on a shared
    filesystem + /update_weights_from_disk; works everywhere), 'nccl' (broadcast from trainer
    rank 0 over a process group joined by the servers, disaggregated GPUs), 'ipc' (CUDA-IPC
    handles to colocated servers on the same GPUs)."""
    weight_dir: str | None = None
    """Folder for the 'disk' exports (must be readable by every server); None: out_dir/rollout_weights."""
    bucket_mb: int = 512
    """Largest bucket of bf16 tensors per 'nccl'/'ipc' update request."""
    server_ranks: int = 1
    """GPUs of each SGLang server (its TP size): its ranks in the 'nccl' group, its IPC entries."""
    weight_sync_address: str | None = None
    """Address of trainer rank 0 that the servers can reach for 'nccl' (None: MASTER_ADDR, else the hostname)."""
    weight_sync_port: int = 0
    """Port for the 'nccl' group rendezvous (0: a free port)."""
    weight_sync_backend: str = "nccl"
    """Backend of the weight-update group ('nccl'; 'gloo' for CPU tests)."""
    colocate: bool = False
    """Servers share the trainer's GPUs: /release_memory_occupation before each training phase,
    /resume_memory_occupation (weights, then KV cache) around the weight sync."""
    overlap: bool = False
    """Sample batch k+1 (in a background thread) while training on batch k: one step off-policy,
    corrected by the objective's truncated importance weight. Server engines only."""
    server_check: str = "refuse"
    """At start, server scoring (rollout server, teacher/reference servers) is compared with the
    trainer's: 'refuse' stops the run, 'warn' reports the measured gap, 'off' skips the check."""
    server_check_tolerance: float = 0.05
    """Largest mean |server - trainer| log-prob gap per token (nats) the check accepts (bf16 servers
    differ from an fp32 trainer by ~1e-2)."""
    server_check_sequences: int = 4
    """Sequences sampled and scored both ways by the start-up check."""
    kv_cache: bool = True
    """engine='embedded': decode with a KV cache (gopd_mega.rollout.kv_decode); False re-runs
    the whole prefix every step (same tokens and log-probs, quadratic in the response length)."""

    def validate(self, where: str = "") -> None:
        _check_finite(self, where)
        if self.engine not in ("embedded", "sglang"):
            _fail(f"{where}.engine", f"must be 'embedded' or 'sglang', got {self.engine!r}")
        if self.temperature <= 0:
            _fail(f"{where}.temperature", f"must be > 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            _fail(f"{where}.top_p", f"must be in (0, 1], got {self.top_p}")
        for name in ("max_new_tokens", "samples_per_prompt"):
            if getattr(self, name) < 1:
                _fail(f"{where}.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.engine == "sglang" and not _urls(self.sglang_url):
            _fail(f"{where}.sglang_url", "engine='sglang' needs the server URL(s)")
        if self.sglang_url is not None:
            _check_urls(f"{where}.sglang_url", self.sglang_url)
        if self.sglang_workers is not None:
            _check_urls(f"{where}.sglang_workers", self.sglang_workers)
        if self.weight_sync not in ("disk", "nccl", "ipc"):
            _fail(f"{where}.weight_sync", f"must be 'disk', 'nccl' or 'ipc', got {self.weight_sync!r}")
        if self.weight_sync_backend not in ("nccl", "gloo"):
            _fail(f"{where}.weight_sync_backend", f"must be 'nccl' or 'gloo', got {self.weight_sync_backend!r}")
        if self.request_timeout_s <= 0 or self.request_timeout_per_token_s < 0:
            _fail(f"{where}.request_timeout_s", "request_timeout_s must be > 0 and request_timeout_per_token_s >= 0")
        if self.request_batch < 1 or self.max_inflight_per_server < 1:
            _fail(f"{where}.request_batch", "request_batch and max_inflight_per_server must be >= 1")
        if self.sglang_version is not None:
            from gopd_mega.rollout.protocol import SUPPORTED, parse_version

            if parse_version(self.sglang_version) is None:
                _fail(
                    f"{where}.sglang_version", f"must be an SGLang release ({SUPPORTED}), got {self.sglang_version!r}"
                )
        if self.bucket_mb < 1 or self.server_ranks < 1:
            _fail(f"{where}.bucket_mb", "bucket_mb and server_ranks must be >= 1")
        if not 0 <= self.weight_sync_port < 65536:
            _fail(f"{where}.weight_sync_port", f"must be a port number (0: free port), got {self.weight_sync_port}")
        if self.overlap and self.engine != "sglang":
            _fail(f"{where}.overlap", "needs engine='sglang' (the embedded engine samples on the training ranks)")
        if self.colocate and self.engine != "sglang":
            _fail(f"{where}.colocate", "needs engine='sglang'")
        if self.server_check not in ("refuse", "warn", "off"):
            _fail(f"{where}.server_check", f"must be 'refuse', 'warn' or 'off', got {self.server_check!r}")
        if self.server_check_tolerance < 0 or self.server_check_sequences < 1:
            _fail(f"{where}.server_check_tolerance", "server_check_tolerance >= 0 and server_check_sequences >= 1")


@dataclass
class OptimConfig:
    """The student's optimizer (megatron-core DDP + AdamW on fp32 master weights) and LR schedule.

    The defaults are the paper's official runs: a fork of verl 0.6.1 whose scripts set only
    ``actor.optim.lr=1e-5`` and ``lr_warmup_steps_ratio=0.0`` and keep verl's defaults for the
    rest (verl/verl/trainer/config/optim/fsdp.yaml and verl/verl/workers/config/optimizer.py in
    github.com/ravindermishra00001-blip/G-OPD, commit 2e57cea: torch.optim.AdamW with
    weight_decay 0.01 on every parameter, betas (0.9, 0.999), torch's eps 1e-8, clip_grad 1.0,
    lr_scheduler_type constant, min_lr_ratio 0.0).
    """

    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the cosine/linear decay."""
    schedule: str = "constant"
    """'constant', 'cosine' or 'linear' decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (verl's default, kept by the paper's runs)."""
    decay_all_params: bool = True
    """Apply weight_decay to every parameter, as torch AdamW in the paper's runs does; false
    follows megatron's rule (no decay on biases and 1-D weights such as norms)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables), megatron's clip_grad_norm_fp32 on the fp32 grads."""
    use_distributed_optimizer: bool = False
    """Shard the fp32 master weights and Adam moments over the data-parallel group (megatron's
    DistributedOptimizer: gradients are reduce-scattered, updated weights all-gathered)."""
    overlap_grad_reduce: bool = False
    """Overlap the bucketed data-parallel gradient reduction with the backward pass (GPU runs).
    (The distributed optimizer's weight all-gather is not overlapped with the next forward: the
    trainer reads the full weights right after every update, for the rollout weight sync.)"""
    loss_scale: float = 0.0
    """fp16 only: constant loss scale; 0 = megatron's dynamic loss scaler (bf16/fp32 never scale)."""
    initial_loss_scale: float = 2.0**16
    """fp16 only: starting value of the dynamic loss scale."""

    def validate(self, where: str = "") -> None:
        _check_finite(self, where)
        if self.loss_scale < 0 or self.initial_loss_scale <= 0:
            _fail(
                f"{where}.loss_scale",
                f"need loss_scale >= 0 and initial_loss_scale > 0, got {self.loss_scale}, {self.initial_loss_scale}",
            )
        if self.lr <= 0:
            _fail(f"{where}.lr", f"must be > 0, got {self.lr}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            _fail(f"{where}.min_lr", f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.schedule not in ("constant", "cosine", "linear"):
            _fail(f"{where}.schedule", f"must be constant, cosine or linear, got {self.schedule!r}")
        for name in ("warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                _fail(f"{where}.{name}", f"must be >= 0, got {getattr(self, name)}")
        if self.eps <= 0:  # Adam divides by sqrt(v) + eps, and v is 0 for a parameter without gradient
            _fail(f"{where}.eps", f"must be > 0, got {self.eps}")
        for name in ("beta1", "beta2"):
            if not (0 <= getattr(self, name) < 1):
                _fail(f"{where}.{name}", f"must be in [0, 1), got {getattr(self, name)}")


VERIFIERS = ("auto", "math", "code", "synthetic", "none")
"""Choices of DataConfig.verifier."""


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
    """Held-out prompts per domain (synthetic data; for a dataset file see eval_holdout / eval_source)."""
    prompt_field: str = "prompt"
    """Dataset column holding the prompt."""
    answer_field: str = "answer"
    """Dataset column holding the reference answer (what the math verifier grades against)."""
    teacher_field: str = "opd_teacher"
    """Dataset column naming the teacher of each prompt (its route); with verifier 'auto' its
    values 'math' / 'code' also pick the verifier of each record."""
    verifier: str = "auto"
    """Verifier of GRPO rewards and of held-out evaluation: 'math' (the last \\boxed{} answer vs
    answer_field, with math-verify), 'code' (the response's program on tests_field, in the
    sandbox), 'synthetic' (the arithmetic domains' exact match; the domain is teacher_field),
    'none', or 'auto': 'synthetic' for synthetic data, else per record from its teacher_field
    value ('math' -> math, 'code' -> code; records naming another route have none)."""
    tests_field: str | None = None
    """Dataset column holding a code record's unit tests (a list of sandbox tests, APPS-style
    {inputs, outputs[, fn_name]}, or either as a JSON string). None: answer_field (how verl-style
    parquet files and gopd_mega.hf.load_paper_mix store them)."""
    code_isolation: bool = True
    """Run generated code in the sandbox's namespaces as its own uid (needs root). false runs it
    WITHOUT that isolation (resource limits only): an explicit opt-out for a trusted machine."""
    eval_source: str | None = None
    """Held-out dataset file (same columns as source) evaluated with the verifier every
    train.eval_every steps (at most eval.max_prompts records per verifier)."""
    eval_holdout: int = 0
    """Records of a dataset source held out from training (a seeded random choice) and evaluated
    like eval_source; 0: none. Synthetic data uses num_eval instead."""
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
        if self.source == "synthetic" and self.num_train < 1:
            _fail(f"{where}.num_train", f"synthetic data needs num_train >= 1, got {self.num_train}")
        if self.source == "synthetic" and not self.domains:
            _fail(f"{where}.domains", "synthetic data needs at least one domain")
        for name in ("prompt_field", "teacher_field"):
            if not getattr(self, name):
                _fail(f"{where}.{name}", "must be a non-empty column name")
        if self.verifier not in VERIFIERS:
            _fail(f"{where}.verifier", f"must be one of {', '.join(VERIFIERS)}, got {self.verifier!r}")
        if self.source == "synthetic" and self.verifier in ("math", "code"):
            _fail(
                f"{where}.verifier",
                f"{self.verifier!r} needs a dataset file; synthetic data has the 'synthetic' verifier",
            )
        if self.tests_field is not None and not self.tests_field:
            _fail(f"{where}.tests_field", "must be a non-empty column name, or null for answer_field")
        if self.eval_holdout < 0:
            _fail(f"{where}.eval_holdout", f"must be >= 0 (0: none), got {self.eval_holdout}")
        if self.source == "synthetic" and (self.eval_source is not None or self.eval_holdout):
            name = "eval_source" if self.eval_source is not None else "eval_holdout"
            _fail(f"{where}.{name}", "is for a dataset file; synthetic data is held out by num_eval")
        if self.eval_source is not None and self.eval_holdout:
            _fail(f"{where}.eval_holdout", "give eval_source or eval_holdout, not both")
        if self.eval_source is not None and not Path(self.eval_source).exists():
            _fail(f"{where}.eval_source", f"dataset path does not exist: {self.eval_source}")
        if (self.eval_source is not None or self.eval_holdout) and self.verifier == "none":
            _fail(
                f"{where}.verifier", "is 'none', so held-out records cannot be evaluated (eval_source / eval_holdout)"
            )


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 100
    """Policy updates."""
    prompts_per_step: int = 32
    """Prompts per rollout batch (each gives samples_per_prompt responses)."""
    max_tokens_per_micro_batch: int | None = None
    """Token budget of one forward (student, teachers, reference): sequences are packed back to
    back without padding into micro-batches of at most this many positions (gradient
    accumulation over the batch). A longer sequence runs alone; none is dropped. None: 4096 with
    Transformer Engine, 512 without (CPU), where a packed micro-batch uses a [T, T]
    block-diagonal attention mask whose cost grows with the square of the budget."""
    micro_batch_size: int | None = None
    """Optional cap on sequences per micro-batch on top of the token budget (None: no cap)."""
    updates_per_rollout: int = 1
    """Optimizer steps per rollout batch. 1 (the paper): one update on the whole batch, ratio 1.
    N > 1 (PPO style): the batch's sequences are split into N mini-batches, one update each,
    against pi_old from a no-grad pass of the student before the first (ratio and clip matter).
    The LR schedule counts updates: optim.warmup_steps and the decay span steps * N updates."""
    eval_every: int = 0
    """Evaluate every N steps and after the last step (0: never during training; the demo evaluates
    its finished models itself, and `gopd-eval` scores any saved model)."""
    save_every: int | None = None
    """Checkpoint every N steps (0: only at the end). None: every 10 steps with SGLang rollout
    servers (a run on a fleet should survive losing its trainer too), else only at the end."""
    keep_last: int | None = None
    """Keep only the N newest complete checkpoints: older ones are deleted after each successful
    save (the one just written is never deleted). None or 0 keeps them all."""
    out_dir: str = "runs/gopd"
    """Where checkpoints, metrics.jsonl and TensorBoard events go."""
    resume: bool = True
    """Resume from the newest checkpoint in out_dir that verifies against its manifest, if there
    is one (gopd_mega.checkpoint). False starts over but leaves the checkpoints already there,
    which a later resume may pick: use a fresh out_dir to start over."""
    seed: int = 0
    """Seed of sampling and data order."""
    log_backend: str = "jsonl"
    """'jsonl', 'tensorboard' or 'both' (the console always gets a line)."""
    progress: bool = True
    """Show a progress bar."""
    max_consecutive_skips: int = 5
    """An update whose loss or gradient norm is not finite is skipped (no optimizer step) and
    reported; this many skipped updates in a row stop the run with an error (1: the first one)."""
    dist_timeout_s: float = 1800.0
    """Timeout of torch.distributed collectives: a rank that waits longer for the others (one is
    dead, stopped or stuck) fails, and the missing ranks are named by rank and host. It must
    exceed the longest wait of a healthy run: with SGLang, the other ranks wait while rank 0
    samples a whole step's batch."""

    def validate(self, where: str = "") -> None:
        if self.steps < 0:
            _fail(f"{where}.steps", f"must be >= 0, got {self.steps}")
        for name in ("prompts_per_step", "updates_per_rollout"):
            if getattr(self, name) < 1:
                _fail(f"{where}.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 1:
            _fail(f"{where}.max_tokens_per_micro_batch", f"must be >= 1, got {self.max_tokens_per_micro_batch}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            _fail(f"{where}.micro_batch_size", f"must be >= 1 or null, got {self.micro_batch_size}")
        for name in ("eval_every", "save_every"):
            if (getattr(self, name) or 0) < 0:
                _fail(f"{where}.{name}", f"must be >= 0 (0: never), got {getattr(self, name)}")
        if self.keep_last is not None and self.keep_last < 0:
            _fail(f"{where}.keep_last", f"must be >= 1, or 0/null to keep every checkpoint, got {self.keep_last}")
        if self.log_backend not in ("jsonl", "tensorboard", "both"):
            _fail(f"{where}.log_backend", f"must be jsonl, tensorboard or both, got {self.log_backend!r}")
        if self.max_consecutive_skips < 1:
            _fail(f"{where}.max_consecutive_skips", f"must be >= 1, got {self.max_consecutive_skips}")
        _check_finite(self, where)
        if self.dist_timeout_s <= 0:
            _fail(f"{where}.dist_timeout_s", f"must be > 0, got {self.dist_timeout_s}")


@dataclass
class EvalConfig:
    """Held-out evaluation."""

    greedy: bool = True
    """Report greedy-decoding accuracy (``eval/<group>/greedy``), on synthetic domains and datasets
    alike. Metric names: gopd_mega/eval/metrics.py."""
    sampled: bool = True
    """Report the accuracy of one sample per prompt at the rollout temperature and top-p
    (``eval/<group>/avg@1``, ``pass@1``)."""
    exact: bool = False
    """Report the exact expected accuracy of temperature sampling: the probability of the reference
    answer then eos, one teacher-forced forward, no sampling noise (``eval/<group>/exact``,
    gopd_mega.eval.domains.answer_probability). Synthetic domains only (they have one reference answer per prompt)."""
    max_prompts: int = 200
    """Held-out prompts per domain used for evaluation."""

    def validate(self, where: str = "") -> None:
        if self.max_prompts < 1:
            _fail(f"{where}.max_prompts", f"must be >= 1, got {self.max_prompts}")


@dataclass
class RunSections:
    """The sections of a run besides its models, declared once: :class:`RunConfig` adds the
    student and the teachers; the demo's config (gopd_mega.demo.DemoConfig) adds its phases and
    builds one RunConfig per phase from these."""

    SECTIONS = ("objective", "rollout", "optim", "data", "train", "eval")

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

    def validate_sections(self) -> None:
        for name in self.SECTIONS:
            getattr(self, name).validate(name)


@dataclass
class RunConfig(RunSections):
    """A whole G-OPD run."""

    student: ModelConfig = field(default_factory=ModelConfig)
    """The student (trained); its initial weights are also the default reference."""
    teachers: list[TeacherConfig] = field(default_factory=list)
    """One or more teachers, each with its own route key and layout."""

    def validate(self) -> RunConfig:
        self.student.validate("student")
        self.objective.validate("objective")
        if self.objective.kind == "grpo":
            if self.teachers:
                _fail(
                    "teachers",
                    "objective.kind='grpo' trains from a verifier's reward and uses no teachers; remove them",
                )
            if self.rollout.samples_per_prompt < 2:
                _fail("rollout.samples_per_prompt", "GRPO normalises rewards within each prompt's group: need >= 2")
            if self.data.verifier == "none":
                _fail("data.verifier", "objective.kind='grpo' needs a verifier for its rewards, got 'none'")
        elif not self.teachers:
            _fail("teachers", "at least one teacher is required")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            _fail("teachers", f"route keys must be unique, got {names}")
        for i, teacher in enumerate(self.teachers):
            teacher.validate(f"teachers[{i}]")
        self._check_estimator()
        self.validate_sections()
        rows = self.train.prompts_per_step * self.rollout.samples_per_prompt
        if self.train.updates_per_rollout > rows:
            _fail(
                "train.updates_per_rollout",
                f"{self.train.updates_per_rollout} mini-batches cannot split a rollout batch of "
                f"{rows} sequences (train.prompts_per_step * rollout.samples_per_prompt)",
            )
        served = [f"teachers[{i}].server" for i, t in enumerate(self.teachers) if t.server is not None]
        served += ["objective.reference_server"] if self.objective.reference_server is not None else []
        if served and self.rollout.temperature != 1.0:
            _fail(
                served[0],
                f"a model served by SGLang scores by prefill, and SGLang's prefill log-probs ignore the "
                f"sampling temperature (every release): at rollout.temperature {self.rollout.temperature} they would "
                "be temperature-1 log-probs. Score it in the trainer (model.load, no server) or run at "
                "temperature 1.0",
            )
        if self.train.save_every is None:  # a run on a fleet of servers saves as it goes
            self.train.save_every = 10 if self.rollout.engine == "sglang" else 0
        prompt_plus_response = self.data.max_prompt_len + self.rollout.max_new_tokens
        for where, model in [("student", self.student)] + [
            (f"teachers[{i}].model", t.model) for i, t in enumerate(self.teachers)
        ]:
            # A loaded model's length comes from its checkpoint: checked when it is built.
            if model.load is None and model.max_seq_len < prompt_plus_response:
                _fail(
                    f"{where}.max_seq_len",
                    f"{model.max_seq_len} < data.max_prompt_len + rollout.max_new_tokens = {prompt_plus_response}",
                )
        return self

    def _check_estimator(self) -> None:
        """What objective.estimator needs of the teachers and the reference."""
        est, lam = self.objective.estimator, self.objective.lam
        if est == "full_vocab":
            for i, teacher in enumerate(self.teachers):
                if teacher.server is not None:
                    _fail(
                        f"teachers[{i}].server",
                        f"objective.estimator='full_vocab' needs the final hidden states and "
                        f"output layer of teacher '{teacher.name}' in the trainer; a server cannot ship hidden states: "
                        "score it locally (teachers[i].model.load, no server) or use objective.estimator=top_k",
                    )
            if self.objective.reference_server is not None and lam != 1.0:
                _fail(
                    "objective.reference_server",
                    "objective.estimator='full_vocab' needs the reference's hidden "
                    "states in the trainer (lam != 1); a server cannot ship them: score the reference locally",
                )
        if est == "top_k" and self.objective.reference_server is not None and lam != 1.0:
            _fail(
                "objective.reference_server",
                "objective.estimator='top_k' at lam != 1 needs the reference's "
                "log-probs at the teacher's top-k ids, which the server scoring request does not return: score "
                "the reference locally, or use lam = 1 (the reference then cancels)",
            )


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
        data = {k: _YAML_BOOL_WORDS.get((cls, k), {}).get(v, v) if isinstance(v, bool) else v for k, v in data.items()}
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
        # A mapping builds the dataclass member of the union (e.g. str | ModelConfig); anything
        # else the first plain member it fits (e.g. ``str | list[str]``).
        if isinstance(data, dict):
            inner = [a for a in inner if dataclasses.is_dataclass(a)] or inner
        elif len(inner) > 1:
            inner = [a for a in inner if not dataclasses.is_dataclass(a)] or inner
        for option in inner[:-1]:
            try:
                return _build(option, data, where)
            except ConfigError:
                pass
        return _build(inner[-1], data, where)
    if cls is float and isinstance(data, (int, float)) and not isinstance(data, bool):
        return float(data)
    if cls is float and isinstance(data, str):  # PyYAML reads '1e-5' (no dot) as a string
        try:
            return float(data)
        except ValueError:
            _fail(where, f"expected a number, got {data!r}")
    if cls is str and isinstance(data, bool):
        _fail(
            where,
            f"expected a string, got the boolean {data}: YAML reads an unquoted on/off/yes/no/true/false "
            "as a boolean; quote the word (e.g. 'off')",
        )
    if cls in (int, str, bool) and not (isinstance(data, cls) and not (cls is int and isinstance(data, bool))):
        _fail(where, f"expected {cls.__name__}, got {data!r}")
    if cls is float:
        _fail(where, f"expected a number, got {data!r}")
    return data


_YAML_BOOL_WORDS: dict[tuple[type, str], dict[bool, str]] = {(RolloutConfig, "server_check"): {False: "off"}}
"""String fields that take a YAML 1.1 boolean where its meaning is clear: ``server_check: off``
reads as False, which means 'off'. Any other boolean for a string field is refused with a message
saying to quote it."""


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
        items = list(base)
        for k, v in update.items():
            i = int(k)
            if i >= len(items):
                raise ConfigError(f"override index {i} is past the end of a list of {len(items)}")
            items[i] = _merge(items[i], v)
        return items
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


def build_config(cls: type, data: dict[str, Any], overrides: Sequence[str] = ()) -> Any:
    """Build and validate ``cls`` from a dict plus overrides."""
    cfg = _build(cls, _merge(data, parse_overrides(list(overrides))), "")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a :class:`RunConfig` from a recipe (or defaults when ``path`` is None) plus overrides."""
    data = read_recipe(path) if path is not None else {}
    return build_config(RunConfig, data, overrides)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a config (for saving next to checkpoints)."""
    return dataclasses.asdict(cfg)
