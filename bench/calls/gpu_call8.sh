#!/usr/bin/env bash
# Round 8, issue #19 acceptance 1 in one device call (H200), for the recipe shipped (fp8 on the MLP's
# gate/up/down): (A) the 20-step loss check at lr 3e-4 on learnable answers (plain stack at LoRA seeds
# 42 and 43, fp8, the bf16 levers as the control; the rule is bench/train_throughput.py loss_check),
# then (B) the rate in the fast-mode shape beside the plain stack. Calls 3 and 4 of round 8 ran A and B
# as two calls on one held machine (bench/results/round8_call3_log.txt, round8_call4_log.txt); this
# script is them in one (~450 s; not run as one: no device time was left).
# From the repo root, wheels in .whl (carried):   bash bench/calls/gpu_call8.sh
source bench/device_prelude.sh
L=packing,answer,liger,flex,fused,offload
echo "== A: loss check, lr 3e-4, 20 steps, learnable answers ($(( $(date +%s) - t0 ))s)"
timeout ${A_S:-360} python3 bench/train_throughput.py --final --steps 20 --global-batch 32 --lr 3e-4 \
  --targets learnable --baseline-seeds 42,43 --ours "$L,fp8,mb=32,gc=all;$L,mb=32,gc=all" \
  --budget-s $(( ${A_S:-360} - 30 )) --max-gib 36 --out "$OUT/loss" 2>&1 | quiet | tee "$OUT/A.log"
echo "A rc=$? ($(( $(date +%s) - t0 ))s)"
echo "== B: rate, fast-mode shape ($(( $(date +%s) - t0 ))s)"
left=$(( ${CALL_S:-585} - $(date +%s) + t0 ))
timeout $left python3 bench/train_throughput.py --final --steps 3 --baseline-steps 1 --lr 1e-3 \
  --ours "$L,fp8,mb=128,gc=45" --budget-s $(( left - 40 )) --max-gib 36 --out "$OUT/rate" 2>&1 | quiet | tee "$OUT/B.log"
echo "B rc=$? ($(( $(date +%s) - t0 ))s)"
rm -f "$OUT"/*/best.json "$OUT"/*/train_throughput.md
echo "done ($(( $(date +%s) - t0 ))s)"
