"""AdamW for the student, with a TP/PP-correct global gradient-norm clip and the LR schedule.

Why not megatron's get_megatron_optimizer: its clip (clip_grad_norm_fp32) asserts CUDA tensors and
its mixed-precision/distributed variants refuse CPU tensors, so on CPU it would need more
patches; a plain ``torch.optim.AdamW`` over this rank's local shard is exact in fp32 on both
platforms and its state_dict resumes bit for bit. (On GPUs with bf16 weights a distributed
optimizer with fp32 master weights is the natural next step; the interface below stays.)

Global gradient norm over a model split by TP and PP (after the DP all-reduce, DP replicas hold
identical gradients, so DP is not summed again):

    ||g||^2 = all_reduce_SUM over the model-parallel group (tp x pp) of
              sum over this rank's *counted* parameters of ||g_p||^2

A parameter is counted on exactly one rank of its copies: TP-sharded parameters on every TP rank
(each holds a different slice), TP-replicated ones (norms, q/k norms) only on tp_rank 0, and the
last stage's copy of a tied embedding (PP > 1) not at all. The caller says which parameters count.

LR schedule (step = number of optimizer steps already taken):
    warm-up  lr = peak * (step + 1) / warmup_steps            for step < warmup_steps
    constant lr = peak
    cosine   lr = min + (peak - min) * (1 + cos(pi * p)) / 2,  p = (step - warmup) / (total - warmup)
    linear   lr = peak + (min - peak) * p
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from gopd_mega.config import OptimConfig


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


def global_grad_norm(counted: list[torch.nn.Parameter], mp_group) -> float:
    """sqrt of the sum of squared gradients of the whole model (see module docstring)."""
    sq = torch.zeros((), dtype=torch.float64)
    for p in counted:
        if p.grad is not None:
            sq += p.grad.detach().to(torch.float64).pow(2).sum().cpu()
    if mp_group is not None and dist.get_world_size(mp_group) > 1:
        sq = sq.to(counted[0].device if counted else sq.device)
        dist.all_reduce(sq, group=mp_group)
    return float(sq.sqrt())


class StudentOptimizer:
    """AdamW over this rank's parameters + global-norm clipping + LR schedule.

    ``step()`` (called by ShardedGPT.train_step) clips and applies AdamW at the current LR;
    ``step_schedule()`` (called by the training loop once per update) advances the schedule.
    """

    def __init__(self, params: list[torch.nn.Parameter], counted: list[torch.nn.Parameter],
                 mp_group, cfg: OptimConfig, total_steps: int | None = None):
        self.params, self.counted, self.mp_group, self.cfg = params, counted, mp_group, cfg
        self.total_steps = total_steps
        self.schedule_step = 0
        self.opt = torch.optim.AdamW(params, lr=self.lr, betas=(cfg.beta1, cfg.beta2),
                                     eps=cfg.eps, weight_decay=cfg.weight_decay)

    @property
    def lr(self) -> float:
        """The learning rate the next ``step()`` uses."""
        return lr_at(self.cfg, self.schedule_step, self.total_steps)

    def step_schedule(self) -> None:
        self.schedule_step += 1

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> dict[str, float]:
        """Clip to cfg.grad_clip by the global norm and apply AdamW (skipped on a non-finite
        norm). Returns grad_norm (before clipping), lr and skipped."""
        norm = global_grad_norm(self.counted, self.mp_group)
        lr = self.lr
        for group in self.opt.param_groups:
            group["lr"] = lr
        if math.isfinite(norm):
            if self.cfg.grad_clip > 0 and norm > self.cfg.grad_clip:
                scale = self.cfg.grad_clip / (norm + 1e-6)
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
            self.opt.step()
        return {"grad_norm": norm, "lr": lr, "skipped": float(not math.isfinite(norm))}

    def state_dict(self) -> dict:
        return {"adamw": self.opt.state_dict(), "schedule_step": self.schedule_step}

    def load_state_dict(self, sd: dict) -> None:
        self.opt.load_state_dict(sd["adamw"])
        self.schedule_step = int(sd["schedule_step"])


def build_optimizer(model, cfg: OptimConfig, total_steps: int | None = None) -> StudentOptimizer:
    """The optimizer of a trainable ShardedGPT (attached to it: ``model.optimizer``)."""
    if not model.trainable:
        raise ValueError(f"{model.name}: a frozen model (teacher/reference) gets no optimizer")
    opt = StudentOptimizer(list(model._params.values()), model._counted_params(), model.groups.pg.mp,
                           cfg, total_steps)
    model.optimizer = opt
    return opt
