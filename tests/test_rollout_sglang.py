"""SGLang HTTP client against a local fake server with FIXED answers in SGLang's JSON shapes.

The fake stays beside the model-backed stand-in (tests/sglang_standin.py, used by the pool, sync
and distributed tests) because these checks need exact, known outputs: a trimmed stop token, an
HTTP 503 body, a failed load. The last test runs against a real server when GOPD_SGLANG_URL is set.
"""

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from gopd_mega.rollout.sglang import SGLangEngine, SGLangError

PAD, EOS = 0, 2


class FakeSGLang:
    """Answers /generate like SGLang: prompt ending in 3 -> [5, 6, EOS] (stop); else [7] * max_new (length)."""

    def __init__(self):
        self.requests: list[tuple[str, dict | None]] = []
        self.fail_with: int | None = None
        self.trim_stop = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                fake.requests.append((self.path, None))
                self._reply(200, {})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, payload))
                if fake.fail_with:
                    return self._reply(fake.fail_with, {"error": {"message": "out of memory"}})
                if self.path == "/update_weights_from_disk":
                    ok = os.path.basename(payload["model_path"]) != "missing"
                    return self._reply(200 if ok else 400, {"success": ok, "message": "loaded" if ok else "no such dir"})
                if self.path != "/generate":
                    return self._reply(404, {"detail": "Not Found"})
                self._reply(200, [fake.answer(ids, payload) for ids in payload["input_ids"]])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, ids, payload):
        params = payload["sampling_params"]
        if isinstance(params, list):
            params = params[0]
        if params["max_new_tokens"] == 0:  # prefill-only scoring
            logprobs = [[None, ids[0], None]] + [[-0.5 * t, tok, None] for t, tok in enumerate(ids[1:], 1)]
            return {"text": "", "output_ids": [], "meta_info": {"input_token_logprobs": logprobs,
                                                                 "finish_reason": {"type": "length", "length": 0}}}
        if ids[-1] == 3:
            out, reason = [5, 6, EOS], {"type": "stop", "matched": EOS}
        else:
            out, reason = [7] * params["max_new_tokens"], {"type": "length", "length": params["max_new_tokens"]}
        logprobs = [[-0.1 * (t + 1), tok, None] for t, tok in enumerate(out)]
        if self.trim_stop and reason["type"] == "stop":
            out = out[:-1]
        return {"text": "xx", "output_ids": out,
                "meta_info": {"id": "r", "finish_reason": reason, "prompt_tokens": len(ids),
                              "output_token_logprobs": logprobs, "weight_version": "default"}}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def _server():
    server = FakeSGLang()
    yield server
    server.close()  # once per module: shutdown waits for serve_forever's 0.5 s poll


@pytest.fixture
def fake(_server):
    _server.requests.clear()
    _server.fail_with, _server.trim_stop = None, False
    return _server


def test_request_fields_as_sglang_expects(fake):
    eng = SGLangEngine(fake.url, pad_id=PAD, stop_ids=[EOS, 9])
    eng.generate([[1, 3], [1, 4, 4]], temperature=0.8, top_p=0.9, max_new_tokens=4, seed=1)
    path, payload = fake.requests[-1]
    assert path == "/generate"
    assert payload["input_ids"] == [[1, 3], [1, 4, 4]] and payload["return_logprob"] is True
    assert payload["sampling_params"] == {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 4,
                                          "stop_token_ids": [EOS, 9], "no_stop_trim": True}
    eng.generate([[1, 3]], temperature=0.8, max_new_tokens=4, greedy=True)
    assert fake.requests[-1][1]["sampling_params"]["temperature"] == 0.0
    seeded = SGLangEngine(fake.url, pad_id=PAD, stop_ids=[EOS], send_seed=True)
    seeded.generate([[1, 3], [1, 3]], temperature=1.0, max_new_tokens=4, seed=10)
    assert [p["sampling_seed"] for p in fake.requests[-1][1]["sampling_params"]] == [10, 11]


@pytest.mark.parametrize("trim_stop", [False, True])
def test_parses_outputs_into_rollout_batch(fake, trim_stop):
    fake.trim_stop = trim_stop
    eng = SGLangEngine(fake.url + "/", pad_id=PAD, stop_ids=[EOS])
    out = eng.generate([[1, 3], [1, 4, 4]], temperature=1.0, max_new_tokens=4)
    assert out.response_ids(0) == [5, 6, EOS] and out.finish_reasons == ["stop", "length"]
    assert out.response_ids(1) == [7, 7, 7, 7]
    assert out.prompt_lens.tolist() == [2, 3] and out.response_lens.tolist() == [3, 4]
    assert out.tokens.tolist() == [[1, 3, 5, 6, EOS, PAD, PAD], [1, 4, 4, 7, 7, 7, 7]]
    assert out.loss_mask[0].tolist() == [False, False, True, True, True, False, False]
    assert out.sampler_logp.dtype == torch.float32
    assert torch.allclose(out.sampler_logp[0, 2:5], torch.tensor([-0.1, -0.2, -0.3]))
    assert (out.sampler_logp[~out.loss_mask] == 0).all()


def test_server_error_names_url_and_status(fake):
    fake.fail_with = 503
    eng = SGLangEngine(fake.url, pad_id=PAD, stop_ids=[EOS])
    with pytest.raises(SGLangError, match=rf"SGLang {fake.url}/generate returned HTTP 503: .*out of memory"):
        eng.generate([[1, 3]], temperature=1.0, max_new_tokens=4)


def test_unreachable_server_is_a_clear_error():
    eng = SGLangEngine("http://127.0.0.1:9", pad_id=PAD, stop_ids=[EOS], timeout=5)
    with pytest.raises(SGLangError, match="cannot reach SGLang at http://127.0.0.1:9/generate"):
        eng.generate([[1]], temperature=1.0, max_new_tokens=2)
    assert not eng.health()


def test_update_weights_and_score(fake):
    eng = SGLangEngine(fake.url, pad_id=PAD, stop_ids=[EOS])
    eng.update_weights("/ckpt/step_10/hf")
    assert fake.requests[-1] == ("/update_weights_from_disk", {"model_path": "/ckpt/step_10/hf"})
    with pytest.raises(SGLangError, match="update_weights_from_disk returned HTTP 400: .*no such dir"):
        eng.update_weights("/ckpt/missing")
    with pytest.raises(ValueError, match="exported HF checkpoint"):
        eng.update_weights(None)
    scores = eng.score([[1, 4, 5], [1, 3]], temperature=1.0)
    payload = fake.requests[-1][1]
    assert payload["sampling_params"]["max_new_tokens"] == 0
    assert payload["return_logprob"] is True and payload["logprob_start_len"] == 0
    assert torch.allclose(scores[0], torch.tensor([0.0, -0.5, -1.0])) and scores[1].shape == (2,)
    assert eng.health()


@pytest.mark.skipif(not os.environ.get("GOPD_SGLANG_URL"), reason="set GOPD_SGLANG_URL to test a real SGLang server")
def test_real_server():
    eng = SGLangEngine(os.environ["GOPD_SGLANG_URL"], pad_id=0, stop_ids=[int(os.environ.get("GOPD_SGLANG_EOS", "2"))])
    assert eng.health()
    eng.server.protocol()  # a release whose protocol the client speaks (0.5.9 .. 0.5.23)
    one = SGLangEngine(eng.url, pad_id=0, stop_ids=eng.stop_ids, batched=False)  # the per-sample (router) body
    assert one.generate([[1, 2, 3]], temperature=1.0, max_new_tokens=4, sample_ids=["gopd-real-0"]).sample_ids == ["gopd-real-0"]
    out = eng.generate([[1, 2, 3, 4]] * 2, temperature=1.0, max_new_tokens=8, seed=0)
    assert len(out) == 2 and (out.response_lens >= 1).all()
    assert (out.sampler_logp[out.loss_mask] <= 0).all()
    # prefill scoring of the sampled sequence agrees with the sampler's log-probs (same engine, T = 1)
    seq = out.tokens[0, :int(out.prompt_lens[0] + out.response_lens[0])].tolist()
    score = eng.score([seq])[0]
    start = int(out.prompt_lens[0])
    assert torch.allclose(score[start:], out.sampler_logp[0, start:len(seq)], atol=0.1)
