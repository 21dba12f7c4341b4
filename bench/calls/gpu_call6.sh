#!/usr/bin/env bash
# Device call 6 (one H200), issue #17's 1-GPU rows of the full fine-tune (train.method: full, job/full.py).
# World 1 trains the plain model (fp32 master weights, bf16 autocast, checkpointing, fused AdamW), no
# FSDP; this proves the CUDA path and gives a 1-GPU rate. Ends by itself within CALL_S (260) seconds.
#  (a) bench/scale.py --method full --gpus 1 on configs/bench-full-8l.yaml (8 layers of 14B width,
#      3.76B params): tokens/s, peak GiB.
#  (b) `job train` with checkpoint_every 2, max_steps 5, SIGKILLed after checkpoint-4,
#      then `--resume auto` to step 5 (no third save: the call's time): DCP save seconds (checkpoint events), load seconds (the resumed
#      log event), then out/model loaded with transformers and checked against the manifest.
#      (b) runs the same config with 1 decoder layer and tied embeddings (1.05B params): the 8-layer
#      model's checkpoint is 42 GiB (12 B/param), two of them (keep 1 + the one being written) do not
#      fit the machine's 64 GiB disk, nor its save+load the call's time.
#   cd .gpu && bash bench/calls/gpu_call6.sh   (wheels in ../.whl, the tokenizer in ../.carry)
# CPU dry run of (b) with a tiny model: NO_PIP=1 SKIP_A=1 B_BASE=<tiny full config, allow_cpu> B_ARCH='{}' bash bench/calls/gpu_call6.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 QWEN_TIKTOKEN=${QWEN_TIKTOKEN:-$(cd ../.carry && pwd)/qwen.tiktoken}
t0=$(date +%s); END=${CALL_S:-260}
el() { echo $(( $(date +%s) - t0 )); }
left() { local l=$(( END - $(date +%s) + t0 - ${1:-0} )); echo $(( l > 1 ? l : 1 )); }
[ -n "${NO_PIP:-}" ] || timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PY=${PY:-python3}
W=${WORK:-/tmp/call6}; rm -rf "$W"; mkdir -p "$W/tmpa"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-call6}  # (a) and (b) share compiles
quiet() { grep -v '^@@socrates-event\|Backend impl\|UserWarning\|warnings.warn\|return fn' | cut -c1-400; }
main() {
echo "== machine ($(el)s)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; df -h /tmp | tail -1
W=$W B_ROWS=${B_ROWS:-} B_BASE=${B_BASE:-configs/bench-full-8l.yaml} B_ARCH=${B_ARCH:-'{"num_hidden_layers": 1, "tie_word_embeddings": true}'} $PY - <<'PY'
import json, os, yaml
c = yaml.safe_load(open(os.environ["B_BASE"]))
c["name"] = c["name"] + "-1l-tied"
c["model"]["id"] = c["model"]["id"] + "-1layer-tied"
c["model"]["arch"].update(json.loads(os.environ["B_ARCH"]))
c["train"].update(max_steps=5, checkpoint_every=2, keep_checkpoints=1)
c["data"]["source"] = os.environ.get("B_ROWS") or "synthetic:3000"
yaml.safe_dump(c, open(os.environ["W"] + "/full1.yaml", "w"))
PY
(timeout 60 $PY -m job prepare --config $W/full1.yaml --out $W/d > $W/prepare.log 2>&1) &  # (b)'s rows, while (a) runs
prep=$!
if [ -z "${SKIP_A:-}" ]; then
echo "== a: scale.py --method full --gpus 1 ($(el)s)"
TMPDIR=$W/tmpa timeout $(left 120) $PY bench/scale.py --config configs/bench-full-8l.yaml --method full --gpus 1 --steps 4 \
  --out "$OUT/scale_full.json" 2>&1 | quiet
echo "scale rc=${PIPESTATUS[0]} ($(el)s)"
[ -f "$OUT/scale_full.json" ] || cp $W/tmpa/scale-*/n1/events.jsonl "$OUT/scale_n1_events.jsonl" 2>/dev/null  # killed: what it got to
rm -rf $W/tmpa
fi
echo "== b: save + SIGKILL + resume ($(el)s)"
wait $prep; tail -1 $W/prepare.log
run=$W/run; rm -rf $run
$PY -m job train --config $W/full1.yaml --data $W/d --out $run --resume never > $W/train1.log 2>&1 &
pid=$!; stop=$(( $(date +%s) + $(left 55) ))
while kill -0 $pid 2>/dev/null; do
  if grep -q '"event":"checkpoint".*checkpoint-4' $run/events.jsonl 2>/dev/null; then kill -9 $pid; echo "SIGKILL after checkpoint-4 ($(el)s)"; break; fi
  if [ $(date +%s) -ge $stop ]; then kill -9 $pid; echo "train1 out of time: SIGKILL ($(el)s)"; break; fi
  sleep 0.5
done
wait $pid; echo "train1 rc=$? ($(el)s)"; quiet < $W/train1.log | grep -i 'error\|speed\|Traceback' | tail -5
cp $run/events.jsonl "$OUT/train1_events.jsonl" 2>/dev/null
timeout $(left 15) $PY -m job train --config $W/full1.yaml --data $W/d --out $run --resume auto > $W/train2.log 2>&1
echo "train2 rc=$? ($(el)s)"; quiet < $W/train2.log | grep -i 'error\|resumed\|Traceback' | tail -5
cp $run/events.jsonl "$OUT/events_full1.jsonl" 2>/dev/null
W=$W timeout $(left) $PY - <<'PY' 2>&1 | quiet
import json, os, torch
from pathlib import Path
from contracts import manifest
run = Path(os.environ["W"]) / "run"
ev = [json.loads(l) for l in open(run / "events.jsonl")]
for e in ev:
    if e["event"] in ("checkpoint", "step", "done") or (e["event"] == "log" and "resumed" in e["message"]):
        print({k: e.get(k) for k in ("event", "step", "loss", "tokens_per_s", "gpu_mem_gib", "path", "seconds", "message", "reason") if k in e})
sz = {p.name: round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**30, 2) for p in (run / "checkpoints").glob("checkpoint-*")}
print("checkpoint sizes GiB:", sz)
print("verify_tree problems:", manifest.verify_tree(run))
from transformers import AutoModelForCausalLM
dev = "cuda" if torch.cuda.is_available() else "cpu"
m = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.bfloat16).to(dev)
print("model/ files:", sorted(p.name for p in (run / "model").iterdir()))
x = torch.randint(0, 1000, (1, 16), device=dev)
print("loaded", type(m).__name__, sum(p.numel() for p in m.parameters()), "params; logits finite:", bool(torch.isfinite(m(x).logits).all()))
PY
echo "done ($(el)s)"
}
main 2>&1 | tee "$OUT/call6.log"
