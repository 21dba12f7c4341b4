"""`socrates-launch init [DIR]`: editable copies of the packaged run configs (paper.yaml, smoke.yaml),
to edit and pass with `--config DIR/paper.yaml`. Nothing is overwritten: if either file exists, nothing
is written (exit 2, one line)."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from contracts.errors import ContractError
from launcher import resources

CONFIGS = ("paper.yaml", "smoke.yaml")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", nargs="?", default=".", metavar="DIR",
                   help="where to write paper.yaml and smoke.yaml (default: the current folder; created if missing)")


def run(args: argparse.Namespace) -> int:
    dest = Path(args.dir).expanduser()
    if dest.exists() and not dest.is_dir():
        raise ContractError(f"{args.dir}: not a folder (give a folder to write {' and '.join(CONFIGS)} into)")
    there = [str(dest / name) for name in CONFIGS if (dest / name).exists() or (dest / name).is_symlink()]
    if there:
        raise ContractError(f"{' and '.join(there)}: already there; nothing was written (move them away or "
                            "pick another folder)")
    dest.mkdir(parents=True, exist_ok=True)
    for name in CONFIGS:
        shutil.copyfile(resources.path(f"{resources.CONFIGS}/{name}"), dest / name)
        print(f"wrote {dest / name}")
    print(f"edit them, then: socrates-launch up --config {dest / 'paper.yaml'} "
          f"(or --infra local --config {dest / 'smoke.yaml'})")
    return 0
