"""Rollout engines: sample responses from the student (in-process or an SGLang server)."""

from gopd_mega.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutBatch, RolloutEngine, pack_rollouts
from gopd_mega.rollout.embedded import EmbeddedEngine, sample_tokens

__all__ = ["EmbeddedEngine", "FINISH_LENGTH", "FINISH_STOP", "RolloutBatch", "RolloutEngine", "pack_rollouts",
           "sample_tokens", "make_engine"]


def make_engine(cfg, *, model=None, tokenizer):
    """Engine for a :class:`gopd_mega.config.RolloutConfig`: 'embedded' samples from ``model``,
    'sglang' talks to ``cfg.sglang_url``."""
    if cfg.engine == "embedded":
        if model is None:
            raise ValueError("rollout.engine='embedded' needs the model to sample from")
        return EmbeddedEngine(model, pad_id=tokenizer.pad_id, stop_ids=tokenizer.stop_ids,
                              kv_cache=cfg.kv_cache)
    if cfg.engine == "sglang":
        from gopd_mega.rollout.sglang import SGLangEngine

        return SGLangEngine(cfg.sglang_url, pad_id=tokenizer.pad_id, stop_ids=tokenizer.stop_ids)
    raise ValueError(f"unknown rollout engine {cfg.engine!r} (known: 'embedded', 'sglang')")
