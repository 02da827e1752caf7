"""Rollout engines: sample responses from the student (in-process or SGLang servers).

* base.py         RolloutBatch, the RolloutEngine interface
* embedded.py     in-process sampling from the trainer's copy of the student (SPMD)
* http.py         pooled asynchronous HTTP (aiohttp, keep-alive) shared by every server object
* protocol.py     the SGLang releases the client speaks (0.5.9 to 0.5.23) and how they differ
* sglang.py       HTTP client of one SGLang server (or router): request bodies, parsing
* pool.py         many servers as one engine: concurrent requests, faults, servers out and back
* coordinator.py  one global batch per step (rank 0 drives servers, broadcasts), overlap, memory
* weight_sync.py  weight refresh of the servers: disk | nccl | ipc
* servers.py      teachers / reference served by SGLang, start-up scoring check
"""

from gopd_mega.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutBatch, RolloutEngine, pack_rollouts
from gopd_mega.rollout.embedded import EmbeddedEngine, sample_tokens

__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "EmbeddedEngine",
    "RolloutBatch",
    "RolloutEngine",
    "make_engine",
    "pack_rollouts",
    "sample_tokens",
]


def make_engine(cfg, *, model=None, tokenizer):
    """Engine for a :class:`gopd_mega.config.RolloutConfig`: 'embedded' samples from ``model``,
    'sglang' talks to ``cfg.sglang_url``."""
    if cfg.engine == "embedded":
        if model is None:
            raise ValueError("rollout.engine='embedded' needs the model to sample from")
        return EmbeddedEngine(model, pad_id=tokenizer.pad_id, stop_ids=tokenizer.stop_ids, kv_cache=cfg.kv_cache)
    if cfg.engine == "sglang":
        from gopd_mega.rollout.pool import SGLangPool

        return SGLangPool(
            cfg.sglang_url,
            pad_id=tokenizer.pad_id,
            stop_ids=tokenizer.stop_ids,
            timeout=cfg.request_timeout_s,
            timeout_per_token=cfg.request_timeout_per_token_s,
            chunk_size=cfg.request_batch,
            send_seed=cfg.send_seed,
            control_urls=cfg.sglang_workers,
            max_inflight=cfg.max_inflight_per_server,
            version=cfg.sglang_version,
        )
    raise ValueError(f"unknown rollout engine {cfg.engine!r} (known: 'embedded', 'sglang')")
