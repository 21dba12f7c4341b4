#!/usr/bin/env bash
# Acceptance 2 of issue #2 on one GPU: `job check` on the Qwen2.5-14B architecture (random weights,
# 4-bit), then `job train` at global batch 256, SIGKILLed right after its first checkpoint, then
# `--resume auto`; prints the step/LR table (resumed steps vs the schedule's own LR), tokens/s, peak GiB.
#   bash bench/job_resume_14b.sh            # CONFIG=... OUT=... to change; CPU dry run: CONFIG=<tiny config>
set -uo pipefail
CONFIG=${CONFIG:-configs/bench-14b.yaml}
OUT=${OUT:-${OUT_DIR:-/tmp/job_resume_14b}}
PY=${PY:-python3}
mkdir -p "$OUT"
run_dir="$OUT/run"; data_dir="$OUT/data"
rm -rf "$run_dir" "$data_dir"
t0=$(date +%s)
echo "== check"; $PY -m job check --config "$CONFIG" --out "$OUT/check" 2>&1 | grep -v '^@@socrates-event'
echo "check rc=${PIPESTATUS[0]} ($(( $(date +%s) - t0 ))s)"
echo "== prepare"; $PY -m job prepare --config "$CONFIG" --out "$data_dir" 2>&1 | tail -1
echo "== train (killed after the first checkpoint)"
$PY -m job train --config "$CONFIG" --data "$data_dir" --out "$run_dir" --resume never > "$OUT/train1.log" 2>&1 &
pid=$!
while kill -0 "$pid" 2>/dev/null; do
  if grep -q '"event":"checkpoint"' "$run_dir/events.jsonl" 2>/dev/null; then
    kill -9 "$pid"; echo "SIGKILL sent to $pid after: $(grep '"event":"checkpoint"' "$run_dir/events.jsonl" | head -1)"; break
  fi
  sleep 0.5
done
wait "$pid"; echo "first train rc=$? ($(( $(date +%s) - t0 ))s)"
tail -5 "$OUT/train1.log" | grep -v '^@@socrates-event' | cut -c1-400
echo "== train --resume auto"
$PY -m job train --config "$CONFIG" --data "$data_dir" --out "$run_dir" --resume auto > "$OUT/train2.log" 2>&1
echo "resumed train rc=$? ($(( $(date +%s) - t0 ))s)"
tail -5 "$OUT/train2.log" | grep -v '^@@socrates-event' | cut -c1-400
$PY bench/job_resume_report.py --config "$CONFIG" --run "$run_dir" | tee "$OUT/report.txt"
