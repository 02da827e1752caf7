"""megatron-core's DDP + optimizer for the student (gopd_mega.optim), on CPU/gloo.

1. fp32 master weights: a bf16 student at lr 1e-5 moves its masters like an fp32 student moves its
   weights (same init, same data, 3 steps), while a plain bf16 AdamW loses almost every update;
   the model directory and the HF export carry the masters, in fp32.
2. Data parallelism: DDP and the distributed optimizer at DP=2 equal DP=1 (fp32): loss, gradient
   norm and weights after 3 steps; in bf16 the distributed optimizer equals plain DDP; the
   overlapped bucket reduce equals the synchronous one.
3. fp16: megatron's dynamic loss scaler skips overflowed steps, then matches fp32.
"""

import pytest
import torch

from dist_utils import run_distributed

pytestmark = pytest.mark.distributed

STEPS = 3


def _cfg(dtype, tie=True):
    from gopd_mega.config import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                       vocab_size=64, max_seq_len=16, qk_layernorm=True, tie_embeddings=tie, params_dtype=dtype)


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, 64, (8, 12), generator=g)
    mask = torch.ones_like(tokens)
    mask[:, :3] = 0  # a "prompt" that carries no loss
    return tokens, mask


def _loss_fn(logp, flat_index):
    # mean NLL over the 8 x 9 loss tokens of the full batch (globally normalised, as train_step wants)
    return -logp / 72.0


def _train(model, steps=STEPS, record_grads=False, micro_batch_size=4):
    """Run ``steps`` train steps; return per-step (loss, grad_norm) and optionally the reduced
    main_grads after each step (they persist until the next zero_grad)."""
    stats, grads = [], []
    for s in range(steps):
        tokens, mask = _data(s)
        out = model.train_step(tokens, mask, _loss_fn, micro_batch_size=micro_batch_size)
        assert out["skipped"] == 0.0
        assert model.optimizer.schedule_step == s + 1  # train_step's optimizer step advanced the schedule
        stats.append((out["loss"], out["grad_norm"]))
        if record_grads:
            grads.append({n: p.main_grad.clone() for n, p in model.model.named_parameters()})
    return stats, grads


def _master_worker(root):
    from safetensors.torch import load_file

    from gopd_mega.config import OptimConfig
    from gopd_mega.hf import export_hf
    from gopd_mega.model_io import WEIGHTS, save_model_dir
    from gopd_mega.models import ShardedGPT
    from gopd_mega.optim import build_optimizer, full_master_state_dict
    from gopd_mega.parallel import build_model_groups

    groups = build_model_groups(1, 1)
    ocfg = OptimConfig(lr=1e-5, grad_clip=0.0, weight_decay=0.0)  # the replay below is plain Adam
    ref = ShardedGPT(_cfg("float32"), groups, trainable=True, name="fp32")
    bf = ShardedGPT(_cfg("bfloat16"), groups, trainable=True, name="bf16")
    build_optimizer(ref, ocfg)
    opt = build_optimizer(bf, ocfg)
    assert type(opt.opt).__name__ == "Float16OptimizerWithFloat16Params"
    from gopd_mega.model.build import has_transformer_engine

    assert opt.fused or has_transformer_engine()  # torch's fused AdamW unless megatron took TE's
    # (clones: at TP=PP=1 full_state_dict hands out the live parameters)
    ref0 = {k: v.clone() for k, v in ref.full_state_dict().items()}
    bf_local0 = {n: p.detach().clone() for n, p in bf.model.named_parameters()}  # bf16 (norms fp32)
    master0_local = bf.optimizer.master_weights()
    bf0_weights = {k: v.clone() for k, v in bf.full_state_dict().items()}  # bf16 weights at init
    master0 = full_master_state_dict(bf)
    assert all(master0[k].dtype == torch.float32 and torch.equal(master0[k], bf0_weights[k].float()) for k in master0)

    ref_stats, ref_grads = _train(ref, record_grads=True)
    bf_stats, bf_grads = _train(bf, record_grads=True)
    ref3, master3, bf3_weights = ref.full_state_dict(), full_master_state_dict(bf), bf.full_state_dict()

    d_ref = torch.cat([(ref3[k] - ref0[k]).flatten() for k in ref0])
    d_master = torch.cat([(master3[k] - master0[k]).flatten() for k in ref0])
    d_weights = torch.cat([(bf3_weights[k].float() - bf0_weights[k].float()).flatten() for k in ref0])

    def replay(start, grads, dtype):
        """torch AdamW from ``start`` ({local name: tensor}) in ``dtype`` fed ``grads``."""
        params = {n: t.detach().to(dtype).clone().requires_grad_(True) for n, t in start.items()}
        # the kernel the student's optimizer runs (gopd_mega.optim: megatron's torch AdamW, fused)
        adamw = torch.optim.AdamW(list(params.values()), lr=1e-5, weight_decay=0.0, fused=bf.optimizer.fused)
        for step_grads in grads:
            for n, p in params.items():
                p.grad = step_grads[n].to(dtype)
            adamw.step()
        return {n: p.detach() for n, p in params.items()}

    # A plain AdamW on the bf16 weights, fed the fp32 run's exact gradients.
    bf16_init = bf_local0
    plain = replay(bf16_init, ref_grads, torch.bfloat16)
    plain_changed = sum(int((plain[n] != bf16_init[n].bfloat16()).sum()) for n in plain)
    total = sum(t.numel() for t in plain.values())
    # The masters are exactly fp32 AdamW on the bf16 run's own (fp32, reduced) gradients.
    exact = replay(master0_local, bf_grads, torch.float32)
    master_local = bf.optimizer.master_weights()
    replay_err = max((exact[n] - master_local[n]).abs().max().item() for n in exact)

    # Exports: the model directory and the HF checkpoint hold the fp32 masters.
    save_model_dir(bf, f"{root}/student")
    saved = load_file(f"{root}/student/{WEIGHTS}")
    export_hf(bf, f"{root}/hf")
    hf = load_file(f"{root}/hf/model-00001-of-00001.safetensors")
    save_model_dir(bf, f"{root}/student_bf16", dtype=torch.bfloat16)
    saved_bf16 = load_file(f"{root}/student_bf16/{WEIGHTS}")
    return {
        "ref_stats": ref_stats, "bf_stats": bf_stats,
        "rel_err": float((d_master - d_ref).norm() / d_ref.norm()),
        "cos": float(torch.nn.functional.cosine_similarity(d_master, d_ref, dim=0)),
        "master_moved": float((d_master != 0).float().mean()),
        "ref_moved": float((d_ref != 0).float().mean()),
        "bf16_weights_moved": float((d_weights != 0).float().mean()),
        "plain_bf16_moved": plain_changed / total,
        "replay_err": replay_err,
        "saved_equals_master": all(saved[k].dtype == torch.float32 and torch.equal(saved[k], master3[k]) for k in master3),
        "saved_keys": sorted(saved) == sorted(master3),
        "saved_differs_from_bf16": float(sum(int((saved[k] != bf3_weights[k].float()).sum()) for k in master3)),
        "hf_embed_equals_master": (hf["model.embed_tokens.weight"].dtype == torch.float32 and
                                   torch.equal(hf["model.embed_tokens.weight"], master3["embedding.word_embeddings.weight"])),
        "bf16_dir_is_rounded_master": all(saved_bf16[k].dtype == torch.bfloat16 and torch.equal(saved_bf16[k], master3[k].bfloat16())
                                          for k in master3),
    }


def test_bf16_master_weights_follow_fp32(tmp_path):
    (r,) = run_distributed(_master_worker, 1, (str(tmp_path),))
    # Losses/grad norms: bf16 forward rounds activations to 8 mantissa bits, so they agree with
    # fp32 to ~1e-2 relative, no better (and no worse: a bug in the master path shows up as a
    # wrong update, checked below, not here).
    for (l32, n32), (l16, n16) in zip(r["ref_stats"], r["bf_stats"]):
        assert abs(l16 - l32) < 2e-2 * abs(l32) and abs(n16 - n32) < 5e-2 * n32, (r["ref_stats"], r["bf_stats"])
    # Every weight of the fp32 run moves, and so does every fp32 master of the bf16 run.
    assert r["ref_moved"] > 0.999 and r["master_moved"] > 0.999, r
    # Update direction. Adam normalises each element (m / sqrt(v)), so the update of an element
    # whose gradient is well above its bf16 error is lr * (nearly the same number) in both runs;
    # only elements with gradients near zero (sign flips under a 1e-2 relative perturbation)
    # differ, by at most 2 lr per step. Measured: rel_err 0.06, cosine 0.998. A master that
    # dropped or double-counted a gradient (e.g. the tied embedding's) gives cosine << 0.9.
    assert r["cos"] > 0.98 and r["rel_err"] < 0.15, r
    # The masters ARE megatron's fp32 Adam on the bf16 run's reduced fp32 gradients: replaying
    # torch AdamW in fp32 from the initial masters with those gradients gives the same numbers
    # (same torch kernel; 1e-9 only allows for a different op order, measured 0).
    assert r["replay_err"] < 1e-9, r
    # The point of the masters: at lr 1e-5 a plain bf16 AdamW (bf16 weights, Adam state and
    # update) changes only the weights with |w| below ~5e-3 (an update of 1e-5 is below half
    # the bf16 spacing 2^-8 |w| above that): ~15% of them for N(0, 0.02) init (measured 0.15),
    # i.e. it loses ~85% of the updates, every step again. The masters keep all of them; their
    # bf16 compute copies move where the accumulated update crossed a rounding boundary (0.23).
    assert r["plain_bf16_moved"] < 0.25 and r["bf16_weights_moved"] < 0.35, r
    # Exports write the masters in fp32 (and a bf16 export is the rounded masters).
    assert r["saved_keys"] and r["saved_equals_master"] and r["saved_differs_from_bf16"] > 0, r
    assert r["hf_embed_equals_master"], r
    assert r["bf16_dir_is_rounded_master"], r


def _run_layout(dtype, distributed_optimizer, tie, overlap=False, micro_batch_size=4):
    from gopd_mega.config import OptimConfig
    from gopd_mega.models import ShardedGPT
    from gopd_mega.optim import build_optimizer, full_master_state_dict
    from gopd_mega.parallel import build_model_groups

    model = ShardedGPT(_cfg(dtype, tie), build_model_groups(1, 1), trainable=True)
    opt = build_optimizer(model, OptimConfig(lr=1e-3, grad_clip=0.5, weight_decay=0.01,
                                             use_distributed_optimizer=distributed_optimizer,
                                             overlap_grad_reduce=overlap))
    stats, _ = _train(model, micro_batch_size=micro_batch_size)
    return stats, full_master_state_dict(model), type(opt.opt).__name__


def _dp_worker(cases):
    return [_run_layout(*case) for case in cases]


FP32_CASES = [("float32", False, True), ("float32", True, True)]
BF16_CASES = [("bfloat16", False, True), ("bfloat16", True, True)]
# untied output layer (its dW reaches main_grad only through the kernel), 2 micro-batches per rank
OVERLAP_CASES = [("float32", True, False, False, 2), ("float32", True, False, True, 2)]


def test_dp2_and_distributed_optimizer_equal_dp1():
    (single,) = run_distributed(_dp_worker, 1, (FP32_CASES[:1],))
    dp2 = run_distributed(_dp_worker, 2, (FP32_CASES + BF16_CASES + OVERLAP_CASES,))
    base = {True: single[0]}  # DP=1
    for rank_results in dp2:
        names = [r[2] for r in rank_results]
        assert names == ["FP32Optimizer", "DistributedOptimizer", "Float16OptimizerWithFloat16Params",
                         "DistributedOptimizer", "DistributedOptimizer", "DistributedOptimizer"], names
        for (dtype, dist_opt, tie), (stats, weights, _) in zip(FP32_CASES, rank_results):
            ref_stats, ref_weights, _ = base[tie]
            # fp32: DP=2 sums two half-batch gradients instead of one full-batch gradient, a
            # different summation order: ~1e-7 relative in loss and norm; Adam (lr 1e-3) turns
            # that into weight differences far below 1e-6 over 3 steps.
            for (l1, n1), (l2, n2) in zip(ref_stats, stats):
                assert abs(l1 - l2) < 1e-5 * abs(l1) and abs(n1 - n2) < 1e-5 * n1, (dtype, dist_opt, tie, ref_stats, stats)
            err = max((weights[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
            assert err < 1e-6, (dtype, dist_opt, tie, err)
        # bf16: the distributed optimizer (reduce-scatter, sharded fp32 masters, all-gather)
        # equals plain DDP (all-reduce, replicated fp32 masters) on the same bf16 forward: the
        # same two numbers are summed per gradient element, so losses are identical; the norm is
        # summed from DP shards in another order (~1e-8 relative), which moves the clip factor
        # by as much and the masters by a few fp32 ulps (measured 1.2e-7 = 1 ulp of a norm weight ~1).
        (s_ddp, w_ddp, _), (s_do, w_do, _) = rank_results[2], rank_results[3]
        assert [l for l, _ in s_ddp] == [l for l, _ in s_do], (s_ddp, s_do)
        assert all(abs(n1 - n2) < 1e-6 * n1 for (_, n1), (_, n2) in zip(s_ddp, s_do)), (s_ddp, s_do)
        err = max((w_ddp[k] - w_do[k]).abs().max().item() for k in w_ddp)
        assert err < 1e-6, err
        # overlap_grad_reduce (bucket reduce launched by DDP's hooks, the output weight's by the
        # kernel path's placeholder gradient; no_sync on all but the last micro-batch) changes
        # when the collectives run, not what they sum: identical results.
        (s_plain, w_plain, _), (s_over, w_over, _) = rank_results[4], rank_results[5]
        assert s_plain == s_over, (s_plain, s_over)
        assert all(torch.equal(w_plain[k], w_over[k]) for k in w_plain)
    # every DP rank ends with the same weights
    for k, v in dp2[0][1][1].items():
        assert torch.equal(v, dp2[1][1][1][k])


def _fp16_worker():
    from gopd_mega.config import OptimConfig
    from gopd_mega.models import ShardedGPT
    from gopd_mega.optim import build_optimizer, full_master_state_dict
    from gopd_mega.parallel import build_model_groups

    groups = build_model_groups(1, 1)
    ref = ShardedGPT(_cfg("float32"), groups, trainable=True, name="fp32")
    build_optimizer(ref, OptimConfig(lr=1e-5, grad_clip=0.0, weight_decay=0.0))
    ref_stats, _ = _train(ref, steps=1)
    fp16 = ShardedGPT(_cfg("float16"), groups, trainable=True, name="fp16")
    opt = build_optimizer(fp16, OptimConfig(lr=1e-5, grad_clip=0.0, weight_decay=0.0, initial_loss_scale=2.0**20))
    master0 = full_master_state_dict(fp16)
    tokens, mask = _data(0)
    log = []
    for _ in range(12):
        scale = float(opt.opt.get_loss_scale())
        out = fp16.train_step(tokens, mask, _loss_fn, micro_batch_size=4)
        log.append((scale, out["skipped"], out["grad_norm"]))
        if not out["skipped"]:
            break
        unchanged = all(torch.equal(v, master0[k]) for k, v in full_master_state_dict(fp16).items())
        assert unchanged, "a skipped (overflowed) step changed the masters"
    assert opt.schedule_step == len(log), (opt.schedule_step, log)  # skipped updates advance the schedule too
    return ref_stats[0][1], log


def test_fp16_dynamic_loss_scale():
    ((ref_norm, log),) = run_distributed(_fp16_worker, 1)
    # 2^20 x the loss overflows fp16 gradients: megatron's dynamic scaler skips those steps
    # (masters untouched, checked in the worker) and halves the scale after `hysteresis` (2)
    # overflows, until a step goes through.
    assert log[0][1] == 1.0 and log[-1][1] == 0.0, log
    assert log[-1][0] < log[0][0], log
    # That step's (unscaled) gradient norm is the fp32 one up to fp16 rounding of the forward
    # (11-bit mantissa: ~1e-3 relative; measured below 1e-4).
    assert abs(log[-1][2] - ref_norm) < 1e-2 * ref_norm, (log, ref_norm)


def test_foreach_fallbacks_equal_megatron_loops():
    """gopd_mega.optim's foreach replacements of megatron's local (no TE / Apex) multi-tensor ops
    compute the same norm and the same scaled tensors."""
    from megatron.core import utils as mutils

    from gopd_mega.optim import _foreach_l2_norm, _foreach_scale
    from gopd_mega.platform import setup_platform

    setup_platform()
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(shape, generator=g) for shape in [(64, 32), (7,), (3, 5, 2), (1,)]]
    want, _ = mutils.local_multi_tensor_l2_norm(0, None, [ts], False)
    got, _ = _foreach_l2_norm(0, None, [ts], False)
    assert got.shape == (1,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want.to(got.device), rtol=1e-6, atol=0)
    for same in (True, False):
        a, b = [t.clone() for t in ts], [t.clone() for t in ts]
        out_a, out_b = (a, b) if same else ([torch.empty_like(t) for t in ts], [torch.empty_like(t) for t in ts])
        mutils.local_multi_tensor_scale(0, None, [a, out_a], 0.37)
        _foreach_scale(0, None, [b, out_b], 0.37)
        assert all(torch.equal(x, y) for x, y in zip(out_a, out_b))


def _internals_worker():
    from gopd_mega.config import OptimConfig
    from gopd_mega.models import ShardedGPT
    from gopd_mega.optim import build_optimizer, master_params, megatron_version
    from gopd_mega.parallel import build_model_groups

    out = {}
    for dtype, dist_opt in [("bfloat16", True), ("bfloat16", False), ("float32", True), ("float32", False)]:
        model = ShardedGPT(_cfg(dtype), build_model_groups(1, 1), trainable=True)
        opt = build_optimizer(model, OptimConfig(lr=1e-3, use_distributed_optimizer=dist_opt))
        pairs = master_params(opt.opt)
        names = {n for n, p in model.model.named_parameters()}
        by_param = {id(p): n for n, p in model.model.named_parameters()}
        covered = {}
        for model_p, main, offset in pairs:
            assert main.dtype == torch.float32 and offset >= 0
            covered[by_param[id(model_p)]] = covered.get(by_param[id(model_p)], 0) + main.numel()
        sizes = {n: p.numel() for n, p in model.model.named_parameters()}
        case = f"{dtype}/{type(opt.opt).__name__}"
        out[case] = {"all_params": set(covered) == names, "full": covered == sizes}  # DP = 1: no shards
        if dist_opt and dtype == "bfloat16":  # a missing internal is named, with the version
            del opt.opt.shard_fp32_from_float16_groups
            try:
                master_params(opt.opt)
                out["error"] = None
            except RuntimeError as exc:
                out["error"] = str(exc)
            out["version"] = megatron_version()
    return out


def test_master_params_reads_megatron_internals():
    """gopd_mega.optim.master_params, the one place that reads megatron-core optimizer internals
    (no public accessor pairs a model param with its fp32 master), works on the real optimizers of
    the installed megatron-core: every parameter has its master, whole at DP = 1. If an upgrade
    renames an attribute, this fails here, and the error names the attribute and the version."""
    ((r,),) = [run_distributed(_internals_worker, 1)]
    cases = [k for k in r if "/" in k]
    assert sorted(cases) == ["bfloat16/DistributedOptimizer", "bfloat16/Float16OptimizerWithFloat16Params",
                             "float32/DistributedOptimizer", "float32/FP32Optimizer"], cases
    for case in cases:
        assert r[case] == {"all_params": True, "full": True}, (case, r[case])
    assert r["error"] and "'shard_fp32_from_float16_groups'" in r["error"] and f"megatron-core {r['version']}" in r["error"], r
