"""Requests per second of the SGLang client at 512 prompts x 8 samples, against stand-in servers (CPU).

    PYTHONPATH=$PWD python benchmarks/bench_rollout_client.py [--prompts 512 --samples 8 --servers 2]

The stand-ins (tests/sglang_standin.py, each in its own process, a tiny random Llama) answer one
token per sample (max_new_tokens 1), so the servers cost as little as they can and the client
and transport show. Modes, each on the same fresh servers, one after the other:

* ``router``: SGLangPool through the real sglang-router in front of the servers: one /generate
  request per sample (4096 requests), the pooled async client (aiohttp) with keep-alive;
* ``direct-per-sample``: one request per sample, the same async client, straight to the servers
  (no router hop; the pool sends per-sample requests only through routers, so this mode calls
  SGLangServer.agenerate with batched=False itself);
* ``direct-batched``: SGLangPool straight to the servers, 64 prompts per request;
* ``urllib-threads``: the peer - the standard library's urllib, one blocking request per sample
  from a pool of threads, as many as requests in flight in the other modes (what the client did
  before, with per-sample requests).

Every mode keeps ``--inflight`` requests in flight per server (64 prompts per request for
``direct-batched``).

Reported per mode: wall seconds, requests/s (wall), and the client process's CPU seconds
(process time: the machine is shared, wall time moves with the load). Writes
benchmarks/results/rollout_client.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def timed(fn) -> dict:
    w0, c0 = time.perf_counter(), time.process_time()
    n = fn()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"requests": n, "wall_s": round(wall, 3), "requests_per_s": round(n / wall, 1), "client_cpu_s": round(cpu, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--inflight", type=int, default=64, help="requests in flight per server, every mode")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rollout_client.json"))
    args = ap.parse_args()

    from sglang_procs import start_router, start_standin, stop

    from gopd_mega.hf.testing import tiny_hf_model
    from gopd_mega.rollout.http import shared_http
    from gopd_mega.rollout.pool import SGLangPool
    from gopd_mega.rollout.sglang import SGLangServer, generate_body, sampling_params

    tmp = Path(tempfile.mkdtemp(prefix="bench_rollout_client_"))
    tiny_hf_model("llama", tmp / "tiny", seed=0)
    procs, workers = [], []
    try:
        for _ in range(args.servers):
            proc, url = start_standin(str(tmp / "tiny"))
            procs.append(proc)
            workers.append(url)
        router_proc, router = start_router(workers, tmp / "router.log")
        procs.append(router_proc)
        n = args.prompts * args.samples
        prompts = [[1, 5 + (i % 50), 7, 9] for i in range(n)]
        ids = [f"s0-p{i // args.samples}-n{i % args.samples}" for i in range(n)]
        kw = dict(temperature=1.0, max_new_tokens=1)
        results = {}

        def through_router():
            pool = SGLangPool(router, control_urls=workers, pad_id=0, stop_ids=[2], max_inflight=args.inflight,
                              timeout=600)
            assert len(pool.generate(prompts, sample_ids=[f"r-{i}" for i in ids], **kw)) == n
            return n

        def direct_per_sample():
            servers = [SGLangServer(u, stop_ids=[2], batched=False, timeout=600) for u in workers]

            async def one(i):
                await servers[i % len(servers)].agenerate([prompts[i]], top_p=1.0, greedy=False, rids=[f"d-{ids[i]}"], **kw)

            async def run_all():
                import asyncio

                limit = asyncio.Semaphore(args.inflight * len(servers))

                async def bounded(i):
                    async with limit:
                        await one(i)

                await asyncio.gather(*[bounded(i) for i in range(n)])

            shared_http().run(run_all())
            return n

        def direct_batched():
            pool = SGLangPool(workers, pad_id=0, stop_ids=[2], chunk_size=64, max_inflight=max(64, args.inflight),
                              timeout=600)
            assert len(pool.generate(prompts, sample_ids=[f"b-{i}" for i in ids], **kw)) == n
            return -(-n // 64)

        def urllib_threads():
            params = sampling_params(temperature=1.0, top_p=1.0, max_new_tokens=1, stop_ids=[2])

            def one(i):
                body = json.dumps(generate_body([prompts[i]], [params], [f"u-{ids[i]}"], batched=False)).encode()
                req = urllib.request.Request(workers[i % len(workers)] + "/generate", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=600) as resp:
                    json.loads(resp.read())

            with ThreadPoolExecutor(args.inflight * len(workers)) as ex:
                list(ex.map(one, range(n)))
            return n

        for name, fn in (("router", through_router), ("direct-per-sample", direct_per_sample),
                         ("direct-batched", direct_batched), ("urllib-threads", urllib_threads)):
            results[name] = timed(fn)
            print(json.dumps({"mode": name, **results[name]}), flush=True)
    finally:
        stop(procs)
    doc = {"prompts": args.prompts, "samples": args.samples, "servers": args.servers, "max_new_tokens": 1,
           "inflight_per_server": args.inflight,
           "modes": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{'mode':<20} {'requests':>9} {'wall s':>8} {'req/s':>8} {'client CPU s':>13}")
    for name, r in results.items():
        print(f"{name:<20} {r['requests']:>9} {r['wall_s']:>8} {r['requests_per_s']:>8} {r['client_cpu_s']:>13}")


if __name__ == "__main__":
    main()
