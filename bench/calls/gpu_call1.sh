#!/usr/bin/env bash
# One device call (H200): issue #12 acceptance 1 (the job path's steady tokens/s with the lock's
# speed packages) and issue #19's lean/fast candidates in the project's bench beside the baseline.
# Run from the worktree copy: cd .gpu && bash bench/calls/gpu_call1.sh   (wheels in ../.whl, rows in ../.carry)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 QWEN_TIKTOKEN=$(cd ../.carry && pwd)/qwen.tiktoken
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch, transformers, peft, accelerate, bitsandbytes, liger_kernel, trl, datasets, triton, importlib.metadata as m; print('versions:', {p: m.version(p) for p in ['torch','transformers','peft','accelerate','bitsandbytes','liger-kernel','trl','datasets','triton']}, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/versions.txt"
t0=$(date +%s)
echo "== job path: prepare + train, configs/bench-paper-14b.yaml (max_steps 7), real SocSci210 rows x2"
cat ../.carry/socsci210_real_sample.jsonl ../.carry/socsci210_real_sample.jsonl > /tmp/rows2.jsonl
python3 -m job prepare --config configs/bench-paper-14b.yaml --data /tmp/rows2.jsonl --out /tmp/d 2>&1 | tail -1
timeout 230 python3 -m job train --config configs/bench-paper-14b.yaml --data /tmp/d --out /tmp/run --resume never > "$OUT/job_train.log" 2>&1
echo "train rc=$? ($(( $(date +%s) - t0 ))s)"
grep -v '^@@socrates-event' "$OUT/job_train.log" | tail -3 | cut -c1-300
cp /tmp/run/events.jsonl "$OUT/job_events.jsonl" 2>/dev/null
python3 bench/job_rate.py /tmp/run/events.jsonl --card H200 --out "$OUT/job_rate.json"
echo "== bench ($(( $(date +%s) - t0 ))s)"
timeout $(( 570 - $(date +%s) + t0 - 15 )) python3 bench/train_throughput.py --final --steps 3 --baseline-steps 2 --lr 1e-3 \
  --ours "${OURS:-packing,answer,liger,flex,fused,offload,mb=128,gc=all;packing,answer,liger,flex,fused,offload,mb=64,gc=all;packing,answer,liger,flex,fused,offload,mb=128,gc=45}" \
  --budget-s $(( 570 - $(date +%s) + t0 - 60 )) --max-gib 24 --out "$OUT/tt"
echo "done ($(( $(date +%s) - t0 ))s)"
