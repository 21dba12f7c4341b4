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
from contracts.rows import check_row

PARQUET_EXTRA = "pip install 'socrates-launch[parquet]'"
_checked: dict[tuple, int] = {}  # (path, size, mtime_ns) -> rows: `up` checks, then its estimate counts


def check_local(path: Path) -> int:
    """Rows in a local .jsonl/.parquet file or a folder of them, every row schema-checked.

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
    n = 0
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
        n += _checked[key]
    if n == 0:
        raise ContractError(f"--data {path}: no rows (accepted: a .jsonl with one JSON object a line, or a .parquet)")
    return n


def _jsonl(f: Path) -> int:
    rows = 0
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
            rows += 1
    return rows


def _parquet(f: Path) -> int:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ContractError(f"--data {f}: reading .parquet needs pyarrow, which is not installed "
                            f"({PARQUET_EXTRA}), or give a .jsonl") from None
    rows = 0
    try:
        pf = pq.ParquetFile(f)
        batches = pf.iter_batches(batch_size=8192)
        for batch in batches:
            for row in batch.to_pylist():
                check_row(row, rows, f"--data {f}")
                rows += 1
    except ContractError:
        raise
    except Exception as e:  # noqa: BLE001  (pyarrow raises several kinds for a damaged file)
        raise ContractError(f"--data {f}: not a readable parquet file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return rows
