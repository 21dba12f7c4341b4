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

PARQUET_EXTRA = "pip install 'socrates-launch[parquet]'"
# (path, size, mtime_ns) -> (rows, rows without a participant id, where the first is): `up` checks, then
# its estimate counts
_checked: dict[tuple, tuple[int, int, str]] = {}


def check_local(path: Path, need_participants: bool = False) -> int:
    """Rows in a local .jsonl/.parquet file or a folder of them, every row schema-checked, and with
    `need_participants` (split unseen-participants) every row carrying a participant id.

    One `ContractError` line names the file, the row and the problem. The folder walk is the job's
    (job/data.py: *.jsonl and *.parquet, outside metadata/, not hidden)."""
    path = Path(path)
    if path.is_dir():  # the walk the data hash and the sync use (links refused)
        files = [p for p in data_files(path) if p.suffix in (".jsonl", ".parquet")
                 and "metadata" not in p.relative_to(path).parts and not p.name.startswith(".")]
    else:
        files = [path]
    if not files:
        raise ContractError(f"--data {path}: no .jsonl or .parquet files in it")
    n = missing = 0
    first = ""
    for f in files:
        st = f.stat()
        key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _checked:
            if f.suffix == ".jsonl":
                _checked[key] = _jsonl(f)
            elif f.suffix == ".parquet":
                _checked[key] = _parquet(f)
            else:
                raise ContractError(f"--data {f}: not accepted (a .jsonl or .parquet file, or a prepared folder)")
        rows, lacking, where = _checked[key]
        n += rows
        missing += lacking
        first = first or where
    if n == 0:
        raise ContractError(f"--data {path}: no rows (accepted: a .jsonl with one JSON object a line, or a .parquet)")
    if need_participants and missing:
        raise no_participants(f"--data {path}", missing, n, first)
    return n


def _no_id(row: dict, f: Path, at: str) -> str:
    """Where a row without a participant id is, for the refusal ("" when it has one)."""
    return "" if participant_id(row) is not None else f"{f} {at}, study {row['study_id']}"


def _jsonl(f: Path) -> tuple[int, int, str]:
    rows = lacking = 0
    first = ""
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
            check_row(row, rows, f"--data {f} (line {line_no})")
            where = _no_id(row, f, f"line {line_no}")
            lacking += bool(where)
            first = first or where
            rows += 1
    return rows, lacking, first


def _parquet(f: Path) -> tuple[int, int, str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ContractError(f"--data {f}: reading .parquet needs pyarrow, which is not installed "
                            f"({PARQUET_EXTRA}), or give a .jsonl") from None
    rows = lacking = 0
    first = ""
    try:
        pf = pq.ParquetFile(f)
        batches = pf.iter_batches(batch_size=8192)
        for batch in batches:
            for row in batch.to_pylist():
                check_row(row, rows, f"--data {f}")
                where = _no_id(row, f, f"row {rows}")
                lacking += bool(where)
                first = first or where
                rows += 1
    except ContractError:
        raise
    except Exception as e:  # noqa: BLE001  (pyarrow raises several kinds for a damaged file)
        raise ContractError(f"--data {f}: not a readable parquet file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return rows, lacking, first
