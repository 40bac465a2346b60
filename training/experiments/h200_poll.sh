#!/usr/bin/env bash
# Wait up to $1 seconds for h200_pipeline.sh (or until it ends), print its progress,
# and pack what it has produced into the device call's $OUT (at most 8 files come back:
# the adapter in parts, and one tarball of everything else).
W=${W:-/tmp/msn/t3}
DEST=${OUT:?run on the device machine, where OUT is set}
end=$(( $(date +%s) + ${1:-540} ))
while [ "$(date +%s)" -lt "$end" ]; do
  case "$(cat "$W/state" 2>/dev/null)" in done|FAILED) break ;; esac
  sleep 5
done
echo "state: $(cat "$W/state" 2>/dev/null || echo none)"
cat "$W/pipeline.log" 2>/dev/null | tail -n 40
for f in "$W"/build*.log "$W"/train_L*.log; do
  [ -f "$f" ] && echo "== $f: $(tr '\r' '\n' < "$f" | grep -v '^\s*$' | tail -n 1 | cut -c1-200)"
done
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
[ -d "$W/out/artifact" ] && cp "$W"/out/artifact/adapter.part* "$DEST/" 2>/dev/null
( cd "$W" && tar czf "$DEST/results.tgz" --exclude='out/artifact/adapter.part*' \
    $(ls -d out pipeline.log build*.log train_L*.log \
    quality.log bench_*.log L*/msn-train.json L*/train_log.jsonl 2>/dev/null) )
ls -la "$DEST"
