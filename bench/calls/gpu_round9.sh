#!/usr/bin/env bash
# Round 9 (issue #27 acceptance 1, #26 item 5), one part per device call on one held machine:
#   loss  - the corrected loss check (bench/train_throughput.py loss_check): the plain stack run twice at
#           LoRA seed 42 (the noise), the bf16 levers (what every bf16 shape computes), fp8 on the MLP,
#           fp8 on q/o + MLP; lr 3e-4, global batch 32, 20 steps, learnable answers, LoRA dropout 0
#   rate  - tokens/s and peak GiB, the plain stack in the same run: QLoRA in the shipped default's shape
#           (configs/paper.yaml), the offloaded micro-batch-128 shape (all / 45 of 48 recomputed), fp8 on
#           the MLP; then `lora` (bf16 base, its own plain stack) in three shapes
#   lora  - the loss check on the bf16 base (plain LoRA twice, the levers); then QLoRA's default shape
#           beside regional compile alone and fp8 (MLP) alone, the plain stack in the same run
# From the repo root, wheels in .whl (carried):   bash bench/calls/gpu_round9.sh loss|rate|lora
source bench/device_prelude.sh
L0=packing,answer,liger,flex,fused
L=$L0,offload
B="python3 bench/train_throughput.py --final"
CHECK="--steps 20 --global-batch 32 --lr 3e-4 --targets learnable --lora-dropout 0 --baseline-seeds 42,42"
RATE="--steps 3 --baseline-steps 1 --lr 1e-3"
left() { echo $(( ${CALL_S:-570} - $(date +%s) + t0 )); }
part() {  # part NAME SECONDS ARGS...: one bench run under a time limit, its log and JSON under $OUT/NAME
  local name=$1 s=$2; shift 2
  echo "== $name ($(( $(date +%s) - t0 ))s, limit ${s}s)"
  timeout "$s" $B "$@" --budget-s $(( s - 45 )) --out "$OUT/$name" 2>&1 | quiet | tee "$OUT/$name.log"
  echo "$name rc=$? ($(( $(date +%s) - t0 ))s)"
}
case "${1:-}" in
  loss) part loss "$(left)" $CHECK --max-gib 36 \
          --ours "$L,mb=32,gc=all;$L,fp8,mb=32,gc=all;$L,fp8attn,mb=32,gc=all" ;;
  rate) part rate "${RATE_S:-300}" $RATE --max-gib 36 \
          --ours "$L0,mb=64,gc=46;$L,mb=128,gc=all;$L,mb=128,gc=45;$L,fp8,mb=128,gc=45"
        part lora_rate "$(left)" --method lora $RATE --max-gib 80 \
          --ours "$L0,mb=64,gc=46;$L,mb=128,gc=45;$L,mb=128,gc=all" ;;
  lora) part lora_loss "${LOSS_S:-260}" --method lora $CHECK --max-gib 80 --ours "$L,mb=32,gc=all"
        [ "$(left)" -gt 150 ] && part compile "$(left)" $RATE --max-gib 36 \
          --ours "$L,mb=128,gc=all;$L,mb=128,gc=all,compile;$L,fp8,mb=128,gc=all" ;;
  *) echo "usage: bash bench/calls/gpu_round9.sh loss|rate|lora"; exit 2 ;;
esac
rm -f "$OUT"/*/best.json "$OUT"/*/train_throughput.md
echo "done ($(( $(date +%s) - t0 ))s)"
