"""`python -m job prepare`: load SocSci210 (hub id, local file/folder or synthetic:N), split as
the SOCRATES paper (arXiv 2509.05830) does, subset the training side by study, count tokens exactly,
write the splits + stats + hash.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from contracts._io import _UMASK, atomic_write_json
from contracts.config import PARTICIPANT_FRACTION, RunConfig, check_fraction, check_participant_fraction, load_config
from contracts.errors import ContractError
from contracts.events import EventWriter
from job import data as D
from job.tokenizer import OFFLINE, load_tokenizer

OUTPUTS = ("train.jsonl", "test.jsonl", "stats.json")  # replaced in this order: stats.json (the hash) last
Loaded = tuple[D.Source, list[dict], list[dict]]  # (source, train rows, test rows)


@dataclass
class PrepareResult:
    out: Path
    train_rows: int
    test_rows: int
    data_hash: str
    stats: dict


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="HF dataset id, local .jsonl/.parquet file or folder, or synthetic:N "
                   "(default: the config's data.source, else socratesft/SocSci210)")
    p.add_argument("--subset", type=float, default=None, help="fraction of training rows kept, stratified by study")
    p.add_argument("--eval-subset", type=float, default=None, help="fraction of test rows kept (default: all)")
    p.add_argument("--split", default=None, choices=D.PREPARE_SPLITS, help="which generalization split (default "
                   "unseen-studies); unseen-participants: a fraction of each study's participants trains, the "
                   "others are test (needs the rows' `participant`); all-test: every row in test.jsonl, train.jsonl "
                   "empty (to score a whole file)")
    p.add_argument("--participant-fraction", type=float, default=None, help="with --split unseen-participants: the "
                   f"fraction of each study's participants in training, in (0, 1) (default: the config's "
                   f"data.participant_fraction, else {PARTICIPANT_FRACTION}, the paper's)")
    p.add_argument("--seed", type=int, default=None, help="split/subset seed (default 42)")
    p.add_argument("--out", required=True, help="folder for train.jsonl, test.jsonl, stats.json")
    p.add_argument("--config", default=None, help="run config: its tokenizer counts tokens; its data section gives defaults")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config) if args.config else None
    d = cfg.data if cfg else None
    source = args.data or (d.source if d else "socratesft/SocSci210")
    subset = check_fraction(args.subset, "--subset") if args.subset is not None else (d.subset if d else 1.0)
    eval_subset = args.eval_subset if args.eval_subset is not None else (d.eval_subset if d else None)
    if eval_subset is not None:
        check_fraction(eval_subset, "--eval-subset")
    split = args.split or (d.split if d else "unseen-studies")
    fraction = check_participant_fraction(args.participant_fraction, "--participant-fraction") \
        if args.participant_fraction is not None else (d.participant_fraction if d else PARTICIPANT_FRACTION)
    seed = args.seed if args.seed is not None else (d.seed if d else 42)
    out = check_out(args.out)
    # Bad input is refused before anything exists: OUT and its events.jsonl only once the rows validated.
    loaded = load(source, split=split, subset=subset, eval_subset=eval_subset, seed=seed, participant_fraction=fraction)
    events = EventWriter(out / "events.jsonl", echo=True)
    events.emit("start", verb="prepare", source=source)
    try:
        res = write(loaded, out, split=split, subset=subset, eval_subset=eval_subset, seed=seed, cfg=cfg,
                    participant_fraction=fraction)
    except Exception as e:
        events.emit("error", message=str(e) if isinstance(e, ContractError) else f"{type(e).__name__}: {str(e)[:500]}")
        raise
    events.emit("prepare", train_rows=res.train_rows, test_rows=res.test_rows, data_hash=res.data_hash,
                studies=res.stats["train"]["studies"] + res.stats["test"]["studies"],
                train_tokens=res.stats["train"]["tokens"]["total"])
    how = split if split != D.UNSEEN_PARTICIPANTS else (
        f"{split}: {fraction:g} of each study's participants train, {res.stats['participants']['shared']} shared")
    print(f"prepared {res.train_rows} train / {res.test_rows} test rows ({how}, subset {subset}) -> {res.out}")
    return 0


def check_out(value: str | os.PathLike, flag: str = "--out") -> Path:
    """An output folder: not empty text (that would be the current directory), not an existing file."""
    if not str(value).strip():
        raise ContractError(f"{flag}: empty; give an output folder (it is created if missing)")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ContractError(f"{flag} {value}: exists and is not a folder; give a folder path")
    return path


def load(source: str, split: str = "unseen-studies", subset: float = 1.0, eval_subset: float | None = None,
         seed: int = 42, participant_fraction: float = PARTICIPANT_FRACTION) -> Loaded:
    """Load, validate, split and subset; writes nothing (every data problem raises here)."""
    src = D.load_source(source, seed=seed)
    train, test = D.split_rows(src, split, seed, participant_fraction)
    train = D.stratified_subset(train, subset, seed)
    if eval_subset is not None:
        test = D.stratified_subset(test, eval_subset, seed)
    return src, train, test


def prepare(source: str, out: Path, split: str = "unseen-studies", subset: float = 1.0,
            eval_subset: float | None = None, seed: int = 42, cfg: RunConfig | None = None,
            participant_fraction: float | None = None) -> PrepareResult:
    """Load, split, subset, count and write. Returns what it wrote. participant_fraction: default the
    config's data.participant_fraction (the paper's 0.1 without a config)."""
    out = check_out(out)
    if participant_fraction is None:
        participant_fraction = cfg.data.participant_fraction if cfg else PARTICIPANT_FRACTION
    loaded = load(source, split=split, subset=subset, eval_subset=eval_subset, seed=seed,
                  participant_fraction=participant_fraction)
    return write(loaded, out, split=split, subset=subset, eval_subset=eval_subset, seed=seed, cfg=cfg,
                 participant_fraction=participant_fraction)


def write(loaded: Loaded, out: Path, split: str = "unseen-studies", subset: float = 1.0,
          eval_subset: float | None = None, seed: int = 42, cfg: RunConfig | None = None,
          participant_fraction: float = PARTICIPANT_FRACTION) -> PrepareResult:
    """Count tokens and write the splits + stats into a temp folder beside OUT, then move them in:
    a failure on the way leaves an existing OUT as it was (other files in OUT, events.jsonl among them, are kept)."""
    src, train, test = loaded
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.prepare-", dir=out.parent))
    try:
        D.write_jsonl(tmp / "train.jsonl", train)
        D.write_jsonl(tmp / "test.jsonl", test)
        data_hash = D.content_hash(tmp)
        tok_name = (cfg.model.tokenizer or cfg.model.id) if cfg else OFFLINE
        tok = load_tokenizer(tok_name, revision=cfg.model.revision if cfg else None)
        system = cfg.model.system_prompt if cfg else RunConfig().model.system_prompt
        stats = {
            "source": src.name, "split": split, "subset": subset, "eval_subset": eval_subset, "seed": seed,
            "mappings": sorted(src.mappings), "tokenizer": tok_name, "data_hash": data_hash,
            "train": _stats(tok, train, system), "test": _stats(tok, test, system),
        }
        if split == D.UNSEEN_PARTICIPANTS:
            stats["participant_fraction"] = participant_fraction
            stats["participants"] = _participants(train, test)
        atomic_write_json(tmp / "stats.json", stats)
        for name in OUTPUTS:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if not out.exists():
            os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; OUT is as readable as any folder
            os.rename(tmp, out)
        else:
            for name in OUTPUTS:
                os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PrepareResult(out, len(train), len(test), data_hash, stats)


def _stats(tok, rows: list[dict], system: str) -> dict:
    """Rows, studies, cells, and exact token counts of the full training sequence, also per study."""
    lengths = [len(ids) for i in range(0, len(rows), 4096) for ids, _ in D.encode(tok, rows[i:i + 4096], system)]
    per_study: dict[str, list[int]] = {}
    for r, n in zip(rows, lengths):
        per_study.setdefault(r["study_id"], []).append(n)
    cells = {(r["study_id"], r["condition_num"], r["task_num"]) for r in rows}
    return {
        "rows": len(rows), "studies": len(per_study), "cells": len(cells), "tokens": _summary(lengths),
        "per_study": {s: {"rows": len(v), **_summary(v)} for s, v in sorted(per_study.items())},
    }


def _participants(train: list[dict], test: list[dict]) -> dict:
    """Distinct (study, participant) pairs on each side, and how many are on both (0 by construction)."""
    a, b = ({(r["study_id"], D.participant_id(r)) for r in rows} for rows in (train, test))
    return {"train": len(a), "test": len(b), "shared": len(a & b)}


def _summary(lengths: list[int]) -> dict:
    if not lengths:
        return {"mean": 0, "p50": 0, "p90": 0, "max": 0, "total": 0}
    s = sorted(lengths)
    return {"mean": round(statistics.fmean(s), 2), "p50": s[len(s) // 2], "p90": s[min(len(s) - 1, int(0.9 * len(s)))],
            "max": s[-1], "total": sum(s)}
