"""What evaluation and prediction hand back: the eval results files and the predict result line.

Both sides read these: the job writes them (job/evaluate.py, job/predict.py), the launcher reads
what comes back from a machine or a subprocess (launcher/verbs/report.py, launcher/verbs/predict.py),
and what comes back is untrusted: every reader here refuses a malformed file or line with one line
(ContractError) naming it and what is accepted, never a traceback.

**OUT/metrics.json** (`METRICS_FILE`), a JSON object:
- `results`: an object, key `"<model>/<mode>"` (`result_key`: model `base`, `fine-tuned` or a
  baseline such as `uniform`; mode `sample` or `distribution`) -> that evaluation's result, an object
  holding at least the `SUMMARY_KEYS` job/metrics.py computes (a reader shows a value that is not a
  number as it is, and a result that is not an object as unknown: a hand-edited file still renders);
- `paper_table2` (the paper's Table 2: name -> W) and `dpd_definition` (text), for the report.

**OUT/cells.jsonl** (`CELLS_FILE`), rewritten whole from metrics.json's results by every evaluation:
one JSON object a line, one line per cell (`CELL_KEYS`): `study_id` (str), `condition_num`,
`task_num` (int), `scale` (the scale its stimuli state: {lo, hi, step[, values]}, or null), `scale_source`
(`stated`, `conflict` when its rows state different scales, or null when they state none;
`human_range` in files from before cells without a stated scale were skipped), `human_n` (int or
null), `out_of_scale` (how many human answers are not one of the stated scale's answers: > 0 flags
the cell; null without a scale), `w` (result key -> W of the cell under it, and `uniform` -> the
uniform guess's W), `skipped` (result key -> why that result did not score the cell: no_scale,
scale_conflict, unbounded, too_few, constant, no_valid_prediction), and for a scale conflict the
distinct `scales`. `out_of_scale` and `scales` may be absent (older files; no conflict).

**The predict result line** (`PREDICT_PREFIX` + one JSON object): `python -m job predict` prints one
per query on stdout; `socrates-launch predict` renders it. Either `{"error": "<one line>"}` (that query
was refused; the next one is read) or `PREDICT_FIELDS`: `scale` [lo, hi], `values` (the scale's
answers, ints, ascending), `probs` (their probabilities, normalized: sum 1), `valid_mass` (how much of
the model's probability the scale's answers hold, 0..1), `sample` (the sampled answer's integer or
null), `sample_text`, `human` (the test row's answer or null), `example` (its row number or null),
`prompt`, `prompt_tokens`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from contracts import remote
from contracts._io import atomic_write_json, atomic_write_text
from contracts.errors import ContractError

METRICS_FILE = "metrics.json"
CELLS_FILE = "cells.jsonl"
REPORT_FILE = "report.html"
MAX_METRICS_BYTES = 64 << 20  # a 2,780-row evaluation's file is ~100 KiB; larger is not one of ours
# The numbers a result is summarized by (the `eval` event, `socrates-launch report`), in this order,
# then `demographic_parity_difference` (its value).
SUMMARY_KEYS = ("mode", "model", "split", "rows", "cells_scored", "studies_scored", "wasserstein",
                "wasserstein_in_scale", "wasserstein_uniform", "individual_accuracy", "invalid_rate", "cells_no_scale",
                "cells_out_of_scale", "cells_unbounded", "cells_scale_conflict", "prompt_tokens_per_s")
CELL_KEYS = ("study_id", "condition_num", "task_num", "scale", "scale_source", "human_n", "w", "skipped")
OPTIONAL_CELL_KEYS = ("out_of_scale", "scales")
SCALE_SOURCES = ("stated", "human_range", "conflict")  # human_range: results written before no-scale cells were skipped
SKIP_REASONS = ("no_scale", "too_few", "constant", "unbounded", "scale_conflict", "no_valid_prediction")

PREDICT_PREFIX = "@@socrates-predict "
PREDICT_FIELDS = ("scale", "values", "probs", "valid_mass", "sample", "sample_text", "human", "example",
                  "prompt", "prompt_tokens")


# --- metrics.json ------------------------------------------------------------------------------

def result_key(model: str, mode: str) -> str:
    """"<model>/<mode>", the key of one evaluation's result in metrics.json."""
    return f"{model}/{mode}"


def read_metrics(path: str | os.PathLike) -> dict:
    """metrics.json as an object whose `results` is an object (absent: empty); ContractError, one
    line naming the file, when it cannot be read, is not JSON, or is not that shape."""
    path = Path(path)
    again = "; `socrates-launch download` pulls it again"
    try:
        size = path.stat().st_size
        if size > MAX_METRICS_BYTES:
            raise ContractError(f"{path}: unreadable metrics ({size:,} bytes, over the {MAX_METRICS_BYTES:,} "
                                f"accepted){again}")
        data = remote.load_file(path, MAX_METRICS_BYTES)  # finite numbers, bounded integers
    except (OSError, ValueError, RecursionError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e) else \
            type(e).__name__
        raise ContractError(f"{path}: unreadable metrics ({why}){again}") from None
    if not isinstance(data, dict):
        raise ContractError(f"{path}: not an evaluation metrics file (a JSON {type(data).__name__}, expected an "
                            f"object with 'results'){again}")
    results = data.get("results")
    if results is None:
        data["results"] = {}
    elif not isinstance(results, dict):
        raise ContractError(f"{path}: results is {type(results).__name__}, not an object of model/mode -> "
                            f"metrics{again}")
    return data


def write_metrics(out: str | os.PathLike, key: str, result: dict, **extra: Any) -> dict:
    """Add (or replace) `key`'s result in OUT/metrics.json, atomically; an earlier file that is damaged
    is replaced, not trusted. `extra` sets top-level keys (paper_table2, dpd_definition). Returns it all."""
    path = Path(out) / METRICS_FILE
    try:
        data = read_metrics(path) if path.is_file() else {"results": {}}
    except ContractError:
        data = {"results": {}}
    if not isinstance(result, dict):
        raise ContractError(f"{key}: a result must be an object, not {type(result).__name__}")
    data["results"][key] = result
    data.update(extra)
    atomic_write_json(path, data)
    return data


def summary(result: Any) -> dict:
    """The numbers shown for one result (SUMMARY_KEYS, then demographic_parity_difference's value);
    a result that is not an object shows them all as unknown (None)."""
    if not isinstance(result, dict):
        result = {}
    dpd = result.get("demographic_parity_difference")
    return {**{k: result.get(k) for k in SUMMARY_KEYS},
            "demographic_parity_difference": dpd.get("value") if isinstance(dpd, dict) else dpd}


# --- cells.jsonl -------------------------------------------------------------------------------

def cell_lines(results: dict[str, dict]) -> list[dict]:
    """One line per cell over every result in metrics.json (see the module's docstring), sorted by
    (study_id, condition_num, task_num)."""
    lines: dict[tuple, dict] = {}
    for key, res in sorted(results.items()):
        for c in res.get("cells") or []:
            line = _cell_line(lines, c)
            line["w"][key] = c.get("w")
            line["w"]["uniform"] = c.get("w_uniform")
        for c in res.get("cells_skipped") or []:
            line = _cell_line(lines, c)
            line["skipped"][key] = c.get("skipped")
            if c.get("scales"):
                line["scales"] = c["scales"]
    return [lines[k] for k in sorted(lines)]


def _cell_line(lines: dict, c: dict) -> dict:
    study, cond, task = c["cell"]
    k = (str(study), int(cond), int(task))
    if k not in lines:
        lines[k] = {"study_id": k[0], "condition_num": k[1], "task_num": k[2], "scale": c.get("scale"),
                    "scale_source": c.get("scale_source"), "human_n": c.get("n"),
                    "out_of_scale": c.get("out_of_scale"), "w": {}, "skipped": {}}
    elif lines[k]["out_of_scale"] is None:  # an older result first: a newer one knows the count
        lines[k]["out_of_scale"] = c.get("out_of_scale")
    return lines[k]


def write_cells(out: str | os.PathLike, results: dict[str, dict]) -> Path:
    """OUT/cells.jsonl, rewritten whole (atomically) from every result metrics.json holds; each line is
    checked against the schema first (a result that would break it stops here, not in a reader)."""
    path = Path(out) / CELLS_FILE
    lines = cell_lines(results)
    for n, line in enumerate(lines, 1):
        validate_cell_line(line, f"{path} (line {n})")
    atomic_write_text(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return path


def read_cells(path: str | os.PathLike) -> list[dict]:
    """Every line of a cells.jsonl, validated; ContractError naming the file and line otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_METRICS_BYTES + 1)
        if len(data) > MAX_METRICS_BYTES:
            raise ValueError(f"over the {MAX_METRICS_BYTES:,} bytes accepted")
        text = data.decode("utf-8")
    except (OSError, ValueError) as e:
        raise ContractError(f"{path}: unreadable cells file ({getattr(e, 'strerror', None) or e})") from None
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{path} (line {n})"
        try:
            obj = remote.loads(raw, remote.MAX_LINE)
        except remote.Refused as e:
            raise ContractError(f"{where}: not JSON ({e}); expected one cell object a line") from None
        out.append(validate_cell_line(obj, where))
    return out


def validate_cell_line(obj: Any, where: str = "cells.jsonl") -> dict:
    """One cells.jsonl line against its schema; returns it, or ContractError naming the first bad field."""
    if not isinstance(obj, dict):
        raise ContractError(f"{where}: a JSON {type(obj).__name__} is not a cell line (expected an object with "
                            f"{', '.join(CELL_KEYS)})")
    missing = [k for k in CELL_KEYS if k not in obj]
    if missing:
        raise ContractError(f"{where}: missing {', '.join(missing)} (a cell line has {', '.join(CELL_KEYS)})")
    unknown = sorted(set(obj) - set(CELL_KEYS) - set(OPTIONAL_CELL_KEYS))
    if unknown:
        raise ContractError(f"{where}: unknown key {unknown[0]!r} (accepted: "
                            f"{', '.join(CELL_KEYS + OPTIONAL_CELL_KEYS)})")
    if not isinstance(obj["study_id"], str):
        _bad(where, "study_id", obj["study_id"], "text")
    for k in ("condition_num", "task_num"):
        if not _is_int(obj[k]):
            _bad(where, k, obj[k], "a whole number")
    for k in ("human_n", "out_of_scale"):
        if obj.get(k) is not None and not (_is_int(obj[k]) and obj[k] >= 0):
            _bad(where, k, obj[k], "a whole number >= 0, or null")
    if obj["scale_source"] is not None and obj["scale_source"] not in SCALE_SOURCES:
        _bad(where, "scale_source", obj["scale_source"], f"{' | '.join(SCALE_SOURCES)} or null")
    if obj["scale"] is not None:
        _check_scale_json(where, "scale", obj["scale"])
    for s in obj.get("scales") or []:
        _check_scale_json(where, "scales", s)
    if not isinstance(obj["w"], dict) or not all(isinstance(k, str) and (v is None or is_number(v))
                                                  for k, v in obj["w"].items()):
        _bad(where, "w", obj["w"], "an object of result key -> W (a number or null)")
    if not isinstance(obj["skipped"], dict) or not all(isinstance(k, str) and v in SKIP_REASONS
                                                        for k, v in obj["skipped"].items()):
        _bad(where, "skipped", obj["skipped"], f"an object of result key -> {' | '.join(SKIP_REASONS)}")
    return obj


def _check_scale_json(where: str, key: str, s: Any) -> None:
    ok = isinstance(s, dict) and all(_is_int(s.get(k)) for k in ("lo", "hi", "step")) and s["lo"] <= s["hi"] \
        and s["step"] >= 1 and set(s) <= {"lo", "hi", "step", "values"} \
        and ("values" not in s or (isinstance(s["values"], list) and all(_is_int(v) for v in s["values"])))
    if not ok:
        _bad(where, key, s, '{"lo": int, "hi": int >= lo, "step": int >= 1[, "values": [int, ...]]}')


# --- the predict result line ---------------------------------------------------------------------

def predict_line(result: dict) -> str:
    """The line `job predict` prints for one query's result (or {"error": ...}); checked first."""
    return PREDICT_PREFIX + json.dumps(validate_predict_result(result), allow_nan=False)


def parse_predict_line(line: str) -> dict | None:
    """The result a predict line carries; None for a line that is not one (other output of the job);
    ContractError (one line) for a line with the prefix whose result breaks the schema."""
    if not line.startswith(PREDICT_PREFIX):
        return None
    body = line[len(PREDICT_PREFIX):].strip()
    try:
        obj = remote.loads(body, remote.MAX_LINE)  # finite numbers, bounded integers
    except remote.Refused as e:
        raise ContractError(f"job predict: a result line that is not JSON ({e}): {remote.clean(body[:60])!r}") from None
    return validate_predict_result(obj)


def validate_predict_result(obj: Any) -> dict:
    """A predict result (or error) against the schema in the module's docstring; returns it."""
    where = "job predict result"
    if not isinstance(obj, dict):
        raise ContractError(f"{where}: a JSON {type(obj).__name__} is not accepted (expected an object)")
    if "error" in obj:
        if set(obj) != {"error"} or not isinstance(obj["error"], str):
            _bad(where, "error", obj.get("error"), 'an object {"error": "<text>"} and nothing else')
        return obj
    missing = [k for k in PREDICT_FIELDS if k not in obj]
    if missing:
        raise ContractError(f"{where}: missing {', '.join(missing)} (a result has {', '.join(PREDICT_FIELDS)}, "
                            "or is {\"error\": ...})")
    unknown = sorted(set(obj) - set(PREDICT_FIELDS))
    if unknown:
        raise ContractError(f"{where}: unknown key {unknown[0]!r} (accepted: {', '.join(PREDICT_FIELDS)})")
    values, probs = obj["values"], obj["probs"]
    s = obj["scale"]
    if not (isinstance(s, list) and len(s) == 2 and all(_is_int(v) for v in s) and s[0] <= s[1]):
        _bad(where, "scale", s, "[lo, hi], two whole numbers, lo <= hi")
    if not (isinstance(values, list) and values and all(_is_int(v) for v in values)
            and values == sorted(set(values)) and s[0] <= values[0] and values[-1] <= s[1]):
        _bad(where, "values", values, "the scale's answers: whole numbers, ascending, within scale")
    if not (isinstance(probs, list) and len(probs) == len(values)
            and all(is_number(p) and p >= 0 for p in probs) and abs(sum(probs) - 1) <= 1e-6):
        _bad(where, "probs", probs, "one probability >= 0 per value, summing to 1")
    if not (is_number(obj["valid_mass"]) and 0 <= obj["valid_mass"] <= 1 + 1e-9):
        _bad(where, "valid_mass", obj["valid_mass"], "a number from 0 to 1")
    for k, ok, what in (("sample", lambda v: v is None or _is_int(v), "a whole number or null"),
                        ("sample_text", lambda v: v is None or isinstance(v, str), "text or null"),
                        ("human", lambda v: v is None or is_number(v), "a number or null"),
                        ("example", lambda v: v is None or (_is_int(v) and v >= 0), "a row number or null"),
                        ("prompt", lambda v: isinstance(v, str), "text"),
                        ("prompt_tokens", lambda v: _is_int(v) and v >= 0, "a whole number >= 0")):
        if not ok(obj[k]):
            _bad(where, k, obj[k], what)
    return obj


# --- helpers -------------------------------------------------------------------------------------

# Bounded: formatting one as a float never overflows. is_number: a finite int or float (not a bool),
# what a metric's value is when the file is sound.
_is_int, is_number = remote.is_int, remote.is_number


def is_result(r: Any) -> bool:
    """One evaluation's result is an object; anything else in `results` is shown as not a result."""
    return isinstance(r, dict)


def _bad(where: str, key: str, value: Any, accepted: str) -> None:
    shown = json.dumps(value, default=str)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise ContractError(f"{where}: {key} {shown} is not accepted ({accepted})")
