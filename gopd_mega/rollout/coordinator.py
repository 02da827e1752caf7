"""One rollout batch for the whole job, once per step, and the weight refresh that follows it.

    rollout = RolloutCoordinator(engine, weight_sync=sync, overlap=False, colocate=False)
    batch = rollout.collect(step, prompt_ids, samples_per_prompt, sampling)            # COLLECTIVE
    rollout.before_training()                                                          # colocated
    rollout.refresh(student, version + 1)                                              # COLLECTIVE

Server engines (SGLang): global rank 0 alone sends the requests and broadcasts the finished
RolloutBatch (broadcast_object_list) - every rank trains on the same global batch and the servers
see each prompt once per step. A failure on rank 0 is re-raised on every rank (no rank waits).
The embedded engine is SPMD: every rank runs the model collectively with the same seed and gets
the same batch; nothing is broadcast.

Ids: sample j of prompt i at step k is 's{k}-p{i}-n{j}' (the SGLang rid; a retry keeps it).
Versions: a batch sampled after k updates has weight version str(k) on every row; a server that
reports another version for any row is taken out of the pool and its rows are drawn elsewhere
(with no server left: an error naming the servers and the rows' ids).

Overlap (``overlap=True``, server engines only): after collecting batch k, rank 0 starts sampling
batch k+1 in a background thread while the trainer trains on batch k; the refresh after step k
first waits for that thread, so batch k+1 was sampled with the weights of version k (one step
off-policy: its sampler_logp come from the older weights, which the objective's truncated
importance weight exp(old - sampler) accounts for).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from gopd_mega.rollout.base import RolloutBatch
from gopd_mega.rollout.collective import global_rank, run_on_rank0
from gopd_mega.rollout.sglang import SGLangError


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of a rollout batch."""

    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int


def sample_ids(step: int, num_prompts: int, samples_per_prompt: int) -> list[str]:
    """'s{step}-p{i}-n{j}' for the j-th sample of prompt i (rows: prompt-major)."""
    return [f"s{step}-p{i}-n{j}" for i in range(num_prompts) for j in range(samples_per_prompt)]


def is_spmd(engine) -> bool:
    """Whether every rank runs ``engine`` collectively (the embedded engine) rather than rank 0
    alone talking to servers."""
    return bool(getattr(engine, "spmd", True))


class RolloutCoordinator:
    """See the module docstring."""

    def __init__(self, engine, *, weight_sync=None, overlap: bool = False, colocate: bool = False):
        self.engine = engine
        self.spmd = is_spmd(engine)
        if overlap and self.spmd:
            raise ValueError(
                "rollout.overlap needs a server engine (sglang): the embedded engine runs "
                "collectively on the training ranks and cannot sample while they train"
            )
        self.weight_sync = weight_sync
        self.overlap = overlap
        self.colocate = colocate
        self.version = 0
        self._prefetch: dict[str, Any] | None = None

    # ------------------------------------------------------------------ sampling

    def _sample(self, prompts: list[list[int]], ids: list[str], version: int, s: Sampling) -> RolloutBatch:
        kwargs: dict[str, Any] = {
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_new_tokens": s.max_new_tokens,
            "seed": s.seed,
        }
        if self.spmd:
            batch = self.engine.generate(prompts, **kwargs)
            batch.sample_ids, batch.weight_versions = list(ids), [str(version)] * len(ids)
            return batch
        if hasattr(self.engine, "live"):  # a pool: a server drawing with other weights is taken out, its rows redone
            kwargs["expect_version"] = str(version)
        batch = self.engine.generate(prompts, sample_ids=ids, **kwargs)
        self.check_versions(batch, version)
        return batch

    def check_versions(self, batch: RolloutBatch, version: int) -> None:
        """Every row must come from weights of ``version`` (as the server reports it)."""
        wrong = [(i, v) for i, v in zip(batch.sample_ids, batch.weight_versions) if v not in (str(version), "")]
        if wrong:
            where = getattr(self.engine, "row_servers", {})
            servers = sorted({where.get(i, "?") for i, _ in wrong})
            raise SGLangError(
                f"weight version mismatch: {len(wrong)} of {len(batch)} samples were drawn with weight "
                f"version {sorted({v for _, v in wrong})} instead of {str(version)!r} "
                f"(server(s) {', '.join(servers)}; e.g. sample {wrong[0][0]}): a weight refresh did not "
                f"take effect there"
            )

    def collect(self, step: int, prompts: list[list[int]], samples_per_prompt: int, sampling: Sampling) -> RolloutBatch:
        """COLLECTIVE. The global batch of ``step``: each prompt repeated ``samples_per_prompt``
        times, prompt-major, the same on every rank."""
        rows = [p for p in prompts for _ in range(samples_per_prompt)]
        ids = sample_ids(step, len(prompts), samples_per_prompt)
        if self.spmd:
            return self._sample(rows, ids, self.version, sampling)
        pre = self._prefetch
        self._prefetch = None
        if pre is not None and pre["ids"] != ids:
            raise RuntimeError(f"prefetched rollout is for {pre['ids'][:1]}..., step {step} wants {ids[:1]}...")

        def on_rank0():
            if pre is None:
                return self._sample(rows, ids, self.version, sampling)
            pre["thread"].join()
            if "error" in pre:
                raise pre["error"]
            return pre["batch"]

        return run_on_rank0(on_rank0, f"rollout of step {step}")

    def prefetch(self, step: int, prompts: list[list[int]], samples_per_prompt: int, sampling: Sampling) -> None:
        """Start sampling the batch of ``step`` in the background (rank 0), with the weights the
        servers hold now; :meth:`collect` for that step returns it. No-op without overlap."""
        if not self.overlap:
            return
        rows = [p for p in prompts for _ in range(samples_per_prompt)]
        ids = sample_ids(step, len(prompts), samples_per_prompt)
        pre: dict[str, Any] = {"ids": ids}
        version = self.version

        def work():
            try:
                pre["batch"] = self._sample(rows, ids, version, sampling)
            except Exception as exc:  # noqa: BLE001 - re-raised by collect() on every rank
                pre["error"] = exc

        pre["thread"] = threading.Thread(target=work, daemon=True, name=f"rollout-prefetch-{step}")
        if global_rank() == 0:
            pre["thread"].start()
        self._prefetch = pre

    @property
    def prefetching(self) -> bool:
        return self._prefetch is not None

    def _wait_prefetch(self) -> None:
        if self._prefetch is not None and global_rank() == 0 and self._prefetch["thread"].is_alive():
            self._prefetch["thread"].join()

    # ------------------------------------------------------------------ weights and memory

    def before_training(self) -> None:
        """COLLECTIVE. Colocated servers give their GPU memory (weights, KV cache) to training."""
        if self.colocate and not self.spmd:
            self._wait_prefetch()
            run_on_rank0(
                lambda: self.engine.control_call("/release_memory_occupation", {"tags": ["kv_cache", "weights"]}),
                "release of the servers' GPU memory",
            )

    def refresh(self, student, version: int) -> None:
        """COLLECTIVE, once per step. The engine samples from ``student`` (weights of ``version``)
        from now on. A running prefetch finishes first (it keeps the older weights)."""
        if self.spmd:
            self.engine.update_weights(student)
            self.version = version
            return
        self._wait_prefetch()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        if self.colocate:
            # every server, out ones too: a colocated server that is to rejoin needs its weights memory
            # back before its probe and sync
            run_on_rank0(
                lambda: self.engine.control_call(
                    "/resume_memory_occupation", {"tags": ["weights"]}, servers=self.engine.control
                ),
                "resume of the servers' weights memory",
            )
        if self.weight_sync is None:
            raise RuntimeError("a server engine needs a weight sync (rollout.weight_sync)")
        self.weight_sync.refresh(student, version)
        if self.colocate:
            run_on_rank0(
                lambda: self.engine.control_call(
                    "/resume_memory_occupation", {"tags": ["kv_cache"]}, servers=self.engine.control
                ),
                "resume of the servers' KV cache",
            )
        self.version = version

    def shared_engine(self):
        """The engine for other collective callers (evaluation): a server engine is driven by
        rank 0 alone and its batch broadcast, so the servers see each request once."""
        return self.engine if self.spmd else _RankZeroEngine(self.engine)

    def close(self) -> None:
        self._wait_prefetch()
        if self.weight_sync is not None:
            self.weight_sync.close()


class _RankZeroEngine:
    """``generate`` on global rank 0, the batch broadcast to every rank (see shared_engine)."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, prompts, **kwargs) -> RolloutBatch:
        return run_on_rank0(lambda: self.engine.generate(prompts, **kwargs), "generation")

    def __getattr__(self, name):
        return getattr(self.engine, name)
