#!/usr/bin/env bash
# G-OPD on one GPU node (8 GPUs, NCCL), e.g. Qwen3-4B student with math and code teachers.
#   bash examples/gpu_single_node.sh recipes/qwen3_4b_multi_teacher.yaml [section.field=value ...]
# Needs a CUDA build of torch; `pip install -e '.[gpu]'` adds Transformer Engine (fused layers)
# and SGLang (rollout.engine=sglang with rollout.sglang_url of a running server).
# Each model has its own layout: e.g. student.tp=1 (DP=8) beside teachers[0].model.tp=8.
set -euo pipefail
RECIPE=${1:?usage: $0 RECIPE.yaml [overrides...]}
shift
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
exec torchrun --standalone --nproc-per-node "$NPROC" -m gopd_mega.cli --recipe "$RECIPE" "$@"
