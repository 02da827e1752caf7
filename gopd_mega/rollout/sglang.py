"""Client of one SGLang server (or router) over HTTP: generation, prefill scoring, control endpoints.

Transport: the process's pooled asynchronous client (gopd_mega.rollout.http, aiohttp with
keep-alive); SGLang itself never has to be importable here. Many servers are driven by
:mod:`gopd_mega.rollout.pool`; weight refreshes by :mod:`gopd_mega.rollout.weight_sync`; which
release speaks which protocol is in :mod:`gopd_mega.rollout.protocol`.

Requests (SGLang's native API; every body the client builds is checked against SGLang 0.5.23's
own request classes and the router's in tests/test_sglang_conformance.py):
    POST /generate, one request per sample (a router: its typed body takes ONE string ``rid``
                    and ONE ``sampling_params`` object, sgl-model-gateway/src/protocols/generate.rs)
                    {input_ids: [...], sampling_params: {temperature, top_p, max_new_tokens,
                     stop_token_ids, no_stop_trim: true[, sampling_seed]}, return_logprob: true,
                     rid: "s3-p0-n1"}
                    or, to a server directly, a batch in one request: input_ids [[...], ...],
                    rid [one per prompt], sampling_params one object (or one per prompt with seeds)
        -> {output_ids, meta_info: {id (the rid), finish_reason: {type: 'stop'|'length'|'abort',
            matched?}, weight_version, output_token_logprobs: [[logprob, token_id, text|null]]}}
           (a list for a batch)
    POST /generate  prefill-only scoring: sampling_params {max_new_tokens: 0}, return_logprob,
                    logprob_start_len 0 -> meta_info.input_token_logprobs (one entry per input
                    token, entry 0 null). These log-probs are at temperature 1 in every release:
                    SGLang does not apply the sampling temperature to them.
    GET  /health, /get_server_info -> {version, ...}, /model_info -> {weight_version, ...}
    POST /update_weights_from_disk, /pause_generation, ... (see weight_sync.py): {success, message},
         HTTP 400 on failure; /flush_cache answers plain text.

Log-prob semantics: by default SGLang reports output log-probs as log softmax(logits / T) of the
full vocabulary before top-p, the same quantity as the embedded engine (gopd_mega.rollout.base).
Do NOT launch the server with SGLANG_RETURN_ORIGINAL_LOGPROB=1 unless T = 1 (it then reports
T = 1 log-probs; the start-up check catches it). Greedy decoding is sent as temperature 0, for
which SGLang reports T = 1 log-probs.

Stop tokens: ``no_stop_trim`` keeps the matched stop id in ``output_ids`` so the response, its
mask and its log-probs include it exactly as in the embedded engine; if a server trims it anyway,
it is restored from ``finish_reason.matched`` (its log-prob is still in output_token_logprobs).

Seeds: SGLang samples with its own server-side RNG unless ``sampling_seed`` is sent (every
supported release takes it); it is sent only when ``send_seed=True`` (seed + global row index).

Time limits: a generation request is abandoned after ``timeout + timeout_per_token *
max_new_tokens`` seconds (its server is then taken out of the pool and the request retried
elsewhere with the same rid); any other request after ``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gopd_mega.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutBatch, RolloutEngine, check_prompts, pack_rollouts
from gopd_mega.rollout.http import ServerUnreachable, SGLangError, http_call, shared_http
from gopd_mega.rollout.protocol import Protocol, protocol_for

__all__ = [
    "SGLangEngine",
    "SGLangError",
    "SGLangServer",
    "Sample",
    "ServerUnreachable",
    "generate_body",
    "http_call",
    "sampling_params",
    "score_body",
]


@dataclass
class Sample:
    """One parsed /generate output."""

    ids: list[int]
    logps: list[float]
    finish: str
    weight_version: str


def sampling_params(
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    greedy: bool = False,
    seed: int | None = None,
) -> dict:
    """SGLang's sampling_params object for one sample."""
    params = {
        "temperature": 0.0 if greedy else float(temperature),
        "top_p": float(top_p),
        "max_new_tokens": int(max_new_tokens),
        "stop_token_ids": [int(s) for s in stop_ids],
        "no_stop_trim": True,
    }
    if seed is not None:
        params["sampling_seed"] = int(seed)
    return params


def generate_body(prompts: list[list[int]], params: list[dict], rids: list[str] | None, *, batched: bool) -> dict:
    """The /generate body for ``prompts`` (one sampling_params object per prompt): ONE prompt with
    a string rid and one sampling_params object (what a router takes), or with ``batched`` all of
    them in one request (lists of input_ids and rids; one shared sampling_params object when all
    prompts share it, as without seeds)."""
    if not batched:
        if len(prompts) != 1:
            raise ValueError(f"an unbatched /generate body holds one prompt, got {len(prompts)}")
        body = {"input_ids": [int(t) for t in prompts[0]], "sampling_params": params[0], "return_logprob": True}
        if rids is not None:
            body["rid"] = str(rids[0])
        return body
    shared = all(p == params[0] for p in params)
    body = {
        "input_ids": [[int(t) for t in p] for p in prompts],
        "sampling_params": params[0] if shared else list(params),
        "return_logprob": True,
    }
    if rids is not None:
        body["rid"] = [str(r) for r in rids]
    return body


def score_body(sequences: list[list[int]], *, batched: bool) -> dict:
    """The prefill-only scoring body (no rid: the server makes one; no temperature: prefill
    log-probs are at T = 1 whatever is sent)."""
    ids = [[int(t) for t in s] for s in sequences]
    if not batched and len(ids) != 1:
        raise ValueError(f"an unbatched scoring body holds one sequence, got {len(ids)}")
    return {
        "input_ids": ids if batched else ids[0],
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": 0,
    }


class SGLangServer:
    """One SGLang server (or a router) at ``url``: generation, scoring and control endpoints.

    ``batched``: several prompts go in one /generate request (a server); False sends one request
    per sample (a router, whose typed body takes one rid and one sampling_params object).
    ``max_inflight``: the most rows this client has in flight on it at once (pool.SGLangPool).
    ``version``: the SGLang release whose protocol it speaks; None asks it (/get_server_info)."""

    def __init__(
        self,
        url: str,
        *,
        stop_ids: Sequence[int] = (),
        timeout: float = 60.0,
        timeout_per_token: float = 0.1,
        send_seed: bool = False,
        batched: bool = True,
        max_inflight: int = 256,
        version: str | None = None,
    ):
        self.url = url.rstrip("/")
        self.stop_ids = [int(s) for s in stop_ids]
        self.timeout = float(timeout)
        self.timeout_per_token = float(timeout_per_token)
        self.send_seed = send_seed
        self.batched = batched
        self.max_inflight = int(max_inflight)
        self._version = version
        self._protocol: Protocol | None = None

    def __repr__(self) -> str:
        return f"SGLangServer({self.url})"

    def generation_timeout(self, max_new_tokens: int) -> float:
        """Seconds after which a generation request of ``max_new_tokens`` is abandoned."""
        return self.timeout + self.timeout_per_token * max(0, int(max_new_tokens))

    # ------------------------------------------------------------------ transport

    async def acall(
        self, path: str, payload: Any = None, timeout: float | None = None, method: str | None = None
    ) -> Any:
        return await shared_http().request(
            method or ("GET" if payload is None else "POST"),
            self.url + path,
            payload,
            self.timeout if timeout is None else timeout,
        )

    def call(self, path: str, payload: Any = None, timeout: float | None = None, method: str | None = None) -> Any:
        return shared_http().run(self.acall(path, payload, timeout, method))

    async def apost_checked(self, path: str, payload: dict | None = None, timeout: float | None = None) -> dict:
        """POST a control request; SGLang answers {success, message} (HTTP 400 on failure)."""
        answer = await self.acall(path, payload if payload is not None else {}, timeout)
        if isinstance(answer, dict) and answer.get("success") is False:
            raise SGLangError(f"SGLang {self.url}{path} failed: {answer.get('message')}")
        return answer if isinstance(answer, dict) else {"message": answer}

    def post_checked(self, path: str, payload: dict | None = None, timeout: float | None = None) -> dict:
        return shared_http().run(self.apost_checked(path, payload, timeout))

    # ------------------------------------------------------------------ state

    def health(self, timeout: float = 30.0) -> bool:
        """Whether the server answers GET /health with 200. A hung scheduler can still answer it
        (SGLang's /health does not generate by default): :meth:`aprobe` is the real test."""
        try:
            self.call("/health", timeout=timeout)
            return True
        except SGLangError:
            return False

    async def aprobe(self, timeout: float = 30.0) -> None:
        """A real one-token /generate (greedy); raises SGLangError when it fails."""
        params = sampling_params(temperature=0.0, top_p=1.0, max_new_tokens=1, stop_ids=(), greedy=True)
        body = generate_body([[self.stop_ids[0] if self.stop_ids else 0]], [params], None, batched=False)
        out = await self.acall("/generate", body, timeout=timeout)
        if not isinstance(out, dict) or "output_ids" not in out:
            raise SGLangError(f"SGLang {self.url}/generate probe: unexpected answer {str(out)[:200]!r}")
        reason = (out.get("meta_info") or {}).get("finish_reason") or {}
        if isinstance(reason, dict) and reason.get("type") == "abort":
            raise SGLangError(f"SGLang {self.url}/generate probe aborted: {reason.get('message', reason)}")

    def version(self) -> str:
        """The SGLang release the server runs (/get_server_info 'version'), or the configured one."""
        if self._version is None:
            info = None
            for path in ("/get_server_info", "/server_info"):
                try:
                    info = self.call(path, timeout=60)
                    break
                except ServerUnreachable:
                    raise
                except SGLangError:
                    continue
            version = info.get("version") if isinstance(info, dict) else None
            if version is None:
                raise SGLangError(
                    f"SGLang {self.url} does not report its version (/get_server_info has no 'version'); "
                    f"set rollout.sglang_version to the release it runs"
                )
            self._version = str(version)
        return self._version

    def protocol(self) -> Protocol:
        """The protocol of this server's release (refuses an unknown one, naming server and version)."""
        if self._protocol is None:
            self._protocol = protocol_for(self.version(), self.url)
        return self._protocol

    async def aweight_version(self) -> str | None:
        """The weight version the server reports (/model_info, else /get_model_info)."""
        for path in ("/model_info", "/get_model_info"):
            try:
                answer = await self.acall(path, timeout=60)
            except ServerUnreachable:
                raise
            except SGLangError:
                continue
            if isinstance(answer, dict) and "weight_version" in answer:
                return None if answer["weight_version"] is None else str(answer["weight_version"])
        return None

    def weight_version(self) -> str | None:
        return shared_http().run(self.aweight_version())

    # ------------------------------------------------------------------ generation

    async def agenerate(
        self,
        prompts: list[list[int]],
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        greedy: bool,
        seeds: list[int] | None = None,
        rids: list[str] | None = None,
    ) -> list[Sample]:
        """One sample per prompt: one batched request, or one request per prompt (``batched``)."""
        seeds = seeds if (self.send_seed and seeds is not None) else [None] * len(prompts)  # type: ignore[list-item]  # no seed sent
        params = [
            sampling_params(
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                stop_ids=self.stop_ids,
                greedy=greedy,
                seed=s,
            )
            for s in seeds
        ]
        timeout = self.generation_timeout(max_new_tokens)
        if self.batched:
            outputs = await self.acall("/generate", generate_body(prompts, params, rids, batched=True), timeout=timeout)
            if isinstance(outputs, dict):
                outputs = [outputs]
        else:
            outputs = await asyncio.gather(
                *[
                    self.acall(
                        "/generate",
                        generate_body([p], [sp], None if rids is None else [rids[i]], batched=False),
                        timeout=timeout,
                    )
                    for i, (p, sp) in enumerate(zip(prompts, params))
                ]
            )
        if not isinstance(outputs, list) or len(outputs) != len(prompts):
            got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
            raise SGLangError(f"SGLang {self.url}/generate: expected {len(prompts)} outputs, got {got}")
        samples = [self._parse_output(i, out) for i, out in enumerate(outputs)]
        if rids is not None:
            for i, (out, rid) in enumerate(zip(outputs, rids)):
                rid_got = (out.get("meta_info") or {}).get("id")
                if rid_got is not None and str(rid_got) != str(rid):
                    raise SGLangError(f"SGLang {self.url}/generate output {i} is request {rid_got!r}, expected {rid!r}")
        return samples

    def generate(self, prompts: list[list[int]], **kwargs) -> list[Sample]:
        return shared_http().run(self.agenerate(prompts, **kwargs))

    def _parse_output(self, i: int, out: dict) -> Sample:
        where = f"SGLang {self.url}/generate output {i}"
        try:
            ids = [int(t) for t in out["output_ids"]]
            meta = out["meta_info"]
            token_logprobs = meta["output_token_logprobs"]
        except (KeyError, TypeError) as exc:
            raise SGLangError(f"{where}: missing field {exc} (is return_logprob supported?)") from None
        reason = meta.get("finish_reason") or {}
        kind = reason.get("type") if isinstance(reason, dict) else str(reason)
        if kind == "abort":
            raise SGLangError(f"{where}: request aborted: {reason.get('message', reason)}")
        matched = reason.get("matched") if isinstance(reason, dict) else None
        if (
            kind == "stop"
            and isinstance(matched, int)
            and (not ids or ids[-1] != matched)
            and len(token_logprobs) == len(ids) + 1
        ):
            ids.append(matched)  # the server trimmed the stop token despite no_stop_trim
        if len(token_logprobs) != len(ids):
            raise SGLangError(f"{where}: {len(ids)} output ids but {len(token_logprobs)} log-probs")
        lps = []
        for t, (entry, tok) in enumerate(zip(token_logprobs, ids)):
            logprob, token_id = entry[0], entry[1]
            if token_id is not None and int(token_id) != tok:
                raise SGLangError(f"{where}: log-prob {t} is for token {token_id}, output id is {tok}")
            lps.append(float(logprob))
        finished_by_stop = kind == "stop" or (ids and ids[-1] in self.stop_ids)
        version = meta.get("weight_version")
        return Sample(
            ids, lps, FINISH_STOP if finished_by_stop else FINISH_LENGTH, "" if version is None else str(version)
        )

    async def ascore(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Prefill-only log-probs (a teacher or reference served by SGLang): for each sequence a
        fp32 tensor of its length whose entry t is log p(token t | tokens < t) at temperature 1
        (SGLang applies no temperature to prefill log-probs); entry 0 (no context) is 0."""
        if self.batched:
            outputs = await self.acall("/generate", score_body(sequences, batched=True))
            if isinstance(outputs, dict):
                outputs = [outputs]
        else:
            outputs = await asyncio.gather(
                *[self.acall("/generate", score_body([s], batched=False)) for s in sequences]
            )
        if not isinstance(outputs, list) or len(outputs) != len(sequences):
            raise SGLangError(f"SGLang {self.url}/generate (score): expected {len(sequences)} outputs")
        result = []
        for i, (seq, out) in enumerate(zip(sequences, outputs)):
            try:
                entries = out["meta_info"]["input_token_logprobs"]
            except (KeyError, TypeError) as exc:
                raise SGLangError(f"SGLang {self.url}/generate (score) output {i}: missing field {exc}") from None
            if len(entries) != len(seq):
                raise SGLangError(
                    f"SGLang {self.url}/generate (score) output {i}: {len(entries)} log-probs for {len(seq)} tokens"
                )
            result.append(torch.tensor([0.0 if e[0] is None else float(e[0]) for e in entries], dtype=torch.float32))
        return result

    def score(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        return shared_http().run(self.ascore(sequences))


def require_unit_temperature(temperature: float, what: str) -> None:
    """Prefill log-probs from SGLang are at temperature 1 in every release: refuse another."""
    if float(temperature) != 1.0:
        raise SGLangError(
            f"{what}: SGLang's prefill (input) log-probs ignore the sampling temperature in every "
            f"release, so scoring at temperature {temperature} would silently give temperature-1 "
            f"log-probs; score this model in the trainer, or run at rollout.temperature 1.0"
        )


class SGLangEngine(RolloutEngine):
    """Rollout engine on ONE SGLang server (or, with ``batched=False``, a router) at ``url``; see
    pool.SGLangPool for many servers, retries and weight sync."""

    spmd = False

    def __init__(
        self,
        url: str,
        *,
        pad_id: int,
        stop_ids: list[int],
        timeout: float = 60.0,
        timeout_per_token: float = 0.1,
        send_seed: bool = False,
        batched: bool = True,
    ):
        self.server = SGLangServer(
            url,
            stop_ids=stop_ids,
            timeout=timeout,
            timeout_per_token=timeout_per_token,
            send_seed=send_seed,
            batched=batched,
        )
        self.url = self.server.url
        self.pad_id = pad_id
        self.stop_ids = list(stop_ids)

    def health(self) -> bool:
        """Whether the server answers /health."""
        return self.server.health()

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
    ) -> RolloutBatch:
        check_prompts(prompts)
        samples = self.server.generate(
            prompts,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            greedy=greedy,
            seeds=[seed + i for i in range(len(prompts))],
            rids=sample_ids,
        )
        return pack_rollouts(
            prompts,
            [s.ids for s in samples],
            [s.logps for s in samples],
            [s.finish for s in samples],
            self.pad_id,
            sample_ids,
            [s.weight_version for s in samples],
        )

    def score(self, sequences: list[list[int]], *, temperature: float = 1.0) -> list[torch.Tensor]:
        require_unit_temperature(temperature, f"scoring on SGLang {self.url}")
        return self.server.score(sequences)

    def update_weights(self, source: Any = None) -> None:
        """Load the student checkpoint the trainer exported (a Hugging Face directory visible to
        the server) via /update_weights_from_disk (weight_sync.py does the full protocol)."""
        if source is None:
            raise ValueError("SGLangEngine.update_weights needs the path of an exported HF checkpoint")
        self.server.post_checked("/update_weights_from_disk", {"model_path": str(source)})

    def close(self) -> None:
        """Nothing to release: connections belong to the process's shared pool; the server is not ours."""
