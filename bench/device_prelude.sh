# Sourced by bench/calls/gpu_call7.sh and later device-call scripts, from the repo root: $OUT, the lock's
# speed packages from the carried wheels in .whl, the card and versions into $OUT/versions.txt, t0.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/versions.txt"
python3 -c "import torch, transformers, peft, bitsandbytes, liger_kernel, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'triton', triton.__version__)" | tee -a "$OUT/versions.txt"
quiet() { grep -v "Backend impl\|UserWarning\|return fn"; }
