"""HF <-> megatron conversion at TP=1 on a bare megatron GPTModel (one gloo process).

Tiny random Llama / Qwen2 / Qwen3 models (hidden 64, 4 heads / 2 KV groups, head_dim 16,
vocab 100 -> padded 104), tied and untied. fp32 logits of the converted megatron model must equal
transformers' to ATOL = 1e-4 (measured ~5e-6 on logits of magnitude ~6: the two implementations
only differ in the order of fp32 sums). Export -> reload must give bit-identical tensors.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gopd_mega.hf import CheckpointError, UnsupportedCheckpoint, export_hf, hf_named_tensors, load_hf_checkpoint, model_config_from_hf
from gopd_mega.hf import testing as T

ATOL = 1e-4
FAMILIES = ["llama", "qwen2", "qwen3"]


@pytest.fixture(scope="module", autouse=True)
def megatron_world():
    T.init_single_process()


def _all_tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _convert(directory):
    cfg = model_config_from_hf(directory)
    gpt = T.build_gpt(cfg)
    load_hf_checkpoint(gpt, directory, cfg)
    return cfg, gpt


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_and_export_round_trip(family, tie, tmp_path):
    hf = T.tiny_hf_model(family, tmp_path / "hf", tie=tie)
    cfg, gpt = _convert(tmp_path / "hf")
    assert cfg.qk_layernorm == (family == "qwen3") and cfg.add_qkv_bias == (family == "qwen2")
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = T.megatron_logits(gpt, tokens)
    assert logits.shape[-1] == 104 and torch.all(logits[..., 100:] == 0)  # padded rows are zero
    expected = hf(tokens).logits
    torch.testing.assert_close(logits[..., :100], expected, atol=ATOL, rtol=0)

    out = export_hf(gpt, tmp_path / "export", cfg, source_dir=tmp_path / "hf")
    original, exported = _all_tensors(tmp_path / "hf"), _all_tensors(out)
    assert set(original) == set(exported)
    for name in original:
        assert torch.equal(original[name], exported[name]), name
    assert (out / "model.safetensors.index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(reloaded(tokens).logits, expected, atol=1e-6, rtol=0)
    prompt = tokens[:1, :4]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(reloaded.generate(prompt, **kwargs), hf.generate(prompt, **kwargs))


def test_sharded_checkpoint_and_named_tensors(tmp_path):
    hf = T.tiny_hf_model("qwen3", tmp_path / "seed")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # several files + index
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    cfg, gpt = _convert(tmp_path / "hf")
    tokens = torch.randint(0, 100, (1, 9))
    torch.testing.assert_close(T.megatron_logits(gpt, tokens)[..., :100], hf(tokens).logits, atol=ATOL, rtol=0)
    named = dict(hf_named_tensors(gpt, cfg, dtype=torch.bfloat16))
    original = _all_tensors(tmp_path / "hf")
    assert set(named) == set(original)
    assert all(t.dtype == torch.bfloat16 for t in named.values())
    torch.testing.assert_close(named["model.layers.1.self_attn.k_proj.weight"],
                               original["model.layers.1.self_attn.k_proj.weight"].bfloat16())


# ----------------------------------------------------------------------------- clear errors


@pytest.fixture()
def llama_dir(tmp_path):
    T.tiny_hf_model("llama", tmp_path / "hf")
    return tmp_path / "hf"


def test_missing_tensor_names_it(llama_dir):
    path = llama_dir / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        _convert(llama_dir)


def test_wrong_shape_names_file_and_tensor(llama_dir):
    path = llama_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 60)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*o_proj\.weight.*\[64, 60\].*\[64, 64\]"):
        _convert(llama_dir)


def test_unused_tensor_is_an_error(llama_dir):
    path = llama_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)  # config says no biases
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"not used.*q_proj\.bias"):
        _convert(llama_dir)


def test_corrupt_file_names_it(llama_dir):
    path = llama_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*corrupt"):
        _convert(llama_dir)


def test_unsupported_config_names_field(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedCheckpoint, match="rope_parameters.rope_type"):
        model_config_from_hf(llama_dir)
    cfg["model_type"] = "qwen3_moe"
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedCheckpoint, match="model_type"):
        model_config_from_hf(llama_dir)


def test_failed_export_leaves_no_checkpoint(llama_dir, tmp_path, monkeypatch):
    cfg, gpt = _convert(llama_dir)
    import gopd_mega.hf.convert as convert

    # Fails after the weight shards are on disk, while the tokenizer files are copied.
    def broken_copy(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(convert.shutil, "copy2", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        export_hf(gpt, tmp_path / "out", cfg, source_dir=llama_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    from gopd_mega.hf import write_checkpoint

    good = write_checkpoint(tmp_path / "ckpt", [("a", torch.ones(4))])

    def tensors():
        for i in range(4):
            yield f"t{i}", torch.zeros(256)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_checkpoint(tmp_path / "ckpt", tensors(), shard_bytes=1024)  # shards were flushed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert set(_all_tensors(good)) == {"a"}
