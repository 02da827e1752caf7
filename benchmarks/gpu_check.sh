#!/usr/bin/env bash
# One GPU session's figures in one command, sized for <= 8 minutes on one H100/H200, everything
# written to one results file ($OUT/gpu_check.txt, with each part's JSON beside it):
#   1. set-up: megatron-core, Liger and CCE from the wheels in benchmarks/wheels/ (`make gpu-wheels`
#      on a machine with the registry; the device tool carries the folder), installed with --no-deps
#      into a private folder on PYTHONPATH; then an import check of the project
#   2. kernels: benchmarks/bench_logprob.py (ours vs naive torch, chunked, Liger, CCE)
#   3. step: benchmarks/bench_step.py --preset qwen3-0.6b, one same-size teacher, TP=1, lambda 1
#      (tokens/s per GPU, MFU, padding fraction, teacher-scoring share)
#   4. decode: benchmarks/bench_decode.py --model qwen3-0.6b (embedded engine tokens/s, bf16)
#   5. weight sync: benchmarks/bench_weight_sync.py (disk s/GB; NCCL s/GB with two GPUs)
#   6. (GPU_TESTS=1) the kernel tests on the GPU
#
#   OUT=gpu_out bash benchmarks/gpu_check.sh          # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry                # every step that can run on a CPU, tiny shapes
#
# Each part runs under its own timeout; one that fails is reported FAILED with its log tail, and
# the others still run. The summary at the end lists every part as ok / FAILED / NOT RUN (with the
# reason); the exit status is 1 if any part FAILED (NOT RUN alone, e.g. NCCL on one GPU: 0).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
OUT=${OUT:-$([ $DRY = 1 ] && echo bench_out/gpu_check_dry || echo gpu_out)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RESULTS="$OUT/gpu_check.txt"
: > "$RESULTS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
SUMMARY=()
FAILED=0
say() { echo "$@" | tee -a "$RESULTS"; }

# part NAME TIMEOUT_S CMD...: run CMD, append its output to the results file, record the outcome.
part() {
  local name=$1 limit=$2; shift 2
  say ""
  say "== $name: $*"
  local t0=$SECONDS log="$OUT/$name.log"
  if declare -F "$1" > /dev/null; then  # a shell function of this script: no timeout(1) for it
    ( "$@" ) > "$log" 2>&1
  else
    timeout "$limit" "$@" > "$log" 2>&1
  fi
  local rc=$?
  grep -v -e '^\s*$' -e 'it/s\]' "$log" | tail -40 >> "$RESULTS"
  local took=$((SECONDS - t0))
  if [ $rc = 0 ]; then
    SUMMARY+=("ok       $name (${took} s)")
  elif [ $rc = 2 ] && grep -q "NOT RUN" "$log"; then
    SUMMARY+=("NOT RUN  $name: $(grep -m1 -o 'NOT RUN.*' "$log")")
  else
    [ $rc = 124 ] && say "!! $name: TIMED OUT after ${limit} s"
    say "!! $name FAILED (exit $rc); full log: $log"
    tail -15 "$log" | sed 's/^/   | /' | tee -a "$RESULTS" >/dev/null
    SUMMARY+=("FAILED   $name (exit $rc, ${took} s)")
    FAILED=1
  fi
}

say "gpu_check $(date -u +%FT%TZ) dry=$DRY commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if [ $DRY = 0 ]; then
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv 2>&1 | tee -a "$RESULTS"
fi

# -- 1. set-up
SITE="$OUT/site"
setup() {
  local wheels=(benchmarks/wheels/*.whl)
  if [ ! -e "${wheels[0]}" ]; then
    if [ $DRY = 1 ]; then echo "no benchmarks/wheels/ here (make gpu-wheels): the dry run uses this Python's packages"
    else echo "benchmarks/wheels/ is empty: run 'make gpu-wheels' where the registry is reachable"; return 1; fi
  fi
  mkdir -p "$SITE"
  for w in "${wheels[@]}"; do
    [ -e "$w" ] || continue
    if $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$w"; then
      echo "installed $(basename "$w")"
    elif [ $DRY = 1 ]; then
      echo "dry: $(basename "$w") does not install on this Python ($($PY -V)); it is for the GPU machine"
    else
      echo "cannot install $w"; return 1
    fi
  done
  PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" $PY - <<'EOF'
import torch, triton, transformers
import megatron.core, gopd_mega.models, kernels
assert getattr(kernels, "__gopd_mega_kernels__", False), f"'kernels' is not this project's: {kernels.__file__}"
print("torch", torch.__version__, "| triton", triton.__version__, "| transformers", transformers.__version__,
      "| megatron-core", megatron.core.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("liger_kernel", "cut_cross_entropy"):
    try:
        __import__(name)
        print(name, "imports")
    except Exception as exc:  # the kernel benchmark reports those rows as skipped
        print(name, "does not import:", type(exc).__name__, exc)
EOF
}
part setup 60 setup
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# -- 2..5
if [ $DRY = 1 ]; then
  part kernels 300 $PY benchmarks/bench_logprob.py --smoke --out "$OUT/kernels"
  part step 300 $PY benchmarks/bench_step.py --teachers 1 --lam 1.0 --warmup 1 --steps 1 --out "$OUT/step"
  part decode 300 $PY benchmarks/bench_decode.py --model tiny --batch 4 --new 8 --skip-nocache --megatron \
      --json "$OUT/decode.json"
  part weight_sync 300 $PY benchmarks/bench_weight_sync.py --dry --out "$OUT/weight_sync"
else
  part kernels 180 $PY benchmarks/bench_logprob.py --out "$OUT/kernels" --time-limit "${BENCH_LIMIT:-130}"
  part step 150 $PY benchmarks/bench_step.py --preset qwen3-0.6b --teachers 1 --lam 1.0 --warmup 1 --steps 2 \
      --out "$OUT/step"
  part decode 45 $PY benchmarks/bench_decode.py --model qwen3-0.6b --batch 64 --new 256 --skip-nocache \
      --json "$OUT/decode.json"
  part weight_sync 45 $PY benchmarks/bench_weight_sync.py --preset qwen3-0.6b --out "$OUT/weight_sync"
  if [ "${GPU_TESTS:-0}" = 1 ]; then
    part gpu_tests 170 $PY -m pytest -q -p no:cacheprovider -rs -m "not distributed" \
        $(ls tests/test_kernels_triton.py tests/test_kernels_logprob.py tests/test_kernels_import.py \
             tests/test_kernels_full_vocab.py 2>/dev/null)
  fi
fi

say ""
say "== summary ($SECONDS s)"
for s in "${SUMMARY[@]}"; do say "  $s"; done
exit $FAILED
