"""What a training run leaves (QLoRA's adapter or a full fine-tune's weights): artifacts, manifest, `done`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contracts import manifest
from contracts._io import sha256_file
from contracts.config import RunConfig
from contracts.events import EventWriter
from job import env


@dataclass
class TrainResult:
    out: Path
    steps: int
    total_steps: int
    reason: str
    resumed_from: str | None


def finish(out: Path, events: EventWriter, device, files: list[Path], *, kind: str, written: RunConfig, mode,
           data_hash: str, step: int, total_steps: int, reason: str, resume_from: Path | None, n_rows: int,
           dropped: int, seconds: float, world: int, **extra) -> None:
    """Rank 0, training over (an adapter or a full fine-tune's weights): an `artifact` event for each of
    `files` (under out/), manifest.json (what the launcher verifies; `extra` adds keys) and the `done` event."""
    import torch  # torch-heavy: the module is imported by `train --help`

    for f in files:
        events.emit("artifact", path=f.relative_to(out).as_posix(), sha256=sha256_file(f), size=f.stat().st_size)
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else 0.0
    meta = {
        "kind": kind, "config": written.to_dict(), "memory_mode": mode, "data_hash": data_hash,
        "packages": env.package_versions(), "card": env.card_info(), "git_revision": env.git_revision(),
        "steps": step, "total_steps": total_steps, "reason": reason,
        "resumed_from": resume_from.name if resume_from else None, "train_rows": n_rows, "rows_too_long": dropped,
        "peak_gpu_mem_gib": peak, "train_seconds": round(seconds, 1),
        "data_stats": "data/stats.json" if (out / "data" / "stats.json").is_file() else None,
        "image": env.image_info(),  # the prebuilt job image (ref, digest) or None: a venv from the lock
        "world_size": world, **extra,
    }
    manifest.write(out, meta)
    events.emit("done", reason=reason, steps=step, total_steps=total_steps, manifest="manifest.json",
                peak_gpu_mem_gib=peak)
