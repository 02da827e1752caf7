#!/usr/bin/env bash
# One GPU session's checks, in one call: kernel correctness on the GPU, then the benchmark.
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# Liger and CCE come from wheels in .whl/ when present (the GPU machine cannot reach a registry);
# without them those rows are reported as skipped.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used,memory.total \
    --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/gpu.txt"
echo "== kernel tests on the GPU"
timeout "${TEST_TIMEOUT:-170}" $PY -m pytest -q -p no:cacheprovider -rs -m "not distributed" \
    tests/test_kernels_triton.py tests/test_kernels_logprob.py tests/test_kernels_import.py \
    tests/test_kernels_full_vocab.py \
    2>&1 | tee "$OUT/pytest.log" | tail -25
echo "== benchmark"
timeout "${BENCH_TIMEOUT:-290}" $PY benchmarks/bench_logprob.py --out "$OUT" \
    --time-limit "${BENCH_LIMIT:-200}" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v '^  '
