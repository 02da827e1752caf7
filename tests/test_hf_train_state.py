"""Layout-free training state: save at DP=2 (TP=1), resume at TP=2 (DP=1), at PP=2 and at DP=2
with the distributed optimizer, on 2 gloo processes. Master weights, Adam moments, Adam step and
schedule step must come back exactly, and the next update from the resumed state must equal the
update of the original run."""

import pytest
import torch

from dist_utils import run_distributed

pytestmark = pytest.mark.distributed


def _cfg(tp, pp):
    from gopd_mega.config import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
                       vocab_size=50, max_seq_len=16, qk_layernorm=True, tie_embeddings=False, tp=tp, pp=pp)


def _fake_grads(model, seed):
    """Deterministic canonical 'gradients' sharded onto this rank (same on every DP replica)."""
    g = torch.Generator().manual_seed(seed)
    full = {k: torch.randn(v.shape, generator=g) for k, v in sorted(model.full_state_dict().items())}
    opt = model.optimizer
    opt.zero_grad()
    for info in model.param_layout():
        p = model._params[info.local_name]
        p.main_grad.copy_(model.shard_of(info, full[info.canonical_name]))


def _step(model, opt, seed):
    _fake_grads(model, seed)
    # megatron's optimizer without the DP reduction (the fake gradients are already global) and
    # without clipping: the state is what is under test
    assert not opt.opt.prepare_grads()
    opt.opt.step_with_ready_grads()
    opt.schedule_step += 1  # what StudentOptimizer.step() does after the update


def _worker(root):
    from gopd_mega.config import OptimConfig
    from gopd_mega.hf.train_state import load_train_state, save_train_state
    from gopd_mega.models import ShardedGPT
    from gopd_mega.optim import build_optimizer
    from gopd_mega.parallel import build_layout_groups

    layouts = [(1, 1), (2, 1), (1, 2)]
    groups = build_layout_groups(layouts)
    models = [ShardedGPT(_cfg(tp, pp), g, trainable=True) for (tp, pp), g in zip(layouts, groups)]
    opts = [build_optimizer(m, OptimConfig(lr=1e-2)) for m in models]
    # and DP=2 with megatron's distributed optimizer (masters and moments sharded over DP)
    models.append(ShardedGPT(_cfg(1, 1), groups[0], trainable=True))
    opts.append(build_optimizer(models[-1], OptimConfig(lr=1e-2, use_distributed_optimizer=True)))
    assert type(opts[-1].opt).__name__ == "DistributedOptimizer"
    _step(models[0], opts[0], 1)
    _step(models[0], opts[0], 2)
    save_train_state(models[0], opts[0], f"{root}/state")
    _step(models[0], opts[0], 3)  # the original run's next update
    expected = models[0].full_state_dict()
    out = []
    for model, opt in zip(models[1:], opts[1:]):
        load_train_state(model, opt, f"{root}/state")
        assert opt.schedule_step == 2
        _step(model, opt, 3)
        got = model.full_state_dict()
        out.append(max((got[k] - expected[k]).abs().max().item() for k in expected))
    return out


def test_resume_at_other_dp_tp_pp(tmp_path):
    results = run_distributed(_worker, 2, (str(tmp_path),))
    for diffs in results:
        assert max(diffs) < 1e-6, diffs
    assert (tmp_path / "state").is_dir() and not (tmp_path / "state.tmp").exists()
