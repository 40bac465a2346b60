# source me on the GPU machine after setup.sh join
export PYTHONPATH=/tmp/site:$PWD MSN_GGUF_PATH=/tmp/msn/model.gguf MSN_CACHE_DIR=/tmp/msn/cache PYTHONUNBUFFERED=1
export MSN_DEV_SET=/tmp/msn/specbench-dev.jsonl  # copied there by setup.sh join
