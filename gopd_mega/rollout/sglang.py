"""Client of one SGLang server over HTTP: generation, prefill scoring and control endpoints.

Standard library only (urllib); SGLang itself never has to be importable here. Many servers are
driven by :mod:`gopd_mega.rollout.pool`; weight refreshes by :mod:`gopd_mega.rollout.weight_sync`.

Requests (SGLang's native API, checked against the 0.5.x source, http_server.py / io_struct.py):
    POST /generate  {input_ids: [[...], ...],                       # a batch, one request
                     sampling_params: {temperature, top_p, max_new_tokens, stop_token_ids,
                                       no_stop_trim: true},
                     return_logprob: true, rid: [one id per prompt]}
        -> [{output_ids, meta_info: {id, finish_reason: {type: 'stop'|'length'|'abort', matched?},
                                     weight_version, output_token_logprobs:
                                     [[logprob, token_id, text|null], ...]}}]
    POST /generate  prefill-only scoring: sampling_params.max_new_tokens = 0,
                     return_logprob, logprob_start_len = 0 -> meta_info.input_token_logprobs
                     (one entry per input token, entry 0 is null)
    GET  /health, /get_weight_version -> {weight_version}, /get_model_info
    POST /update_weights_from_disk, /pause_generation, ... (see weight_sync.py): {success, message},
         HTTP 400 on failure; /flush_cache answers plain text.

Log-prob semantics: by default SGLang reports log softmax(logits / T) of the full vocabulary
before top-p, the same quantity as the embedded engine (gopd_mega.rollout.base). Do NOT launch the
server with SGLANG_RETURN_ORIGINAL_LOGPROB=1 unless T = 1 (it then reports T = 1 log-probs).
Greedy decoding is sent as temperature 0, for which SGLang reports T = 1 log-probs.

Stop tokens: ``no_stop_trim`` keeps the matched stop id in ``output_ids`` so the response, its
mask and its log-probs include it exactly as in the embedded engine; if a server trims it anyway,
it is restored from ``finish_reason.matched`` (its log-prob is still in output_token_logprobs).

Seeds: SGLang samples with its own server-side RNG; per-request seeds (``sampling_seed``) exist
only in recent versions, so they are sent only when ``send_seed=True`` (seed + global row index).
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from gopd_mega.rollout.base import (FINISH_LENGTH, FINISH_STOP, RolloutBatch, RolloutEngine, check_prompts,
                                    pack_rollouts)


class SGLangError(RuntimeError):
    """The SGLang server failed or answered something unexpected; the message names the URL."""


class ServerUnreachable(SGLangError):
    """No answer at all (connection refused/reset, timeout): the server may be gone; its requests
    can be retried on another server."""


def http_call(url: str, payload: dict | None = None, timeout: float = 3600.0, method: str | None = None) -> Any:
    """One HTTP request; the JSON answer (plain text for endpoints that answer text, None when
    empty). HTTP errors raise :class:`SGLangError`, no answer :class:`ServerUnreachable`."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method or ("GET" if data is None else "POST"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:1000]
        raise SGLangError(f"SGLang {url} returned HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError, socket.timeout, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerUnreachable(f"cannot reach SGLang at {url}: {reason or type(exc).__name__}") from None
    if not body:
        return None
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        return body.decode(errors="replace")


@dataclass
class Sample:
    """One parsed /generate output."""

    ids: list[int]
    logps: list[float]
    finish: str
    weight_version: str


class SGLangServer:
    """One SGLang server (or a router) at ``url``: generation, scoring and control endpoints."""

    def __init__(self, url: str, *, stop_ids: Sequence[int] = (), timeout: float = 3600.0, send_seed: bool = False):
        self.url = url.rstrip("/")
        self.stop_ids = [int(s) for s in stop_ids]
        self.timeout = timeout
        self.send_seed = send_seed

    def __repr__(self) -> str:
        return f"SGLangServer({self.url})"

    def call(self, path: str, payload: dict | None = None, timeout: float | None = None, method: str | None = None) -> Any:
        return http_call(self.url + path, payload, self.timeout if timeout is None else timeout, method)

    def post_checked(self, path: str, payload: dict | None = None, timeout: float | None = None) -> dict:
        """POST a control request; SGLang answers {success, message} (HTTP 400 on failure)."""
        answer = self.call(path, payload if payload is not None else {}, timeout)
        if isinstance(answer, dict) and answer.get("success") is False:
            raise SGLangError(f"SGLang {self.url}{path} failed: {answer.get('message')}")
        return answer if isinstance(answer, dict) else {"message": answer}

    def health(self, timeout: float = 30.0) -> bool:
        """Whether the server answers GET /health with 200."""
        try:
            self.call("/health", timeout=timeout)
            return True
        except SGLangError:
            return False

    def weight_version(self) -> str | None:
        """The weight version the server reports (/get_weight_version, else /get_model_info)."""
        for path in ("/get_weight_version", "/get_model_info"):
            try:
                answer = self.call(path, timeout=60)
            except ServerUnreachable:
                raise
            except SGLangError:
                continue
            if isinstance(answer, dict) and "weight_version" in answer:
                return None if answer["weight_version"] is None else str(answer["weight_version"])
        return None

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: list[list[int]], *, temperature: float, top_p: float, max_new_tokens: int,
                 greedy: bool, seeds: list[int] | None = None, rids: list[str] | None = None) -> list[Sample]:
        params = {
            "temperature": 0.0 if greedy else float(temperature),
            "top_p": float(top_p),
            "max_new_tokens": int(max_new_tokens),
            "stop_token_ids": self.stop_ids,
            "no_stop_trim": True,
        }
        sampling_params: Any = params
        if self.send_seed and seeds is not None:
            sampling_params = [dict(params, sampling_seed=int(s)) for s in seeds]
        payload = {"input_ids": [list(map(int, p)) for p in prompts], "sampling_params": sampling_params,
                   "return_logprob": True}
        if rids is not None:
            payload["rid"] = list(rids)
        outputs = self.call("/generate", payload)
        if isinstance(outputs, dict):
            outputs = [outputs]
        if not isinstance(outputs, list) or len(outputs) != len(prompts):
            got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
            raise SGLangError(f"SGLang {self.url}/generate: expected {len(prompts)} outputs, got {got}")
        samples = [self._parse_output(i, out) for i, out in enumerate(outputs)]
        if rids is not None:
            for i, (out, rid) in enumerate(zip(outputs, rids)):
                got = (out.get("meta_info") or {}).get("id")
                if got is not None and str(got) != str(rid):
                    raise SGLangError(f"SGLang {self.url}/generate output {i} is request {got!r}, expected {rid!r}")
        return samples

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
        if kind == "stop" and isinstance(matched, int) and (not ids or ids[-1] != matched) \
                and len(token_logprobs) == len(ids) + 1:
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
        return Sample(ids, lps, FINISH_STOP if finished_by_stop else FINISH_LENGTH,
                      "" if version is None else str(version))

    def score(self, sequences: list[list[int]], *, temperature: float = 1.0, rids: list[str] | None = None) -> list[torch.Tensor]:
        """Prefill-only log-probs (e.g. a teacher served by SGLang): for each sequence a fp32 tensor
        of its length whose entry t is log p(token t | tokens < t); entry 0 (no context) is 0.
        Whether the server applies ``temperature`` to prefill log-probs depends on its version:
        :func:`gopd_mega.rollout.servers.check_server_scoring` measures it at start."""
        payload = {"input_ids": [list(map(int, s)) for s in sequences],
                   "sampling_params": {"max_new_tokens": 0, "temperature": float(temperature)},
                   "return_logprob": True, "logprob_start_len": 0}
        if rids is not None:
            payload["rid"] = list(rids)
        outputs = self.call("/generate", payload)
        if isinstance(outputs, dict):
            outputs = [outputs]
        if not isinstance(outputs, list) or len(outputs) != len(sequences):
            raise SGLangError(f"SGLang {self.url}/generate (score): expected {len(sequences)} outputs")
        result = []
        for i, (seq, out) in enumerate(zip(sequences, outputs)):
            try:
                entries = out["meta_info"]["input_token_logprobs"]
            except (KeyError, TypeError) as exc:
                raise SGLangError(f"SGLang {self.url}/generate (score) output {i}: missing field {exc}") from None
            if len(entries) != len(seq):
                raise SGLangError(f"SGLang {self.url}/generate (score) output {i}: {len(entries)} log-probs for {len(seq)} tokens")
            result.append(torch.tensor([0.0 if e[0] is None else float(e[0]) for e in entries], dtype=torch.float32))
        return result


class SGLangEngine(RolloutEngine):
    """Rollout engine on ONE SGLang server (or router) at ``url``; see pool.SGLangPool for many."""

    spmd = False

    def __init__(self, url: str, *, pad_id: int, stop_ids: list[int], timeout: float = 3600.0, send_seed: bool = False):
        self.server = SGLangServer(url, stop_ids=stop_ids, timeout=timeout, send_seed=send_seed)
        self.url = self.server.url
        self.pad_id = pad_id
        self.stop_ids = list(stop_ids)

    def health(self) -> bool:
        """Whether the server answers /health."""
        return self.server.health()

    def generate(self, prompts: list[list[int]], *, temperature: float, top_p: float = 1.0, max_new_tokens: int,
                 greedy: bool = False, seed: int = 0, sample_ids: list[str] | None = None) -> RolloutBatch:
        check_prompts(prompts)
        samples = self.server.generate(prompts, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                       greedy=greedy, seeds=[seed + i for i in range(len(prompts))], rids=sample_ids)
        return pack_rollouts(prompts, [s.ids for s in samples], [s.logps for s in samples], [s.finish for s in samples],
                             self.pad_id, sample_ids, [s.weight_version for s in samples])

    def score(self, sequences: list[list[int]], *, temperature: float = 1.0) -> list[torch.Tensor]:
        return self.server.score(sequences, temperature=temperature)

    def update_weights(self, source: Any = None) -> None:
        """Load the student checkpoint the trainer exported (a Hugging Face directory visible to
        the server) via /update_weights_from_disk (weight_sync.py does the full protocol)."""
        if source is None:
            raise ValueError("SGLangEngine.update_weights needs the path of an exported HF checkpoint")
        self.server.post_checked("/update_weights_from_disk", {"model_path": str(source)})

    def close(self) -> None:
        """Nothing to release: every request opens its own connection; the server is not ours."""
