"""How well the cost model predicts training time: predicted vs measured, two subset sizes, one card.

    python bench/cost_accuracy.py --data .carry/socsci210_real_sample.jsonl --subsets 0.25,0.5 --out $OUT
    python bench/cost_accuracy.py --tiny        # the same code path on CPU with a tiny Qwen2 (no GPU)

`.carry/` (not in the repo) is where the developers copied the 2,780-row SocSci210 sample to the GPU
machine: the same file as ../shared/fixtures/socsci210_real_sample.jsonl, which is the default
--data when it exists (else synthetic:600). The Qwen BPE ranks come from the installed dashscope
wheel (or $QWEN_TIKTOKEN; see job/tokenizer.py and bench/COST_ACCURACY.md).

Each subset runs the job's real train path (`job.prepare.prepare` then `job.train.train`: the
Qwen2.5-14B architecture with random weights, 4-bit NF4, LoRA, the paper's optimizer and packing)
in its own process. The cost model's training term is tokens / tokens_per_s, with tokens exact
from the prepared stats.json (launcher/cost/tokens.py count_tokens). Two predictions per run:
  table     tokens_per_s from configs/throughput.yaml for this card (what `estimate` shows);
  other     tokens_per_s measured on the OTHER subset's run (cross-validated: no run predicts itself).
Both are startup + tokens / steady tokens/s (steady: steps 2..N from the step events; startup: the
rest of the trainer's time: first step, optimizer init, adapter save). Measured = the trainer's
wall time (manifest train_seconds). Target: |error| <= 10%.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_config(tiny: bool, global_batch: int | None, micro_batch: int | None, checkpoint_layers: int | None = None):
    """configs/paper.yaml with random 14B weights; its global/micro batch unless given."""
    from contracts.config import load_config

    cfg = load_config(REPO / "configs" / "paper.yaml")
    over = {"model.init": "random", "model.tokenizer": "qwen2.5-offline",
            "model.arch": {"preset": "qwen2-tiny" if tiny else "qwen2.5-14b"},
            "train.global_batch": global_batch or cfg.train.global_batch,
            "train.micro_batch": micro_batch or cfg.train.micro_batch,
            "train.checkpoint_every": 0, "eval.enabled": False}
    if checkpoint_layers is not None:
        over["train.checkpoint_layers"] = checkpoint_layers
    if tiny:
        over.update({"allow_cpu": True, "train.precision": "fp32", "train.optim": "adamw_torch",
                     "train.gradient_checkpointing": False, "model.id": "tiny-qwen2"})
    return cfg.with_overrides(over, source="bench")


def one_run(args: argparse.Namespace, subset: float, out: Path) -> dict:
    """Prepare + train one subset in this process; return its measurements."""
    import torch

    from contracts.events import EventWriter
    from job.prepare import prepare
    from job.train import train

    cfg = make_config(args.tiny, args.global_batch, args.micro_batch, args.checkpoint_layers).with_overrides({"data.subset": subset})
    data_dir = out / "data"
    prepare(args.data, data_dir, split=cfg.data.split, subset=subset, seed=cfg.data.seed, cfg=cfg)
    t0 = time.time()
    res = train(cfg, out / "train", EventWriter(out / "train" / "events.jsonl"), data_dir=data_dir, resume="never")
    wall = time.time() - t0
    man = json.loads((out / "train" / "manifest.json").read_text())
    steps = [json.loads(line) for line in (out / "train" / "events.jsonl").read_text().splitlines()
             if '"event":"step"' in line]
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"subset": subset, "card": card, "steps": res.steps, "train_seconds": man["train_seconds"],
            "wall_with_build_s": round(wall, 1), "peak_gib": man.get("peak_gpu_mem_gib"),
            "step_events": [{"ts": s["ts"], "step": s["step"], "tokens_per_s": s["tokens_per_s"]} for s in steps],
            "data_dir": str(data_dir),
            "config": cfg.to_dict()}


def tile(src: Path, k: int, dst: Path) -> Path:
    """`src`'s rows `k` times over (same studies, so the split and subset draw keep their proportions)."""
    rows = [line for line in src.read_text().splitlines() if line.strip()]
    dst.write_text("".join(line + "\n" for _ in range(k) for line in rows))
    return dst


def steady(run: dict) -> tuple[float, float]:
    """(steady tokens/s over steps 2..N from the step events, startup s = the rest of the trainer's time)."""
    ev = run["step_events"]
    tokens = sum(e["tokens_per_s"] * (e["ts"] - p["ts"]) for p, e in zip(ev, ev[1:]))
    span = ev[-1]["ts"] - ev[0]["ts"] if len(ev) > 1 else 0.0
    tps = tokens / span if span > 0 else run["tokens"] / run["train_seconds"]
    return tps, max(0.0, run["train_seconds"] - run["tokens"] / tps)


def predict(runs: list[dict], table_tps: float | None = None, table_startup: float | None = None) -> list[dict]:
    """The cost model's training time for each run: from the table, and from the other run."""
    from contracts.config import from_dict
    from launcher.cost.rates import card_throughput, load_throughput, model_params_b
    from launcher.cost.tokens import count_tokens

    table = load_throughput()
    for r in runs:
        r["tokens"] = count_tokens(from_dict(r["config"]), data=r["data_dir"]).tokens
        r["steady_tps"], r["startup_s"] = steady(r)
    rows = []
    for i, r in enumerate(runs):
        cfg = from_dict(r["config"])
        row = {"card": r["card"], "subset": r["subset"], "steps": r["steps"], "tokens": int(r["tokens"]),
               "measured_s": r["train_seconds"], "steady_tps": round(r["steady_tps"], 1),
               "startup_s": round(r["startup_s"], 1), "peak_gib": r["peak_gib"]}
        card = _table_card(r["card"], table)
        if card:
            tps, _band, _how = card_throughput(table, card, cfg.train.method, model_params_b(cfg))
            tps = table_tps or tps  # the value the table will hold (measured in the same device call)
            start = float(table.get("train_startup_s", 0)) if table_startup is None else table_startup
            row["table_card"], row["table_tps"], row["table_startup_s"] = card, round(tps, 1), start
            row["pred_table_s"] = round(start + r["tokens"] / tps, 1)
            row["err_table"] = round(row["pred_table_s"] / r["train_seconds"] - 1, 4)
        others = [o for j, o in enumerate(runs) if j != i]
        if others:
            o = others[0]
            row["pred_other_s"] = round(o["startup_s"] + r["tokens"] / o["steady_tps"], 1)
            row["err_other"] = round(row["pred_other_s"] / r["train_seconds"] - 1, 4)
        rows.append(row)
    return rows


def partial_rate(events: Path, subset: float) -> dict:
    """What a run killed by the time limit still tells: its steady tokens/s over the steps it did."""
    if not events.is_file():
        return {"subset": subset, "steps": 0}
    ev = [json.loads(line) for line in events.read_text().splitlines() if '"event":"step"' in line]
    run = {"step_events": ev, "tokens": 0.0, "train_seconds": 1.0}
    tps = steady(run)[0] if len(ev) > 1 else None
    return {"subset": subset, "steps": len(ev), "steady_tps": tps}


def _table_card(device_name: str, table: dict) -> str | None:
    name = device_name.upper()
    for card in ("H200", "H100", "A100-80GB" if "80GB" in name else "A100", "L40S", "L4", "A10G"):
        if card.split("-")[0] in name:
            return card
    return None


def print_table(rows: list[dict]) -> str:
    head = ("card", "subset", "steps", "tokens", "measured s", "steady tok/s", "startup s", "pred(table) s", "err",
            "pred(other run) s", "err", "peak GiB")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(" | ".join(str(x) for x in (
            r["card"], r["subset"], r["steps"], f"{r['tokens']:,}", r["measured_s"], r["steady_tps"], r["startup_s"],
            r.get("pred_table_s", "-"), f"{r['err_table']:+.1%}" if "err_table" in r else "-",
            r.get("pred_other_s", "-"), f"{r['err_other']:+.1%}" if "err_other" in r else "-", r["peak_gib"])))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny Qwen2 on CPU: checks the script, not the card")
    ap.add_argument("--data", default=None, help="SocSci210 rows (.jsonl); default: the shared fixture, else synthetic:600")
    ap.add_argument("--subsets", default="0.25,0.5")
    ap.add_argument("--tile", type=int, default=1,
                    help="repeat every row of --data this many times (real lengths, runs of more steps)")
    ap.add_argument("--global-batch", type=int, default=None, help="default: configs/paper.yaml's")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: configs/paper.yaml's")
    ap.add_argument("--checkpoint-layers", type=int, default=None, help="decoder layers that recompute (default: the config's)")
    ap.add_argument("--table-tps", type=float, default=None,
                    help="tokens/s the table will hold for this card and shape (default: configs/throughput.yaml's)")
    ap.add_argument("--table-startup", type=float, default=None,
                    help="the table's trainer startup seconds (default: configs/throughput.yaml's train_startup_s)")
    ap.add_argument("--cold", action="store_true",
                    help="each run gets its own empty TRITON_CACHE_DIR / TORCHINDUCTOR_CACHE_DIR (a fresh machine)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/cost_accuracy")))
    ap.add_argument("--one", type=float, help=argparse.SUPPRESS)  # child mode: run one subset
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds for each run but the last")
    ap.add_argument("--budget", type=float, default=520.0, help="seconds for all runs together")
    args = ap.parse_args()
    if args.data is None:
        shared = REPO / ".." / "shared" / "fixtures" / "socsci210_real_sample.jsonl"
        args.data = str(shared) if shared.is_file() else "synthetic:600"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tile > 1 and args.one is None:
        args.data = str(tile(Path(args.data), args.tile, args.out / f"tiled-x{args.tile}.jsonl"))
    if args.one is not None:
        res = one_run(args, args.one, args.out / f"subset-{args.one}")
        (args.out / f"subset-{args.one}.json").write_text(json.dumps(res, indent=2))
        return 0
    runs, partial, t_start = [], [], time.time()
    subsets = [float(x) for x in args.subsets.split(",")]
    for k, s in enumerate(subsets):
        # The first run gets --timeout; the last one whatever is left of --budget.
        left = args.budget - (time.time() - t_start) - 15
        limit = left if k == len(subsets) - 1 else min(args.timeout, left)
        cmd = [sys.executable, __file__, "--one", str(s), "--data", args.data, "--out", str(args.out),
               *(f"--{k}={v}" for k, v in (("global-batch", args.global_batch), ("micro-batch", args.micro_batch),
                                           ("checkpoint-layers", args.checkpoint_layers)) if v is not None)]
        cmd += ["--tiny"] if args.tiny else []
        env = dict(os.environ)
        if args.cold:  # compile caches as empty as a fresh cloud machine's
            for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
                env[var] = tempfile.mkdtemp(prefix=f"cold-{s}-{var.split('_')[0].lower()}-")
        t0 = time.time()
        try:
            rc = subprocess.run(cmd, timeout=max(limit, 1), env=env).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        print(f"subset {s}: rc={rc} in {time.time() - t0:.0f} s", flush=True)
        f = args.out / f"subset-{s}.json"
        if f.is_file():
            runs.append(json.loads(f.read_text()))
        else:
            partial.append(partial_rate(args.out / f"subset-{s}" / "train" / "events.jsonl", s))
    for p in partial:
        print(f"unfinished run, steady rate from its step events: {p}", flush=True)
    (args.out / "partial.json").write_text(json.dumps(partial, indent=2))
    if not runs:
        print("no run finished")
        return 1
    rows = predict(runs, args.table_tps, args.table_startup)
    text = print_table(rows)
    (args.out / "cost_accuracy.json").write_text(json.dumps(rows, indent=2))
    (args.out / "cost_accuracy.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
