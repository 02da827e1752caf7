"""Many SGLang servers as one rollout engine: split, send concurrently, retry on the survivors.

    pool = SGLangPool(["http://node1:30000", "http://node2:30000"], pad_id=0, stop_ids=[2])
    batch = pool.generate(prompts, temperature=1.0, max_new_tokens=512, sample_ids=ids)

Work distribution: the rows are cut into chunks of ``chunk_size`` prompts (one HTTP request
each) put on a shared queue; one thread per live server takes the next chunk, sends it with a
per-request timeout, and stores the outputs by row. A server that fails (no answer, timeout,
HTTP error, an aborted output) is dropped for the rest of the call, the requests it held are
aborted there (best effort: /abort_request {rid}) and its chunk goes back on the queue with the
SAME request ids (rid), so another server finishes it. Every row is stored exactly once (by
index; a late duplicate would be refused), so nothing is lost or duplicated. When no server is
left with work outstanding, the call fails with a message naming every URL and its error.
Dropped servers are probed again (/health) at the next call and rejoin if they answer.

One URL may also be a router (SGLang Model Gateway) in front of many servers; control requests
(weight sync, memory release) then go to ``control_urls``, the servers behind it.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch

from gopd_mega.rollout.base import RolloutBatch, RolloutEngine, check_prompts, pack_rollouts
from gopd_mega.rollout.sglang import SGLangError, SGLangServer

logger = logging.getLogger(__name__)


def as_url_list(urls: str | Sequence[str] | None) -> list[str]:
    """One URL, a comma-separated string or a list -> list of URLs (no trailing '/')."""
    if urls is None:
        return []
    if isinstance(urls, str):
        urls = [u for u in urls.split(",")]
    return [u.strip().rstrip("/") for u in urls if u and u.strip()]


class SGLangPool(RolloutEngine):
    """Rollout engine over one or more SGLang servers (see the module docstring)."""

    spmd = False

    def __init__(self, urls: str | Sequence[str], *, pad_id: int, stop_ids: Sequence[int], timeout: float = 3600.0,
                 chunk_size: int = 64, send_seed: bool = False, control_urls: str | Sequence[str] | None = None):
        urls = as_url_list(urls)
        if not urls:
            raise ValueError("SGLangPool needs at least one server URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"SGLangPool: a server URL is listed twice: {urls}")
        if chunk_size < 1:
            raise ValueError(f"SGLangPool: chunk_size must be >= 1, got {chunk_size}")
        self.pad_id = pad_id
        self.stop_ids = list(stop_ids)
        self.chunk_size = chunk_size
        self.servers = [SGLangServer(u, stop_ids=stop_ids, timeout=timeout, send_seed=send_seed) for u in urls]
        control = as_url_list(control_urls)
        self.control = ([SGLangServer(u, stop_ids=stop_ids, timeout=timeout) for u in control] if control
                        else self.servers)
        self.dropped: dict[str, str] = {}  # url -> why it was dropped
        self.last_rows: list[str] = []  # server URL that answered each row of the last dispatch
        self.row_servers: dict[str, str] = {}  # sample id -> server URL, last generate()

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    # ------------------------------------------------------------------ health

    def check_health(self, timeout: float = 30.0) -> None:
        """Raise naming every server (generation and control) that does not answer /health."""
        everyone = {s.url: s for s in self.servers + self.control}
        with ThreadPoolExecutor(len(everyone)) as ex:
            ok = dict(zip(everyone, ex.map(lambda s: s.health(timeout), everyone.values())))
        dead = [u for u, alive in ok.items() if not alive]
        if dead:
            raise SGLangError(f"SGLang server(s) not answering /health: {', '.join(dead)} "
                              f"(of {', '.join(everyone)}); start them or remove them from rollout.sglang_url")

    def _live_servers(self) -> list[SGLangServer]:
        """Servers for this call: those not dropped, plus dropped ones that answer /health again."""
        live = []
        for s in self.servers:
            if s.url in self.dropped:
                if not s.health(timeout=5.0):
                    continue
                logger.warning("SGLang server %s answers again; it rejoins the pool", s.url)
                del self.dropped[s.url]
            live.append(s)
        return live

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, n: int, job: Callable[[SGLangServer, list[int]], list[Any]], what: str,
                 on_failure: Callable[[SGLangServer, list[int]], None] | None = None) -> list[Any]:
        """Run ``job(server, rows) -> one result per row`` over chunks of range(n) on the live
        servers concurrently (see the module docstring); results in row order."""
        servers = self._live_servers()
        if not servers:
            raise SGLangError(f"no SGLang server left for {what}: " +
                              "; ".join(f"{u}: {why}" for u, why in self.dropped.items()))
        chunks = [list(range(i, min(i + self.chunk_size, n))) for i in range(0, n, self.chunk_size)]
        results: list[Any] = [None] * n
        answered_by = [""] * n
        done = [False] * n
        cond = threading.Condition()
        state = {"in_flight": 0}
        errors: dict[str, str] = {}

        def worker(server: SGLangServer) -> None:
            while True:
                with cond:
                    while not chunks and state["in_flight"] > 0:
                        cond.wait()  # a chunk in flight elsewhere may come back
                    if not chunks:
                        return
                    rows = chunks.pop(0)
                    state["in_flight"] += 1
                try:
                    out = job(server, rows)
                    if len(out) != len(rows):
                        raise SGLangError(f"SGLang {server.url}: {len(out)} results for {len(rows)} requests")
                except Exception as exc:  # noqa: BLE001 - any failure moves the chunk elsewhere
                    errors[server.url] = str(exc)
                    if on_failure is not None:
                        try:
                            on_failure(server, rows)
                        except Exception:  # noqa: BLE001 - best effort on a failing server
                            pass
                    with cond:
                        chunks.insert(0, rows)
                        state["in_flight"] -= 1
                        cond.notify_all()
                    logger.warning("SGLang server %s failed during %s (%s); %d requests go to the others",
                                   server.url, what, exc, len(rows))
                    return
                with cond:
                    for r, value in zip(rows, out):
                        if done[r]:
                            raise SGLangError(f"{what}: row {r} answered twice")  # cannot happen by design
                        results[r], done[r], answered_by[r] = value, True, server.url
                    state["in_flight"] -= 1
                    cond.notify_all()

        threads = [threading.Thread(target=worker, args=(s,), daemon=True, name=f"sglang-{s.url}") for s in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.dropped.update(errors)
        self.last_rows = answered_by
        if not all(done):
            lost = sum(not d for d in done)
            raise SGLangError(f"{what}: every SGLang server failed with {lost} of {n} requests unanswered: " +
                              "; ".join(f"{u}: {why}" for u, why in errors.items()))
        return results

    # ------------------------------------------------------------------ engine API

    def generate(self, prompts: list[list[int]], *, temperature: float, top_p: float = 1.0, max_new_tokens: int,
                 greedy: bool = False, seed: int = 0, sample_ids: list[str] | None = None) -> RolloutBatch:
        """One response per prompt; ``sample_ids`` (unique) become the requests' rid."""
        check_prompts(prompts)
        n = len(prompts)
        ids = list(sample_ids) if sample_ids is not None else [f"r{seed}-{i}" for i in range(n)]
        if len(ids) != n or len(set(ids)) != n:
            raise ValueError(f"generate: need {n} unique sample ids, got {len(ids)} ({len(set(ids))} unique)")

        def job(server: SGLangServer, rows: list[int]):
            return server.generate([prompts[r] for r in rows], temperature=temperature, top_p=top_p,
                                   max_new_tokens=max_new_tokens, greedy=greedy, seeds=[seed + r for r in rows],
                                   rids=[ids[r] for r in rows])

        def abort(server: SGLangServer, rows: list[int]) -> None:
            for r in rows:
                server.call("/abort_request", {"rid": ids[r]}, timeout=5.0)

        samples = self.dispatch(n, job, "generation", on_failure=abort)
        self.row_servers = dict(zip(ids, self.last_rows))
        return pack_rollouts(prompts, [s.ids for s in samples], [s.logps for s in samples], [s.finish for s in samples],
                             self.pad_id, ids, [s.weight_version for s in samples])

    def score(self, sequences: list[list[int]], *, temperature: float = 1.0) -> list[torch.Tensor]:
        """Prefill-only log-probs of each sequence (see SGLangServer.score), spread over the servers."""
        return self.dispatch(len(sequences), lambda s, rows: s.score([sequences[r] for r in rows], temperature=temperature),
                             "scoring")

    def control_call(self, path: str, payload: dict | None = None, timeout: float | None = None) -> list[dict]:
        """POST a control request to every control server concurrently; raise naming each that failed."""
        def one(server: SGLangServer):
            try:
                return server.post_checked(path, payload, timeout), None
            except SGLangError as exc:
                return None, str(exc)

        with ThreadPoolExecutor(len(self.control)) as ex:
            answers = list(ex.map(one, self.control))
        failed = [err for _, err in answers if err is not None]
        if failed:
            raise SGLangError(f"{path} failed on {len(failed)} of {len(self.control)} server(s): " + "; ".join(failed))
        return [a for a, _ in answers]

    def update_weights(self, source: Any = None) -> None:
        """Load an exported HF checkpoint directory on every server (weight_sync.py does the full
        protocol with versions, pause and checks)."""
        if source is None:
            raise ValueError("SGLangPool.update_weights needs the path of an exported HF checkpoint")
        self.control_call("/update_weights_from_disk", {"model_path": str(source)})
