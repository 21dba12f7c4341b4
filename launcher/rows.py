"""Local rows checked before a machine is paid for: the file's shape, then every row against the
job's own schema (contracts/rows.py). `up` and `estimate` both call `check_local`; the job runs the
same check again in `job prepare`.

Stdlib only for .jsonl; a .parquet needs pyarrow (the optional extra `socrates-launch[parquet]`).
"""
from __future__ import annotations

import json
from pathlib import Path

from contracts.errors import ContractError
from contracts.manifest import data_files
from contracts.rows import check_row, no_participants, participant_id

# (path, size, mtime_ns) -> (rows, rows without a participant id, where the first is): `up` checks, then
# its estimate counts
_checked: dict[tuple, tuple[int, int, str]] = {}


def check_local(path: Path, need_participants: bool = False) -> int:
    """Rows in a local .jsonl/.parquet file or a folder of them, every row schema-checked, and with
    `need_participants` (split unseen-participants) every row carrying a participant id.

    One `ContractError` line names the file, the row and the problem. The folder walk is the job's
    (job/data.py: *.jsonl and *.parquet, outside metadata/, not hidden)."""
    path = Path(path)
    files = [path] if not path.is_dir() else [  # a folder: the walk the data hash and the sync use (links refused)
        p for p in data_files(path) if p.suffix in (".jsonl", ".parquet")
        and "metadata" not in p.relative_to(path).parts and not p.name.startswith(".")]
    if not files:
        raise ContractError(f"--data {path}: no .jsonl or .parquet files in it")
    n = missing = 0
    first = ""
    for f in files:
        st = f.stat()
        key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _checked:
            if f.suffix not in (".jsonl", ".parquet"):
                raise ContractError(f"--data {f}: not accepted (a .jsonl or .parquet file, or a prepared folder)")
            _checked[key] = _count(f)
        rows, lacking, where = _checked[key]
        n += rows
        missing += lacking
        first = first or where
    if n == 0:
        raise ContractError(f"--data {path}: no rows (accepted: a .jsonl with one JSON object a line, or a .parquet)")
    if need_participants and missing:
        raise no_participants(f"--data {path}", missing, n, first)
    return n


def _count(f: Path) -> tuple[int, int, str]:
    rows = lacking = 0
    first = ""
    for row, context, at in (_jsonl(f) if f.suffix == ".jsonl" else _parquet(f)):
        check_row(row, rows, context)
        if participant_id(row) is None:  # where the first such row is, for the refusal
            lacking += 1
            first = first or f"{f} {at}, study {row['study_id']}"
        rows += 1
    return rows, lacking, first


def _jsonl(f: Path):
    """(row, its context for check_row, where it is) for each row of a .jsonl file."""
    with open(f, "rb") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise ContractError(f"--data {f}: line {line_no} is not UTF-8 text (accepted: UTF-8 JSON lines)") from None
            except ValueError as e:
                raise ContractError(f"--data {f}: line {line_no} is not JSON ({e}; accepted: one JSON object a line)") from None
            if not isinstance(row, dict):
                raise ContractError(f"--data {f}: line {line_no} is a {type(row).__name__}, not a JSON object "
                                    "(accepted: one JSON object a line)")
            yield row, f"--data {f} (line {line_no})", f"line {line_no}"


def _parquet(f: Path):
    """As `_jsonl`, for a .parquet file, read in batches."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ContractError(f"--data {f}: reading .parquet needs pyarrow, which is not installed "
                            "(pip install 'socrates-launch[parquet]'), or give a .jsonl") from None
    try:
        batches = pq.ParquetFile(f).iter_batches(batch_size=8192)
        for n, row in enumerate(row for batch in batches for row in batch.to_pylist()):
            yield row, f"--data {f}", f"row {n}"
    except Exception as e:  # noqa: BLE001  (pyarrow raises several kinds for a damaged file)
        raise ContractError(f"--data {f}: not a readable parquet file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
