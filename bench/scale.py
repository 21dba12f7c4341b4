"""Scaling of `job train` over GPUs: tokens/s at 1, 2, 4, 8 ranks, the same per-GPU micro-batch,
the same global batch (the paper's 256: accumulation = 256 / (micro-batch x N)).

Each point is a real `python -m torch.distributed.run --nproc-per-node N -m job train` of a few
optimizer steps; the rate is the median of the step events' tokens/s after the first step (the
Trainer counts the tokens of every rank), peak GiB/GPU is rank 0's. efficiency(N) = rate(N) /
(N x rate(1)): the number configs/throughput.yaml's `multi_gpu_efficiency` stands for (0.90
configured until this measures it).

    python bench/scale.py --config configs/bench-14b.yaml --gpus 1,2,4,8 --steps 4 --out bench/results/scale.json
    python bench/scale.py --tiny --gpus 1,2 --steps 3 --out /tmp/scale.json     # CPU, gloo, tiny Qwen2

`--method full` measures the FSDP2 full fine-tune (job/full.py) the same way: every weight trains,
sharded over the N ranks (peak GiB/GPU falls with N); N=1 is the plain single-process full fine-tune,
so only cards that hold the whole model with its fp32 AdamW states measure N=1 (pass --gpus 2,4,8 and
read the rates; efficiency needs the N=1 point).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TINY = {
    "name": "scale-tiny", "allow_cpu": True,
    "model": {"id": "tiny", "init": "random", "tokenizer": "qwen2.5-offline",
              "arch": {"preset": "qwen2-tiny", "initializer_range": 0.25}},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "train": {"method": "qlora", "epochs": 1, "global_batch": 8, "micro_batch": 2, "lr": 1.0e-3, "optim": "adamw_torch",
              "precision": "fp32", "max_length": 512, "packing": True, "gradient_checkpointing": False,
              "checkpoint_every": 0, "seed": 1},
    "data": {"source": "synthetic:120", "split": "random", "seed": 1},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(args) -> dict:
    raw = json.loads(json.dumps(TINY)) if args.tiny else yaml.safe_load(Path(args.config).read_text())
    t = raw.setdefault("train", {})
    t["method"] = args.method or t.get("method", "qlora")
    if args.global_batch:
        t["global_batch"] = args.global_batch
    if args.micro_batch:
        t["micro_batch"] = args.micro_batch
    t["max_steps"] = args.steps
    t["checkpoint_every"] = 0
    t["epochs"] = max(int(t.get("epochs", 1)), 1)
    if not args.tiny:  # enough rows for every step at the largest N
        raw.setdefault("data", {})["source"] = f"synthetic:{int(t['global_batch'] * (args.steps + 1) * 1.3)}"
    return raw


def rank_counts(gpus: str, method: str | None) -> list[int]:
    """The N to measure: those asked for, and 1 (the efficiency's base) unless the method is full."""
    return sorted({int(x) for x in gpus.split(",") if x.strip()} | ({1} if method != "full" else set()))


def point(cfg_path: Path, data: Path, n: int, work: Path, tiny: bool) -> dict:
    out = work / f"n{n}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if tiny else dict(os.environ)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "job", "train", "--config", str(cfg_path), "--data", str(data),
           "--out", str(out), "--resume", "never"]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    row = {"n": n, "wall_s": round(time.time() - t0, 1)}
    if r.returncode != 0:
        row["error"] = (r.stderr.strip().splitlines() or ["failed"])[-1][:300]
        return row
    from contracts.events import read_all

    steps = [e for e in read_all(out / "events.jsonl") if e["event"] == "step"]
    rates = [e["tokens_per_s"] for e in steps[1:]] or [e["tokens_per_s"] for e in steps]
    row.update(tokens_per_s=round(statistics.median(rates), 1), steps=len(steps),
               peak_gib_per_gpu=max((e.get("gpu_mem_gib") or 0.0) for e in steps),
               losses=[e["loss"] for e in steps])
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "bench-14b.yaml"))
    p.add_argument("--method", choices=("qlora", "lora", "full"), default=None)
    p.add_argument("--gpus", default="1,2,4,8", help="rank counts to measure (comma-separated; 1 is always added, "
                   "except with --method full, where one GPU may not hold the model)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per point (the first is warm-up)")
    p.add_argument("--global-batch", type=int, default=None, help="default: the config's (256 in the paper)")
    p.add_argument("--micro-batch", type=int, default=None, help="per-GPU micro-batch, the same at every N")
    p.add_argument("--tiny", action="store_true", help="CPU, gloo ranks, a tiny Qwen2 (the code path, not a rate)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    args = p.parse_args(argv)
    ns = rank_counts(args.gpus, args.method)
    if not args.tiny:
        import torch

        have = torch.cuda.device_count()
        if have == 0:
            print("bench/scale.py: no GPU here (use --tiny for the CPU path)", file=sys.stderr)
            return 2
        ns = [n for n in ns if n <= have]
    raw = _config(args)
    from contracts.config import load_config
    from job import env as jenv
    from job.prepare import prepare

    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        work = Path(tmp)
        cfg_path = work / "cfg.yaml"
        cfg_path.write_text(yaml.safe_dump(raw))
        cfg = load_config(cfg_path)
        for n in ns:
            cfg.train.grad_accum(n)  # every N must make the global batch from the same micro-batch
        d = cfg.data
        prepare(d.source, work / "data", split=d.split, subset=d.subset, seed=d.seed, cfg=cfg)
        rows = [point(cfg_path, work / "data", n, work, args.tiny) for n in ns]
    base = next((r["tokens_per_s"] for r in rows if r["n"] == 1 and "tokens_per_s" in r), None)
    for r in rows:
        if "tokens_per_s" in r and base:
            r["efficiency"] = round(r["tokens_per_s"] / (r["n"] * base), 4)
    card = "cpu" if args.tiny else jenv.card_info()["name"]
    result = {"card": card, "method": cfg.train.method, "config": raw.get("name"), "global_batch": cfg.train.global_batch,
              "micro_batch": cfg.train.micro_batch, "steps": args.steps, "tiny": args.tiny,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'card':<22} {'N':>3} {'tok/s':>10} {'peak GiB/GPU':>13} {'efficiency':>10}")
    for r in rows:
        if "error" in r:
            print(f"{card:<22} {r['n']:>3} failed: {r['error']}")
            continue
        print(f"{card:<22} {r['n']:>3} {r['tokens_per_s']:>10.1f} {r['peak_gib_per_gpu']:>13.2f} "
              f"{r.get('efficiency', float('nan')):>10.3f}")
    print(f"wrote {args.out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
