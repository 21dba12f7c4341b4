"""The SOCRATES paper's evaluation metrics (arXiv 2509.05830, "Evaluation"), pure numpy/scipy: no torch here.

A *cell* is (study_id, condition_num, task_num). Per cell, human and model answers are rescaled
to [0, 1] with the cell's *human* min and max; model answers are clipped to [0, 1]. Cells with
fewer than 2 human answers or a constant human answer are skipped; cells whose answer scale has
more than 101 levels ("unbounded", e.g. amounts in dollars) are excluded and counted. A cell's
scale is the one its stimuli state (contracts/scale.py: ranges, step grids, enumerated options),
never one read from its answers: a cell whose stimuli state none is skipped and counted
("no_scale"), and a cell whose rows state different scales is excluded and reported
("scale_conflict"), never merged. These three are decided from the questions alone, before any
answer is looked at. A scored cell with human answers outside its stated scale (not one of the
scale's answers) is scored, counted (`cells_out_of_scale`) and flagged (`out_of_scale`: how many
answers), and the headline W is also given without those cells (`wasserstein_in_scale`). The
distance is `scipy.stats.wasserstein_distance`, averaged over the cells of a study, then over
studies.

Each evaluated row is a `Record`. Its prediction is either one sampled integer (`sample` mode,
None when the model's answer held no integer) or a probability over the row's scale values
(`distribution` mode). The uniform guess puts equal mass on every level of the cell's scale (on a
step grid, every grid point).

Demographic parity difference: `DPD_DEFINITION` says it (our definition; the paper's is not public).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from contracts.scale import Scale, as_scale

MAX_LEVELS = 101
MIN_GROUP_ROWS = 10

# Table 2 of the SOCRATES paper (arXiv 2509.05830), unseen studies, W (lower is better).
PAPER_TABLE2 = {
    "Uniform guess": 0.203,
    "Llama3-8B base": 0.219,
    "Qwen2.5-14B base": 0.205,
    "GPT-4o": 0.174,
    "GPT-4o 5-shot": 0.161,
    "SOCRATES-Llama-8B": 0.153,
    "SOCRATES-Qwen-14B": 0.151,
    "Empirical best": 0.125,
}

DPD_DEFINITION = (
    "Demographic parity difference (this project's definition; the paper's is not public): for "
    "each demographic field, rows are grouped by the field's value (age in bands 18-29, 30-44, "
    "45-59, 60+; groups of at least "
    f"{MIN_GROUP_ROWS} rows); the field's gap is the largest minus the smallest group mean "
    "individual error (1 - accuracy); the value is the mean gap over fields with at least 2 "
    "groups. Lower means the model errs alike across groups."
)

Cell = tuple[str, int, int]

_INT = re.compile(r"-?\d+")


def parse_answer(text: str) -> int | None:
    """The first integer in a generated answer (the paper's rule), or None."""
    m = _INT.search(text.replace(",", ""))
    return int(m.group()) if m else None


@dataclass
class Record:
    study_id: str
    condition_num: int
    task_num: int
    response: float
    scale: Scale | tuple[int, int] | None = None
    """The row's stated answer scale (contracts.scale); None: it states none."""
    demographic: dict = field(default_factory=dict)
    sample: int | None = None
    """Sample mode: the parsed answer (None: unparseable)."""
    values: Sequence[float] | None = None
    probs: Sequence[float] | None = None
    """Distribution mode: the probability of each scale value (normalized here)."""

    @property
    def cell(self) -> Cell:
        return (str(self.study_id), int(self.condition_num), int(self.task_num))


@dataclass
class CellResult:
    cell: Cell
    n: int
    levels: int
    lo: float
    hi: float
    w: float
    w_uniform: float
    human: list[float]
    predicted_values: list[float]
    predicted_weights: list[float]
    scale: dict = field(default_factory=dict)
    """The scale used: {"lo", "hi", "step", "values"} (the uniform guess spreads over `values`)."""
    scale_source: str = "stated"
    """stated: the stimulus says it (the only source a scored cell has)."""
    out_of_scale: int = 0
    """Human answers that are not one of the stated scale's answers (flagged when > 0)."""


def cell_scale(records: Sequence[Record]) -> tuple[Scale | None, str | None, list[Scale]]:
    """A cell's scale, from its rows' stimuli only (never their answers): (scale, "stated", []);
    (None, None, []) when they state none; (None, "conflict", the distinct scales) when its rows
    state different ones (reported, never merged)."""
    stated: list[Scale] = []
    for r in records:
        s = as_scale(r.scale)
        if s is not None and s not in stated:
            stated.append(s)
    if len(stated) > 1:
        return None, "conflict", stated
    if stated:
        return stated[0], "stated", []
    return None, None, []


def evaluate(records: Iterable[Record], mode: str, max_levels: int = MAX_LEVELS,
             min_group_rows: int = MIN_GROUP_ROWS) -> dict[str, Any]:
    """All metrics for one set of predictions; JSON-ready (cells listed under `cells`)."""
    from scipy.stats import wasserstein_distance  # ~0.6 s to import: not for an evaluate that is skipped

    if mode not in ("sample", "distribution"):
        raise ValueError(f"mode {mode!r}: sample | distribution")
    by_cell: dict[Cell, list[Record]] = defaultdict(list)
    rows_total = invalid = 0
    for r in records:
        by_cell[r.cell].append(r)
        rows_total += 1
        if mode == "sample" and r.sample is None:
            invalid += 1

    counts = {"cells_total": len(by_cell), "cells_no_scale": 0, "cells_scale_conflict": 0, "cells_unbounded": 0,
              "cells_too_few": 0, "cells_constant": 0, "cells_no_valid_prediction": 0, "cells_scored": 0,
              "cells_out_of_scale": 0}
    results: list[CellResult] = []
    skipped: list[dict[str, Any]] = []
    row_errors: list[tuple[dict, float]] = []
    uniform_errors: list[float] = []
    for cell, rows in sorted(by_cell.items()):
        human = np.array([r.response for r in rows], dtype=float)
        scale, source, conflict = cell_scale(rows)
        outside = None if scale is None else sum(not scale.accepts(x) for x in human.tolist())
        info = {"cell": list(cell), "n": len(rows), "scale": scale.to_json() if scale else None,
                "scale_source": source, "out_of_scale": outside}
        # What is scored is decided from the questions first (no scale, conflict, unbounded), then
        # by the paper's two rules on the answers (fewer than 2, constant).
        why = ("no_scale" if scale is None and source is None else "scale_conflict" if scale is None
               else "unbounded" if scale.levels > max_levels else "too_few" if len(human) < 2
               else "constant" if human.min() == human.max() else None)
        if why is not None:
            counts[f"cells_{why}"] += 1
            skipped.append(info | {"skipped": why} | ({"scales": [s.to_json() for s in conflict]} if conflict else {}))
            continue
        levels = scale.levels
        lo_h, hi_h = float(human.min()), float(human.max())
        span = hi_h - lo_h
        h = (human - lo_h) / span
        scale_values = np.array(scale.values(), dtype=float)
        scale01 = np.clip((scale_values - lo_h) / span, 0.0, 1.0)

        pv, pw, errs = _predictions(rows, mode, lo_h, span)
        if not pv:
            counts["cells_no_valid_prediction"] += 1
            skipped.append(info | {"skipped": "no_valid_prediction"})
            continue
        w = float(wasserstein_distance(h, pv, None, pw))
        w_uni = float(wasserstein_distance(h, scale01))
        for r, e in errs:
            row_errors.append((r.demographic or {}, e))
        uniform_errors.extend(float(np.mean(np.abs(scale01 - x))) for x in h)
        counts["cells_scored"] += 1
        counts["cells_out_of_scale"] += outside > 0
        results.append(CellResult(cell, len(rows), levels, lo_h, hi_h, w, w_uni,
                                  h.tolist(), list(map(float, pv)),
                                  [1.0] * len(pv) if pw is None else list(map(float, pw)),
                                  scale.to_json(), source, outside))

    per_study = _per_study(results, "w")
    per_study_uniform = _per_study(results, "w_uniform")
    in_scale = [c for c in results if not c.out_of_scale]
    errors = np.array([e for _, e in row_errors], dtype=float)
    return {
        "mode": mode,
        "rows": rows_total,
        "invalid_answers": invalid,
        "invalid_rate": invalid / rows_total if rows_total else 0.0,
        **counts,
        "studies_scored": len(per_study),
        "wasserstein": _mean(per_study.values()),
        "wasserstein_uniform": _mean(per_study_uniform.values()),
        # The same headline without the cells flagged out_of_scale (equal when none is).
        "wasserstein_in_scale": _mean(_per_study(in_scale, "w").values()),
        "wasserstein_uniform_in_scale": _mean(_per_study(in_scale, "w_uniform").values()),
        "individual_accuracy": float(1 - errors.mean()) if errors.size else None,
        "individual_accuracy_uniform": float(1 - np.mean(uniform_errors)) if uniform_errors else None,
        "demographic_parity_difference": demographic_parity(row_errors, min_group_rows),
        "dpd_definition": DPD_DEFINITION,
        "per_study": per_study,
        "per_study_uniform": per_study_uniform,
        "cells": [c.__dict__ | {"cell": list(c.cell)} for c in results],
        "cells_skipped": skipped,
        "paper_table2": PAPER_TABLE2,
    }


def _predictions(rows: Sequence[Record], mode: str, lo: float, span: float
                 ) -> tuple[list[float], list[float] | None, list[tuple[Record, float]]]:
    """A cell's predicted values (rescaled, clipped), their weights, and each row's error."""
    if mode == "sample":
        valid = [r for r in rows if r.sample is not None]
        pv = [float(np.clip((r.sample - lo) / span, 0, 1)) for r in valid]
        errs = [(r, abs(p - (r.response - lo) / span)) for r, p in zip(valid, pv)]
        return pv, None, errs
    values: list[float] = []
    weights: list[float] = []
    errs = []
    for r in rows:
        if r.values is None or r.probs is None or len(r.values) == 0:
            continue
        p = np.asarray(r.probs, dtype=float)
        if not np.isfinite(p).all() or p.sum() <= 0:
            continue
        p = p / p.sum()
        v = np.clip((np.asarray(r.values, dtype=float) - lo) / span, 0, 1)
        values.extend(v.tolist())
        weights.extend(p.tolist())  # every row carries total mass 1: the cell's mixture
        errs.append((r, float(np.sum(p * np.abs(v - (r.response - lo) / span)))))
    return values, weights, errs


def demographic_parity(row_errors: Sequence[tuple[dict, float]], min_group_rows: int = MIN_GROUP_ROWS
                       ) -> dict[str, Any]:
    """Per-field gap between the worst and best group's mean error; `value` is their mean."""
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for demo, err in row_errors:
        for key, value in demo.items():
            if value is None or value == "":
                continue
            groups[key][_group(key, value)].append(err)
    fields: dict[str, dict[str, Any]] = {}
    for key, by_value in sorted(groups.items()):
        means = {v: float(np.mean(e)) for v, e in by_value.items() if len(e) >= min_group_rows}
        if len(means) < 2:
            continue
        worst, best = max(means, key=means.get), min(means, key=means.get)
        fields[key] = {"gap": means[worst] - means[best], "worst": worst, "best": best,
                       "groups": len(means)}
    value = float(np.mean([f["gap"] for f in fields.values()])) if fields else None
    return {"value": value, "fields": fields}


def _group(key: str, value: Any) -> str:
    """The group a demographic value falls in; ages in bands so groups have enough rows."""
    if key == "age" and isinstance(value, (int, float)):
        for edge, label in ((30, "18-29"), (45, "30-44"), (60, "45-59")):
            if value < edge:
                return label
        return "60+"
    return str(value)


def _per_study(results: Sequence[CellResult], attr: str) -> dict[str, float]:
    by_study: dict[str, list[float]] = defaultdict(list)
    for c in results:
        by_study[c.cell[0]].append(getattr(c, attr))
    return {s: float(np.mean(v)) for s, v in sorted(by_study.items())}


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None
