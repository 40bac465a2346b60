#!/usr/bin/env bash
# Issue 3, GPU part 1: self-distilled data (two shards, one per GPU) and four trainings
# (L = 0 / 3 / 5 / 8, two per GPU), then the rank-r artifact of the L = 5 run.
# Needs the default model prepared (benchmarks/device/setup.sh join + env.sh) or BASE=path.
# Sizes come from the environment so the same script runs tiny on CPU:
#   MAGPIE/TASKS (per shard), GEN_BATCH, NEW_TOKENS, EPOCHS, TRAIN_BATCH, DEVICES.
set -euo pipefail
W=${W:-/tmp/msn/t3}
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
DEVICES=(${DEVICES:-0 1})
N=${#DEVICES[@]}
# 2026-11-28 ran 5000 / 9500 per shard and kept 18,473 rows (task prompts repeat: the
# stdlib passage pool is small); these sizes aim at about 22k.
# The shipped model's run used four GPUs: DEVICES="0 1 2 3" MAGPIE=4000 TASKS=5000 -> 23,700.
MAGPIE=${MAGPIE:-6500}; TASKS=${TASKS:-10000}; GEN_BATCH=${GEN_BATCH:-1024}
NEW_TOKENS=${NEW_TOKENS:-192}; EPOCHS=${EPOCHS:-3}; TRAIN_BATCH=${TRAIN_BATCH:-64}
MAX_LEN=${MAX_LEN:-576}; LR=${LR:-1e-4}; SPANS=${SPANS:-4}; RANK=${RANK:-32}
EXTRA_BUILD=${EXTRA_BUILD:-}; EXTRA_TRAIN=${EXTRA_TRAIN:-}
PY=${PY:-python3}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

BASE=${BASE:-$($PY -c "from msn.models import resolve_model; print(resolve_model('base'))")}
stamp "base model at $BASE"

pids=()
SHARDS=$N
[ -n "${SKIP_BUILD:-}" ] && SHARDS=0  # reuse $W/shard*.jsonl from an earlier run
for i in $(seq 0 $((SHARDS - 1))); do
  CUDA_VISIBLE_DEVICES=${DEVICES[$i]} $PY -m msn.cli data build --model "$BASE" \
    --output "$W/shard$i.jsonl" --shard "$i/$N" --num-magpie "$MAGPIE" --num-tasks "$TASKS" \
    --batch-size "$GEN_BATCH" --max-new-tokens "$NEW_TOKENS" --seed 0 $EXTRA_BUILD \
    > "$W/build$i.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || { tail -n 30 "$W"/build*.log; exit 1; }; done
grep -h "wrote" "$W"/build*.log
$PY -m msn.cli data merge "$W"/shard*.jsonl --output "$W/data.jsonl"
stamp "data built"

# L = 0 is plain SFT on the same data, the baseline (b); L = 5 is the MSN model (c).
# Training gets what is left of DEADLINE (s) after a reserve for extraction and copying.
DEADLINE=${DEADLINE:-540}
TRAIN_TIME=$(( DEADLINE - 45 - ($(date +%s) - T0) ))
stamp "training for at most ${TRAIN_TIME}s"
pids=()
k=0
for L in ${LS:-0 5 3 8}; do
  dev=${DEVICES[$((k % N))]}
  CUDA_VISIBLE_DEVICES=$dev $PY -m msn.cli train --data "$W/data.jsonl" --model "$BASE" \
    --method linear --span-length "$L" --num-spans "$SPANS" --epochs "$EPOCHS" --lr "$LR" \
    --batch-size "$TRAIN_BATCH" --max-length "$MAX_LEN" --save-steps 100000 \
    --logging-steps 20 --seed 0 --max-time "$TRAIN_TIME" --output "$W/L$L" $EXTRA_TRAIN > "$W/train_L$L.log" 2>&1 &
  pids+=($!)
  k=$((k + 1))
done
for p in "${pids[@]}"; do wait "$p" || { tail -n 40 "$W"/train_L*.log; exit 1; }; done
stamp "trained"
for L in ${LS:-0 5 3 8}; do grep -h -E "saved|stopped|examples," "$W/train_L$L.log"; done

$PY -m msn.cli artifact extract --base "$BASE" --tuned "$W/L5" --output "$W/artifact" \
  --rank "$RANK"
stamp "artifact extracted"

# At most 8 files of 16 MiB come back from the device: the adapter travels in parts.
mkdir -p "$OUT/artifact" "$OUT/logs"
cp "$W/artifact/adapter_config.json" "$W/artifact/msn-extract.json" "$OUT/artifact/"
split -b 15000000 -d "$W/artifact/adapter_model.safetensors" "$OUT/artifact/adapter.part"
head -n 200 "$W/data.jsonl" > "$OUT/data-sample.jsonl"  # the full set stays on the machine
tar czf "$OUT/logs/train.tgz" -C "$W" $(cd "$W" && ls build*.log train_L*.log) \
  $(cd "$W" && ls L*/msn-train.json L*/train_log.jsonl)
ls -la "$OUT" "$OUT/artifact"
stamp "done"
