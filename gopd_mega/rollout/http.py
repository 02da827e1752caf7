"""Pooled asynchronous HTTP for the SGLang client: one ``aiohttp.ClientSession`` (keep-alive
connections, HTTP/1.1) on one event-loop thread, shared by every server object of the process.
(aiohttp, as SGLang's own benchmark clients use. httpx 0.29 was tried first: in one run of
benchmarks/bench_rollout_client.py here, with 128 requests in flight, its connection pool spent
~9 ms of client CPU per request; aiohttp ~0.4 ms.)

    pool = shared_http()
    answer = pool.call("POST", url, payload, timeout=30.0)       # blocking, from any thread
    answers = pool.gather([coroutine, ...])                       # many requests at once

Thousands of requests per step (512 prompts x 8 samples, one request each through a router) run
as coroutines on that loop; nothing spawns a thread per request. Each server object limits how
many of its requests are in flight (SGLangServer.max_inflight); requests beyond that wait on the
client side, where no server timeout runs.

Errors: an HTTP status >= 400 raises :class:`SGLangError` (URL, status and the body's first 1000
characters); no answer at all (refused, reset, or nothing within ``timeout`` seconds) raises
:class:`ServerUnreachable`, whose requests can be retried on another server. ``timeout`` bounds
the whole request, connect to last byte.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import threading
from collections.abc import Coroutine
from typing import Any

import aiohttp


class SGLangError(RuntimeError):
    """The SGLang server failed or answered something unexpected; the message names the URL."""


class ServerUnreachable(SGLangError):
    """No answer at all (connection refused/reset, timeout): the server may be gone; its requests
    can be retried on another server."""


def decode_body(content: bytes) -> Any:
    """JSON answer, plain text for endpoints that answer text, None when empty."""
    if not content:
        return None
    try:
        return json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return content.decode(errors="replace")


class HttpPool:
    """The event loop thread and its pooled client (see the module docstring)."""

    def __init__(self, max_connections: int = 4096):
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="sglang-http")
        self.thread.start()

        async def make() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, keepalive_timeout=60.0)
            # No session timeout: request() bounds each whole request itself.
            return aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None), trust_env=False
            )

        self.client = self.run(make())

    def run(self, coro: Coroutine, timeout: float | None = None) -> Any:
        """Run ``coro`` on the pool's loop from another thread and return its result."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("HttpPool.run called from its own event loop thread")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def gather(self, coros, return_exceptions: bool = False) -> list:
        """Run the coroutines concurrently on the loop; their results in order (blocking)."""

        async def run_all():
            return await asyncio.gather(*coros, return_exceptions=return_exceptions)

        return self.run(run_all())

    async def request(self, method: str, url: str, payload: Any = None, timeout: float = 60.0) -> Any:
        """One request on the loop; the decoded answer (see decode_body)."""

        async def send():
            async with self.client.request(method, url, json=payload) as resp:
                return resp.status, await resp.read()

        try:
            status, content = await asyncio.wait_for(send(), timeout)
        except TimeoutError:
            raise ServerUnreachable(f"SGLang {url}: no answer within {timeout:g} s (timed out)") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ServerUnreachable(
                f"cannot reach SGLang at {url}: {type(exc).__name__}: {exc or 'no answer'}"
            ) from None
        if status >= 400:
            detail = content.decode(errors="replace")[:1000]
            raise SGLangError(f"SGLang {url} returned HTTP {status}: {detail}")
        return decode_body(content)

    def call(self, method: str, url: str, payload: Any = None, timeout: float = 60.0) -> Any:
        """Blocking :meth:`request`."""
        return self.run(self.request(method, url, payload, timeout))

    def close(self) -> None:
        """Close the connections and stop the loop (at exit)."""
        if self.pid != os.getpid() or not self.loop.is_running():
            return
        with contextlib.suppress(Exception):  # best effort at interpreter exit
            self.run(self.client.close(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)


_lock = threading.Lock()
_shared: HttpPool | None = None


def shared_http() -> HttpPool:
    """The process's HttpPool (made on first use; a forked child makes its own)."""
    global _shared
    with _lock:
        if _shared is None or _shared.pid != os.getpid():
            _shared = HttpPool()
            atexit.register(_shared.close)
        return _shared


def http_call(url: str, payload: Any = None, timeout: float = 60.0, method: str | None = None) -> Any:
    """One blocking HTTP request on the shared pool: POST with a payload, else GET."""
    return shared_http().call(method or ("GET" if payload is None else "POST"), url, payload, timeout)
