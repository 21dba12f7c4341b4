#!/usr/bin/env bash
# Round 8, calls 1 and 2 (H200), issue #19 acceptance 1 in one call (q/o + MLP in fp8: `fp8attn`; at 4215571, where they ran, `fp8`): the fast mode's rate beside the
# plain baseline, then the 20-step loss check by a rule fixed before the run (bench/train_throughput.py
# loss_check): each variant against the plain stack at the same LoRA seed, beside the plain stack
# against itself under another LoRA seed, on answers a model can learn (--targets learnable).
# fp8 now leaves k_proj/v_proj in bf16 (job/fp8.py: round 6 timed no gain there).
#   (B) rate, global batch 256: plain baseline (1 step) and the fast mode (offload, micro-batch 128,
#       45 of 48 recomputed, fp8)
#   (A) loss, global batch 32, lr 1e-3 (LR=...), 20 steps, learnable answers: plain stack at LoRA
#       seeds 42 and 43, then fp8 at seed 42 and the bf16 levers at 42 (the control: exact arithmetic,
#       other kernels); SEED43=1 adds fp8 at seed 43 (the first call ran it; it got 7 steps)
# From the repo root, wheels in .whl (carried):   bash bench/calls/gpu_call7.sh
source bench/device_prelude.sh
LEVERS=packing,answer,liger,flex,fused,offload
echo "== B: rate, fast-mode shape ($(( $(date +%s) - t0 ))s)"
# budget: build ~15 s, the baseline's step ~40-55 s, fp8's first step ~80 s (flex/Liger/Triton compiles), then ~11 s a step
timeout ${B_S:-240} python3 bench/train_throughput.py --final --steps 3 --baseline-steps 1 --lr 1e-3 \
  --ours "$LEVERS,fp8attn,mb=128,gc=45" --budget-s $(( ${B_S:-240} - 40 )) --max-gib 36 --out "$OUT/rate" 2>&1 | quiet | tee "$OUT/B.log"
echo "B rc=$? ($(( $(date +%s) - t0 ))s)"
echo "== A: loss check, 20 steps, learnable answers ($(( $(date +%s) - t0 ))s)"
left=$(( ${CALL_S:-570} - $(date +%s) + t0 ))
extra=""; [ -n "${SEED43:-}" ] && extra=";$LEVERS,fp8attn,mb=32,gc=all,seed=43"
timeout $left python3 bench/train_throughput.py --final --steps 20 --global-batch 32 --lr ${LR:-1e-3} \
  --targets learnable --baseline-seeds 42,43 \
  --ours "$LEVERS,fp8attn,mb=32,gc=all;$LEVERS,mb=32,gc=all$extra" \
  --budget-s $(( left - 25 )) --max-gib 36 --out "$OUT/loss" 2>&1 | quiet | tee "$OUT/A.log"
echo "A rc=$? ($(( $(date +%s) - t0 ))s)"
rm -f "$OUT"/*/best.json "$OUT"/*/train_throughput.md  # in the logs too: what comes back is at most 8 files
echo "done ($(( $(date +%s) - t0 ))s)"
