"""`python -m job ...` with one fault injected around the real job (tests/fakesky.py's managed jobs).

FAKESKY_CKPT_KILL_STEP=N: the first checkpoint at step >= N is cut off mid-write, as a preemption in
the middle of a checkpoint upload to a bucket leaves it: the staging folder is sealed (COMPLETE
marker) by the real code, then copied into checkpoints/ with its marker but its largest file cut to
half, then this process marks FAKESKY_CKPT_MARK and stops (the fake controller then kills the whole
machine). Without those variables it is the real `python -m job`.
"""
from __future__ import annotations

import os
import runpy
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _inject() -> None:
    kill_at = int(os.environ["FAKESKY_CKPT_KILL_STEP"])
    mark = Path(os.environ["FAKESKY_CKPT_MARK"])
    import job.checkpoints as checkpoints  # checkpoints.commit seals every checkpoint, QLoRA's and full's

    real_seal = checkpoints.seal

    def seal(checkpoint: Path, step: int) -> None:
        real_seal(checkpoint, step)
        if step < kill_at or mark.exists():
            return
        torn = checkpoint.parent.parent / checkpoint.name  # checkpoints/checkpoint-N, its upload cut off
        shutil.copytree(checkpoint, torn)
        biggest = max((p for p in torn.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        with open(biggest, "r+b") as f:
            f.truncate(biggest.stat().st_size // 2)
        mark.write_text(f"{step} {biggest.name}\n")
        while True:  # the machine goes away now (the controller kills it)
            time.sleep(1)

    checkpoints.seal = seal


if __name__ == "__main__":
    if os.environ.get("FAKESKY_CKPT_KILL_STEP") and sys.argv[1:2] == ["train"]:
        sys.path.insert(0, os.getcwd())
        _inject()
    sys.argv = ["job", *sys.argv[1:]]
    runpy.run_module("job", run_name="__main__", alter_sys=True)
