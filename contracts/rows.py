"""The SocSci210 row schema: one check, stdlib only, used by the job (`job prepare`) and by the
launcher (`up`/`estimate` on a local file, before a machine is paid for).

Schema: study_id non-empty string; response, condition_num, task_num integers (a whole float
response is taken as an integer); prompt optional, a string or null; stimuli and demographic
required when there is no (non-empty) prompt: stimuli a string, demographic an object (field
name -> value) or null. When present they are typed the same way even beside a prompt (evaluate
reads both). Every problem is a `ContractError` naming where, the row and the column.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

from contracts.errors import ContractError

REQUIRED_COLUMNS = ("study_id", "response", "condition_num", "task_num")


def check_row(r: dict, i: int, where: str) -> None:
    """One row (index `i`, 0-based, in `where`); a whole float response becomes an int in place."""
    if not isinstance(r, dict):
        raise ContractError(f"{where}: row {i} is a {type(r).__name__}, not an object with columns")
    missing = [c for c in REQUIRED_COLUMNS if c not in r]
    if not r.get("prompt"):
        missing += [c for c in ("stimuli", "demographic") if c not in r]
    if missing:
        raise ContractError(f"{where}: row {i} is missing column(s) {', '.join(missing)} "
                            f"(needs {', '.join(sorted(REQUIRED_COLUMNS))} and prompt or stimuli+demographic)")
    resp = r["response"]
    if isinstance(resp, float) and math.isfinite(resp) and resp.is_integer():
        r["response"] = resp = int(resp)
    if isinstance(resp, bool) or not isinstance(resp, int):
        raise ContractError(f"{where}: row {i} (study {r.get('study_id')}): response {resp!r} is not "
                            "an integer (SocSci210 answers are integers)")
    if not isinstance(r["study_id"], str) or not r["study_id"]:
        raise ContractError(f"{where}: row {i}: study_id {r['study_id']!r} is not a non-empty string")
    for c in ("condition_num", "task_num"):
        if isinstance(r[c], bool) or not isinstance(r[c], int):
            raise ContractError(f"{where}: row {i}: {c} {r[c]!r} is not an integer")
    for c in ("prompt", "stimuli"):
        if r.get(c) is not None and not isinstance(r[c], str):
            raise ContractError(f"{where}: row {i}: {c} {short(r[c])} is not text (a string or null)")
    demo = r.get("demographic")
    if demo is not None and not isinstance(demo, dict):
        raise ContractError(f"{where}: row {i}: demographic {short(demo)} is not an object "
                            "(field name -> value, or null)")
    if not r.get("prompt") and not isinstance(r.get("stimuli"), str):
        raise ContractError(f"{where}: row {i}: no prompt and stimuli {r.get('stimuli')!r} is not text")


def validate_rows(rows: Iterable[dict], where: str) -> int:
    """Every row checked (see the module doc); at least one. Returns how many."""
    n = 0
    for n, r in enumerate(rows, 1):
        check_row(r, n - 1, where)
    if not n:
        raise ContractError(f"{where}: no rows")
    return n


def short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n - 3] + "..."


def participant_id(r: dict) -> Any:
    """A row's participant (SocSci210's `participant`: an index within its study; a non-empty string is
    taken too), or None when it has none. What split unseen-participants needs on every row."""
    p = r.get("participant")
    return p if (isinstance(p, int) and not isinstance(p, bool)) or (isinstance(p, str) and p) else None


def no_participants(where: str, missing: int, total: int, first: str) -> ContractError:
    """The one-line refusal of split unseen-participants for rows without participant ids."""
    return ContractError(f"{where}: --split unseen-participants needs participant ids, and {missing:,} of {total:,} "
                         f"rows have none ({first}); give a source whose rows carry `participant`, or another --split")
