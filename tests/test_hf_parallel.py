"""HF checkpoints loaded into ShardedGPT at TP=2 and PP=2 (2 gloo processes) match transformers.

Every rank streams only its own slices from the HF files. Logits are compared for every prefix
of the token rows (``next_token_logits`` with lengths 1..S); fp32, ATOL = 1e-4 (measured ~5e-6).
``hf_named_tensors`` of the sharded model (gathered through ``full_state_dict``) must give back the
HF tensors exactly, and ``export_hf`` from the sharded model writes a checkpoint (rank 0).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_utils import run_distributed

pytestmark = pytest.mark.distributed

ATOL = 1e-4
CASES = [("llama", False), ("qwen2", True), ("qwen3", False), ("qwen3", True)]


def _prefix_rows(tokens):
    n, s = tokens.shape
    rows = tokens.repeat_interleave(s, dim=0)
    lengths = torch.arange(1, s + 1).repeat(n)
    return rows, lengths


def _worker(root, tokens, cases):
    from gopd_mega.hf import export_hf, hf_named_tensors, load_hf_checkpoint, model_config_from_hf
    from gopd_mega.models import ShardedGPT
    from gopd_mega.parallel import build_layout_groups

    layouts = [(2, 1), (1, 2)]
    groups = build_layout_groups(layouts)
    rows, lengths = _prefix_rows(tokens)
    out = {}
    for family, tie in cases:
        d = Path(root) / f"{family}-{tie}"
        for (tp, pp), g in zip(layouts, groups):
            cfg = model_config_from_hf(d, tp=tp, pp=pp)
            try:
                model = ShardedGPT(cfg, g)
            except Exception as exc:
                raise RuntimeError(f"building ShardedGPT for {family} tie={tie} tp={tp} pp={pp}") from exc
            load_hf_checkpoint(model, d)
            logits = model.next_token_logits(rows, lengths)
            named = dict(hf_named_tensors(model))
            export_hf(model, Path(root) / f"export-{family}-{tie}-{tp}{pp}", source_dir=d)
            out[(family, tie, tp, pp)] = (logits, named)
    return out


def _check_layouts(tmp_path, cases):
    from gopd_mega.hf import testing as T

    tokens = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = {}
    for family, tie in cases:
        hf = T.tiny_hf_model(family, tmp_path / f"{family}-{tie}", tie=tie, num_hidden_layers=4)
        with torch.no_grad():
            expected[(family, tie)] = (hf(tokens).logits.reshape(-1, 100), load_file(str(tmp_path / f"{family}-{tie}" / "model.safetensors")))
    results = run_distributed(_worker, 2, (str(tmp_path), tokens, cases))
    for rank_out in results:
        for (family, tie, tp, pp), (logits, named) in rank_out.items():
            ref_logits, ref_tensors = expected[(family, tie)]
            print(f"{family} tie={tie} tp={tp} pp={pp}: max |logit diff| = {(logits - ref_logits).abs().max():.2e}")
            torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0, msg=f"{family} tie={tie} tp={tp} pp={pp}")
            assert set(named) == set(ref_tensors)
            for name, t in named.items():
                assert torch.equal(t, ref_tensors[name]), (family, tie, tp, pp, name)
    for family, tie in cases:
        for tp, pp in [(2, 1), (1, 2)]:
            exported = load_file(str(next((tmp_path / f"export-{family}-{tie}-{tp}{pp}").glob("model-*.safetensors"))))
            assert set(exported) == set(expected[(family, tie)][1])



@pytest.mark.slow
def test_tp2_and_pp2_match_transformers(tmp_path):
    _check_layouts(tmp_path, CASES)
