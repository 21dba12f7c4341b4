"""Checkpoint folders: complete ones carry a COMPLETE marker (written last, before the atomic rename),
and a run fingerprint: what was trained on what, so that a resume never continues someone else's run.

No torch or transformers here: `--resume` is validated before anything heavy is imported.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from contracts.errors import ContractError

COMPLETE = "COMPLETE"
FINGERPRINT = "socrates_run.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")

# What may differ between a checkpoint and the run resuming from it: how a step is computed (memory,
# kernels, the micro-batch split of the same global batch, bookkeeping), never what it computes.
# A smaller card can therefore resume with a smaller train.micro_batch.
HOW_NOT_WHAT = frozenset({
    "train.micro_batch", "train.packing", "train.gradient_checkpointing", "train.checkpoint_layers", "train.liger",
    "train.attn_implementation", "train.fused_lora", "train.offload_checkpoints", "train.compile", "train.memory_mode",
    "train.checkpoint_every", "train.checkpoint_every_s", "train.keep_checkpoints", "train.logging_steps", "train.report_to",
})
_SECTIONS = ("model", "lora", "train")


def is_complete(path: Path) -> bool:
    """A COMPLETE marker, trainer_state.json, and every file the marker lists there at its size.

    The marker lists the checkpoint's files (written last, after they were fsynced), so a copy that
    stopped part-way still reads as incomplete where a folder rename is not atomic: a bucket mount
    (SkyPilot's MOUNT_CACHED uploads file by file) can hold the marker of a checkpoint whose other
    files never arrived. A marker from before the list (a bare step number) counts as it did."""
    marker = path / COMPLETE
    if not (path.is_dir() and marker.is_file() and (path / "trainer_state.json").is_file()):
        return False
    try:
        sealed = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(sealed, dict):
        return isinstance(sealed, int)  # the bare step number older versions wrote
    files = sealed.get("files")
    if not isinstance(files, dict) or not files:
        return False
    return all(".." not in Path(rel).parts and (f := path / rel).is_file() and f.stat().st_size == size
               for rel, size in files.items())


def move_checkpoint(src: Path, dst: Path) -> None:
    """Move a sealed checkpoint into place: one folder rename where the file system has it; else (a
    bucket mount that renames no folders) file by file with the COMPLETE marker last, so that until
    the last move the copy in place reads as incomplete."""
    try:
        return os.replace(src, dst)
    except OSError:  # no folder rename here
        pass
    files = sorted((p for p in src.rglob("*") if p.is_file()), key=lambda p: (p.name == COMPLETE, str(p)))
    for f in files:
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(f, target)
        except OSError:
            shutil.copy2(f, target)
    shutil.rmtree(src, ignore_errors=True)


def seal(checkpoint: Path, step: int) -> None:
    """Write the COMPLETE marker: the step and every file's size (is_complete checks them)."""
    files = {p.relative_to(checkpoint).as_posix(): p.stat().st_size
             for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != COMPLETE}
    (checkpoint / COMPLETE).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")


def commit(staging: Path, root: Path, step: int, run_fp: dict, keep: int) -> None:
    """Seal a written checkpoint (its fingerprint; every file on disk before the marker that lists them),
    move it into `root` under its name, and keep the newest `keep` complete ones (0: all)."""
    write_fingerprint(staging, run_fp)
    fsync_tree(staging)
    seal(staging, step)
    fsync_tree(staging)
    dst = root / staging.name
    if dst.exists():
        shutil.rmtree(dst)
    move_checkpoint(staging, dst)  # file by file, marker last, where a bucket mount renames no folders
    fsync_dir(root)
    for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def global_step(checkpoint: Path) -> int:
    """The optimizer step a complete checkpoint was saved at (its trainer_state.json)."""
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ContractError(f"--resume: {checkpoint}/trainer_state.json is unreadable; the checkpoint is damaged "
                            "(accepted: a complete checkpoint; --resume never starts over)") from None


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


def fingerprint(config: dict, data_hash: str) -> dict:
    """The config keys that decide what is learned (model, lora, train less HOW_NOT_WHAT), flat, and
    the prepared data's content hash. JSON-normal, so a fresh one compares equal to a stored one."""
    flat: dict = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}", v)
        elif prefix not in HOW_NOT_WHAT:
            flat[prefix] = node

    for section in _SECTIONS:
        walk(section, config.get(section, {}))
    return json.loads(json.dumps({"data_hash": data_hash, "config": flat}, sort_keys=True))


def write_fingerprint(checkpoint: Path, fp: dict) -> None:
    (checkpoint / FINGERPRINT).write_text(json.dumps(fp, indent=1, sort_keys=True) + "\n")


def check_resumable(checkpoint: Path, fp: dict, how: str) -> bool:
    """Refuse (exit 2, one line) a checkpoint trained with another config or on other data. False
    when it carries no fingerprint (written before there was one): the caller says so, then resumes."""
    f = checkpoint / FINGERPRINT
    if not f.is_file():
        return False
    try:
        old = json.loads(f.read_text())
    except (OSError, ValueError):
        raise ContractError(f"--resume {how}: {checkpoint}/{FINGERPRINT} is unreadable; the checkpoint is damaged "
                            "(accepted: a complete checkpoint; --resume never starts over)") from None
    diffs = []
    if old.get("data_hash") != fp["data_hash"]:
        diffs.append(f"data hash {str(old.get('data_hash'))[:12]} there, {fp['data_hash'][:12]} here")
    was, now = old.get("config", {}), fp["config"]
    for key in sorted(set(was) | set(now)):
        if was.get(key, "<unset>") != now.get(key, "<unset>"):
            diffs.append(f"{key} {was.get(key, '<unset>')!r} there, {now.get(key, '<unset>')!r} here")
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise ContractError(
            f"--resume {how}: {checkpoint.parent.name}/{checkpoint.name} comes from a different run: "
            f"{'; '.join(diffs[:3])}{more} (accepted: the config and data it was trained with; changes to how a "
            "step runs, such as train.micro_batch or the speed switches, are fine; --resume never starts over "
            "and deletes these checkpoints, or pick another --out)")
    return True
