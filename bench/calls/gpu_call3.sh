#!/usr/bin/env bash
# Round 6, device call 1 (H200), issue #19 acceptance 1: FP8 (e4m3) matmuls for the frozen base
# (job/fp8.py). (1) the CUDA test of job/fp8.py (_scaled_mm and the Triton quantizer vs the emulation);
# (2) bench/fp8_layer.py: one decoder layer's four linear shapes at one micro-batch (128 x 322 tokens),
# NF4 bnb vs fp8, forward and input grad; (3) the project's bench, the plain baseline beside the best
# round-5 shape without and with fp8.
#   cd .gpu && bash bench/calls/gpu_call3.sh   (wheels in ../.whl)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch, transformers, peft, bitsandbytes, liger_kernel, trl, triton, importlib.metadata as m; print('versions:', {p: m.version(p) for p in ['torch','transformers','peft','bitsandbytes','liger-kernel','trl','triton']}, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/versions.txt"
echo "== CUDA test ($(( $(date +%s) - t0 ))s)"
timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_job_fp8.py -k cuda 2>&1 | tail -15 | tee "$OUT/pytest_fp8.txt"
echo "== layer microbench ($(( $(date +%s) - t0 ))s)"
timeout 120 python3 bench/fp8_layer.py --tokens 40960 --out "$OUT" 2>&1 | grep -v Warning
echo "== bench ($(( $(date +%s) - t0 ))s)"
left=$(( ${CALL_S:-560} - $(date +%s) + t0 ))
timeout $left python3 bench/train_throughput.py --final --steps 3 --baseline-steps 2 --lr 1e-3 \
  --ours "${OURS:-packing,answer,liger,flex,fused,offload,mb=128,gc=all;packing,answer,liger,flex,fused,offload,fp8,mb=128,gc=all;packing,answer,liger,flex,fused,offload,fp8,mb=128,gc=45;packing,answer,liger,flex,fused,fp8,mb=64,gc=46}" \
  --budget-s $(( left - 75 )) --max-gib 36 --out "$OUT/tt"
echo "done ($(( $(date +%s) - t0 ))s)"
