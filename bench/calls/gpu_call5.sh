#!/usr/bin/env bash
# Round 7, one device call (H200), issue #19 acceptance 1: which part of round 6's fp8 recipe makes its
# 20-step loss noisier than the bf16 levers. Two variants (job/fp8.py; bench levers `exact`, `dxbf16`):
# "fp8 exact" (the forward's _scaled_mm without fast accumulation) and "fp8 forward only" (dx = dy @ W
# in bf16 from the dequantized weight, as bnb does). (A) the 20-step loss check of round 6 (global batch
# 32, lr 1e-3, same data/order/seed): plain baseline, bf16 levers, the two variants, and both switches
# together if the budget leaves time; (B) the two variants' rate in the fast-mode shape (offload,
# micro-batch 128, 45 of 48 recomputed, global batch 256) beside the plain baseline.
#   cd .gpu && bash bench/calls/gpu_call5.sh   (wheels in ../.whl)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/versions.txt"
LEVERS=packing,answer,liger,flex,fused,offload
echo "== A: loss over 20 steps ($(( $(date +%s) - t0 ))s)"
timeout ${A_S:-330} python3 bench/train_throughput.py --final --steps 20 --global-batch 32 --lr 1e-3 \
  --ours "$LEVERS,mb=32,gc=all;$LEVERS,fp8,exact,mb=32,gc=all;$LEVERS,fp8,dxbf16,mb=32,gc=all;$LEVERS,fp8,exact,dxbf16,mb=32,gc=all" \
  --budget-s $(( ${A_S:-330} - 30 )) --max-gib 36 --out "$OUT/loss20" 2>&1 | grep -v "Backend impl\|UserWarning\|return fn" | tee "$OUT/A.log"
echo "A rc=$? ($(( $(date +%s) - t0 ))s)"
echo "== B: the variants' rate, fast-mode shape ($(( $(date +%s) - t0 ))s)"
left=$(( ${CALL_S:-520} - $(date +%s) + t0 ))
timeout $left python3 bench/train_throughput.py --final --steps 3 --baseline-steps 1 --lr 1e-3 \
  --ours "$LEVERS,fp8,exact,mb=128,gc=45;$LEVERS,fp8,dxbf16,mb=128,gc=45" \
  --budget-s $(( left - 40 )) --max-gib 36 --out "$OUT/rate" 2>&1 | grep -v "Backend impl\|UserWarning\|return fn" | tee "$OUT/B.log"
echo "B rc=$? ($(( $(date +%s) - t0 ))s)"
echo "done ($(( $(date +%s) - t0 ))s)"
