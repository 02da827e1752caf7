"""The student's optimizer: megatron-core's DDP + optimizer (fp32 master weights) and the LR schedule.

Pieces (all megatron-core's own; gopd_mega.platform makes them run on CPU/gloo too):
  * ``DistributedDataParallel`` (DistributedDataParallelConfig: grad_reduce_in_fp32): every
    trainable parameter p gets ``p.main_grad``, an fp32 view into contiguous, bucketed gradient
    buffers. Autograd's gradient of p (bf16 for a bf16 model) is added into it by DDP's
    post-accumulate hook and p.grad is freed. The output layer's dW is written straight into its
    main_grad by the fused kernel (``output_grad_acc``), so no V x H weight gradient exists.
  * ``finalize_model_grads``: DP reduction of the buffers (all-reduce, or reduce-scatter with the
    distributed optimizer; a SUM: with calculate_per_token_loss megatron does not average, and
    each DP rank's loss is its share of the globally normalised sum), TP sum of the q/k-norm
    gradients (TP-replicated weights applied to each rank's own heads), and the first/last-stage
    sum of a tied embedding (PP > 1).
  * ``get_megatron_optimizer`` (OptimizerConfig): Adam with decoupled weight decay (AdamW) on
    fp32 MASTER weights when the model runs in bf16/fp16 (Float16OptimizerWithFloat16Params, or
    DistributedOptimizer which shards masters and moments over DP); the bf16 weights are copies
    of the masters refreshed after every step. fp16 adds megatron's loss scaler (dynamic unless
    OptimConfig.loss_scale). Gradient clipping is megatron's clip_grad_norm_fp32 over the fp32
    gradients, norm summed once per parameter (TP duplicates and the tied copy excluded) over the
    model-parallel group (the whole world with the distributed optimizer).
    Weight decay: on every parameter by default, as torch AdamW in the paper's runs
    (OptimConfig.decay_all_params); decay_all_params=false follows megatron's rule (no decay on
    biases and 1-D weights such as norms).
  * Without Transformer Engine or Apex (always on CPU) megatron builds torch's own AdamW, which
    on CPU defaults to one tensor at a time (~8 passes over each), and computes norms and clip
    scales in Python loops. ``StudentOptimizer`` switches that AdamW to torch's fused kernel and
    those loops to foreach kernels (``use_foreach_fallbacks``): same arithmetic, measured 0.70 ->
    0.14 CPU-s per step for SmolLM2-135M (1 thread; torch's fused AdamW + clip alone: 0.12 s).

Why fp32 masters: a bf16 weight w has a spacing of 2^-8 |w| around it, so an AdamW update of
~lr (1e-5) to weights of size ~1e-2 is below half a spacing and rounds away; fp32 masters keep
every update (tests/test_optim_megatron.py shows both).

Step (``step()``, called by ShardedGPT.train_step after the backward of all micro-batches):
    finalize_model_grads -> set lr / weight decay of every param group -> prepare_grads
    (main_grad -> master .grad; fp16: unscale, inf check) -> grad norm (clip if grad_clip > 0)
    -> skip the update if the norm is not finite -> step_with_ready_grads (Adam on the masters,
    copy back to the model weights; all-gather them with the distributed optimizer) -> advance
    the LR schedule by one update (a skipped update counts too), so no caller does it.

LR schedule (step = number of updates already taken, skipped ones included: ``schedule_step``):
    warm-up  lr = peak * (step + 1) / warmup_steps            for step < warmup_steps
    constant lr = peak
    cosine   lr = min + (peak - min) * (1 + cos(pi * p)) / 2,  p = (step - warmup) / (total - warmup)
    linear   lr = peak + (min - peak) * p

megatron-core has no public accessor pairing a model parameter with its fp32 master:
``master_params`` is the one function that reads those optimizer internals, with a clear error
(attribute, megatron-core version) if an upgrade removes one.

Layout-free state (used by gopd_mega.hf.train_state, model_io, the HF export):
``master_weights()`` / ``moments()`` give, per local parameter name, fp32 tensors shaped like the
local (TP/PP) parameter, complete on every DP rank (the distributed optimizer's DP shards are
summed into place); ``load_master_state`` takes the same and re-shards. ``load_master_weight``
sets one parameter (weight and master) at a time: the streaming checkpoint loaders use it so a
bf16 student loaded from an fp32 checkpoint starts from the checkpoint's values in its masters,
not from the bf16-rounded weights.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist

from gopd_mega.config import OptimConfig

MOMENTS = ("exp_avg", "exp_avg_sq")


def lr_at(cfg: OptimConfig, step: int, total_steps: int | None) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or not total_steps:
        return cfg.lr
    p = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    return cfg.lr + (cfg.min_lr - cfg.lr) * p


def _megatron_groups(pg):
    """A copy of the model's ProcessGroupCollection with the groups megatron's DDP/optimizer ask
    for that a dense model without expert/context parallelism does not otherwise need."""
    pg = copy.copy(pg)
    pg.expt_dp = pg.dp  # no expert parameters: their buffers stay empty
    pg.ep = None
    pg.tp_ep_pp = pg.mp
    pg.intra_dist_opt = dist.group.WORLD  # a model spans the world (gopd_mega.parallel)
    return pg


class _ExternalGradReady(torch.autograd.Function):
    """Identity on the loss. Its backward hands ``weight`` a placeholder gradient with
    ``weight.grad_added_to_main_grad = True`` (megatron's gradient_accumulation_fusion protocol):
    DDP's hook for the weight then runs (marking it ready for the overlapped bucket reduce) and
    adds nothing, because the kernel already wrote dW into main_grad."""

    @staticmethod
    def forward(ctx, loss, weight):
        ctx.weight = weight
        weight.grad_added_to_main_grad = True
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, g):
        w = ctx.weight
        return g, torch.empty(w.shape, dtype=w.dtype, device=w.device)


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron's ``local_multi_tensor_l2_norm`` (the total L2 norm of the tensors, as a
    1-element fp32 tensor) with one ``torch._foreach_norm`` instead of a Python loop and a host
    round trip per tensor."""
    tensors = [t for group in tensor_lists for t in group]
    if not tensors:  # (megatron never calls it so, but its own fallback answers this on the device)
        from gopd_mega.platform import device

        return torch.zeros(1, dtype=torch.float32, device=device()), None
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """megatron's ``local_multi_tensor_scale`` (dst = src * scale) with foreach kernels."""
    src, dst = tensor_lists
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def use_foreach_fallbacks() -> None:
    """Where megatron-core found neither Transformer Engine nor Apex (always on CPU, and on GPU
    machines without them), its gradient norm, clipping and master copies fall back to Python
    loops over the tensors (megatron.core.utils.local_multi_tensor_*). Replace those fallbacks,
    and only those, with torch's foreach kernels: the same arithmetic (one norm per tensor, then
    the norm of the norms; one multiply per element). Idempotent."""
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptimizer

    for module in (clip_grads, moptimizer):
        if getattr(module, "multi_tensor_applier", None) is mutils.local_multi_tensor_applier:
            if getattr(module, "l2_norm_impl", None) is mutils.local_multi_tensor_l2_norm:
                module.l2_norm_impl = _foreach_l2_norm
            if module.multi_tensor_scale_impl is mutils.local_multi_tensor_scale:
                module.multi_tensor_scale_impl = _foreach_scale


def _fuse_torch_adam(opt) -> bool:
    """When megatron built torch's own Adam/AdamW (no Transformer Engine / Apex), switch it to
    torch's fused kernel (one pass per tensor instead of ~8; ~6x cheaper on CPU for a 135M model).
    torch reads ``fused`` from the param group at every step; its fused kernels cover CPU and CUDA
    float tensors. Returns whether it did."""
    inner = getattr(opt, "optimizer", None)
    if inner is None or type(inner) not in (torch.optim.AdamW, torch.optim.Adam):  # exactly these, no subclass
        return False
    params = [p for g in inner.param_groups for p in g["params"]]
    if not params or any(p.device.type not in ("cpu", "cuda") or not p.is_floating_point() for p in params):
        return False
    if len({p.device for p in params}) != 1:
        return False
    for group in inner.param_groups:
        group["fused"], group["foreach"] = True, False
    inner.defaults["fused"], inner.defaults["foreach"] = True, False
    return True


class StudentOptimizer:
    """megatron DDP + megatron optimizer over one ShardedGPT, and the LR schedule.

    ``step()`` (called by ShardedGPT.train_step) reduces the gradients, applies AdamW at the
    current LR and then advances the schedule by one update (``schedule_step``), whether the
    update was applied or skipped.
    """

    def __init__(self, model, cfg: OptimConfig, total_steps: int | None = None):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.model, self.cfg, self.total_steps = model, cfg, total_steps
        self.schedule_step = 0
        tcfg = model.tconfig
        self.pg = _megatron_groups(model.groups.pg)
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=cfg.overlap_grad_reduce,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        )
        self.ddp = DistributedDataParallel(tcfg, ddp_cfg, model.model, pg_collection=self.pg)
        ocfg = OptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.beta1,
            adam_beta2=cfg.beta2,
            adam_eps=cfg.eps,
            clip_grad=cfg.grad_clip,
            bf16=tcfg.bf16,
            fp16=tcfg.fp16,
            params_dtype=tcfg.params_dtype,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
            loss_scale=cfg.loss_scale or None,
            initial_loss_scale=cfg.initial_loss_scale,
        )
        # config_overrides={} decays every parameter (torch AdamW, the paper's runs); None is megatron's
        # standard rule (no decay on biases and 1-D weights).
        overrides: dict | None = {} if cfg.decay_all_params else None
        chained = get_megatron_optimizer(
            ocfg, [self.ddp], config_overrides=overrides, use_gloo_process_groups=False, pg_collection=self.pg
        )
        parts = getattr(chained, "chained_optimizers", [chained])
        if len(parts) != 1:
            raise RuntimeError(f"{model.name}: expected one megatron optimizer for a dense model, got {len(parts)}")
        self.opt = parts[0]
        use_foreach_fallbacks()
        self.fused = _fuse_torch_adam(self.opt)
        """True when the Adam update is torch's fused kernel (megatron chose torch's AdamW)."""
        self.scaler = getattr(self.opt, "grad_scaler", None)
        if self.scaler is not None:  # fp16: the schedules scale each micro-batch's loss
            tcfg.grad_scale_func = self.opt.scale_loss
        if cfg.overlap_grad_reduce:
            tcfg.no_sync_func = self.ddp.no_sync
            tcfg.grad_sync_func = self.ddp.start_grad_sync
        self._names = {p: n for n, p in model.model.named_parameters()}
        self._by_name: dict[str, tuple[torch.Tensor, list[tuple[torch.Tensor, int]]]] | None = (
            None  # built on first use by _slot_index (masters never change identity)
        )

    # ------------------------------------------------------------------ schedule

    @property
    def lr(self) -> float:
        """The learning rate the next ``step()`` uses."""
        return lr_at(self.cfg, self.schedule_step, self.total_steps)

    # ------------------------------------------------------------------ gradients and step

    def zero_grad(self) -> None:
        """Zero the fp32 gradient buffers (and forget any .grad)."""
        self.ddp.zero_grad_buffer()
        self.opt.zero_grad()

    def output_grad_acc(self, weight: torch.nn.Parameter) -> torch.Tensor | None:
        """fp32 buffer for the fused kernel's ``grad_weight_acc``: the output weight's main_grad
        (the same tensor as the embedding's when they are tied on this stage, where autograd adds
        the embedding gradient through DDP's hook: the kernel adds no autograd gradient, so
        nothing is counted twice). None with fp16 loss scaling: the kernel needs loss gradient 1,
        so its dW then goes through autograd and the hook like every other gradient."""
        if self.scaler is not None:
            return None
        return weight.main_grad  # type: ignore[attr-defined]  # megatron DDP adds main_grad to every param

    def mark_output_grad(self, loss: torch.Tensor, weight: torch.nn.Parameter) -> torch.Tensor:
        """With overlap_grad_reduce, make DDP's hook for an output weight whose dW the kernel
        wrote into main_grad run in backward (see _ExternalGradReady). Not applied where the
        weight is also this stage's input embedding: its own gradient runs the hook already, and
        a placeholder gradient would be summed into it."""
        if not self.cfg.overlap_grad_reduce or self.scaler is not None:
            return loss
        emb = getattr(getattr(self.model.model, "embedding", None), "word_embeddings", None)
        if emb is not None and emb.weight is weight:
            return loss
        return _ExternalGradReady.apply(loss, weight)

    def step(self, loss: float | None = None) -> dict[str, float]:
        """Reduce the gradients, clip to cfg.grad_clip by the global norm and apply AdamW at the
        LR of the current schedule position (skipped on a non-finite ``loss`` or norm, or an fp16
        overflow), then advance the schedule by one update, applied or skipped. Returns grad_norm
        (before clipping), lr (the one this update used), skipped, and overflow (1: the skip was
        the fp16 loss scaler's)."""
        stats = self._update(loss)
        self.schedule_step += 1
        return stats

    def _update(self, loss: float | None) -> dict[str, float]:
        """step() less the schedule advance."""
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([self.ddp], num_tokens=None, pg_collection=self.pg)
        lr = self.lr
        for group in self.opt.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.cfg.weight_decay * group.get("wd_mult", 1.0)
        if self.opt.prepare_grads():  # fp16 overflow: megatron already lowered the loss scale
            return {"grad_norm": float("inf"), "lr": lr, "skipped": 1.0, "overflow": 1.0}
        if self.cfg.grad_clip > 0:
            norm = float(self.opt.clip_grad_norm(self.cfg.grad_clip))
        else:
            norm = float(self.opt.get_grad_norm())
        finite = math.isfinite(norm) and (loss is None or math.isfinite(loss))
        if finite:
            self.opt.step_with_ready_grads()
        return {"grad_norm": norm, "lr": lr, "skipped": float(not finite), "overflow": 0.0}

    # ------------------------------------------------------------------ master weights and state

    def _slots(self):
        """(local name, model param, master tensor, flat offset) for every master tensor on this
        rank: the master holds elements [offset, offset + master.numel()) of the flattened
        param (all of it, except with the distributed optimizer's DP shards)."""
        return [(self._names[model_p], model_p, main, offset) for model_p, main, offset in master_params(self.opt)]

    def _complete(self, parts: dict[str, list[tuple[int, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        """{name: [(offset, flat values)]} -> {name: fp32 tensor shaped like the param}, summed
        over DP when the optimizer is sharded (each element is held by exactly one DP rank)."""
        params = dict(self.model.model.named_parameters())
        out = {}
        for name, p in params.items():
            full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            for offset, flat in parts.get(name, []):
                full[offset : offset + flat.numel()] = flat
            out[name] = full
        if self.cfg.use_distributed_optimizer and self.model.groups.dp > 1:
            names = list(out)
            flat = torch._utils._flatten_dense_tensors([out[n] for n in names])
            dist.all_reduce(flat, group=self.model.groups.pg.dp)
            out = dict(zip(names, torch._utils._unflatten_dense_tensors(flat, [out[n] for n in names])))
        return {n: out[n].view(params[n].shape).clone() for n in params}

    @torch.no_grad()
    def master_weights(self) -> dict[str, torch.Tensor]:
        """{local param name: fp32 master weights shaped like the param} (collective over DP
        with the distributed optimizer)."""
        parts: dict[str, list] = {}
        for name, _, main, offset in self._slots():
            parts.setdefault(name, []).append((offset, main.detach().float().reshape(-1)))
        return self._complete(parts)

    @torch.no_grad()
    def moments(self) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
        """({moment: {local param name: fp32 tensor shaped like the param}}, Adam step); the
        moments are zero and the step 0 before the first update."""
        state = self.opt.optimizer.state
        out, step = {}, 0.0
        for moment in MOMENTS:
            parts: dict[str, list] = {}
            for name, _, main, offset in self._slots():
                st = state.get(main, {})
                if moment in st:
                    parts.setdefault(name, []).append((offset, st[moment].detach().float().reshape(-1)))
                    step = float(st["step"])
            out[moment] = self._complete(parts)
        if self.cfg.use_distributed_optimizer and self.model.groups.dp > 1:
            t = torch.tensor([step], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.model.groups.pg.dp)
            step = float(t)
        return out, step

    @torch.no_grad()
    def load_master_state(
        self,
        weights: dict[str, torch.Tensor],
        moments: dict[str, dict[str, torch.Tensor]] | None = None,
        step: float = 0.0,
    ) -> None:
        """Set masters AND model weights from ``weights`` ({local name: full local tensor}, any
        float dtype; fp32 keeps full precision). With ``moments``: also the Adam moments and
        step (``step == 0``: no Adam state, as before a first update); without: the Adam state
        is left as it is."""
        params = dict(self.model.model.named_parameters())
        missing = sorted(set(params) - set(weights))
        if missing:
            raise KeyError(f"{self.model.name}: master state lacks {missing[:5]}")
        for name, p in params.items():  # every shape checked before anything is written
            if tuple(weights[name].shape) != tuple(p.shape):
                raise ValueError(
                    f"{self.model.name}: master weight {name} has shape "
                    f"{tuple(weights[name].shape)}, the parameter {tuple(p.shape)}"
                )
        for name in params:
            self.load_master_weight(name, weights[name])
        if moments is None:
            return
        state = self.opt.optimizer.state
        for name, _, main, offset in self._slots():
            n = main.numel()
            if step > 0:  # torch keeps the step on the param's device for its fused kernel, else on the CPU
                st = {
                    "step": torch.tensor(float(step), dtype=torch.float32, device=main.device if self.fused else "cpu")
                }
                for m in MOMENTS:
                    st[m] = (
                        moments[m][name]
                        .to(main.device, torch.float32)
                        .reshape(-1)[offset : offset + n]
                        .view(main.shape)
                        .clone()
                    )
                state[main] = st
            elif main in state:
                del state[main]

    @torch.no_grad()
    def load_master_weight(self, name: str, weight: torch.Tensor) -> None:
        """Set ONE parameter from ``weight`` (its full local tensor on this rank, any float
        dtype): the model weight gets ``weight`` rounded to its dtype, the fp32 master (this
        rank's part of it with the distributed optimizer) gets ``weight`` itself, so an fp32
        checkpoint keeps every bit in the master. Streaming loaders call this per tensor; the
        Adam state is left as it is. Local, no collective."""
        entry = self._slot_index().get(name)
        if entry is None:
            raise KeyError(f"{self.model.name}: no parameter named {name!r}")
        p, mains = entry
        if tuple(weight.shape) != tuple(p.shape):
            raise ValueError(
                f"{self.model.name}: master weight {name} has shape "
                f"{tuple(weight.shape)}, the parameter {tuple(p.shape)}"
            )
        p.data.copy_(weight.to(p.device, p.dtype))
        for main, offset in mains:
            n = main.numel()
            main.copy_(weight.to(main.device, torch.float32).reshape(-1)[offset : offset + n].view(main.shape))

    def _slot_index(self) -> dict[str, tuple[torch.Tensor, list[tuple[torch.Tensor, int]]]]:
        """{local name: (model param, [(master tensor, flat offset)])}; the list is empty for a
        param of which this rank holds no master elements (distributed optimizer)."""
        if self._by_name is None:
            index: dict[str, tuple[torch.Tensor, list[tuple[torch.Tensor, int]]]] = {
                n: (p, []) for n, p in self.model.model.named_parameters()
            }
            for name, _, main, offset in self._slots():
                index[name][1].append((main, offset))
            self._by_name = index
        return self._by_name

    def state_dict(self) -> dict:
        """Same-layout optimizer state (ShardedGPT.save): masters, moments, step, schedule."""
        moments, step = self.moments()
        sd = {
            "master": self.master_weights(),
            "moments": moments,
            "adam_step": step,
            "schedule_step": self.schedule_step,
        }
        if self.scaler is not None:
            sd["grad_scaler"] = self.scaler.state_dict()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.load_master_state(sd["master"], sd["moments"], sd["adam_step"])
        self.schedule_step = int(sd["schedule_step"])
        if self.scaler is not None and "grad_scaler" in sd:
            self.scaler.load_state_dict(sd["grad_scaler"])


MEGATRON_TESTED = ">=0.16.1,<0.20"
"""The megatron-core releases whose optimizer internals :func:`master_params` was checked
against (pyproject's pin)."""


def megatron_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def _internals(opt, names: tuple[str, ...]) -> list:
    """``opt``'s attributes ``names``: megatron-core optimizer internals that no public API gives
    (below). A missing one raises a RuntimeError naming it, the optimizer class and the
    installed megatron-core version, instead of a bare AttributeError deep in a checkpoint save."""
    missing = [n for n in names if not hasattr(opt, n)]
    if missing:
        raise RuntimeError(
            f"megatron-core {megatron_version()}: {type(opt).__name__} has no attribute {missing[0]!r}, which "
            f"gopd_mega.optim.master_params reads to pair each model parameter with its fp32 master (checked "
            f"against megatron-core {MEGATRON_TESTED}); this megatron-core changed its optimizer internals: "
            "install a release in that range or update master_params"
        )
    return [getattr(opt, n) for n in names]


def master_params(opt) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(model param, fp32 master tensor, flat offset) for every master tensor of the megatron
    optimizer ``opt`` on this rank: the master holds elements [offset, offset + numel) of the
    flattened model param (all of it, except for the distributed optimizer's DP shards).

    The ONE place that reads megatron-core optimizer internals: megatron-core has no public
    accessor for the model-param <-> master pairing (its own checkpoint code reads the same
    attributes: DistributedOptimizer's model_float16_groups / shard_fp32_from_float16_groups /
    shard_float16_groups / model_fp32_groups / shard_fp32_groups, and
    Float16OptimizerWithFloat16Params' float16_groups / fp32_from_float16_groups /
    fp32_from_fp32_groups). Each access goes through :func:`_internals` (a clear error naming the
    attribute and the megatron-core version if one disappears); tests/test_optim_megatron.py
    checks them on real optimizers. FP32Optimizer's masters are its params (public API)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

    if isinstance(opt, DistributedOptimizer):
        model16, main16, shard16, model32, shard32 = _internals(
            opt,
            (
                "model_float16_groups",
                "shard_fp32_from_float16_groups",
                "shard_float16_groups",
                "model_fp32_groups",
                "shard_fp32_groups",
            ),
        )
        pairs = [(m, s, v) for mg, sg, vg in zip(model16, main16, shard16) for m, s, v in zip(mg, sg, vg)]
        pairs += [(m, s, s) for mg, sg in zip(model32, shard32) for m, s in zip(mg, sg)]
        # view: the shard of the model param itself, whose storage offset locates the master's elements
        return [(model_p, main, view.storage_offset() - model_p.storage_offset()) for model_p, main, view in pairs]
    if isinstance(opt, Float16OptimizerWithFloat16Params):
        model16, main16, main32 = _internals(
            opt, ("float16_groups", "fp32_from_float16_groups", "fp32_from_fp32_groups")
        )
        out = [(m, s, 0) for mg, sg in zip(model16, main16) for m, s in zip(mg, sg)]
        return out + [(p, p, 0) for g in main32 for p in g]
    if isinstance(opt, FP32Optimizer):  # the model params are the masters
        return [(p, p, 0) for g in opt.optimizer.param_groups for p in g["params"]]
    raise TypeError(
        f"gopd_mega.optim.master_params: unexpected megatron optimizer {type(opt).__name__} "
        f"(megatron-core {megatron_version()})"
    )


def build_optimizer(model, cfg: OptimConfig, total_steps: int | None = None) -> StudentOptimizer:
    """The optimizer of a trainable ShardedGPT (attached to it: ``model.optimizer``); wraps its
    GPTModel in megatron's DDP. Collective over the world. The masters start as copies of the
    model weights; build it BEFORE loading a checkpoint (``ShardedGPT(..., optim=...)``,
    gopd_mega.run.build_model(optim=...)) so the loaders write the checkpoint's full-precision
    values into them (``load_master_weight``), or load them later with ``load_master_state``."""
    if not model.trainable:
        raise ValueError(f"{model.name}: a frozen model (teacher/reference) gets no optimizer")
    if getattr(model, "optimizer", None) is not None:
        raise ValueError(f"{model.name}: already has an optimizer (megatron's DDP wraps a model once)")
    opt = StudentOptimizer(model, cfg, total_steps)
    model.optimizer = opt
    return opt


@torch.no_grad()
def full_master_state_dict(model) -> dict[str, torch.Tensor]:
    """Canonical full fp32 weights of a ShardedGPT: its optimizer's master weights when it has
    one, else its weights in fp32. Collective (TP/PP gather, DP for the distributed optimizer)."""
    opt = getattr(model, "optimizer", None)
    if opt is None:
        return {k: v.float() for k, v in model.full_state_dict().items()}
    return gather_like_params(model, opt.master_weights())


@torch.no_grad()
def gather_like_params(model, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full canonical tensors of per-parameter tensors ``local`` ({local name: tensor shaped
    like the param}, kept in their own dtype), gathered like the weights by the model's
    ``full_state_dict(tensors=...)`` (collective over TP/PP)."""
    return model.full_state_dict(tensors=local)
