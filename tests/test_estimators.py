"""objective.estimator = full_vocab / top_k through the trainer's models (CPU, one process):

- the student's loss, per-position outputs and every gradient (megatron main_grad, the output
  layer's dW from the kernel) equal plain autograd through full fp64 logits of all three models,
  with teachers of another hidden size and a reference of its own;
- the hidden states delivered from another layout are exactly the model's own;
- the top-k loss against brute-force enumeration of the coarsened distributions;
- the config refuses what the estimators cannot do, naming the field.

Tolerances: the pipeline runs in fp32 against an fp64 reference over a 44-token vocabulary and
hidden sizes <= 48; measured worst cases: loss 6e-8 relative, per-position outputs 2.3e-6
absolute, gradients 1.2e-6 relative. The bounds (1e-5, 1e-5 + 1e-4 relative, 1e-4) leave
headroom without hiding a wrong term: lam off by 1% or a wrong route fails them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gopd_mega.config import ConfigError
from gopd_mega.model.distill import FullVocabLoss, Projection, TopK, TopKLoss
from gopd_mega.objective import full_vocab_token_loss, tilted_target, token_weights, top_k_token_loss
from gopd_mega.optim import build_optimizer
from gopd_mega.model_io import build_model
from gopd_mega.run import build_models
from helpers import TOK, run_cfg, save_random_model

PROMPTS = ("12+34=", "5*6=", "70+8=", "9*19=", "3+3=")
ROUTES = ["add", "mul", "add", "mul", "add"]
T = 0.8  # temperature != 1 everywhere: a model scored at another temperature changes every number


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("est")
    return {"student": save_random_model(root / "s", 11, init_std=0.1),
            # a teacher of another hidden size, a reference of a third
            "add": save_random_model(root / "a", 12, init_std=0.3, hidden_size=48, ffn_hidden_size=96),
            "mul": save_random_model(root / "m", 13, init_std=0.3),
            "ref": save_random_model(root / "r", 14, init_std=0.2, hidden_size=40, ffn_hidden_size=80)}


def _cfg(dirs, tmp_path, lam, estimator, **extra):
    return run_cfg(dirs, tmp_path / "run", 1, **{"objective.lam": lam, "objective.estimator": estimator,
                                                  "objective.reference": f"{{load: {dirs['ref']}}}",
                                                  "optim.grad_clip": 0.0, "rollout.temperature": T, **extra})


def _log_softmax_fp64(model, tokens: torch.Tensor) -> torch.Tensor:
    """[N, S, V] fp64 log-softmax at T of the next token after every prefix (autograd for the student)."""
    N, S = tokens.shape
    hidden = model.model(input_ids=tokens, position_ids=torch.arange(S)[None].expand(N, S), attention_mask=None)
    logits = (hidden.transpose(0, 1).double() @ model._output_weight().double().t())[:, :, :TOK.vocab_size]
    return torch.log_softmax(logits / T, -1)


def _setup(dirs, tmp_path, lam, estimator):
    cfg = _cfg(dirs, tmp_path, lam, estimator)
    models = build_models(cfg, TOK)
    prompts = [[TOK.bos_id] + TOK.encode(p) for p in PROMPTS]
    batch = models.engine.generate(prompts, temperature=T, max_new_tokens=6, seed=3)
    student = build_model(dataclasses.replace(cfg.student), trainable=True, name="student")
    build_optimizer(student, dataclasses.replace(cfg.optim, lr=1e-30))  # keeps the grads; no update
    weights = token_weights(batch.loss_mask, cfg.objective.aggregation)
    return cfg, models, batch, student, weights


def _reference(models, student, batch, weights, lam, per_position):
    """fp64 autograd of sum_t w_t * per_position(log p, log pi_T, log pi_ref) over the scored
    positions; leaves the gradient in the student's main_grad. Returns (loss, dict of [N, S])."""
    student.optimizer.zero_grad()
    tokens, mask = batch.tokens, batch.loss_mask
    N, S = tokens.shape
    ls = _log_softmax_fp64(student, tokens)
    with torch.no_grad():
        lt = torch.stack([_log_softmax_fp64(models.teachers[r], tokens[i:i + 1])[0] for i, r in enumerate(ROUTES)])
        lr = _log_softmax_fp64(models.reference, tokens)
    # position j - 1 predicts token j
    scored = mask.bool().clone()
    scored[:, 0] = False
    out = {k: torch.zeros(N, S, dtype=torch.float64) for k in ("token_loss", "log_z", "reverse_kl")}
    total = torch.zeros((), dtype=torch.float64)
    for i, j in scored.nonzero().tolist():
        loss, log_z, kl = per_position(ls[i, j - 1], lt[i, j - 1], lr[i, j - 1], tokens[i, j], lam)
        total = total + weights[i, j].double() * loss
        out["token_loss"][i, j], out["log_z"][i, j], out["reverse_kl"][i, j] = loss.detach(), log_z, kl
    total.backward()
    return total, out


def _exact(ls, lt, lr, _token, lam):
    """The full-vocabulary loss of one position: the objective's fp64 reference."""
    loss, log_z = full_vocab_token_loss(ls, lt, lr, lam)
    return loss, log_z, float((ls.exp() * (ls - lt)).sum())


def _compare(out, total, want, student, fused, mask):
    assert out["loss"] == pytest.approx(float(total), rel=1e-5)
    for k in ("token_loss", "log_z", "reverse_kl"):
        torch.testing.assert_close(out[k].double() * mask, want[k], rtol=1e-4, atol=1e-5)
    for name, p in student._params.items():
        ref_grad = p.main_grad.double()
        err = (fused[name].double() - ref_grad).norm() / ref_grad.norm().clamp(min=1e-30)
        assert err < 1e-4, (name, float(err))


@pytest.mark.parametrize("lam", [1.0, 1.25])
def test_full_vocab_step_equals_full_logits_autograd(dirs, tmp_path, lam):
    cfg, models, batch, student, weights = _setup(dirs, tmp_path, lam, "full_vocab")
    assert models.teachers["add"].cfg.hidden_size == 48 and models.reference.cfg.hidden_size == 40
    # the trainer's projections were built against the run's student; this student has its layout
    proj = {n: Projection(m, student, n) for n, m in models.teachers.items()}
    ref = Projection(models.reference, student, "reference")
    route = torch.tensor([list(models.teachers).index(r) for r in ROUTES])
    teachers = [(proj[n].hidden(batch.tokens, batch.loss_mask, (route == k).nonzero().flatten()), proj[n].head)
                for k, n in enumerate(models.teachers)]
    reference = None if lam == 1.0 else (ref.hidden(batch.tokens, batch.loss_mask), ref.head)
    loss = FullVocabLoss(teachers, route, reference, weights, lam, batch.tokens.shape[1])
    out = student.train_step(batch.tokens, batch.loss_mask, loss, 2, temperature=T)
    fused = {n: p.main_grad.clone() for n, p in student._params.items()}
    total, want = _reference(models, student, batch, weights, lam, _exact)
    _compare(out, total, want, student, fused, batch.loss_mask)
    if lam == 1.0:
        assert (want["log_z"].abs() < 1e-12).all()


@pytest.mark.parametrize("lam", [1.0, 1.25])
def test_top_k_step_equals_full_logits_autograd(dirs, tmp_path, lam):
    k = 5
    cfg, models, batch, student, weights = _setup(dirs, tmp_path, lam, "top_k")
    from gopd_mega.trainer import score_teachers_top_k

    top = score_teachers_top_k(models.teachers, batch, ROUTES, k, T, student.cfg.vocab_size)
    if lam != 1.0:
        top.ref_logp = models.reference.logprobs_at(batch.tokens, batch.loss_mask, top.ids, T)
    out = student.train_step(batch.tokens, batch.loss_mask, TopKLoss(top, weights, lam), 2, temperature=T)
    fused = {n: p.main_grad.clone() for n, p in student._params.items()}

    def coarse(ls, lt, lr, token, lam):  # K_t from the fp64 teacher itself, then enumerate
        ids = lt.topk(k).indices
        if token not in ids:
            ids = torch.cat([ids, token[None]])
        loss, log_z = top_k_token_loss(ls[ids], lt[ids], lr[ids], lam)
        kl, _ = top_k_token_loss(ls[ids].detach(), lt[ids], None, 1.0)
        return loss, log_z, float(kl)

    total, want = _reference(models, student, batch, weights, lam, coarse)
    _compare(out, total, want, student, fused, batch.loss_mask)
    # the teacher's ids from the model's vocab-parallel top-k are the fp64 ones
    assert top.mask[batch.loss_mask.bool()][:, :k].all()


def test_top_k_loss_against_enumeration():
    """The coarsened loss by explicit enumeration of K_t and the tail, in fp64; it equals the
    full-vocabulary loss when K_t is the whole vocabulary, and is below it at lam = 1."""
    g = torch.Generator().manual_seed(0)
    V, K = 9, 4
    for lam in (1.0, 1.25, 0.5):
        zs, zt, zr = (torch.randn(V, generator=g, dtype=torch.float64) * 2 for _ in range(3))
        ls, lt, lr = (torch.log_softmax(z, -1) for z in (zs, zt, zr))
        ids = torch.tensor([3, 0, 7, 5])
        rest = torch.tensor([i for i in range(V) if i not in ids.tolist()])
        # enumerate: K outcomes + the tail
        p = torch.cat([ls[ids].exp(), ls[rest].exp().sum()[None]])
        pt = torch.cat([lt[ids].exp(), lt[rest].exp().sum()[None]])
        pr = torch.cat([lr[ids].exp(), lr[rest].exp().sum()[None]])
        gg = lam * pt.log() + (1 - lam) * pr.log()
        want_z = torch.logsumexp(gg, 0)
        want = (p * (p.log() - gg)).sum()
        got, log_z = top_k_token_loss(ls[ids], lt[ids], lr[ids], lam)
        assert float(got) == pytest.approx(float(want), rel=1e-9, abs=1e-12)
        assert float(log_z) == pytest.approx(float(want_z), rel=1e-9, abs=1e-12)
        # a masked entry is as if that id were in the tail
        mask = torch.tensor([True, True, False, True])
        drop = torch.tensor([3, 0, 5])
        rest2 = torch.tensor([i for i in range(V) if i not in drop.tolist()])
        p2 = torch.cat([ls[drop].exp(), ls[rest2].exp().sum()[None]])
        gg2 = lam * torch.cat([lt[drop], lt[rest2].logsumexp(0)[None]]) + (1 - lam) * torch.cat([lr[drop], lr[rest2].logsumexp(0)[None]])
        got2, _ = top_k_token_loss(ls[ids], lt[ids], lr[ids], lam, mask)
        assert float(got2) == pytest.approx(float((p2 * (p2.log() - gg2)).sum()), rel=1e-9, abs=1e-12)
        # K_t = the whole vocabulary: the exact loss (up to the tail floor's 1e-6)
        full, _ = top_k_token_loss(ls, lt, lr, lam)
        log_q, log_z_full = tilted_target(lt, lr, lam)
        exact = (ls.exp() * (ls - log_q - log_z_full)).sum()
        assert float(full) == pytest.approx(float(exact), abs=1e-5)
        if lam == 1.0:
            assert float(got) <= float(exact) + 1e-12
        # gradient w.r.t. the student's selected log-probs: finite differences of the enumeration
        x = ls[ids].clone().requires_grad_(True)
        top_k_token_loss(x, lt[ids], lr[ids], lam)[0].backward()
        assert torch.isfinite(x.grad).all()


def test_top_k_selection_masks_duplicates_and_foreign_ids():
    tokens = torch.tensor([[1, 5, 6, 0]])
    mask = torch.tensor([[0, 1, 1, 0]])
    ids = torch.tensor([[[-1, -1], [5, 9], [50, 7], [-1, -1]]])  # 50: an id the student cannot produce
    logp = torch.tensor([[[0.0, 0.0], [-0.1, -2.0], [-0.5, -1.0], [0.0, 0.0]]])
    top = TopK.from_teacher(tokens, mask, ids, logp, torch.tensor([[0.0, -0.1, -3.0, 0.0]]), vocab_size=44)
    assert top.ids[0, 1].tolist() == [5, 9, 5] and top.mask[0, 1].tolist() == [True, True, False]
    assert top.ids[0, 2].tolist() == [50, 7, 6] and top.mask[0, 2].tolist() == [False, True, True]
    assert not top.mask[0, 0].any() and not top.mask[0, 3].any()
    assert top.teacher_logp[0, 2, 2] == -3.0


def test_estimator_config_is_validated(dirs, tmp_path):
    with pytest.raises(ConfigError, match="'objective.estimator'"):
        _cfg(dirs, tmp_path, 1.0, "exact")
    with pytest.raises(ConfigError, match="'objective.top_k'"):
        _cfg(dirs, tmp_path, 1.0, "top_k", **{"objective.top_k": 0})
    with pytest.raises(ConfigError, match=r"'teachers\[0\].server'.*hidden states"):
        _cfg(dirs, tmp_path, 1.0, "full_vocab", **{"teachers.0.server": "http://127.0.0.1:1"})
    with pytest.raises(ConfigError, match="'objective.reference_server'"):
        _cfg(dirs, tmp_path, 1.25, "top_k", **{"objective.reference_server": "http://127.0.0.1:1",
                                               "rollout.temperature": 1.0})
    with pytest.raises(ConfigError, match="'objective.estimator'.*GRPO"):
        run_cfg(dirs, tmp_path, 1, **{"objective.kind": "grpo", "objective.estimator": "full_vocab", "teachers": "[]",
                                       "rollout.samples_per_prompt": 2})
    served = {"teachers.0.server": "http://127.0.0.1:1", "rollout.temperature": 1.0}  # served models score at T = 1
    assert _cfg(dirs, tmp_path, 1.0, "top_k", **served).objective.estimator == "top_k"
    assert run_cfg(dirs, tmp_path, 1).objective.estimator == "sampled"


@pytest.mark.parametrize("estimator", ["full_vocab", "top_k"])
def test_several_updates_per_rollout(dirs, tmp_path, estimator):
    """train.updates_per_rollout = 2: two mini-batch updates per batch, and the per-position
    outputs of both gathered at every scored position (each from its own update's forward)."""
    from helpers import make_distiller

    cfg = _cfg(dirs, tmp_path, 1.25, estimator, **{"train.updates_per_rollout": 2, "train.steps": 2})
    d = make_distiller(cfg)
    prompts, batch = d.next_rollout()
    out = d.algorithm.update(batch, d.algorithm.score(batch, prompts))
    scored = batch.loss_mask.bool().clone()
    scored[:, 0] = False
    assert len(d.update_stats) == 2
    assert (out["reverse_kl"][scored] > 0).all() and (out["log_z"][scored] != 0).all()
    assert (out["reverse_kl"][~scored] == 0).all()
    metrics = d.train_step()
    assert metrics["updates"] == 2.0 and metrics["reverse_kl"] > 0


def test_full_vocab_teacher_in_another_dtype(dirs, tmp_path):
    """A bf16 teacher beside an fp32 student: its hidden states and head reach the kernel in the
    student's dtype (the Triton path takes one dtype for all three models); the step runs and its
    exact reverse KL matches the fp32 teacher's up to the bf16 rounding of the teacher."""
    from helpers import make_distiller

    def first_kl(extra):
        cfg = _cfg(dirs, tmp_path / str(len(extra)), 1.0, "full_vocab", **{"train.steps": 1, **extra})
        return make_distiller(cfg).fit()[0]["reverse_kl"]

    fp32, bf16 = first_kl({}), first_kl({"teachers.0.model.params_dtype": "bfloat16",
                                        "teachers.1.model.params_dtype": "bfloat16"})
    assert fp32 > 0.1 and bf16 == pytest.approx(fp32, rel=1e-3)  # measured 6e-5
