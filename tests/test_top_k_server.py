"""The top-k estimator with a teacher served over SGLang's HTTP API: the request body, the parse
of ``meta_info.input_top_logprobs``, and a whole G-OPD run with one teacher behind a server equal
to the run with every teacher local.

The server here is a minimal threaded HTTP handler backed by the teacher's own weights; its answers
have the shape SGLang 0.5.x builds (tokenizer_manager.add_logprob_to_meta_info with
logprob_start_len 0, return_text_in_logprobs false): input_token_logprobs [[lp, id, null], ...]
and input_top_logprobs [null, [[lp, id, null] x k], ...], entry 0 null in both, the last input
position's next-token distribution dropped. It agrees with the trainer's log-probs only to fp32
rounding through JSON, as a real server in fp32 would. Like SGLang it applies no temperature to
prefill log-probs, so served teachers run at temperature 1 (other temperatures are refused).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from gopd_mega.rollout.servers import parse_top_k, top_k_request
from gopd_mega.rollout.sglang import SGLangError
from gopd_mega.model_io import build_model
from gopd_mega.config import ModelConfig
from helpers import make_distiller, run_cfg

K = 5


class TopKServer:
    """POST /generate (prefill scoring, with or without top_logprobs_num), GET /health."""

    def __init__(self, model_dir: str):
        self.model = build_model(ModelConfig(load=model_dir), trainable=False, name="served teacher")
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(200, b"")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                self._send(200, json.dumps(server.answer(body)).encode())

            def _send(self, code, data):
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @torch.no_grad()
    def answer(self, body: dict) -> list[dict]:
        assert body["sampling_params"]["max_new_tokens"] == 0 and body["return_logprob"] is True
        assert body["logprob_start_len"] == 0
        k = body.get("top_logprobs_num", 0)
        out = []
        batch = body["input_ids"] if isinstance(body["input_ids"][0], list) else [body["input_ids"]]
        for seq in batch:
            ids = torch.tensor([seq])
            m = self.model
            hidden = m.model(input_ids=ids, position_ids=torch.arange(len(seq))[None], attention_mask=None)
            z = (hidden[:, 0].float() @ m._output_weight().float().t())[:, :m.cfg.vocab_size]
            lp = torch.log_softmax(z, -1)  # [L, V]: SGLang's prefill log-probs are at T = 1
            tok = [[None, seq[0], None]] + [[float(lp[t - 1, seq[t]]), seq[t], None] for t in range(1, len(seq))]
            meta = {"input_token_logprobs": tok}
            if k:
                top = [None]
                for t in range(1, len(seq)):
                    v, i = lp[t - 1].topk(k)
                    top.append([[float(a), int(b), None] for a, b in zip(v, i)])
                meta["input_top_logprobs"] = top
            out.append({"text": "", "meta_info": meta})
        return out if isinstance(body["input_ids"][0], list) else out[0]

    def close(self):
        self.httpd.shutdown()


@pytest.fixture()
def served(model_dirs):
    server = TopKServer(model_dirs["add"])
    yield server
    server.close()


def test_request_and_parse():
    body = top_k_request([[1, 5, 6]], 3, batched=True)
    assert body == {"input_ids": [[1, 5, 6]], "sampling_params": {"max_new_tokens": 0},
                    "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3}
    assert top_k_request([[1, 5, 6]], 3, batched=False)["input_ids"] == [1, 5, 6]  # one per request (a router)
    meta = {"input_token_logprobs": [[None, 1, None], [-0.5, 5, None], [-1.5, 6, None]],
            "input_top_logprobs": [None, [[-0.5, 5, None], [-1.0, 7, None]], [[-0.1, 2, None], [-1.5, 6, None]]]}
    ((ids, logp, target),) = parse_top_k([{"meta_info": meta}], [[1, 5, 6]], 3)
    assert ids.tolist() == [[-1, -1, -1], [5, 7, -1], [2, 6, -1]]
    assert logp[1, :2].tolist() == [-0.5, -1.0] and logp[1, 2] == float("-inf")
    assert target.tolist() == [0.0, -0.5, -1.5]
    with pytest.raises(SGLangError, match="missing field 'input_top_logprobs'"):
        parse_top_k([{"meta_info": {"input_token_logprobs": meta["input_token_logprobs"]}}], [[1, 5, 6]], 3, "http://x")
    with pytest.raises(SGLangError, match="2 token and 3 top-k entries for 3 tokens"):
        parse_top_k([{"meta_info": {**meta, "input_token_logprobs": meta["input_token_logprobs"][:2]}}], [[1, 5, 6]], 3)


def test_served_teacher_top_k_equals_local(model_dirs, tmp_path, served):
    """One teacher behind the server (with its local copy for the start-up check), lam = 1.25:
    the same run as with every teacher local, and the requests asked for the top-k."""
    base = {"objective.estimator": "top_k", "objective.top_k": K, "rollout.temperature": 1.0}
    local = [(m["loss"], m["reverse_kl"], m["grad_norm"]) for m in make_distiller(run_cfg(
        model_dirs, tmp_path / "local", 2, **base)).fit()]
    remote = [(m["loss"], m["reverse_kl"], m["grad_norm"]) for m in make_distiller(run_cfg(
        model_dirs, tmp_path / "remote", 2, **base, **{"teachers.0.server": served.url})).fit()]
    asked = [r for r in served.requests if "top_logprobs_num" in r]
    assert asked and all(r["top_logprobs_num"] == K for r in asked)
    assert any("top_logprobs_num" not in r for r in served.requests)  # the start-up scoring check
    # fp32 on both sides; the server's numbers come through JSON (exact for fp32 values) but from
    # an unpacked, unbatched forward: summation order only, ~1e-7
    assert [v for s in remote for v in s] == pytest.approx([v for s in local for v in s], rel=1e-5, abs=1e-6)
