#!/usr/bin/env bash
# The GPU figures in bench/RESULTS.md: our engine against the reference qwen-tts on one CUDA GPU, same run.
#   bench/cuda.sh OUT_DIR [CHECKPOINT]
# Without CHECKPOINT it builds the random full-size 0.6B-Base checkpoint (bf16) in /tmp. Each stage has its
# own time limit and writes its log and JSON to OUT_DIR, so one failing stage leaves the others' figures.
# On the lent GPU machine (no registry there) the packages it lacks travel as wheels in .whl/ (see RESULTS).
set -uo pipefail
OUT_DIR=${1:?OUT_DIR}
CKPT=${2:-}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
stage() {   # stage NAME LIMIT_S CMD...: run CMD with a time limit, output to OUT_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date +%T))"
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  echo "== $name exit $? ($(date +%T))"; tail -n 25 "$OUT_DIR/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
if [ -z "$CKPT" ]; then
  CKPT=/tmp/makima-bench/full-0.6b-base-bf16
  stage checkpoint 200 $PY -m makima_tts.testing.checkpoints "$CKPT" --full --dtype bfloat16
fi
# one stream, ours (bf16, the CUDA default) against the reference (bf16, sdpa), then 8 batched streams
stage engine 240 $PY -m bench.engine --checkpoint "$CKPT" --device cuda --dtype bfloat16 --frames 60 \
  --threads 4 --batch 8
# streams per GPU: batched streams starting at once
stage batch 240 $PY -m bench.batch --checkpoint "$CKPT" --device cuda --threads 4 --modes batched \
  --streams "${STREAMS:-1,8,32,64}" --frames 40
