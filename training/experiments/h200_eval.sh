#!/usr/bin/env bash
# Issue 3, GPU part 2 (after h200_train.sh on the same machine): MAT / speedup of
# ar, jacobi and tr-jacobi with the reference runner for (a) base, (b) SFT (L = 0),
# (c) the MSN model as shipped (base + the extracted artifact, merged); held-out quality
# of (b) and (c); then the L ablation on fewer questions.
set -euo pipefail
W=${W:-/tmp/msn/t3}
OUT=${OUT:-$W/out}
DEVICES=(${DEVICES:-0 1})
DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-bfloat16}
PER_GROUP=${PER_GROUP:-10}; ABL_PER_GROUP=${ABL_PER_GROUP:-5}; NEW=${NEW:-128}
PY=${PY:-python3}
mkdir -p "$OUT/bench"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
BASE=${BASE:-$($PY -c "from msn.models import resolve_model; print(resolve_model('base'))")}
MERGE_DTYPE=float32
$PY -c "
from pathlib import Path
from training.artifact import merge_artifact
merge_artifact(Path('$BASE'), Path('$W/artifact'), Path('$W/msn'), '$MERGE_DTYPE')"
stamp "merged artifact"

# Every step gets what is left of DEADLINE (s), so the results so far still come back.
DEADLINE=${DEADLINE:-540}
left() { echo $(( DEADLINE - 15 - ($(date +%s) - T0) )); }
bench() {  # name model per_group
  [ "$(left)" -gt 20 ] || { stamp "bench $1 skipped: out of time"; return; }
  timeout "$(left)" $PY -m benchmarks.reference.bench_methods --model "$2" --device "$DEVICE" --dtype "$DTYPE" \
    --methods ar,jacobi,tr-jacobi --per-group "$3" --max-new-tokens "$NEW" --name "$1" \
    --out-dir "$OUT/bench" --no-plot > "$W/bench_$1.log" 2>&1 || true
  stamp "bench $1: $(grep -h overall "$W/bench_$1.log" || echo failed)"
}
if [ -n "${QUICK:-}" ]; then
  # Short lease: the three main models and the quality check share one GPU at once, so
  # MAT is exact but tokens/s (and speedup) are contaminated by the sharing.
  export CUDA_VISIBLE_DEVICES=${DEVICES[0]}
  bench base "$BASE" "$PER_GROUP" & bench sft "$W/L0" "$PER_GROUP" &
  bench msn "$W/msn" "$PER_GROUP" &
  timeout "$(left)" $PY -m training.quality --data "$W/data.jsonl" --model base="$BASE" \
    --model sft="$W/L0" --model msn="$W/msn" --reference base --device "$DEVICE" \
    --max-prompts 128 --out "$OUT/quality.json" > "$W/quality.log" 2>&1 || true
  wait
elif [ "${#DEVICES[@]}" -ge 4 ]; then
  # Four GPUs: base then MSN alone on the first, SFT alone on the second (their speedups
  # are timings); the ablation (MAT only) shares the third; the quality check the fourth.
  ( export CUDA_VISIBLE_DEVICES=${DEVICES[0]}
    bench base "$BASE" "$PER_GROUP"; bench msn "$W/msn" "$PER_GROUP" ) &
  ( export CUDA_VISIBLE_DEVICES=${DEVICES[1]}; bench sft "$W/L0" "$PER_GROUP" ) &
  ( export CUDA_VISIBLE_DEVICES=${DEVICES[2]}
    bench L3 "$W/L3" "$ABL_PER_GROUP" & bench L8 "$W/L8" "$ABL_PER_GROUP" &
    bench L5full "$W/L5" "$ABL_PER_GROUP" & wait ) &
  ( export CUDA_VISIBLE_DEVICES=${DEVICES[3]}
    timeout "$(left)" $PY -m training.quality --data "$W/data.jsonl" --model base="$BASE" \
      --model sft="$W/L0" --model msn="$W/msn" --reference base --device "$DEVICE" \
      --out "$OUT/quality.json" > "$W/quality.log" 2>&1 || tail -20 "$W/quality.log"
    stamp "quality: $(grep -E '^(base|sft|msn) ' "$W/quality.log" | tr '\n' ' ')" ) &
  wait || true
else
# Main-table models (base, SFT, MSN) run alone on their GPU, since their speedups are
# timings; afterwards the ablation (MAT only) and the quality check share GPU 1.
( export CUDA_VISIBLE_DEVICES=${DEVICES[0]}
  bench base "$BASE" "$PER_GROUP"; bench msn "$W/msn" "$PER_GROUP"
  bench L5full "$W/L5" "$ABL_PER_GROUP" ) &
g0=$!
( export CUDA_VISIBLE_DEVICES=${DEVICES[$(( ${#DEVICES[@]} - 1 ))]}
  bench sft "$W/L0" "$PER_GROUP"
  bench L3 "$W/L3" "$ABL_PER_GROUP" & bench L8 "$W/L8" "$ABL_PER_GROUP" &
  timeout "$(left)" $PY -m training.quality --data "$W/data.jsonl" --model base="$BASE" --model sft="$W/L0" \
    --model msn="$W/msn" --reference base --device "$DEVICE" --out "$OUT/quality.json" \
    > "$W/quality.log" 2>&1 || tail -20 "$W/quality.log"
  stamp "quality: $(cat "$W/quality.log" | grep -E '^(base|sft|msn) ' | tr '\n' ' ')"
  wait ) &
g1=$!
wait $g0 $g1 || true
fi
cat "$W"/bench_*.log "$W/quality.log" > "$OUT/eval.log" 2>/dev/null || true
tar czf "$OUT/bench.tgz" -C "$OUT" bench && rm -r "$OUT/bench"  # at most 8 files come back
ls -la "$OUT"
stamp "done"
