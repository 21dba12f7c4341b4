"""Checkpoint folders: complete ones carry a COMPLETE marker (written last, before the atomic rename).

No torch or transformers here: `--resume` is validated before anything heavy is imported.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

COMPLETE = "COMPLETE"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / COMPLETE).is_file() and (path / "trainer_state.json").is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def resume_point(resume: str, root: Path) -> Path | None:
    if resume == "never":
        shutil.rmtree(root, ignore_errors=True)
        return None
    if resume == "auto":
        done = complete_checkpoints(root)
        return done[-1] if done else None
    return Path(resume)


def fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
