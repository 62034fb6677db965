#!/bin/bash
# The GPU benchmark matrix (one device call): installs the reference wheel from .whl, maps the
# rwkv_chat package onto this checkout, and appends every table to $OUT/bench.md.
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/rwkv-0.8.32-*.whl
mkdir -p /tmp/shim/rwkv_chat && touch /tmp/shim/rwkv_chat/__init__.py
for d in models app daemon csrc; do ln -sfn "$PWD/$d" /tmp/shim/rwkv_chat/$d; done
export PYTHONPATH=/tmp/shim:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
B="python3 -m rwkv_chat.app.bench --md $OUT/bench.md --json $OUT/bench.jsonl"
run() { local t=$1; shift; echo "=== $*"; timeout "$t" $B "$@" 2>&1 | grep -v "^$" | tail -40 | tee -a "$OUT/log.txt"; }
for job in "$@"; do eval "run $job"; done
