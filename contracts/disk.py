"""The disk a full fine-tune (`train.method: full`) needs on a node: one formula, read by both sides.

`job check` (job/check.py) refuses a machine whose free disk is under `need_gib`; the launcher
(launcher/task.py) asks SkyPilot for `machine_disk_gb` (the same need plus the OS image and the job's
venv, and a margin for the launcher's coarser parameter count), never less than the template's
`disk_size`. Stdlib only: the launcher never imports torch, the job never imports sky.
"""
from __future__ import annotations

import math

CHECKPOINT_BYTES_PER_PARAM = 12  # a sharded DCP checkpoint: fp32 master weights + AdamW m and v
BASE_DOWNLOAD_FACTOR = 1.1       # the base's bf16 safetensors (2 B/param) as downloaded, with the hub's extras
MIN_FREE_GIB = 2.0               # data, logs, the evaluation's outputs (job/check.py's MIN_DISK_GIB)
SYSTEM_GIB = 60.0                # the machine image (CUDA, drivers) and the job's venv, on the same disk
MARGIN = 1.15                    # the launcher counts parameters from the model's name ("14B" for 14.77B)


def output_bytes_per_param(precision: str) -> int:
    """out/model/ is written in the training precision: fp32 on CPU/fp32 configs, else bf16."""
    return 4 if precision == "fp32" else 2


def kept_checkpoints(checkpoint_every: int, keep_checkpoints: int) -> int:
    """Checkpoints on disk at once: the kept ones plus the one being written (none without checkpoints)."""
    return 0 if not checkpoint_every else max(int(keep_checkpoints), 1) + 1


def full_disk(params: float, *, nodes: int = 1, checkpoint_every: int, keep_checkpoints: int,
              precision: str = "bf16", pretrained: bool = True) -> dict:
    """GiB a full fine-tune of `params` parameters writes on one node of `nodes`: its share of each
    checkpoint, the output weights (node 0), the downloaded base (pretrained), and MIN_FREE_GIB.
    `total_gib` is the checkpoints + output; `need_gib` everything `job check` asks to be free."""
    nodes = max(1, int(nodes))
    kept = kept_checkpoints(checkpoint_every, keep_checkpoints)
    ckpt = params * CHECKPOINT_BYTES_PER_PARAM / nodes / 2**30
    out = params * output_bytes_per_param(precision) / 2**30
    base = params * 2 / 2**30 * BASE_DOWNLOAD_FACTOR if pretrained else 0.0
    total = kept * ckpt + out
    return {"nodes": nodes, "checkpoints": kept, "checkpoint_gib": round(ckpt, 1), "output_gib": round(out, 1),
            "base_gib": round(base, 1), "total_gib": round(total, 1), "need_gib": round(total + base + MIN_FREE_GIB, 1)}


def machine_disk_gb(need_gib: float, *, floor_gb: int = 0) -> int:
    """The `resources.disk_size` to ask for: (need + SYSTEM_GIB) x MARGIN in GB (SkyPilot's unit; 1 GiB
    = 1.074 GB), rounded up to 10, never below `floor_gb` (the template's value)."""
    gb = (need_gib + SYSTEM_GIB) * MARGIN * 2**30 / 1e9
    return max(int(floor_gb), int(math.ceil(gb / 10.0)) * 10)
