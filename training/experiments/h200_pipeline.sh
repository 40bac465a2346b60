#!/usr/bin/env bash
# Issue 3 on a short lease: the whole GPU part (h200_train.sh then h200_eval.sh) as one
# detached job, so that it can outlive a single 10-minute device call. Start it after
# `benchmarks/device/setup.sh join` with `setsid bash training/experiments/h200_pipeline.sh &`,
# then keep the machine busy with `h200_poll.sh` calls, each of which reports progress and
# packs what is finished into $OUT.
#   TRAIN_DEADLINE: seconds from the job's start by which training must have stopped
#                   (data build included); EVAL_DEADLINE: seconds for the evaluation.
set -uo pipefail
source benchmarks/device/env.sh
export W=${W:-/tmp/msn/t3}
export OUT=$W/out
mkdir -p "$W" "$OUT"
exec > "$W/pipeline.log" 2>&1
T0=$(date +%s)
echo "[0s] pipeline started"
BASE=$(python3 -c "from msn.models import resolve_model; print(resolve_model('base'))") || {
  echo FAILED > "$W/state"; exit 1; }
export BASE
echo running > "$W/state"
DEADLINE=${TRAIN_DEADLINE:-840} bash training/experiments/h200_train.sh || {
  echo FAILED > "$W/state"; exit 1; }
echo "[$(( $(date +%s) - T0 ))s] training part done"
echo evaluating > "$W/state"
DEADLINE=${EVAL_DEADLINE:-540} bash training/experiments/h200_eval.sh
echo "[$(( $(date +%s) - T0 ))s] evaluation part done (exit $?)"
echo done > "$W/state"
