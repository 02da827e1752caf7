"""A stand-in SGLang server for tests: SGLang's native HTTP API, field for field, on a tiny model.

    server = StandinSGLang(hf_dir)             # threaded http.server on 127.0.0.1, random port
    server = StandinSGLang(hf_dir, version="0.5.20", tp_size=2)   # an older release, 2 TP ranks
    server.url, server.calls                   # base URL; [(path, payload)] of every request
    server.die_after_outputs = 2               # next /generate: answer 2 rows, then die (no reply)
    server.hang = True                         # /generate never answers; /health still does
    server.fail_next_load = "disk full"        # next weight update fails (HTTP 400, success false)
    server.delay_s = 0.5                       # each /generate sleeps first
    server.return_original_logprob = True      # output log-probs at T = 1 (SGLANG_RETURN_ORIGINAL_LOGPROB=1)
    python tests/sglang_standin.py --model-path DIR [--port P --tp-size N ...]  # prints "URL <url>"

The command line takes ``python -m sglang.launch_server``'s arguments (unknown ones are
ignored), so the launchers in examples/ can start it instead of SGLang on a CPU machine
(``SGLANG_SERVER="python tests/sglang_standin.py"``); ``--kill-after N`` makes it SIGKILL itself
right after answering its N-th /generate request.

It samples from a Hugging Face causal LM (transformers, fp32, CPU) loaded from ``hf_dir``, so
log-probs are real: output log-probs are log softmax(logits / T) of the full vocabulary at the
sampled token (T = 1 for greedy, temperature 0), as SGLang reports them; prefill (input)
log-probs are at T = 1 whatever temperature is sent, as in every SGLang release.

Behaviour of SGLang ``version`` (default 0.5.23; 0.5.9 to 0.5.23 are modelled):
  * every request body is checked by SGLang 0.5.23's own request classes (tests/sglang_contract.py,
    from the installed sglang wheel) when that wheel is installed: /generate bodies it refuses
    get its HTTP 400 {"error": ...}, control bodies 422 (FastAPI), and a control field the class
    does not have is refused too (the real server would silently drop it);
  * rid: echoed as meta_info.id; a list needs one unique id per input; a string for a batch
    becomes '{rid}_{i}';
  * >= 0.5.21: /update_weights_from_tensor and /update_weights_from_distributed answer 400
    outside a weight-update session (/begin_weight_update ... /end_weight_update; one at a time);
    /get_weight_version is gone (404 Not Found); before 0.5.21 it is a 404 deprecation stub and
    there is no session endpoint;
  * an unknown endpoint is 404 {"detail": "Not Found"}.

  POST /generate {input_ids (one list or a batch), sampling_params (one dict or one per input),
      return_logprob, logprob_start_len, rid (str or list)}
      -> {text, output_ids, meta_info {id, finish_reason {type, matched | length}, prompt_tokens,
         completion_tokens, cached_tokens, weight_version, e2e_latency, output_token_logprobs
         [[lp, id, null]], input_token_logprobs (from logprob_start_len; entry 0 null)}}
  GET /standin_log (not SGLang: calls, loads, version - for a stand-in in its own process)
  GET /health, /health_generate, /model_info, /get_model_info, /server_info, /get_server_info
  GET|POST /flush_cache (plain text; 400 while requests run)
  POST /pause_generation, /continue_generation ({message, status})
  POST /update_weights_from_disk {model_path, load_format, weight_version, flush_cache, ...}
      -> {success, message, num_paused_requests} (400 on failure)
  POST /init_weights_update_group, /update_weights_from_distributed, /destroy_weights_update_group
  POST /update_weights_from_tensor {serialized_named_tensors (one base64 pickle per TP rank; each
      decoded with SGLang's SafeUnpickler), load_format, flush_cache, weight_version}
  POST /begin_weight_update {selector}, /end_weight_update {} (>= 0.5.21)
  POST /update_weight_version {new_version, abort_all_requests}
  POST /release_memory_occupation {tags}, /resume_memory_occupation {tags} (generation refused
      while weights are released), /abort_request {rid, abort_all}

A checkpoint on disk is accepted only when complete (config.json, every shard the index names,
every weight of the model with its shape); ``loads`` records each attempt and what was seen.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sglang_contract  # noqa: E402

SESSION_FROM = (0, 5, 21)


class _Died(Exception):
    pass


class _Refused(Exception):
    def __init__(self, code: int, body: dict):
        super().__init__(body)
        self.code, self.body = code, body


def _release(version: str) -> tuple[int, int, int]:
    major, minor, patch = (int(x) for x in version.split(".")[:3])
    return major, minor, patch


def read_hf_folder(path: str) -> tuple[dict[str, torch.Tensor] | None, str]:
    """All tensors of an HF checkpoint folder, or (None, why it is incomplete)."""
    from safetensors.torch import load_file

    root = Path(path)
    if not (root / "config.json").is_file():
        return None, f"{path}: no config.json"
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (root / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        return None, f"{path}: no model.safetensors(.index.json)"
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not (root / f).is_file():
            return None, f"{path}: shard {f} missing"
        try:
            tensors.update(load_file(str(root / f)))
        except Exception as exc:  # noqa: BLE001
            return None, f"{path}: shard {f} unreadable: {exc}"
    if weight_map is not None and set(weight_map) - set(tensors):
        return None, f"{path}: tensors named in the index are missing: {sorted(set(weight_map) - set(tensors))[:3]}"
    return tensors, ""


def init_custom_group(backend: str, address: str, port: int, rank: int, world_size: int, group_name: str):
    """The weight-update group as SGLang's server builds it (tcp rendezvous, PrefixStore(group_name))."""
    import torch.distributed.distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=120)
    store, rank, world_size = next(c10d.rendezvous(f"tcp://{address}:{port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], backend, store, group_name=group_name, timeout=timeout)
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class StandinSGLang:
    """See the module docstring."""

    def __init__(self, model_path: str, *, host: str = "127.0.0.1", port: int = 0, seed: int = 0,
                 version: str = "0.5.23", tp_size: int = 1, kill_after: int | None = None, strict: bool = True):
        import transformers

        self.version = version
        self.sessions = _release(version) >= SESSION_FROM
        self.tp_size = tp_size
        self.kill_after = kill_after
        self.contract = sglang_contract.load() if strict else None
        self.session_open = False
        self.refused: list[tuple[str, str]] = []  # (path, why) of every request the contract refused
        self.tensor_payloads: list[list[list[str]]] = []  # per /update_weights_from_tensor: names per TP rank
        self.answered = 0
        self.model_path = str(model_path)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).eval()
        self.tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        self.rng = torch.Generator().manual_seed(seed)
        self.lock = threading.RLock()  # the model: one forward or one weight load at a time
        self.calls: list[tuple[str, dict | None]] = []
        self.loads: list[dict] = []
        self.weight_version = "default"
        self.die_after_outputs: int | None = None
        self.fail_next_load: str | None = None
        self.delay_s = 0.0
        self.hang = False
        self.return_original_logprob = False
        self.report_version: str | None = None  # a server that lies about its version
        self.paused = threading.Event()
        self.released: set[str] = set()
        self.running = 0
        self.dead = False
        self.closing = threading.Event()
        self.groups: dict[str, object] = {}
        self.served_rids: list[str] = []
        self.aborted: set[str] = set()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, code, obj, text: bool = False):
                if standin.dead:
                    self.close_connection = True
                    return
                body = obj.encode() if text else json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if text else "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n)) if n else {}

            def do_GET(self):
                self._handle(None)

            def do_POST(self):
                self._handle(self._body())

            def _handle(self, payload):
                if standin.dead:
                    self.close_connection = True
                    return
                standin.calls.append((self.path, payload))
                try:
                    standin.check_contract(self.path, payload)
                    code, obj, text = standin.route(self.path, payload)
                except _Died:
                    self.close_connection = True
                    return
                except _Refused as exc:
                    code, obj, text = exc.code, exc.body, False
                except Exception as exc:  # noqa: BLE001 - a 400 like SGLang's error handler
                    code, obj, text = 400, {"object": "error", "message": f"{type(exc).__name__}: {exc}",
                                            "type": "Bad Request", "code": 400}, False
                self._reply(code, obj, text)
                if self.path.startswith("/generate") and code == 200:
                    standin.answered += 1
                    if standin.kill_after is not None and standin.answered >= standin.kill_after:
                        self.wfile.flush()
                        os.kill(os.getpid(), signal.SIGKILL)  # kill -9, right after the reply went out

        class Server(ThreadingHTTPServer):
            request_queue_size = 2048  # uvicorn's backlog; socketserver's 5 resets bursts of connections

        self.server = Server((host, port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ lifecycle

    def kill(self) -> None:
        """Die: stop answering and refuse new connections (like a crashed server)."""
        self.dead = True
        self.closing.set()
        threading.Thread(target=self._stop, daemon=True).start()

    def _stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def close(self) -> None:
        if not self.dead:
            self.dead = True
            self.closing.set()
            self._stop()

    def posted(self, path: str) -> list[dict]:
        return [p for q, p in self.calls if q == path]

    # ------------------------------------------------------------------ routing

    def check_contract(self, path: str, payload) -> None:
        """Refuse what SGLang 0.5.23's own request classes refuse (see the module docstring)."""
        path = path.split("?")[0]
        if self.contract is None or path.startswith("/standin_") or path not in (
                {"/generate"} | set(sglang_contract.CONTROL) | sglang_contract.GET_ONLY):
            return
        if path in sglang_contract.GET_ONLY and payload is None:
            return
        try:
            self.contract.check(path, payload if payload is not None else {}, vocab_size=self.model.config.vocab_size)
        except sglang_contract.ContractError as exc:
            self.refused.append((path, str(exc)))
            if path == "/generate":
                raise _Refused(400, {"error": str(exc)}) from None
            raise _Refused(422, {"detail": [{"type": "value_error", "loc": ["body"], "msg": str(exc)}]}) from None

    def route(self, path: str, p: dict | None):
        path = path.split("?")[0]
        version = self.report_version or self.weight_version
        if path == "/standin_log":  # not SGLang: the call and load log, for a stand-in in its own process
            return 200, {"calls": [[q, d] for q, d in self.calls if q != "/standin_log"], "loads": self.loads,
                         "weight_version": self.weight_version, "refused": self.refused,
                         "tensor_payloads": self.tensor_payloads}, False
        if path in ("/health", "/health_generate"):
            return 200, "", True
        if path in ("/get_model_info", "/model_info"):
            return 200, {"model_path": self.model_path, "tokenizer_path": self.model_path, "is_generation": True,
                         "preferred_sampling_params": None, "weight_version": version}, False
        if path in ("/get_weight_version", "/weight_version") and not self.sessions:
            return 404, {"detail": "Endpoint '/get_weight_version' or '/weight_version' is deprecated. Please use "
                                   "'/model_info' instead."}, False
        if path in ("/get_server_info", "/server_info"):
            return 200, {"model_path": self.model_path, "tp_size": self.tp_size, "weight_version": version,
                         "version": self.version, "frontend": "python"}, False
        if path == "/flush_cache":
            ok = self.running == 0
            return (200 if ok else 400), "Cache flushed.\nPlease check backend logs for more details. " \
                "(When there are running or waiting requests, the operation will not be performed.)\n", True
        if path == "/pause_generation":
            self.paused.set()
            return 200, {"message": "Generation paused successfully.", "status": "ok"}, False
        if path == "/continue_generation":
            self.paused.clear()
            return 200, {"message": "Generation continued successfully.", "status": "ok"}, False
        if path == "/abort_request":
            if p.get("abort_all"):
                self.aborted.add("*")
            elif p.get("rid"):
                self.aborted.add(str(p["rid"]))
            return 200, "", True
        if path in ("/release_memory_occupation", "/resume_memory_occupation"):
            tags = set(p.get("tags") or ["weights", "kv_cache"])
            (self.released.update if path.startswith("/release") else self.released.difference_update)(tags)
            return 200, None, False
        if path == "/generate":
            return 200, self.generate(p), False
        if path == "/standin_fail_next_load":  # not SGLang: failure injection from another process
            self.fail_next_load = p.get("message", "injected failure")
            return 200, {"success": True}, False
        if path == "/update_weight_version":
            self.weight_version = str(p["new_version"])
            return 200, {"success": True, "message": f"Weight version updated to {p['new_version']}",
                         "new_version": p["new_version"]}, False
        if path == "/update_weights_from_disk":
            return self._weights_answer(self._load_disk(p), p, num_paused=True)
        if path == "/init_weights_update_group":
            return self._init_group(p)
        if path in ("/begin_weight_update", "/end_weight_update") and self.sessions:
            opening = path == "/begin_weight_update"
            if self.session_open == opening:
                why = ("a weight-update session is already open; call end_weight_update() first" if opening else
                       "no weight-update session is open; call begin_weight_update() first")
                return 400, {"success": False, "message": why}, False
            self.session_open = opening
            return 200, {"success": True, "message": "Success"}, False
        if path in ("/update_weights_from_distributed", "/update_weights_from_tensor") and self.sessions \
                and not self.session_open:
            return 400, {"success": False, "message": f"{path[1:]} must run between begin_weight_update() and "
                                                      f"end_weight_update()"}, False
        if path == "/update_weights_from_distributed":
            return self._weights_answer(self._load_distributed(p), p)
        if path == "/destroy_weights_update_group":
            pg = self.groups.pop(p.get("group_name", "weight_update_group"), None)
            if pg is not None:
                torch.distributed.destroy_process_group(pg)
            return (200 if pg is not None else 400), {"success": pg is not None, "message": "destroyed" if pg is not None else "no such group"}, False
        if path == "/update_weights_from_tensor":
            return self._weights_answer(self._load_tensor(p), p)
        return 404, {"detail": "Not Found"}, False

    # ------------------------------------------------------------------ weights

    def _weights_answer(self, error: str, p: dict, num_paused: bool = False):
        ok = not error
        if ok and p.get("weight_version") is not None:
            self.weight_version = str(p["weight_version"])
        body = {"success": ok, "message": "Succeeded to update model weights." if ok else error}
        if num_paused:
            body["num_paused_requests"] = 0
        return (200 if ok else 400), body, False

    def _install(self, tensors: dict[str, torch.Tensor], partial: bool = False) -> str:
        state = self.model.state_dict()
        wanted = {k for k in state if not (self.tied and k == "lm_head.weight")}
        unknown = set(tensors) - set(state)
        if unknown:
            return f"unknown parameter names: {sorted(unknown)[:3]}"
        if not partial and wanted - set(tensors):
            return f"incomplete weights: missing {sorted(wanted - set(tensors))[:3]}"
        for k, t in tensors.items():
            if tuple(t.shape) != tuple(state[k].shape):
                return f"shape of {k}: got {tuple(t.shape)}, model has {tuple(state[k].shape)}"
        with self.lock, torch.no_grad():
            for k, t in tensors.items():
                state[k].copy_(t.to(torch.float32))  # state_dict tensors share the parameters' storage
        return ""

    def _take_failure(self) -> str:
        msg, self.fail_next_load = self.fail_next_load, None
        return f"Failed to update weights: {msg}" if msg else ""

    def _load_disk(self, p: dict) -> str:
        tensors, why = read_hf_folder(p["model_path"])
        record = {"path": p["model_path"], "complete": tensors is not None, "why": why, "time": time.time(),
                  "dtypes": sorted({str(t.dtype) for t in (tensors or {}).values()})}
        self.loads.append(record)
        failure = self._take_failure()
        if failure:
            return failure
        if tensors is None:
            return f"Failed to load {why}"
        return self._install(tensors)

    def _init_group(self, p: dict):
        backend = p.get("backend", "nccl")
        if backend == "nccl" and not torch.cuda.is_available():
            return 400, {"success": False, "message": "backend nccl needs CUDA; this stand-in runs gloo on CPU"}, False
        try:
            pg = init_custom_group(backend, p["master_address"], int(p["master_port"]), int(p["rank_offset"]),
                                   int(p["world_size"]), p.get("group_name", "weight_update_group"))
        except Exception as exc:  # noqa: BLE001
            return 400, {"success": False, "message": f"Failed to init group: {exc}"}, False
        self.groups[p.get("group_name", "weight_update_group")] = pg
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}, False

    def _load_distributed(self, p: dict) -> str:
        pg = self.groups.get(p.get("group_name", "weight_update_group"))
        if pg is None:
            return f"no weights update group {p.get('group_name')!r}"
        received = {}
        handles = []
        for name, dtype, shape in zip(p["names"], p["dtypes"], p["shapes"]):
            t = torch.empty(shape, dtype=getattr(torch, dtype))
            handles.append(torch.distributed.broadcast(t, group=pg, group_src=0, async_op=True))
            received[name] = t
        for h in handles:
            h.wait()
        self.loads.append({"names": list(p["names"]), "dtypes": sorted(set(p["dtypes"]))})
        return self._take_failure() or self._install(received, partial=True)

    def _load_tensor(self, p: dict) -> str:
        """Each TP rank decodes its own entry (SGLang: serialized_named_tensors[tp_rank]) with
        SGLang's SafeUnpickler when the wheel is installed; rank 0's tensors are loaded."""
        import pickle

        from multiprocessing.reduction import ForkingPickler  # noqa: F401 (registers torch reductions)
        import torch.multiprocessing  # noqa: F401

        entries = p["serialized_named_tensors"]
        if len(entries) != self.tp_size:
            return f"{len(entries)} serialized_named_tensors for {self.tp_size} TP ranks"
        ranks = []
        for entry in entries:
            if self.contract is not None:
                ranks.append(self.contract.decode_tensors(entry))
            else:
                import base64

                ranks.append(pickle.loads(base64.b64decode(entry)))
        self.tensor_payloads.append([[n for n, _ in named] for named in ranks])
        named = ranks[0]
        self.loads.append({"names": [n for n, _ in named], "dtypes": sorted({str(t.dtype) for _, t in named})})
        return self._take_failure() or self._install(dict(named), partial=True)

    # ------------------------------------------------------------------ generation

    def generate(self, p: dict):
        if self.released & {"weights"}:
            raise RuntimeError("weights are released (/release_memory_occupation); resume them first")
        if self.delay_s:
            self.closing.wait(self.delay_s)  # cut short when the server dies
        while self.hang and not self.dead:
            self.closing.wait(0.05)
        while self.paused.is_set() and not self.dead:
            time.sleep(0.01)
        if self.dead:
            raise _Died()
        ids = p["input_ids"]
        single = bool(ids) and isinstance(ids[0], int)
        batch = [ids] if single else ids
        params = p.get("sampling_params") or {}
        rids = p.get("rid")
        if isinstance(rids, str):
            rids = [rids] if single else [f"{rids}_{i}" for i in range(len(batch))]
        if rids is not None and len(rids) != len(batch):
            raise ValueError("The specified rids length mismatch with the batch_size for batch processing.")
        outs = []
        self.running += 1
        try:
            for i, prompt in enumerate(batch):
                if self.die_after_outputs is not None and i >= self.die_after_outputs:
                    self.die_after_outputs = None
                    self.kill()
                    raise _Died()
                sp = params[i] if isinstance(params, list) else params
                rid = rids[i] if rids is not None else f"standin-{len(self.served_rids)}"
                outs.append(self._one(prompt, sp, p, str(rid)))
                self.served_rids.append(str(rid))
        finally:
            self.running -= 1
        return outs[0] if single else outs

    @torch.no_grad()
    def _logits(self, ids: list[int]) -> torch.Tensor:
        with self.lock:
            return self.model(torch.tensor([ids])).logits[0].float()

    def _one(self, prompt: list[int], sp: dict, p: dict, rid: str) -> dict:
        temperature = float(sp.get("temperature", 1.0))
        top_p, top_k = float(sp.get("top_p", 1.0)), int(sp.get("top_k", -1))
        max_new = int(sp.get("max_new_tokens", 128))
        stops = set(sp.get("stop_token_ids") or [])
        eos = self.model.config.eos_token_id
        if eos is not None and not sp.get("ignore_eos", False):
            stops |= set(eos if isinstance(eos, list) else [eos])
        gen = self.rng if sp.get("sampling_seed") is None else torch.Generator().manual_seed(int(sp["sampling_seed"]))
        out, lps, finish = [], [], {"type": "length", "length": max_new}
        seq = list(prompt)
        for _ in range(max_new):
            logits = self._logits(seq)[-1]
            logp = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), -1)
            reported = torch.log_softmax(logits, -1) if self.return_original_logprob else logp
            if temperature <= 0:
                tok = int(logits.argmax())
            else:
                probs = logp.exp()
                if top_k > 0:
                    kth = probs.topk(min(top_k, probs.numel())).values[-1]
                    probs = probs.masked_fill(probs < kth, 0.0)
                if top_p < 1.0:
                    sp_, order = probs.sort(descending=True)
                    sp_ = sp_.masked_fill(sp_.cumsum(0) - sp_ >= top_p, 0.0)
                    probs = torch.zeros_like(probs).scatter(0, order, sp_)
                tok = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
            out.append(tok)
            lps.append(float(reported[tok]))
            seq.append(tok)
            if tok in stops:
                finish = {"type": "stop", "matched": tok}
                break
        if rid in self.aborted or "*" in self.aborted:
            finish = {"type": "abort", "message": "Abort request"}
        output_ids = out if (sp.get("no_stop_trim") or finish["type"] != "stop") else out[:-1]
        meta = {"id": rid, "finish_reason": finish, "prompt_tokens": len(prompt), "completion_tokens": len(out),
                "cached_tokens": 0, "weight_version": self.report_version or self.weight_version, "e2e_latency": 0.0}
        if p.get("return_logprob"):
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(lps, out)]
            start = int(p.get("logprob_start_len", -1))
            if start >= 0 or max_new == 0:
                meta["input_token_logprobs"] = self._input_logprobs(prompt, max(start, 0))
        return {"text": "", "output_ids": output_ids, "meta_info": meta}

    def _input_logprobs(self, ids: list[int], start: int) -> list:
        """Prefill log-probs at T = 1: SGLang applies no sampling temperature to them."""
        logp = torch.log_softmax(self._logits(ids), -1)
        entries = [[None, ids[0], None]] + [[float(logp[j - 1, ids[j]]), ids[j], None] for j in range(1, len(ids))]
        return entries[start:]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--tp-size", "--tp", type=int, default=1)
    ap.add_argument("--sglang-version", default="0.5.23", help="the SGLang release to behave like")
    ap.add_argument("--kill-after", type=int, default=None, help="SIGKILL itself after answering N /generate requests")
    args, _ = ap.parse_known_args(argv)  # launch_server's other flags (--enable-memory-saver, ...) are ignored
    torch.set_num_threads(1)
    server = StandinSGLang(args.model_path, host=args.host, port=args.port, version=args.sglang_version,
                           tp_size=args.tp_size, kill_after=args.kill_after)
    print(f"URL {server.url}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.close()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
