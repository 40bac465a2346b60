#!/usr/bin/env bash
# Tree-attention kernel sweep + final benchmark over several GPUs of one host (issue 4).
#
#   bash benchmarks/kernels/h200_x4.sh            # 4 H200s, ~4-5 min; results land in $OUT
#   SMOKE=1 bash benchmarks/kernels/h200_x4.sh    # CPU plumbing check (TRITON_INTERPRET=1, tiny shapes)
#
# Phase 1: one process per GPU sweeps kernel variants for its share of the case classes
#          (model x tree size); the merge picks each class's best variant (kernels-h200-configs.json).
# Phase 2: one process per GPU runs its share of the 54 cases (ours / SDPA / flex) with the
#          best variant of each case's class, from this same call; the merge joins the shards,
#          sets one bandwidth bound (the best copy reading of any GPU) and plots.
# Env: NGPU (4), OUT ($OUT or ./h200_x4_out), PYTHON (python3), SWEEP_BUDGET_S (140),
#      FINAL_BUDGET_S (110): seconds per process per phase; SMOKE (0).
set -uo pipefail
NGPU=${NGPU:-4}
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
OUT=${OUT:-$PWD/h200_x4_out}
SWEEP_BUDGET_S=${SWEEP_BUDGET_S:-140}
FINAL_BUDGET_S=${FINAL_BUDGET_S:-110}
BENCH=benchmarks/kernels/bench_tree_attention.py
WORK=$(mktemp -d /tmp/h200_x4.XXXXXX)
LOG=$WORK/h200_x4.log
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
EXTRA=()
if [ "$SMOKE" = 1 ]; then
  export TRITON_INTERPRET=1
  EXTRA=(--smoke)
  NGPU=${NGPU_SMOKE:-2}
  SWEEP_BUDGET_S=${SWEEP_BUDGET_S_SMOKE:-60}
  FINAL_BUDGET_S=${FINAL_BUDGET_S_SMOKE:-60}
fi
T0=$(date +%s)
log() { echo "[h200_x4 +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
{ echo "commit $(git rev-parse HEAD 2>/dev/null || echo '?') dirty: $(git status --porcelain 2>/dev/null | grep -c . || true)";
  nvidia-smi --query-gpu=index,name,clocks.max.sm,memory.total --format=csv 2>/dev/null || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } >>"$LOG" 2>&1

run_phase() {  # phase name, extra args...; one process per GPU, waits for all
  local phase=$1; shift
  local pids=() i
  for ((i = 0; i < NGPU; i++)); do
    if [ "$SMOKE" = 1 ]; then dev=""; else dev=$i; fi
    # One Triton cache per GPU index (the final pass reuses its sweep's compiled kernels).
    CUDA_VISIBLE_DEVICES=$dev TRITON_CACHE_DIR=$WORK/triton.$i \
      $PY "$BENCH" --shard "$i/$NGPU" "${EXTRA[@]}" "$@" \
      --sweep "$WORK/sweep.$i.json" --out "$WORK/final.$i.json" \
      >"$WORK/$phase.$i.log" 2>&1 &
    pids+=($!)
  done
  local rc=0
  for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then log "$phase shard $i failed (see its log)"; rc=1; fi
  done
  for ((i = 0; i < NGPU; i++)); do
    { echo "===== $phase shard $i/$NGPU"; cat "$WORK/$phase.$i.log"; } >>"$LOG"
  done
  return $rc
}

log "phase 1: sweep on $NGPU devices, ${SWEEP_BUDGET_S}s budget each"
run_phase sweep --phase sweep --sweep-budget-s "$SWEEP_BUDGET_S"
SWEEPS=()
for ((i = 0; i < NGPU; i++)); do [ -s "$WORK/sweep.$i.json" ] && SWEEPS+=("$WORK/sweep.$i.json"); done
CONFIG_ARGS=()
if [ ${#SWEEPS[@]} -gt 0 ]; then
  if $PY "$BENCH" "${EXTRA[@]}" --merge-sweep "${SWEEPS[@]}" --sweep "$WORK/kernels-h200-sweep.json" \
      --configs "$WORK/kernels-h200-configs.json" >>"$LOG" 2>&1; then
    CONFIG_ARGS=(--configs "$WORK/kernels-h200-configs.json")
  else
    log "sweep merge failed: final pass uses the kernel's defaults"
  fi
else
  log "no sweep shard produced a result: final pass uses the kernel's defaults"
fi
tail -n 8 "$LOG" | grep '^best' || true

log "phase 2: cases on $NGPU devices, ${FINAL_BUDGET_S}s budget each"
run_phase final --phase final --budget-s "$FINAL_BUDGET_S" "${CONFIG_ARGS[@]}"
FINALS=()
for ((i = 0; i < NGPU; i++)); do [ -s "$WORK/final.$i.json" ] && FINALS+=("$WORK/final.$i.json"); done
if [ ${#FINALS[@]} -gt 0 ]; then
  $PY "$BENCH" "${EXTRA[@]}" --merge "${FINALS[@]}" --out "$WORK/kernels-h200.json" >>"$LOG" 2>&1 \
    || log "final merge failed"
else
  log "no final shard produced a result"
fi
grep -E '^(tree [0-9]+:|missing|read ceiling)' "$LOG" || true
log "done"

# At most 8 files back: results, plot, sweep, chosen configs, one combined log, raw shards as a tarball.
for f in kernels-h200.json kernels-h200.png kernels-h200-sweep.json kernels-h200-configs.json; do
  [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"
done
tar -czf "$OUT/h200_x4-shards.tar.gz" -C "$WORK" $(cd "$WORK" && ls sweep.*.json final.*.json 2>/dev/null) 2>/dev/null || true
cp "$LOG" "$OUT/h200_x4.log"
ls -la "$OUT"
