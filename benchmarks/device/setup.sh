#!/usr/bin/env bash
# Bring the default model to the GPU machine (see README.md beside this file).
#   setup.sh part   copy the GGUF parts this call carried (.carry/m*/gguf.part*) to /tmp/msn
#   setup.sh join   the same, then join all parts, check them and install the gguf wheel
set -euo pipefail
mkdir -p /tmp/msn
cp .carry/m*/gguf.part* /tmp/msn/ 2>/dev/null || true
case "${1:-}" in
  part|part1) ls -la /tmp/msn ;;
  join|part2)
    cat /tmp/msn/gguf.part* > /tmp/msn/model.gguf
    echo "a1231443440b107ff29f02bdb38c9d0a  /tmp/msn/model.gguf" | md5sum -c -
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/gguf-*.whl
    cp .carry/data/specbench-dev.jsonl /tmp/msn/  # later calls do not carry it (env.sh)
    ;;
  *) echo "usage: setup.sh part|join" >&2; exit 2 ;;
esac
