#!/usr/bin/env bash
# One short lease on one H200 (what was left of the session's device time): a reduced
# run of h200_train.sh (SFT and MSN L = 5 only, a few thousand rows) and h200_eval.sh
# (main table on few questions, all three models sharing the GPU). Run after
# `benchmarks/device/setup.sh join` on the same machine.
set -uo pipefail
source benchmarks/device/env.sh
export W=/tmp/msn/t3 OUT=${OUT:-/tmp/msn/t3/out}
T0=$(date +%s)
BASE=$(python3 -c "from msn.models import resolve_model; print(resolve_model('base'))") || exit 1
export BASE
echo "[$(( $(date +%s) - T0 ))s] base ready"
DEVICES="0 0" LS="0 5" MAGPIE=${MAGPIE:-512} TASKS=${TASKS:-2000} GEN_BATCH=${GEN_BATCH:-768} \
  NEW_TOKENS=${NEW_TOKENS:-160} EPOCHS=${EPOCHS:-3} DEADLINE=${TRAIN_DEADLINE:-180} \
  bash training/experiments/h200_train.sh
echo "[$(( $(date +%s) - T0 ))s] train part done"
QUICK=1 DEVICES="0" PER_GROUP=${PER_GROUP:-3} DEADLINE=${EVAL_DEADLINE:-120} \
  bash training/experiments/h200_eval.sh
echo "[$(( $(date +%s) - T0 ))s] all done"
