#!/usr/bin/env bash
# Round 6, device call 2 (H200), issue #19 acceptance 1: (A) the loss over 20 optimizer steps, the plain
# baseline beside the bf16 lean levers and the same levers with fp8, same data/order/seed (global batch
# 32 so that 20 baseline steps fit one call); (B) the job path in the fast mode (configs/bench-fast-14b.yaml:
# train.fp8, micro-batch 128, offload, 45 of 48 recomputed): `job check` then `job train`, 7 steps.
#   cd .gpu && bash bench/calls/gpu_call4.sh   (wheels in ../.whl, rows in ../.carry)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 QWEN_TIKTOKEN=$(cd ../.carry && pwd)/qwen.tiktoken
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
echo "== A: loss over 20 steps ($(( $(date +%s) - t0 ))s)"
timeout 330 python3 bench/train_throughput.py --final --steps 20 --global-batch 32 --lr 1e-3 \
  --ours "packing,answer,liger,flex,fused,offload,mb=32,gc=all;packing,answer,liger,flex,fused,offload,fp8,mb=32,gc=all" \
  --budget-s 300 --max-gib 36 --out "$OUT/loss20" 2>&1 | grep -v "Backend impl\|UserWarning\|return fn"
echo "== B: job path, fast mode with fp8 ($(( $(date +%s) - t0 ))s)"
cat ../.carry/socsci210_real_sample.jsonl ../.carry/socsci210_real_sample.jsonl > /tmp/rows2.jsonl
python3 -m job prepare --config configs/bench-fast-14b.yaml --data /tmp/rows2.jsonl --out /tmp/d 2>&1 | tail -1
python3 -m job check --config configs/bench-fast-14b.yaml --data /tmp/d 2>&1 | grep -v '^@@socrates-event\|Backend impl' | tee "$OUT/check_fast.txt"
left=$(( ${CALL_S:-560} - $(date +%s) + t0 ))
timeout $left python3 -m job train --config configs/bench-fast-14b.yaml --data /tmp/d --out /tmp/run --resume never > /tmp/job_fast.log 2>&1
echo "train rc=$? ($(( $(date +%s) - t0 ))s)"
grep -v 'Backend impl\|^@@socrates-event' /tmp/job_fast.log | grep -i 'speed\|memory mode\|trained\|Error' | cut -c1-300
cp /tmp/run/events.jsonl "$OUT/job_fast_events.jsonl" 2>/dev/null
python3 bench/job_rate.py /tmp/run/events.jsonl --card H200 --out "$OUT/job_fast_rate.json"
echo "done ($(( $(date +%s) - t0 ))s)"
