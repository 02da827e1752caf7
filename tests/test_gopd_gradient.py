"""The student's G-OPD gradient through megatron + the fused kernel equals plain autograd through
full [N, S, V] logits and gopd_mega.objective (the one definition of the math)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gopd_mega.objective import gopd_token_loss, token_weights
from gopd_mega.optim import build_optimizer
from gopd_mega.model_io import build_model
from gopd_mega.run import build_models
from gopd_mega.trainer import gopd_loss_builder
from helpers import TOK, run_cfg, save_random_model


@pytest.mark.parametrize("lam", [1.0, 1.25])
def test_train_step_gradient_equals_full_logits_autograd(tmp_path, lam):
    dirs = {"student": save_random_model(tmp_path / "s", 11, init_std=0.1),
            "add": save_random_model(tmp_path / "a", 12, init_std=0.3),
            "mul": save_random_model(tmp_path / "m", 13, init_std=0.3)}
    cfg = run_cfg(dirs, tmp_path / "run", 1, **{"objective.lam": lam, "optim.grad_clip": 0.0})
    models = build_models(cfg, TOK)
    prompts = [[TOK.bos_id] + TOK.encode(p) for p in ("12+34=", "5*6=", "70+8=", "9*19=", "3+3=")]
    batch = models.engine.generate(prompts, temperature=1.0, max_new_tokens=6, seed=3)
    teacher = models.teachers["add"].logprobs(batch.tokens, batch.loss_mask, 1.0)
    # a reference different from the student, so lambda != 1 exercises it
    ref = models.teachers["mul"].logprobs(batch.tokens, batch.loss_mask, 1.0)
    weights = token_weights(batch.loss_mask, "seq-mean-token-mean")
    settings = cfg.objective  # an ObjectiveConfig is a LossSettings

    student = build_model(dataclasses.replace(cfg.student), trainable=True, name="student")
    build_optimizer(student, dataclasses.replace(cfg.optim, lr=1e-30))  # keeps the grads; no update
    out = student.train_step(batch.tokens, batch.loss_mask,
                             gopd_loss_builder(teacher, ref, batch.sampler_logp, weights, settings), 2)
    # megatron's DDP keeps the reduced fp32 gradient in main_grad (the kernel writes the output
    # layer's dW there directly); the plain-autograd reference below lands there too, through
    # DDP's gradient hooks, once the buffers are zeroed.
    fused = {n: p.main_grad.clone() for n, p in student._params.items()}
    student.optimizer.zero_grad()
    N, S = batch.tokens.shape
    hidden = student.model(input_ids=batch.tokens, position_ids=torch.arange(S)[None].expand(N, S), attention_mask=None)
    logits = (hidden.transpose(0, 1).double() @ student._output_weight().double().t())[:, :, :TOK.vocab_size]
    logp_all = torch.log_softmax(logits, -1)
    logp = torch.zeros(N, S, dtype=torch.float64)
    logp[:, 1:] = logp_all[:, :-1].gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)
    logp = logp * batch.loss_mask
    loss_tok, _, _ = gopd_token_loss(logp, teacher_logp=teacher.double(), ref_logp=ref.double(),
                                     sampler_logp=batch.sampler_logp.double(), old_logp=None, settings=settings)
    loss = (weights.double() * loss_tok).sum()
    loss.backward()
    assert out["loss"] == pytest.approx(float(loss), rel=1e-5)
    # fp32 pipeline vs fp64 logits: relative error of fp32 accumulation (measured ~5e-7)
    for name, p in student._params.items():
        ref_grad = p.main_grad.double()
        err = (fused[name].double() - ref_grad).norm() / ref_grad.norm().clamp(min=1e-30)
        assert err < 1e-4, (name, float(err))
