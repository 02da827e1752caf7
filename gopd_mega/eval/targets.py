"""gopd-eval's oracle rows: the per-token G-OPD target on a benchmark's reference answers.

For every problem with a reference answer (math benchmarks), the response "answer, then eos" after
the (chat-formatted) prompt is scored teacher-forced by the evaluated model, the teacher and the
reference; at each lambda the per-token target q ~ pi_T^lam pi_ref^(1 - lam) (gopd_mega.oracle)
gives its log-probability and the mean log Z_t over its positions. On a task whose whole response
is the answer (the synthetic domains) exp(log q) is the target's expected accuracy; on reasoning
benchmarks, where the answer comes after a derivation, it is the likelihood of the bare answer: a
diagnostic of where the target moves, not an accuracy, and the report says so. The sequence-level
target is not computed here: its response tree is far too large for real vocabularies and lengths.
"""

from __future__ import annotations

import torch

from gopd_mega.eval.harness import encode_prompt
from gopd_mega.oracle import per_token_target

NOTE = (
    "log-probability of the reference answer as the whole response (answer, then eos), teacher-forced: an expected "
    "accuracy only where the response is the bare answer; on reasoning benchmarks a diagnostic. Sequence-level "
    "target: not computed (the response tree is too large)"
)


def answer_batch(records: list[dict], tokenizer, chat_template: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [N, S] = prompt ids (harness.encode_prompt) + answer ids + eos, right-padded;
    loss_mask [N, S] on the answer and eos."""
    seqs, starts = [], []
    for rec in records:
        prompt = encode_prompt(tokenizer, rec["prompt"], chat_template)
        seqs.append(prompt + list(tokenizer.encode(str(rec["answer"]))) + [tokenizer.eos_id])
        starts.append(len(prompt))
    tokens = torch.full((len(seqs), max(map(len, seqs))), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        tokens[i, : len(seq)] = torch.tensor(seq)
        mask[i, start : len(seq)] = True
    return tokens, mask


def answer_targets(
    model,
    teacher,
    reference,
    tokenizer,
    records: list[dict],
    lambdas: list[float],
    *,
    temperature: float,
    chat_template: bool,
) -> dict:
    """``{"model": {"log_prob": ..., "probability": ...}, "targets": {f"{lam:g}": {"log_prob", "probability",
    "mean_log_z"}}, "problems": N}``: means over problems of the evaluated model's and each
    per-token target's log-probability (and probability) of the reference answer."""
    tokens, mask = answer_batch(records, tokenizer, chat_template)
    own = (model.logprobs(tokens, mask, temperature).double() * mask).sum(1)
    tgt = per_token_target(teacher, reference, tokens, mask, lambdas, temperature)

    def stats(log_prob: torch.Tensor) -> dict:
        return {"log_prob": float(log_prob.mean()), "probability": float(log_prob.exp().mean())}

    return {
        "model": stats(own),
        "problems": len(records),
        "targets": {
            f"{lam:g}": {**stats(tgt.log_prob[lam]), "mean_log_z": float(tgt.mean_log_z[lam].mean())} for lam in lambdas
        },
    }


def markdown(rows: dict[str, dict]) -> str:
    """One table: per benchmark, the model's and each lambda's target answer log-probability and log Z."""
    if not rows:
        return ""
    lams = list(next(iter(rows.values()))["targets"])
    head = ["benchmark", "problems", "model log p(answer)"] + [f"target lam {x}: log q (mean log Z_t)" for x in lams]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name, str(r["problems"]), f"{r['model']['log_prob']:.3f}"] + [
            f"{r['targets'][x]['log_prob']:.3f} ({r['targets'][x]['mean_log_z']:.3f})" for x in lams
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nPer-token G-OPD targets ({NOTE}).\n"
