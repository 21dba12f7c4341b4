"""Steady tokens/s of one `job train` run, from its own step events, beside configs/throughput.yaml's rate.

    python bench/job_rate.py RUN/events.jsonl [--card H200] [--method qlora] [--out rate.json]

Steady = tokens of optimizer steps W+1..N over their time (each step event carries the tokens/s
since the previous one, so tokens = tokens_per_s x the gap between events). The first W = 2 steps
are left out: in the job path both carry flex_attention/Liger compiles (H200, 2026-11-30: step 2
took 26-32 s, steps 3-7 11.3-12.3 s). The table's rate is the one `estimate` uses for that card (14B).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def steady_rate(events: list[dict], warmup: int = 2) -> dict:
    """tokens/s over steps warmup+1..N; needs at least warmup+1 step events."""
    all_steps = [e for e in events if e.get("event") == "step"]
    if len(all_steps) < warmup + 1 or len(all_steps) < 2:
        raise ValueError(f"{len(all_steps)} step event(s): a steady rate after {warmup} warm-up step(s) needs "
                         f"at least {max(2, warmup + 1)}")
    steps = all_steps[max(0, warmup - 1):]  # the event of the last warm-up step starts the timed span
    pairs = list(zip(steps, steps[1:]))
    tokens = sum(e["tokens_per_s"] * (e["ts"] - p["ts"]) for p, e in pairs)
    span = steps[-1]["ts"] - steps[0]["ts"]
    return {"steps": len(all_steps), "warmup_steps": warmup, "timed_steps": len(pairs), "tokens": tokens, "seconds": span,
            "tokens_per_s": tokens / span, "step_s": [round(e["ts"] - p["ts"], 2) for p, e in pairs],
            "peak_gib": max((e.get("gpu_mem_gib") or 0.0) for e in all_steps),
            "losses": [e["loss"] for e in all_steps]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("events", type=Path)
    ap.add_argument("--card", default="H200")
    ap.add_argument("--method", default="qlora")
    ap.add_argument("--table-key", default="measured", help="measured | lean: which table row to compare with")
    ap.add_argument("--warmup-steps", type=int, default=2, help="leading steps left out (compiles); default 2")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from launcher.cost.rates import load_throughput

    events = [json.loads(line) for line in args.events.read_text().splitlines() if line.strip().startswith("{")]
    r = steady_rate(events, args.warmup_steps)
    table = load_throughput()
    row = table.get(args.table_key, {}).get(args.method, {}).get(14) or {}
    ref = row.get("tokens_per_s")
    r.update({"card": args.card, "table_key": args.table_key, "table_tokens_per_s": ref,
              "ratio_to_table": r["tokens_per_s"] / ref if ref else None})
    print(f"job path steady rate: {r['tokens_per_s']:,.0f} tok/s over steps {args.warmup_steps + 1}-{r['steps']} "
          f"(step times {r['step_s']}), peak {r['peak_gib']} GiB; table ({args.table_key}): "
          f"{ref or '-'} tok/s; ratio {r['ratio_to_table'] or float('nan'):.3f}")
    if args.out:
        args.out.write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
