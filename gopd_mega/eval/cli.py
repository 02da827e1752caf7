"""``gopd-eval``: score a model on local benchmark files (avg@k, pass@k), write JSON + table + plot.

    gopd-eval --model MODEL_DIR --bench aime24=data/aime24.jsonl --bench livecodebench=data/lcb.jsonl \\
              --out eval_out
    gopd-eval --model HF_DIR --engine sglang --sglang-url http://host:30000 --bench humaneval_plus=he.jsonl

MODEL_DIR is a Hugging Face folder or a gopd-mega model folder (then --tokenizer names the HF
folder whose tokenizer it uses, or 'char' for the synthetic character tokenizer). Benchmarks are
``NAME=PATH``; names aime24, aime25, hmmt25, math500, humaneval_plus, mbpp_plus and livecodebench
know their format, any other name needs ``--format NAME=math|evalplus|livecodebench``. Sampling
follows the paper: temperature 1.0, top-p 1.0, 32 samples per math problem and 4 per code problem
(--samples-math / --samples-code); --greedy adds greedy decoding. Scores are named as in training
(gopd_mega/eval/metrics.py): avg@k, pass@k, greedy. Generated code runs only in the sandbox (gopd_mega.verify).
Writes OUT/results.json, OUT/results.md and OUT/results.png and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from gopd_mega.eval.benchmarks import DEFAULT_SAMPLES, FORMATS, BenchmarkError, load_benchmark


def _pairs(values: list[str], what: str, parser) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            parser.error(f"{what} must be NAME=VALUE, got {v!r}")
        if name in out:
            parser.error(f"{what}: {name!r} given twice")
        out[name] = rest
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gopd-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="Hugging Face or gopd-mega model folder")
    p.add_argument(
        "--tokenizer", help="HF folder with the tokenizer, or 'char' (default: --model when it is an HF folder)"
    )
    p.add_argument("--bench", action="append", required=True, help="NAME=PATH (repeatable)")
    p.add_argument(
        "--format", action="append", default=[], help=f"NAME=FORMAT for other names; formats: {sorted(FORMATS)}"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--samples-math", type=int, default=DEFAULT_SAMPLES["math"], help="samples per math problem (default 32)"
    )
    p.add_argument(
        "--samples-code", type=int, default=DEFAULT_SAMPLES["code"], help="samples per code problem (default 4)"
    )
    p.add_argument("--pass-k", default="", help="extra pass@k values, comma-separated (pass@1 and pass@n always)")
    p.add_argument(
        "--greedy",
        action="store_true",
        help="also decode each problem greedily: its accuracy is the "
        "score 'greedy' (metric names: gopd_mega/eval/metrics.py)",
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="sequences per engine call")
    p.add_argument("--max-problems", type=int, help="only the first N problems of each benchmark (smoke runs)")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt text as it is")
    p.add_argument("--engine", choices=("embedded", "sglang"), default="embedded")
    p.add_argument("--sglang-url", help="SGLang server base URL (--engine sglang)")
    p.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="embedded engine weights"
    )
    p.add_argument("--math-workers", type=int, default=4, help="math grading processes")
    p.add_argument("--code-workers", type=int, default=4, help="programs run in parallel")
    p.add_argument("--code-timeout-s", type=float, default=6.0, help="wall time per code test")
    p.add_argument(
        "--oracle-teacher",
        help="a teacher's model folder: also report the per-token G-OPD target "
        "(gopd_mega.eval.targets) on each benchmark's reference answers, with --oracle-reference",
    )
    p.add_argument("--oracle-reference", help="the reference's model folder (pi_ref) for --oracle-teacher")
    p.add_argument("--oracle-lambdas", default="1,1.25,1.5", help="reward scales of the targets, comma-separated")
    p.add_argument(
        "--no-isolation",
        action="store_true",
        help="run generated code WITHOUT network/mount/pid namespaces (only rlimits, session, temp dir)",
    )
    return p


def load_tokenizer(model: str, tokenizer: str | None):
    if tokenizer == "char":
        from gopd_mega.data.tokenizer import CharTokenizer

        return CharTokenizer()
    path = tokenizer or model
    if not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ValueError(f"{path}: no Hugging Face tokenizer there; pass --tokenizer HF_DIR (or 'char')")
    from gopd_mega.hf import HFTokenizer

    return HFTokenizer(path)


def build_engine(args, tokenizer):
    """The rollout engine the model is sampled through (embedded: the model loaded in-process)."""
    if args.engine == "sglang":
        if not args.sglang_url:
            raise ValueError("--engine sglang needs --sglang-url")
        from gopd_mega.rollout.sglang import SGLangEngine

        return SGLangEngine(args.sglang_url, pad_id=tokenizer.pad_id, stop_ids=tokenizer.stop_ids)
    from gopd_mega.config import ModelConfig
    from gopd_mega.model_io import build_model
    from gopd_mega.platform import init_distributed
    from gopd_mega.rollout import EmbeddedEngine

    init_distributed()
    model = build_model(ModelConfig(load=args.model, params_dtype=args.dtype), trainable=False, name="evaluated model")
    return EmbeddedEngine(model, pad_id=tokenizer.pad_id, stop_ids=tokenizer.stop_ids)


def _oracle_args(args, parser) -> list[float]:
    """The lambdas of the oracle rows ([] without --oracle-teacher); one-line errors for bad ones."""
    if (args.oracle_teacher is None) != (args.oracle_reference is None):
        parser.error("--oracle-teacher and --oracle-reference go together (the target needs both models)")
    if args.oracle_teacher is None:
        return []
    for flag, path in (("--oracle-teacher", args.oracle_teacher), ("--oracle-reference", args.oracle_reference)):
        if not Path(path).is_dir():
            parser.error(f"{flag} {path}: no such folder")
    if args.engine != "embedded":
        parser.error("--oracle-teacher scores the answers in this process: use --engine embedded")
    try:
        lams = [float(x) for x in args.oracle_lambdas.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--oracle-lambdas must be comma-separated numbers, got {args.oracle_lambdas!r}")
    if not lams or any(not (lam >= 0 and lam < float("inf")) for lam in lams):
        parser.error(f"--oracle-lambdas: need finite lambdas >= 0, got {args.oracle_lambdas!r}")
    return lams


def oracle_rows(args, engine, tokenizer, loaded, lambdas: list[float]) -> dict[str, dict]:
    """Per benchmark with reference answers, gopd_mega.eval.targets.answer_targets; a benchmark
    without them (code) is named on stdout as not computed."""
    from gopd_mega.config import ModelConfig
    from gopd_mega.eval.targets import answer_targets
    from gopd_mega.model_io import build_model

    teacher = build_model(
        ModelConfig(load=args.oracle_teacher, params_dtype=args.dtype), trainable=False, name="oracle teacher"
    )
    reference = build_model(
        ModelConfig(load=args.oracle_reference, params_dtype=args.dtype), trainable=False, name="oracle reference"
    )
    sizes = {
        "--model": engine.model.cfg.vocab_size,
        "--oracle-teacher": teacher.cfg.vocab_size,
        "--oracle-reference": reference.cfg.vocab_size,
    }
    if len(set(sizes.values())) > 1:
        raise SystemExit(f"gopd-eval: error: the oracle needs one vocabulary, got vocab_size {sizes}")
    rows = {}
    for bench in loaded:
        if not all("answer" in r for r in bench.records):
            print(f"{bench.name}: oracle not computed (no reference answer per problem)", flush=True)
            continue
        rows[bench.name] = answer_targets(
            engine.model,
            teacher,
            reference,
            tokenizer,
            bench.records,
            lambdas,
            temperature=args.temperature,
            chat_template=not args.no_chat_template,
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    benches = _pairs(args.bench, "--bench", parser)
    formats = _pairs(args.format, "--format", parser)
    try:
        pass_ks = [int(k) for k in args.pass_k.split(",") if k.strip()]
    except ValueError:
        parser.error(f"--pass-k must be comma-separated integers, got {args.pass_k!r}")
    if not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: no such folder")
    oracle_lambdas = _oracle_args(args, parser)
    from gopd_mega.verify.code import CodeVerifier
    from gopd_mega.verify.math import MathVerifier
    from gopd_mega.verify.sandbox import IsolationUnavailable, SandboxLimits, require_isolation

    math_verifier = MathVerifier(workers=args.math_workers)
    code_verifier = CodeVerifier(
        limits=SandboxLimits(timeout_s=args.code_timeout_s, stop_on_failure=True, isolate=not args.no_isolation),
        workers=args.code_workers,
    )
    try:
        loaded = []
        for name, path in benches.items():
            fmt = formats.get(name)
            bench = load_benchmark(name, path, fmt)
            bench.verifier = math_verifier if bench.kind == "math" else code_verifier
            if args.max_problems:
                bench.records = bench.records[: args.max_problems]
            loaded.append(bench)
        if any(b.kind == "code" for b in loaded) and not args.no_isolation:
            require_isolation()  # refuse before spending time on sampling
        tokenizer = load_tokenizer(args.model, args.tokenizer)
    except (BenchmarkError, ValueError, IsolationUnavailable) as exc:
        parser.error(str(exc))
    # torch-heavy imports only now: argument and file errors above come back quickly
    from gopd_mega.eval.harness import SamplingSettings, evaluate_benchmark
    from gopd_mega.eval.report import markdown_table, write_report

    engine = build_engine(args, tokenizer)
    results = []
    try:
        for bench in loaded:
            samples = args.samples_math if bench.kind == "math" else args.samples_code
            settings = SamplingSettings(
                samples=samples,
                temperature=args.temperature,
                top_p=args.top_p,
                max_new_tokens=args.max_new_tokens,
                seed=args.seed,
                batch_size=args.batch_size,
                chat_template=not args.no_chat_template,
            )
            res = evaluate_benchmark(engine, tokenizer, bench, settings, pass_ks)
            if args.greedy:  # one greedy response per problem, after the samples (their seeds unchanged)
                greedy = evaluate_benchmark(
                    engine, tokenizer, bench, dataclasses.replace(settings, samples=1, greedy=True)
                )
                res.scores = {"greedy": greedy.scores["avg@1"], **res.scores}
            results.append(res)
            print(f"{bench.name}: " + ", ".join(f"{k}={100 * v:.1f}" for k, v in res.scores.items()), flush=True)
        oracle = oracle_rows(args, engine, tokenizer, loaded, oracle_lambdas) if oracle_lambdas else {}
    finally:
        engine.close()
        math_verifier.close()
    extra = {"model": args.model, "engine": args.engine, "benchmarks_files": benches}
    if oracle_lambdas:
        from gopd_mega.eval.targets import NOTE, markdown

        extra["oracle"] = {
            "teacher": args.oracle_teacher,
            "reference": args.oracle_reference,
            "note": NOTE,
            "benchmarks": oracle,
        }
    paths = write_report(results, args.out, title=f"gopd-eval: {args.model}", extra=extra)
    sys.stdout.write(markdown_table(results, title=f"gopd-eval: {args.model}"))
    if oracle_lambdas:
        table = markdown(oracle)
        with open(paths["markdown"], "a") as fh:
            fh.write("\n" + table)
        sys.stdout.write("\n" + table)


if __name__ == "__main__":
    main()
