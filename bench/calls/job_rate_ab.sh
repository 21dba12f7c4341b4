#!/usr/bin/env bash
# One device call: the job's real train path twice on one card, the job at $OLD (a checkout before a change)
# and this tree's: configs/bench-paper-14b.yaml (random 14B weights, configs/paper.yaml's training) cut to
# $STEPS optimizer steps on synthetic rows; the steady tokens/s of each from its own step events (bench/job_rate.py).
#   cd COPY && OLD=/path/to/old/checkout bash bench/calls/job_rate_ab.sh
# ORDER="new old" runs this tree first: the side run second finds the first one's compiled kernels cached
# (inductor/triton), so compare the steady steps, or run both orders.
# Wheels: the lock's speed packages in .whl (device_prelude.sh) and trl/datasets/dill/multiprocess in .xwhl;
# Qwen's BPE ranks in .carry/qwen.tiktoken (the dashscope wheel's) for the offline tokenizer.
source bench/device_prelude.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .xwhl/*.whl || exit 1
export QWEN_TIKTOKEN=$PWD/.carry/qwen.tiktoken
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
sed "s/max_steps: 7/max_steps: ${STEPS:-5}/" configs/bench-paper-14b.yaml > /tmp/bench.yaml
python3 -m job prepare --config /tmp/bench.yaml --out /tmp/d 2>&1 | tail -1
for side in ${ORDER:-old new}; do
  dir=$PWD; [ "$side" = old ] && dir=$OLD
  echo "== $side ($dir, $(( $(date +%s) - t0 ))s)"
  (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout "${RUN_S:-190}" python3 -m job train --config /tmp/bench.yaml \
     --data /tmp/d --out /tmp/run_$side --resume never > "$OUT/train_$side.log" 2>&1)
  echo "$side train rc=$? ($(( $(date +%s) - t0 ))s)"
  grep -v '^@@socrates-event' "$OUT/train_$side.log" | quiet | grep -i 'speed\|memory mode\|trained\|error' | cut -c1-200
  python3 bench/job_rate.py /tmp/run_$side/events.jsonl --card "$card" --out "$OUT/rate_$side.json"
done
python3 -c "import json; o, n = (json.load(open('$OUT/rate_' + s + '.json'))['tokens_per_s'] for s in ('old', 'new')); print(f'$card: old {o:,.0f} tok/s, new {n:,.0f} tok/s, new/old {n / o:.4f}')"
echo "done ($(( $(date +%s) - t0 ))s)"
