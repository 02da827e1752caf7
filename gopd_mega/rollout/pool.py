"""Many SGLang servers as one rollout engine: a fleet that survives dead and hung servers.

    pool = SGLangPool(["http://node1:30000", "http://node2:30000"], pad_id=0, stop_ids=[2])
    batch = pool.generate(prompts, temperature=1.0, max_new_tokens=512, sample_ids=ids)

Lists. ``servers`` are the generation URLs: servers, or routers (SGLang Model Gateway) when
``control_urls`` names the servers behind them. ``control`` are the servers that weight sync and
memory control talk to: the servers themselves, or the ones behind the routers.

Work distribution: rows are cut into units, ``chunk_size`` prompts in one /generate request for a
server, one row per request for a router (its typed body takes one rid and one sampling_params
object). The units run concurrently as coroutines on the shared HTTP pool, each server holding at
most ``max_inflight`` rows in flight (a router: that many per server behind it). Results are
stored by row index, each exactly once.

Faults. A server that fails a request (no answer, an HTTP error, an aborted output, a wrong weight
version) or does not answer within its time limit (``timeout + timeout_per_token *
max_new_tokens``) is taken OUT of every list (generation, control, weight sync; when it sits
behind a router it is also removed from the router). Its in-flight requests are abandoned, aborted
there (best effort) and sent to the others with the SAME rid, so nothing is lost or duplicated.
A failure through a router is blamed by probing the servers behind it; a router that cannot be
reached is itself taken out. The call fails only when no server is left, naming every URL and why
it is out. An out server comes back only through :meth:`probe_out` (a real one-token /generate,
not /health, which a hung SGLang still answers) followed by a weight sync that brings it to the
current version (gopd_mega.rollout.weight_sync), then :meth:`readmit`; a server of a frozen model
(teacher, reference) after its probe alone (:meth:`readmit_frozen`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import torch

from gopd_mega.rollout.base import RolloutBatch, RolloutEngine, check_prompts, pack_rollouts
from gopd_mega.rollout.http import ServerUnreachable, SGLangError, shared_http
from gopd_mega.rollout.sglang import SGLangServer, require_unit_temperature

logger = logging.getLogger(__name__)

ROUTER_ATTEMPTS = 3
"""Tries of one row through a router before the router itself is taken out."""


def _retrieve(task: asyncio.Task) -> None:
    """Done-callback of an abandoned request: its outcome is not wanted (silences asyncio)."""
    if not task.cancelled():
        task.exception()


def as_url_list(urls: str | Sequence[str] | None) -> list[str]:
    """One URL, a comma-separated string or a list -> list of URLs (no trailing '/')."""
    if urls is None:
        return []
    if isinstance(urls, str):
        urls = list(urls.split(","))
    return [u.strip().rstrip("/") for u in urls if u and u.strip()]


class SGLangPool(RolloutEngine):
    """Rollout engine over one or more SGLang servers or routers (see the module docstring)."""

    spmd = False

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        pad_id: int,
        stop_ids: Sequence[int],
        timeout: float = 60.0,
        timeout_per_token: float = 0.1,
        chunk_size: int = 64,
        send_seed: bool = False,
        control_urls: str | Sequence[str] | None = None,
        max_inflight: int = 256,
        version: str | None = None,
        probe_timeout: float = 30.0,
    ):
        urls = as_url_list(urls)
        control = as_url_list(control_urls)
        if not urls:
            raise ValueError("SGLangPool needs at least one server URL")
        for what, group in (("server", urls), ("server behind the router", control)):
            if len(set(group)) != len(group):
                raise ValueError(f"SGLangPool: a {what} URL is listed twice: {group}")
        if chunk_size < 1 or max_inflight < 1:
            raise ValueError(f"SGLangPool: chunk_size and max_inflight must be >= 1, got {chunk_size}, {max_inflight}")
        self.pad_id = pad_id
        self.stop_ids = list(stop_ids)
        self.chunk_size = chunk_size
        self.routed = bool(control)
        self.probe_timeout = probe_timeout

        def server(url: str, batched: bool, inflight: int) -> SGLangServer:
            return SGLangServer(
                url,
                stop_ids=stop_ids,
                timeout=timeout,
                timeout_per_token=timeout_per_token,
                send_seed=send_seed,
                batched=batched,
                max_inflight=inflight,
                version=version,
            )

        self.servers = [server(u, not self.routed, max_inflight * max(1, len(control))) for u in urls]
        self.control = [server(u, True, max_inflight) for u in control] if control else self.servers
        self.out: dict[str, str] = {}
        """URL -> why it is out of every list (see the module docstring)."""
        self.last_rows: list[str] = []  # the URL that answered each row of the last dispatch
        self._expect_version: str | None = None  # the weight version the running generation expects
        self.row_servers: dict[str, str] = {}  # sample id -> URL that answered it, last generate()

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def dropped(self) -> dict[str, str]:
        """Servers out of the pool and why (an alias of ``out``)."""
        return self.out

    def everyone(self) -> list[SGLangServer]:
        """Generation and control servers, each once."""
        seen: dict[str, SGLangServer] = {}
        for s in self.servers + self.control:
            seen.setdefault(s.url, s)
        return list(seen.values())

    def live(self) -> list[SGLangServer]:
        """Generation URLs that are in."""
        return [s for s in self.servers if s.url not in self.out]

    def live_control(self) -> list[SGLangServer]:
        """Control servers that are in."""
        return [s for s in self.control if s.url not in self.out]

    def _why_none(self, what: str) -> SGLangError:
        everyone = ", ".join(s.url for s in self.everyone())
        reasons = "; ".join(f"{u}: {why}" for u, why in self.out.items())
        return SGLangError(f"no SGLang server left for {what} (of {everyone}): {reasons}")

    # ------------------------------------------------------------------ membership

    async def atake_out(self, server: SGLangServer, why: str) -> None:
        """``server`` leaves every list (and the routers in front of it) until readmitted."""
        if server.url in self.out:
            return
        self.out[server.url] = why
        logger.warning(
            "SGLang server %s is out of the pool until it answers a /generate probe and syncs the current weights: %s",
            server.url,
            why,
        )
        if self.routed and server in self.control:
            await asyncio.gather(*[self._router_remove(r, server.url) for r in self.live()])

    def take_out(self, server: SGLangServer, why: str) -> None:
        shared_http().run(self.atake_out(server, why))

    async def areadmit(self, server: SGLangServer) -> None:
        """``server`` (probed and synced) is back in every list."""
        if self.out.pop(server.url, None) is None:
            return
        logger.warning("SGLang server %s is back in the pool", server.url)
        if self.routed and server in self.control:
            await asyncio.gather(*[self._router_add(r, server.url) for r in self.live()])

    def readmit(self, server: SGLangServer) -> None:
        shared_http().run(self.areadmit(server))

    async def _router_remove(self, router: SGLangServer, url: str) -> None:
        """Best effort: take ``url`` out of the router's worker list (GET /workers, DELETE /workers/{id})."""
        try:
            listing = await router.acall("/workers", timeout=10)
            for w in (listing or {}).get("workers", []) if isinstance(listing, dict) else []:
                if str(w.get("url", "")).rstrip("/") == url and w.get("id"):
                    await router.acall(f"/workers/{w['id']}", timeout=10, method="DELETE")
        except SGLangError as exc:
            logger.warning("could not remove %s from router %s: %s", url, router.url, exc)

    async def _router_add(self, router: SGLangServer, url: str) -> None:
        try:
            await router.acall("/workers", {"url": url}, timeout=10)
        except SGLangError as exc:
            logger.warning("could not add %s back to router %s: %s", url, router.url, exc)

    async def aprobe_out(self) -> list[SGLangServer]:
        """Out control servers whose real /generate probe succeeds now (candidates for the next
        weight sync; they stay out of generation until :meth:`readmit`)."""
        out = [s for s in self.control if s.url in self.out]

        async def ok(s: SGLangServer) -> bool:
            try:
                await s.aprobe(self.probe_timeout)
                return True
            except SGLangError as exc:
                self.out[s.url] = (
                    f"{self.out[s.url]} (probe: {exc})" if "(probe:" not in self.out[s.url] else self.out[s.url]
                )
                return False

        passed = await asyncio.gather(*[ok(s) for s in out])
        return [s for s, p in zip(out, passed) if p]

    def probe_out(self) -> list[SGLangServer]:
        return shared_http().run(self.aprobe_out())

    def readmit_frozen(self) -> list[SGLangServer]:
        """For servers of a frozen model (a teacher, the reference): out servers whose /generate
        probe succeeds come straight back (there are no weights to bring up to date). Returns them."""
        back = self.probe_out()
        for s in back:
            self.readmit(s)
        return back

    def check_health(self, timeout: float = 30.0, protocol: bool = True) -> None:
        """At start: every server (generation and control) must answer /health, and (with
        ``protocol``: servers that get weight syncs) every control server must run a release
        whose protocol the client speaks. Raises naming each server that does not."""
        everyone = self.everyone()

        async def health(s: SGLangServer):
            try:
                await s.acall("/health", timeout=timeout)
                return True
            except SGLangError:
                return False

        ok = shared_http().gather([health(s) for s in everyone])
        dead = [s.url for s, alive in zip(everyone, ok) if not alive]
        if dead:
            raise SGLangError(
                f"SGLang server(s) not answering /health: {', '.join(dead)} "
                f"(of {', '.join(s.url for s in everyone)}); start them or remove them from rollout.sglang_url"
            )
        if protocol:
            for s in self.control:
                s.protocol()

    # ------------------------------------------------------------------ dispatch

    def dispatch(
        self,
        n: int,
        job: Callable[[SGLangServer, list[int]], Awaitable[list[Any]]],
        what: str,
        abort: Callable[[SGLangServer, list[int]], Awaitable[None]] | None = None,
    ) -> list[Any]:
        """Run ``await job(server, rows) -> one result per row`` over units of range(n) on the live
        servers (see the module docstring); results in row order."""
        return shared_http().run(self._dispatch(n, job, what, abort))

    async def _dispatch(self, n, job, what, abort) -> list[Any]:
        size = 1 if self.routed else self.chunk_size
        pending = deque(list(range(i, min(i + size, n))) for i in range(0, n, size))
        results: list[Any] = [None] * n
        answered_by = [""] * n
        done = [False] * n
        attempts = [0] * n
        running: dict[asyncio.Task, tuple[SGLangServer, list[int]]] = {}
        inflight: dict[str, int] = {}
        self._aborts: list[asyncio.Task] = []  # best-effort aborts, run beside the retries
        completed: asyncio.Queue = asyncio.Queue()  # tasks as they finish (abandoned ones are skipped)
        try:
            while pending or running:
                live = self.live()
                if not live and not running:
                    raise self._why_none(f"{what} ({sum(not d for d in done)} of {n} requests unanswered)")
                while pending and live:  # the least loaded server with room takes the next unit
                    s = min(live, key=lambda x: inflight.get(x.url, 0) / x.max_inflight)
                    rows = pending[0]
                    if inflight.get(s.url, 0) and inflight.get(s.url, 0) + len(rows) > s.max_inflight:
                        break
                    pending.popleft()
                    inflight[s.url] = inflight.get(s.url, 0) + len(rows)
                    task = asyncio.ensure_future(job(s, rows))
                    task.add_done_callback(completed.put_nowait)
                    running[task] = (s, rows)
                finished = [await completed.get()]  # one completion at a time: O(1) per request
                while not completed.empty():
                    finished.append(completed.get_nowait())
                for task in finished:
                    if task not in running:
                        continue  # abandoned with its server below
                    s, rows = running.pop(task)
                    inflight[s.url] -= len(rows)
                    exc = task.exception()
                    if exc is None:
                        out = task.result()
                        if len(out) != len(rows):
                            exc = SGLangError(f"SGLang {s.url}: {len(out)} results for {len(rows)} requests")
                    if exc is None:
                        for r, value in zip(rows, out):
                            if done[r]:
                                raise SGLangError(f"{what}: row {r} answered twice")  # cannot happen by design
                            results[r], done[r], answered_by[r] = value, True, s.url
                        continue
                    await self._failed(s, rows, exc, what, pending, running, inflight, attempts, abort)
        finally:
            for task in running:
                task.cancel()
                task.add_done_callback(_retrieve)
            if self._aborts:
                await asyncio.wait(self._aborts, timeout=5.0)
        self.last_rows = answered_by
        return results

    async def _failed(self, s, rows, exc, what, pending, running, inflight, attempts, abort) -> None:
        """A unit failed on ``s``: take out whoever is to blame, requeue its rows (same rids)."""
        why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, SGLangError) else str(exc)
        logger.warning("SGLang %s failed during %s (%s); %d request(s) go to the others", s.url, what, why, len(rows))
        if not self.routed:
            abandoned = [rows]
            for task, (s2, rows2) in list(running.items()):
                if s2 is s:  # abandon its other requests
                    task.cancel()
                    task.add_done_callback(_retrieve)
                    running.pop(task)
                    inflight[s.url] -= len(rows2)
                    abandoned.append(rows2)
            await self.atake_out(s, why)
            for unit in abandoned:
                pending.appendleft(unit)
            if abort is not None:
                self._aborts.append(asyncio.ensure_future(self._quietly(abort(s, [r for u in abandoned for r in u]))))
            return
        # Through a router: probe the servers behind it; the router itself is out when it cannot
        # be reached or a row has failed there too often.
        blamed = await self._blame_workers()
        for r in rows:
            attempts[r] += 1
        unreachable = isinstance(exc, ServerUnreachable) and "cannot reach" in str(exc)
        if unreachable or max(attempts[r] for r in rows) >= ROUTER_ATTEMPTS:
            await self.atake_out(s, why)
        pending.appendleft(rows)
        if abort is not None:
            for w in blamed:
                self._aborts.append(asyncio.ensure_future(self._quietly(abort(w, rows))))

    async def _blame_workers(self) -> list[SGLangServer]:
        """Probe the live servers behind the routers; take out those that fail, or that report
        another weight version than the generation expects."""
        workers = self.live_control()
        expect = self._expect_version

        async def check(w: SGLangServer):
            try:
                await w.aprobe(self.probe_timeout)
                got = await w.aweight_version() if expect is not None else None
            except SGLangError as exc:
                return str(exc)
            if got is not None and got != expect:
                return (
                    f"reports weight version {got!r} instead of {expect!r}: a weight refresh did not take effect there"
                )
            return None

        verdicts = await asyncio.gather(*[check(w) for w in workers])
        blamed = []
        for w, why in zip(workers, verdicts):
            if why is not None:
                await self.atake_out(w, why)
                blamed.append(w)
        return blamed

    @staticmethod
    async def _quietly(coro) -> None:
        with contextlib.suppress(Exception):  # best effort on a failing server
            await coro

    # ------------------------------------------------------------------ engine API

    def generate(
        self,
        prompts: list[list[int]],
        *,
        temperature: float,
        top_p: float = 1.0,
        max_new_tokens: int,
        greedy: bool = False,
        seed: int = 0,
        sample_ids: list[str] | None = None,
        expect_version: str | None = None,
    ) -> RolloutBatch:
        """One response per prompt; ``sample_ids`` (unique) become the requests' rid. With
        ``expect_version``, a server that reports another weight version fails (and is taken out)."""
        check_prompts(prompts)
        n = len(prompts)
        ids = list(sample_ids) if sample_ids is not None else [f"r{seed}-{i}" for i in range(n)]
        if len(ids) != n or len(set(ids)) != n:
            raise ValueError(f"generate: need {n} unique sample ids, got {len(ids)} ({len(set(ids))} unique)")

        async def job(server: SGLangServer, rows: list[int]):
            samples = await server.agenerate(
                [prompts[r] for r in rows],
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                greedy=greedy,
                seeds=[seed + r for r in rows],
                rids=[ids[r] for r in rows],
            )
            wrong = [
                (ids[r], s.weight_version)
                for r, s in zip(rows, samples)
                if expect_version is not None and s.weight_version not in (expect_version, "")
            ]
            if wrong:
                raise SGLangError(
                    f"weight version mismatch: SGLang {server.url} drew {len(wrong)} sample(s) with weight "
                    f"version {sorted({v for _, v in wrong})} instead of {expect_version!r} (e.g. sample "
                    f"{wrong[0][0]}): a weight refresh did not take effect there"
                )
            return samples

        async def abort(server: SGLangServer, rows: list[int]) -> None:
            await asyncio.gather(
                *[server.acall("/abort_request", {"rid": ids[r]}, timeout=5.0) for r in rows], return_exceptions=True
            )

        self._expect_version = expect_version
        try:
            samples = self.dispatch(n, job, "generation", abort)
        finally:
            self._expect_version = None
        self.row_servers = dict(zip(ids, self.last_rows))
        return pack_rollouts(
            prompts,
            [s.ids for s in samples],
            [s.logps for s in samples],
            [s.finish for s in samples],
            self.pad_id,
            ids,
            [s.weight_version for s in samples],
        )

    def score(self, sequences: list[list[int]], *, temperature: float = 1.0) -> list[torch.Tensor]:
        """Prefill-only log-probs of each sequence (SGLangServer.ascore), spread over the servers;
        temperature 1 only (SGLang's prefill log-probs ignore the temperature)."""
        require_unit_temperature(temperature, f"scoring on SGLang {', '.join(self.urls)}")
        return self.dispatch(len(sequences), lambda s, rows: s.ascore([sequences[r] for r in rows]), "scoring")

    async def acontrol_call(
        self,
        path: str,
        payload: dict | None = None,
        timeout: float | None = None,
        servers: Sequence[SGLangServer] | None = None,
    ) -> dict[str, dict]:
        """POST a control request to ``servers`` (default: the live control servers) concurrently.
        A server that fails is taken out; raises only when none succeeds. {url: answer} of those
        that did."""
        targets = list(self.live_control() if servers is None else servers)
        if not targets:
            raise self._why_none(path)
        answers = await asyncio.gather(
            *[s.apost_checked(path, payload, timeout) for s in targets], return_exceptions=True
        )
        ok = {}
        for s, a in zip(targets, answers):
            if isinstance(a, BaseException):
                await self.atake_out(s, f"{path}: {a}")
            else:
                ok[s.url] = a
        if not ok:
            raise SGLangError(
                f"{path} failed on every SGLang server: "
                + "; ".join(f"{s.url}: {self.out.get(s.url, '?')}" for s in targets)
            )
        return ok

    def control_call(
        self,
        path: str,
        payload: dict | None = None,
        timeout: float | None = None,
        servers: Sequence[SGLangServer] | None = None,
    ) -> dict[str, dict]:
        return shared_http().run(self.acontrol_call(path, payload, timeout, servers))

    def update_weights(self, source: Any = None) -> None:
        """Load an exported HF checkpoint directory on every server (weight_sync.py does the full
        protocol with versions, pause and checks)."""
        if source is None:
            raise ValueError("SGLangPool.update_weights needs the path of an exported HF checkpoint")
        self.control_call("/update_weights_from_disk", {"model_path": str(source)})
