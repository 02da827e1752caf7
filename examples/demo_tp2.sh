#!/usr/bin/env bash
# The demo on 2 CPU processes (gloo) with every model at tensor-parallel size 2.
#   bash examples/demo_tp2.sh                                        # TP=2
#   PARALLEL="model.pp=2 model.num_layers=4" bash examples/demo_tp2.sh  # PP=2 (layers must split evenly)
# Extra arguments are passed on as recipe overrides (section.field=value).
set -euo pipefail
cd "$(dirname "$0")/.."
make setup >/dev/null
PARALLEL=${PARALLEL:-model.tp=2}
exec .venv/bin/torchrun --standalone --nproc-per-node 2 -m gopd_mega.demo \
    --recipe recipes/demo.yaml out_dir=runs/demo_2proc $PARALLEL "$@"
