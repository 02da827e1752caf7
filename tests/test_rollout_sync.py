"""Weight refresh of SGLang servers (stand-in): disk, NCCL over gloo, IPC format, colocated memory.

The stand-in loads the exported/broadcast weights into its own transformers model, so a refresh
is checked by what the server then computes: its log-probs must match the trainer's student up to
bf16 rounding of the weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from sglang_standin import StandinSGLang

from gopd_mega.config import ModelConfig
from gopd_mega.rollout.coordinator import RolloutCoordinator, Sampling
from gopd_mega.rollout.pool import SGLangPool
from gopd_mega.rollout.sglang import SGLangError, http_call
from gopd_mega.rollout.weight_sync import DiskSync, IpcSync, NcclSync

HERE = Path(__file__).parent


def _student(model_dirs, tp=1):
    from gopd_mega.model_io import build_model

    return build_model(ModelConfig(load=model_dirs["student"], tp=tp), trainable=False, name="student")


@pytest.fixture(scope="module")
def other_hf(model_dirs, tmp_path_factory):
    """An HF export of a DIFFERENT model of the student's shape: what the servers start with, so a
    refresh that does not arrive shows."""
    from gopd_mega.hf import export_hf
    from gopd_mega.model_io import build_model

    path = tmp_path_factory.mktemp("hf") / "other"
    export_hf(build_model(ModelConfig(load=model_dirs["add"]), trainable=False, name="other"), path)
    return str(path)


def _gap_to_student(url, student, temperature=1.0):
    """mean |server - trainer| log-prob over a few sequences."""
    seqs = torch.tensor([[1, 5, 7, 9, 11, 3, 4], [2, 6, 8, 10, 12, 13, 14]])
    mask = torch.ones_like(seqs, dtype=torch.bool)
    mask[:, 0] = False
    server = SGLangPool(url, pad_id=0, stop_ids=[]).score(seqs.tolist(), temperature=temperature)
    trainer = student.logprobs(seqs, mask, temperature)
    return float((torch.stack(server) - trainer).abs()[mask].mean())


# ----------------------------------------------------------------------------- disk


def _disk_refresh(model_dirs, url, weight_dir):
    """2 ranks, student TP=2 (the export is collective). Rank 0's write is slowed down: the server
    must still only ever see the finished folder."""
    import torch.distributed as dist

    import gopd_mega.hf.convert as convert

    student = _student(model_dirs, tp=2)
    real_write = convert.write_checkpoint
    finished = []

    def slow_write(*args, **kwargs):
        time.sleep(1.5)
        out = real_write(*args, **kwargs)
        finished.append(time.time())
        return out

    convert.write_checkpoint = slow_write
    sync = DiskSync(SGLangPool(url, pad_id=0, stop_ids=[]), weight_dir)
    sync.refresh(student, 1)
    if dist.get_rank() == 0:  # the next load fails on the server: the error reaches every rank
        http_call(url + "/standin_fail_next_load", {"message": "disk quota exceeded"})
    with pytest.raises(SGLangError, match=rf"{url}/update_weights_from_disk returned HTTP 400: .*disk quota exceeded") as info:
        sync.refresh(student, 2)
    gap = _gap_to_student(url, student)  # collective: the TP=2 student scores on both ranks
    return finished, str(info.value), gap


@pytest.mark.distributed
def test_disk_refresh_sees_only_complete_checkpoints_and_keeps_the_old_one(model_dirs, other_hf, tmp_path):
    server = StandinSGLang(other_hf)
    try:
        results = run_distributed(_disk_refresh, 2, (model_dirs, server.url, tmp_path / "w"))
    finally:
        server.close()
    finished, message0, gap = results[0]
    assert results[1][1] == message0  # the same failure on both ranks
    loads = server.loads
    assert len(loads) == 2 and all(load["complete"] for load in loads)  # never a partial folder
    assert loads[0]["time"] > finished[0]  # posted only after rank 0's write had finished
    assert loads[0]["dtypes"] == ["torch.bfloat16"]
    posts = server.posted("/update_weights_from_disk")
    assert [(Path(p["model_path"]).name, p["weight_version"]) for p in posts] == [("v000001", "1"), ("v000002", "2")]
    assert server.weight_version == "1"  # the failed load left version 1 in place ...
    assert (tmp_path / "w" / "v000001" / "config.json").is_file()  # ... and its folder is kept
    assert gap < 0.02  # the server computes with the student's weights (bf16-rounded)


# ----------------------------------------------------------------------------- nccl over gloo


@pytest.fixture
def standin_process(other_hf):
    """The stand-in in its own process: it joins the weight-update group as the extra rank."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(HERE / "sglang_standin.py"), "--model-path", other_hf],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if not line.startswith("URL "):
        proc.kill()
        pytest.fail(f"stand-in did not start: {line!r} {proc.stderr.read()[-2000:]}")
    yield line.split()[1]
    proc.kill()
    proc.wait()


def test_nccl_protocol_over_gloo(model_dirs, standin_process):
    url = standin_process
    student = _student(model_dirs)
    assert _gap_to_student(url, student) > 0.1  # the server starts with other weights
    pool = SGLangPool(url, pad_id=0, stop_ids=[])
    sync = NcclSync(pool, backend="gloo", master_address="127.0.0.1", bucket_mb=1)
    sync.bucket_bytes = 12_000  # several buckets for the tiny model
    try:
        sync.refresh(student, 1)
        assert _gap_to_student(url, student) < 0.02  # the broadcast weights arrived (bf16 on the wire)
        sync.refresh(student, 2)
    finally:
        sync.close()
    log = http_call(url + "/standin_log")
    calls = [(path, body) for path, body in log["calls"] if path not in ("/generate", "/health")]
    init = [b for p, b in calls if p == "/init_weights_update_group"]
    assert len(init) == 1 and init[0]["rank_offset"] == 1 and init[0]["world_size"] == 2 and init[0]["backend"] == "gloo"
    updates = [b for p, b in calls if p == "/update_weights_from_distributed"]
    per_refresh = len(updates) // 2
    assert per_refresh > 1  # bucketed
    for refresh, version in ((updates[:per_refresh], "1"), (updates[per_refresh:], "2")):
        assert [u["weight_version"] for u in refresh] == [None] * (per_refresh - 1) + [version]
        assert [u["flush_cache"] for u in refresh] == [False] * (per_refresh - 1) + [True]
        assert all(set(u["dtypes"]) == {"bfloat16"} for u in refresh)
        assert all(u["group_name"] == init[0]["group_name"] for u in refresh)
        assert len(refresh[0]["names"]) == len(refresh[0]["shapes"]) == len(refresh[0]["dtypes"])
    names = [n for u in updates[:per_refresh] for n in u["names"]]
    assert len(names) == len(set(names)) and "model.embed_tokens.weight" in names
    order = [p for p, _ in calls]
    assert order[order.index("/init_weights_update_group") + 1] == "/pause_generation"
    assert order[-1] == "/destroy_weights_update_group" and log["weight_version"] == "2"


# ----------------------------------------------------------------------------- ipc, colocated memory


def _ipc_refresh(model_dirs, url):
    """2 ranks, one server of 2 TP ranks: rank j serializes TP rank j's payload on its own device."""
    student = _student(model_dirs)
    sync = IpcSync(SGLangPool(url, pad_id=0, stop_ids=[]), allow_cpu=True, server_ranks=2)
    sync.refresh(student, 1)
    gap = _gap_to_student(url, student)  # collective: the student's log-probs gather over both ranks
    if torch.distributed.get_rank() == 0:
        http_call(url + "/standin_fail_next_load", {"message": "CUDA out of memory"})
    with pytest.raises(SGLangError, match=r"update_weights_from_tensor returned HTTP 400: .*CUDA out of memory") as info:
        sync.refresh(student, 2)
    sync.refresh(student, 3)  # the server answers its probe again: synced and back in
    return gap, str(info.value), sorted(sync.pool.out)


@pytest.mark.distributed
def test_ipc_one_payload_per_tp_rank_decoded_by_sglang(model_dirs, other_hf):
    """The /update_weights_from_tensor payload: one entry per TP rank of the server, each made by
    the trainer rank that shares that rank's GPU, each decoded by SGLang's own SafeUnpickler
    (Base64Bytes first) in the stand-in. CPU tensors stand in for CUDA-IPC handles (the device
    UUID mapping is tested below and on a GPU). A failed load takes the only server out (the
    error names it); it rejoins at the next refresh once its probe succeeds."""
    server = StandinSGLang(other_hf, tp_size=2)
    try:
        results = run_distributed(_ipc_refresh, 2, (model_dirs, server.url))
    finally:
        server.close()
    gap, message, out = results[0]
    assert gap < 0.02 and results[1][1] == message and server.url in message
    assert out == [] and server.weight_version == "3"
    assert server.contract is not None and not server.refused  # SGLang's own classes took every body
    per_rank = server.tensor_payloads
    assert per_rank and all(len(ranks) == 2 and ranks[0] == ranks[1] for ranks in per_rank)
    posts = server.posted("/update_weights_from_tensor")
    assert all(len(set(p["serialized_named_tensors"])) == 2 for p in posts)  # two payloads, not one copied
    paths = [p for p, _ in server.calls if p.endswith("weight_update") or p == "/update_weights_from_tensor"]
    assert paths[0] == "/begin_weight_update" and paths[-1] == "/end_weight_update"  # 0.5.23: inside a session


def test_ipc_device_is_its_uuid():
    """CUDA tensors are pickled with their device as its UUID (SGLang's patched rebuild maps it to
    the receiving process's own index, whatever CUDA_VISIBLE_DEVICES it has)."""
    from gopd_mega.rollout.weight_sync import CUDA_DEVICE_ARG, with_device_uuid

    args = tuple(range(15))
    out = with_device_uuid(args, lambda i: f"GPU-uuid-{i}")
    assert out[CUDA_DEVICE_ARG] == "GPU-uuid-6" and out[:6] == args[:6] and out[7:] == args[7:]


def _decode_in_sglangs_way(blob: str, queue) -> None:
    """A separate process (as the server is): SGLang's patched CUDA rebuild, then its SafeUnpickler."""
    import sglang_contract

    contract = sglang_contract.load()
    contract.patch_cuda_rebuild()
    named = contract.decode_tensors(blob)
    queue.put([(n, t.device.type, t.cpu().float().tolist()) for n, t in named])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-IPC weight sync needs a GPU")
def test_ipc_cuda_payload_decodes_in_another_process_by_device_uuid():
    """A real CUDA-IPC payload (device given by its UUID) decoded by SGLang's own code in another
    process: the handle opens there and the values arrive."""
    import multiprocessing as mp

    from gopd_mega.rollout.weight_sync import serialize_named_tensors

    t = torch.arange(12, dtype=torch.bfloat16, device="cuda").view(3, 4)
    blob = serialize_named_tensors([("w", t)])
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_decode_in_sglangs_way, args=(blob, queue))
    proc.start()
    got = queue.get(timeout=120)
    proc.join(timeout=60)
    assert got == [("w", "cuda", t.cpu().float().tolist())]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-IPC weight sync needs a GPU")
def test_ipc_needs_gpu_flag():
    pool = SGLangPool("http://127.0.0.1:9", pad_id=0, stop_ids=[])
    assert IpcSync(pool).mode == "ipc"


def test_ipc_refused_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(RuntimeError, match="CUDA-IPC handles and needs GPUs"):
        IpcSync(SGLangPool("http://127.0.0.1:9", pad_id=0, stop_ids=[]))


def test_colocated_release_and_resume_around_training(model_dirs, other_hf, tmp_path):
    server = StandinSGLang(other_hf)
    server.weight_version = "0"
    try:
        pool = SGLangPool(server.url, pad_id=0, stop_ids=[])
        rollout = RolloutCoordinator(pool, weight_sync=DiskSync(pool, tmp_path / "w"), colocate=True)
        rollout.collect(0, [[1, 5, 7]], 1, Sampling(1.0, 1.0, 3, seed=0))
        rollout.before_training()
        with pytest.raises(SGLangError, match="weights are released"):  # the server really gave them up
            http_call(server.url + "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})
        rollout.refresh(_student(model_dirs), 1)
        assert rollout.collect(1, [[1, 5, 7]], 1, Sampling(1.0, 1.0, 3, seed=0)).weight_versions == ["1"]
    finally:
        server.close()
    control = [(p, b.get("tags") if b else None) for p, b in server.calls if p not in (
        "/generate", "/model_info", "/get_server_info", "/abort_request", "/health")]
    assert control == [("/release_memory_occupation", ["kv_cache", "weights"]),
                       ("/resume_memory_occupation", ["weights"]),
                       ("/pause_generation", None), ("/update_weights_from_disk", None), ("/continue_generation", None),
                       ("/resume_memory_occupation", ["kv_cache"])]
