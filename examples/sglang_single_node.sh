#!/usr/bin/env bash
# G-OPD with SGLang rollout servers on ONE GPU node (8 GPUs), disaggregated or colocated.
#
#   MODEL=/path/to/student_hf bash examples/sglang_single_node.sh RECIPE.yaml [section.field=value ...]
#   MODE=colocated MODEL=/path/to/student_hf bash examples/sglang_single_node.sh RECIPE.yaml
#
# disaggregated (default): the trainer runs on TRAIN_GPUS, the SGLang servers on SERVER_GPUS
#   (one server per SERVER_TP GPUs). Weight sync: WEIGHT_SYNC=disk (default) or nccl.
# colocated: servers and trainer share ALL GPUs; the servers start with --enable-memory-saver and
#   a small --mem-fraction-static, and give their memory back during each training phase
#   (rollout.colocate=true). Weight sync: WEIGHT_SYNC=disk (default) or ipc.
# The servers start from MODEL (the student's HF folder, as student.load); the trainer pushes its
# own weights (version 0) before the first step anyway. Logs: LOG_DIR/sglang_<i>.log.
# SGLANG_SERVER is the server command (default: python -m sglang.launch_server, SGLang 0.5.9 to
# 0.5.23); the tests run this script on a CPU with SGLANG_SERVER="python tests/sglang_standin.py",
# a stand-in that takes the same arguments.
set -euo pipefail
RECIPE=${1:?usage: MODEL=... $0 RECIPE.yaml [overrides...]}
shift
MODE=${MODE:-disaggregated}              # disaggregated | colocated
MODEL=${MODEL:?set MODEL to the student HF folder the servers start from}
SERVER_TP=${SERVER_TP:-1}                # GPUs per SGLang server (its --tp-size)
BASE_PORT=${BASE_PORT:-30000}            # server i listens on BASE_PORT + i
WEIGHT_SYNC=${WEIGHT_SYNC:-disk}         # disk | nccl | ipc
MEM_FRACTION=${MEM_FRACTION:-0.35}       # colocated: GPU memory share of each server
LOG_DIR=${LOG_DIR:-sglang_logs}
read -r -a sglang_server <<< "${SGLANG_SERVER:-python -m sglang.launch_server}"
case "$MODE" in
  disaggregated) TRAIN_GPUS=${TRAIN_GPUS:-0,1,2,3}; SERVER_GPUS=${SERVER_GPUS:-4,5,6,7} ;;
  colocated)     TRAIN_GPUS=${TRAIN_GPUS:-0,1,2,3,4,5,6,7}; SERVER_GPUS=${SERVER_GPUS:-$TRAIN_GPUS} ;;
  *) echo "MODE must be disaggregated or colocated, got '$MODE'" >&2; exit 2 ;;
esac
mkdir -p "$LOG_DIR"
IFS=, read -r -a server_gpus <<< "$SERVER_GPUS"
IFS=, read -r -a train_gpus <<< "$TRAIN_GPUS"
if (( ${#server_gpus[@]} % SERVER_TP )); then
  echo "SERVER_TP=$SERVER_TP does not divide the ${#server_gpus[@]} GPUs of SERVER_GPUS=$SERVER_GPUS" >&2; exit 2
fi
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
urls=()
extra=()
[ "$MODE" = colocated ] && extra=(--enable-memory-saver --mem-fraction-static "$MEM_FRACTION")
for ((i = 0; i < ${#server_gpus[@]} / SERVER_TP; i++)); do
  gpus=$(IFS=,; echo "${server_gpus[*]:i*SERVER_TP:SERVER_TP}")
  port=$((BASE_PORT + i))
  CUDA_VISIBLE_DEVICES=$gpus "${sglang_server[@]}" --model-path "$MODEL" --tp-size "$SERVER_TP" \
    --host 127.0.0.1 --port "$port" "${extra[@]}" > "$LOG_DIR/sglang_$i.log" 2>&1 &
  pids+=($!)
  urls+=("http://127.0.0.1:$port")
done
for url in "${urls[@]}"; do                # wait until every server answers /health (max 20 min)
  for ((t = 0; t < 240; t++)); do curl -sf "$url/health" > /dev/null && break; sleep 5; done
  curl -sf "$url/health" > /dev/null || { echo "SGLang at $url did not come up; see $LOG_DIR" >&2; exit 1; }
done
url_list="[$(IFS=,; echo "${urls[*]}")]"
coloc=()
[ "$MODE" = colocated ] && coloc=(rollout.colocate=true)
CUDA_VISIBLE_DEVICES=$TRAIN_GPUS torchrun --standalone --nproc-per-node "${#train_gpus[@]}" -m gopd_mega.cli \
  --recipe "$RECIPE" rollout.engine=sglang "rollout.sglang_url=$url_list" rollout.weight_sync="$WEIGHT_SYNC" \
  rollout.server_ranks="$SERVER_TP" "${coloc[@]}" "$@"
