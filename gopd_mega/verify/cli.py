"""``gopd-verify``: judge one answer or one program from the command line, print one JSON object.

    gopd-verify math GOLD ANSWER            e.g.  gopd-verify math '\\frac12' 'so \\boxed{0.5}'
    gopd-verify code PROGRAM.py TESTS.json  TESTS.json: [{"stdin": ..., "expected_stdout": ...}, ...]
                                            (function-call and assertion tests also accepted)

The object has "passed": true|false plus details (math: extracted/parsed answers; code: per-test
status, time-outs and the resource limit hit). Exit status 0 when passed, 1 when not, 2 for bad
input. Code runs only inside the sandbox (gopd_mega.verify.sandbox); where isolation is impossible
the command refuses unless --no-isolation is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gopd_mega.verify.math import MathVerifier
from gopd_mega.verify.sandbox import IsolationUnavailable, SandboxLimits, check_tests, run_tests


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gopd-verify", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="kind", required=True)
    m = sub.add_parser("math", help="grade ANSWER (last \\boxed{} or the whole text) against GOLD with math-verify")
    m.add_argument("gold")
    m.add_argument("answer")
    m.add_argument("--timeout-s", type=float, default=10.0, help="grading time limit (default 10)")
    m.add_argument("--require-boxed", action="store_true", help="fail answers without \\boxed{}")
    c = sub.add_parser("code", help="run PROGRAM.py on the tests of TESTS.json in the sandbox")
    c.add_argument("program", type=Path)
    c.add_argument("tests", type=Path)
    d = SandboxLimits()
    c.add_argument("--timeout-s", type=float, default=d.timeout_s, help=f"wall time per test (default {d.timeout_s})")
    c.add_argument("--memory-mb", type=int, default=d.memory_mb, help=f"address-space limit (default {d.memory_mb})")
    c.add_argument(
        "--file-size-mb", type=int, default=d.file_size_mb, help=f"largest file written (default {d.file_size_mb})"
    )
    c.add_argument(
        "--max-processes", type=int, default=d.max_processes, help=f"process limit (default {d.max_processes})"
    )
    c.add_argument(
        "--max-output-bytes", type=int, default=d.max_output_bytes, help=f"output cap (default {d.max_output_bytes})"
    )
    c.add_argument("--stop-on-failure", action="store_true", help="skip the tests after the first failure")
    c.add_argument(
        "--no-isolation",
        action="store_true",
        help="run WITHOUT network/mount/pid namespaces and uid switch (only rlimits, session, temp dir)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.kind == "math":
        v = MathVerifier(timeout_s=args.timeout_s, require_boxed=args.require_boxed)
        try:
            verdict = v.grade(args.gold, args.answer)
        finally:
            v.close()
        out = verdict.to_json()
    else:
        for path in (args.program, args.tests):
            if not path.is_file():
                parser.error(f"{path}: no such file")
        try:
            tests = check_tests(json.loads(args.tests.read_text()), str(args.tests))
        except json.JSONDecodeError as exc:
            parser.error(f"{args.tests}: not valid JSON ({exc})")
        except ValueError as exc:
            parser.error(str(exc))
        limits = SandboxLimits(
            timeout_s=args.timeout_s,
            memory_mb=args.memory_mb,
            file_size_mb=args.file_size_mb,
            max_processes=args.max_processes,
            max_output_bytes=args.max_output_bytes,
            stop_on_failure=args.stop_on_failure,
            isolate=not args.no_isolation,
        )
        try:
            limits.validate()
            result = run_tests(args.program.read_text(), tests, limits)
        except ValueError as exc:
            parser.error(str(exc))
        except IsolationUnavailable as exc:
            print(f"gopd-verify: {exc}", file=sys.stderr)
            sys.exit(2)
        out = result.to_json()
    print(json.dumps(out))
    sys.exit(0 if out["passed"] else 1)


if __name__ == "__main__":
    main()
