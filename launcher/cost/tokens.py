"""The tokens and steps a run's schedule consumes (rows x epochs / global batch, capped by max_steps), and
the rows it evaluates: exact from a prepared folder's stats.json (`python -m job prepare`), else from
the shipped SocSci210 stats (configs/socsci210_stats.json) or rows counted in a local file."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.config import RunConfig
from contracts.errors import ContractError
from launcher import resources
from launcher.rows import check_local

HUB_STATS_FILE = resources.path("configs/socsci210_stats.json")
HUB_DATASET = "socratesft/SocSci210"


@dataclass(frozen=True)
class Tokens:
    train_rows: int  # after the subset, one epoch
    trained_rows: int  # what the schedule feeds: steps x global batch, at most rows x epochs
    steps: int
    tokens: float
    low: float
    high: float
    test_rows: int
    prompt_tokens_per_row: float
    exact: bool
    source: str
    kind: str = "hub"  # hub | prepared | raw | synthetic: decides the dataset transfer and prepare terms
    data_bytes: int = 0
    split: str = ""  # a prepared folder's own, else the config's data.split


def count_tokens(cfg: RunConfig, data: str | None = None) -> Tokens:
    """Training tokens and steps for `cfg` on `data` (or cfg.data.source)."""
    source, d = data or cfg.data.source, cfg.data
    path = Path(source)
    if path.is_dir() and (path / "stats.json").is_file():
        return _from_prepared(cfg, path / "stats.json")
    hub = load_hub_stats()
    if path.exists():
        n = check_local(path)  # every row checked against the job's schema before a machine is paid for
        share = _train_share(hub, d)
        size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
        return _schedule(cfg, max(1, round(n * share * d.subset)), round(n * (1 - share)), hub,
                         kind="raw", data_bytes=size,
                         how=f"{path}: {n:,} rows counted, tokens per row from the shipped SocSci210 mean "
                             "(run `python -m job prepare --out DIR` and pass --data DIR for exact counts)")
    if source.startswith("synthetic:"):
        n = source.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ContractError(f"--data {source!r}: synthetic:N needs a whole number of rows N >= 1")
        n = int(n)
        train = synthetic_train_rows(n, d.split, d.subset)
        if train is None:
            train = round(n * _train_share(hub, d) * d.subset)
        test = n - train if d.subset >= 1 else round(n * (1 - _train_share(hub, d)))
        return _schedule(cfg, train, test, hub, kind="synthetic",
                         how=f"{source}: generated rows, tokens per row from the shipped SocSci210 mean")
    if source.startswith((".", "/", "~")) or path.suffix in (".jsonl", ".json", ".parquet"):
        raise ContractError(f"--data {source!r}: no such file or folder (a prepared folder with stats.json, "
                            "a local .jsonl/.parquet file or folder, or the hub id socratesft/SocSci210)")
    if source.rstrip("/") != HUB_DATASET:
        raise ContractError(f"--data {source!r}: no token stats for this hub dataset (accepted: {HUB_DATASET}, "
                            "or prepare it with `python -m job prepare --out DIR` and pass --data DIR)")
    if rows := hub["splits"].get(d.split):
        train_all, test_all, where = rows["train"], rows["test"], "rows from the SOCRATES paper (arXiv 2509.05830)"
    else:
        share = _train_share(hub, d)
        train_all, test_all = round(hub["total_rows"] * share), round(hub["total_rows"] * (1 - share))
        where = f"rows approximate ({share:.0%} of {hub['total_rows']:,} for split {d.split})"
    # The subset is stratified by study and keeps >= 1 row per study: the rounding is negligible.
    test = test_all if d.eval_subset is None else round(test_all * d.eval_subset)
    return _schedule(cfg, round(train_all * d.subset), test, hub,
                     how=f"{HUB_DATASET}: {where}, tokens per row from configs/socsci210_stats.json")


def _from_prepared(cfg: RunConfig, stats_file: Path) -> Tokens:
    try:
        stats = json.loads(stats_file.read_text(encoding="utf-8"))
        train, test = stats["train"], stats["test"]
        rows, total = int(train["rows"]), float(train["tokens"]["total"])
        test_rows, test_mean = int(test["rows"]), float(test["tokens"]["mean"])
    except (ValueError, KeyError, TypeError) as e:
        raise ContractError(f"--data {stats_file.parent}: unreadable stats.json ({type(e).__name__}: {e}); "
                            "re-run `python -m job prepare`") from None
    how = f"{stats_file}: exact counts by `job prepare` with tokenizer {stats.get('tokenizer', '?')}"
    prepared, subset = float(stats.get("subset") or 1.0), cfg.data.subset
    scale = subset / prepared if abs(prepared - subset) > 1e-9 and subset < prepared else 1.0
    if scale != 1.0:
        how += f", scaled x{scale:.4g} from its subset {prepared:g} to {subset:g}"
    size = sum(f.stat().st_size for f in stats_file.parent.rglob("*") if f.is_file())
    # The answer is a few tokens; evaluation prompts are the training sequence minus it.
    return _schedule(cfg, max(1, round(rows * scale)), test_rows, None, exact=scale == 1.0, how=how,
                     kind="prepared", data_bytes=size, mean=total / rows if rows else 0.0, total=total * scale,
                     prompt_mean=max(1.0, test_mean - 4),
                     split=_split_name(stats.get("split"), stats.get("participant_fraction")))


def _schedule(cfg: RunConfig, train_rows: int, test_rows: int, hub: dict | None, how: str, exact: bool = False,
              kind: str = "hub", data_bytes: int = 0, mean: float = 0.0, total: float | None = None,
              prompt_mean: float = 0.0, split: str | None = None) -> Tokens:
    """Steps the schedule takes, and the tokens those steps consume (packed: no padding)."""
    t, train_rows = cfg.train, max(1, train_rows)
    steps = t.total_steps(train_rows)
    trained_rows = min(train_rows * t.epochs, steps * t.global_batch)
    lo = hi = mean
    if hub is not None:
        mean, lo, hi = (hub["tokens_per_row"][k] for k in ("mean", "low", "high"))
        prompt_mean = mean - 4
    tokens = total * trained_rows / train_rows if (total is not None and exact) else trained_rows * mean
    return Tokens(train_rows=train_rows, trained_rows=int(math.ceil(trained_rows)), steps=steps, tokens=tokens,
                  low=tokens * lo / mean if mean else tokens, high=tokens * hi / mean if mean else tokens,
                  test_rows=max(0, test_rows), prompt_tokens_per_row=prompt_mean, exact=exact, source=how,
                  kind=kind, data_bytes=data_bytes,
                  split=split if split is not None else _split_name(cfg.data.split, cfg.data.participant_fraction))


def synthetic_train_rows(n: int, split: str, subset: float) -> int | None:
    """Training rows the job gets from `synthetic:n`, where that follows from n alone (else None): as
    job/synthetic.generate deals n rows round-robin over max(4, min(40, n // 30)) studies and
    job/data.split_rows holds out 20% of the studies, at least 1 (`random`: 20% of the rows);
    tests/test_launcher_firsthour.py checks it against the job's own prepare."""
    if subset < 1:
        return None
    if split == "random":
        return n - max(1, round(n * 0.2))
    studies = max(4, min(40, n // 30))
    if split != "unseen-studies" or n % studies:
        return None  # per-study counts differ: which studies are held out decides
    held = min(studies - 1, max(1, round(studies * 0.2)))
    return n - held * (n // studies)


def _train_share(hub: dict, d) -> float:
    """The share of rows that trains under data section `d`'s split (unseen-participants: about its
    participant_fraction, as rows per participant are alike within a study)."""
    if rows := hub["splits"].get(d.split):
        return rows["train"] / (rows["train"] + rows["test"])
    if d.split == "unseen-participants":
        return d.participant_fraction
    return float(hub["approx_train_share"].get(d.split, 0.8))


def _split_name(split: Any, fraction: Any) -> str:
    """The split as the estimate names it (a prepared folder's stats.json is read back: shown, never trusted)."""
    if split == "unseen-participants" and isinstance(fraction, (int, float)) and not isinstance(fraction, bool):
        return f"{split}, {fraction:g} of each study's participants in training"
    return " ".join(str(split or "unknown").split())[:40]


def load_hub_stats(path: Path = HUB_STATS_FILE) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
