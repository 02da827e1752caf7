"""Rollout engine that talks to a running SGLang server over HTTP (GPU clusters).

Standard library only (urllib); SGLang itself never has to be importable here.

Requests (SGLang's native API, checked against the 0.5.x source):
    POST /generate  {input_ids: [[...], ...],                       # a batch, one request
                     sampling_params: {temperature, top_p, max_new_tokens, stop_token_ids,
                                       no_stop_trim: true},
                     return_logprob: true}
        -> [{output_ids, meta_info: {finish_reason: {type: 'stop'|'length'|'abort', matched?},
                                     output_token_logprobs: [[logprob, token_id, text|null], ...]}}]
    POST /generate  prefill-only scoring: sampling_params.max_new_tokens = 0,
                     return_logprob, logprob_start_len = 0 -> meta_info.input_token_logprobs
    POST /update_weights_from_disk {model_path} -> {success, message}
    GET  /health

Log-prob semantics: by default SGLang reports log softmax(logits / T) of the full vocabulary
before top-p, the same quantity as the embedded engine (gopd_mega.rollout.base). Do NOT launch the
server with SGLANG_RETURN_ORIGINAL_LOGPROB=1 unless T = 1 (it then reports T = 1 log-probs).
Greedy decoding is sent as temperature 0, for which SGLang reports T = 1 log-probs.

Stop tokens: ``no_stop_trim`` keeps the matched stop id in ``output_ids`` so the response, its
mask and its log-probs include it exactly as in the embedded engine; if a server trims it anyway,
it is restored from ``finish_reason.matched`` (its log-prob is still in output_token_logprobs).

Seeds: SGLang samples with its own server-side RNG; per-request seeds (``sampling_seed``) exist
only in recent versions, so they are sent only when ``send_seed=True``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import torch

from gopd_mega.rollout.base import (FINISH_LENGTH, FINISH_STOP, RolloutBatch, RolloutEngine, check_prompts,
                                    pack_rollouts)


class SGLangError(RuntimeError):
    """The SGLang server failed or answered something unexpected; the message names the URL."""


class SGLangEngine(RolloutEngine):
    """HTTP client of one SGLang server (or router) at ``url``."""

    def __init__(self, url: str, *, pad_id: int, stop_ids: list[int], timeout: float = 3600.0, send_seed: bool = False):
        self.url = url.rstrip("/")
        self.pad_id = pad_id
        self.stop_ids = list(stop_ids)
        self.timeout = timeout
        self.send_seed = send_seed

    # ------------------------------------------------------------------ HTTP

    def _request(self, path: str, payload: dict | None = None) -> Any:
        url = self.url + path
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:1000]
            raise SGLangError(f"SGLang {url} returned HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SGLangError(f"cannot reach SGLang at {url}: {reason}") from None
        try:
            return json.loads(body) if body else None
        except json.JSONDecodeError:
            raise SGLangError(f"SGLang {url} returned non-JSON: {body[:200]!r}") from None

    def health(self) -> bool:
        """Whether the server answers /health."""
        try:
            self._request("/health")
            return True
        except SGLangError:
            return False

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompts: list[list[int]],
        *,
        temperature: float,
        top_p: float = 1.0,
        max_new_tokens: int,
        greedy: bool = False,
        seed: int = 0,
    ) -> RolloutBatch:
        check_prompts(prompts)
        params = {
            "temperature": 0.0 if greedy else float(temperature),
            "top_p": float(top_p),
            "max_new_tokens": int(max_new_tokens),
            "stop_token_ids": self.stop_ids,
            "no_stop_trim": True,
        }
        if self.send_seed:
            sampling_params: Any = [dict(params, sampling_seed=seed + i) for i in range(len(prompts))]
        else:
            sampling_params = params
        payload = {"input_ids": [list(map(int, p)) for p in prompts], "sampling_params": sampling_params,
                   "return_logprob": True}
        outputs = self._request("/generate", payload)
        if isinstance(outputs, dict):
            outputs = [outputs]
        if not isinstance(outputs, list) or len(outputs) != len(prompts):
            got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
            raise SGLangError(f"SGLang {self.url}/generate: expected {len(prompts)} outputs, got {got}")
        responses, logps, finish = [], [], []
        for i, out in enumerate(outputs):
            ids, lps, reason = self._parse_output(i, out)
            responses.append(ids)
            logps.append(lps)
            finish.append(reason)
        return pack_rollouts(prompts, responses, logps, finish, self.pad_id)

    def _parse_output(self, i: int, out: dict) -> tuple[list[int], list[float], str]:
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
        return ids, lps, FINISH_STOP if finished_by_stop else FINISH_LENGTH

    def score(self, sequences: list[list[int]], *, temperature: float = 1.0) -> list[torch.Tensor]:
        """Prefill-only log-probs (e.g. a teacher served by SGLang): for each sequence a fp32 tensor
        of its length whose entry t is log p(token t | tokens < t); entry 0 (no context) is 0.
        Whether the server applies ``temperature`` to prefill log-probs depends on its version:
        compare with a trainer-side recomputation before relying on it at T != 1."""
        payload = {"input_ids": [list(map(int, s)) for s in sequences],
                   "sampling_params": {"max_new_tokens": 0, "temperature": float(temperature)},
                   "return_logprob": True, "logprob_start_len": 0}
        outputs = self._request("/generate", payload)
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

    # ------------------------------------------------------------------ weights

    def update_weights(self, source: Any = None) -> None:
        """Load the student checkpoint the trainer exported (a Hugging Face directory visible to
        the server) via /update_weights_from_disk."""
        if source is None:
            raise ValueError("SGLangEngine.update_weights needs the path of an exported HF checkpoint")
        answer = self._request("/update_weights_from_disk", {"model_path": str(source)})
        if isinstance(answer, dict) and not answer.get("success", True):
            raise SGLangError(f"SGLang {self.url}/update_weights_from_disk failed for {source}: {answer.get('message')}")

    def close(self) -> None:
        """Nothing to release: every request opens its own connection; the server is not ours."""
