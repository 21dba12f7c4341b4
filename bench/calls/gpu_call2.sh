#!/usr/bin/env bash
# Second device call (H200), issue #19's lean mode: (A) the job path picks it by itself on a card
# capped at 22.5 GiB (SOCRATES_GPU_MEMORY_GIB: an L4's/A10G's usable memory; the allocator refuses
# past it), `job check` then `job train`; (B) loss over 20 optimizer steps, plain baseline vs the
# lean levers, same data/order/seed (global batch 32 so 20 baseline steps fit one call).
#   cd .gpu && bash bench/calls/gpu_call2.sh   (wheels in ../.whl, rows in ../.carry)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 QWEN_TIKTOKEN=$(cd ../.carry && pwd)/qwen.tiktoken
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
cat ../.carry/socsci210_real_sample.jsonl ../.carry/socsci210_real_sample.jsonl > /tmp/rows2.jsonl
python3 -m job prepare --config configs/bench-paper-14b.yaml --data /tmp/rows2.jsonl --out /tmp/d 2>&1 | tail -1
echo "== A: job check + train with SOCRATES_GPU_MEMORY_GIB=22.5 (memory_mode auto)"
SOCRATES_GPU_MEMORY_GIB=22.5 python3 -m job check --config configs/bench-paper-14b.yaml --data /tmp/d 2>&1 | grep -v '^@@socrates-event\|Backend impl' | tee "$OUT/check_lean.txt"
SOCRATES_GPU_MEMORY_GIB=22.5 timeout 200 python3 -m job train --config configs/bench-paper-14b.yaml --data /tmp/d --out /tmp/run --resume never > "$OUT/job_lean.log" 2>&1
echo "train rc=$? ($(( $(date +%s) - t0 ))s)"
grep -v 'Backend impl' "$OUT/job_lean.log" | grep -i 'memory mode\|trained\|Error' | cut -c1-400
cp /tmp/run/events.jsonl "$OUT/job_lean_events.jsonl" 2>/dev/null
python3 -c "import json; m=json.load(open('/tmp/run/manifest.json')); print('manifest memory_mode:', m.get('memory_mode'), 'peak', m.get('peak_gpu_mem_gib'))"
python3 bench/job_rate.py /tmp/run/events.jsonl --card H200 --table-key lean --out "$OUT/job_lean_rate.json"
echo "== B: loss over 20 steps ($(( $(date +%s) - t0 ))s)"
left=$(( 400 - $(date +%s) + t0 ))
timeout $left python3 bench/train_throughput.py --final --steps 20 --global-batch 32 --lr 1e-3 \
  --ours "packing,answer,liger,flex,fused,offload,mb=32,gc=all" --budget-s $(( left - 50 )) --max-gib 24 --out "$OUT/loss20"
echo "done ($(( $(date +%s) - t0 ))s)"
