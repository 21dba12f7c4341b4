"""The table bench/job_resume_14b.sh prints: every step event (both runs), the LR the schedule gives
for that step, and whether the resumed run continued the same step count and LR curve."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from contracts.config import load_config
from contracts.events import read_all


def expected_lrs(cfg, total: int) -> list[float]:
    """LR after each optimizer step 1..total, from transformers' own scheduler with our warmup."""
    import torch
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    sched = get_scheduler(cfg.train.lr_scheduler, opt, num_warmup_steps=math.ceil(cfg.train.warmup_ratio * total),
                          num_training_steps=total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])  # the Trainer logs the LR used by the step that just ran
        opt.step(); sched.step()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--run", required=True)
    a = ap.parse_args()
    cfg = load_config(a.config)
    events = read_all(Path(a.run) / "events.jsonl")
    starts = [i for i, e in enumerate(events) if e["event"] == "start"]
    steps = [(sum(1 for s in starts if s < i), e) for i, e in enumerate(events) if e["event"] == "step"]
    if not steps:
        print("no step events"); return 1
    total = steps[0][1]["total_steps"]
    exp = expected_lrs(cfg, total)
    man = json.loads((Path(a.run) / "manifest.json").read_text()) if (Path(a.run) / "manifest.json").is_file() else {}
    card = man.get("card", {}).get("name", "?")
    print(f"card: {card}   config: {a.config}   total_steps: {total}")
    print(f"{'run':>3} {'step':>4} {'loss':>9} {'lr':>11} {'lr(sched)':>11} {'tok/s':>9} {'peak GiB':>8}")
    for run, e in steps:
        print(f"{run:>3} {e['step']:>4} {e['loss']:>9.4f} {e['lr']:>11.4e} {exp[e['step'] - 1]:>11.4e} "
              f"{e['tokens_per_s']:>9.1f} {e['gpu_mem_gib']:>8.2f}")
    ckpts = [e["step"] for e in events if e["event"] == "checkpoint"]
    resumed = [e for r, e in steps if r == len(starts)]
    first = [e for r, e in steps if r == 1]
    killed_at = max((c for c in ckpts if first and c <= first[-1]["step"]), default=None)
    ok_steps = bool(resumed) and resumed[0]["step"] == (killed_at or 0) + 1 and resumed[-1]["step"] == total
    ok_lr = all(math.isclose(e["lr"], exp[e["step"] - 1], rel_tol=1e-6, abs_tol=1e-12) for _, e in steps)
    done = [e for e in events if e["event"] == "done"]
    tps = [e["tokens_per_s"] for e in resumed[1:]] or [e["tokens_per_s"] for e in resumed]
    print(f"checkpoints: {ckpts}; resumed from step {killed_at}; resumed steps "
          f"{[e['step'] for e in resumed]}; same step count: {ok_steps}; LR = schedule at every step: {ok_lr}")
    print(f"tokens/s (resumed run, steady steps): {sum(tps) / max(len(tps), 1):.1f}   "
          f"peak GiB: {man.get('peak_gpu_mem_gib')}   done: {done[-1]['reason'] if done else None}   "
          f"manifest files: {len(man.get('files', []))}")
    return 0 if ok_steps and ok_lr and done else 1


if __name__ == "__main__":
    raise SystemExit(main())
