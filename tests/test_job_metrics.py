"""job.metrics against an independent per-cell computation written here (scipy), to 1e-9."""
import json
import random
import re
from collections import defaultdict

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from contracts.scale import parse_scale
from job.metrics import Record, evaluate, parse_answer
from conftest import REAL_SAMPLE, needs_real_sample


def generated_rows(n: int = 600, seed: int = 3) -> list[dict]:
    """SocSci210-shaped rows with every edge cell: single answer, constant, unbounded, no scale, and
    answers outside the stated scale."""
    rng = random.Random(seed)
    rows = []
    for study in ("aaaaa", "bbbbb", "ccccc"):
        for cond in (1, 2):
            for task in (1, 2, 3):
                lo, hi = rng.choice([(1, 5), (1, 7), (0, 10), (0, 100), (1, 2)])
                for _ in range(rng.randint(5, 40)):
                    rows.append(_row(study, cond, task, rng.randint(lo, hi), lo, hi, rng))
    rows.append(_row("ddddd", 1, 1, 3, 1, 7, rng))  # a single human answer
    rows += [_row("ddddd", 1, 2, 4, 1, 7, rng) for _ in range(6)]  # constant human answers
    rows += [_row("ddddd", 2, 1, rng.randint(0, 5000), 0, 5000, rng) for _ in range(9)]  # unbounded
    for _ in range(12):  # no scale sentence: skipped, never scored on the answers' own range
        r = _row("ddddd", 2, 2, rng.randint(0, 30), 0, 30, rng)
        r["stimuli"] = "How many hours? Only return an integer representing the hours, nothing else."
        rows.append(r)
    # Answers 1..12 under a stated 1..2 (the study 8ctbk): scored, flagged.
    rows += [_row("eeeee", 1, 1, v, 1, 2, rng) for v in (1, 2, 3, 7, 12, 2, 1)]
    rows += [_row("eeeee", 1, 2, v, 1, 5, rng) for v in (1, 2, 3, 4, 5, 3)]
    return rows


def _row(study, cond, task, response, lo, hi, rng) -> dict:
    return {"study_id": study, "condition_num": cond, "task_num": task, "response": response,
            "stimuli": f"Question {task}. Only return an integer from {lo} to {hi}, nothing else.",
            "demographic": {"gender": rng.choice(["Male", "Female"]), "age": rng.randint(18, 90),
                            "party_id": rng.choice(["Democrat", "Republican", "Independent"])}}


def fixed_predictor(row: dict) -> int:
    """A deterministic, imperfect predictor: the answer nudged by the row's id, sometimes out of range."""
    return int(row["response"]) + (hash((row["study_id"], row["task_num"], row["response"])) % 5) - 2


def reference(rows: list[dict], preds: list[int | None]) -> dict:
    """The paper's protocol written out as a plain per-cell loop, for comparison: a cell is scored on
    the scale its questions state (none: skipped); "in scale" leaves out cells with an answer outside it."""
    cells = defaultdict(list)
    for r, p in zip(rows, preds):
        cells[(r["study_id"], r["condition_num"], r["task_num"])].append((r, p))
    study_w, study_u, errors = defaultdict(list), defaultdict(list), []
    study_w_in, outside_cells = defaultdict(list), 0
    for (study, _, _), items in cells.items():
        human = np.array([r["response"] for r, _ in items], float)
        scales = [_stated(r["stimuli"]) for r, _ in items]
        if not all(scales):
            continue
        lo_s, hi_s = min(s[0] for s in scales), max(s[1] for s in scales)
        if hi_s - lo_s + 1 > 101 or len(human) < 2 or human.min() == human.max():
            continue
        mn, mx = human.min(), human.max()
        hum = (human - mn) / (mx - mn)
        model = np.array([min(1, max(0, (p - mn) / (mx - mn))) for _, p in items if p is not None])
        uniform = np.clip((np.arange(lo_s, hi_s + 1) - mn) / (mx - mn), 0, 1)
        study_w[study].append(wasserstein_distance(hum, model))
        study_u[study].append(wasserstein_distance(hum, uniform))
        if human.min() < lo_s or human.max() > hi_s:
            outside_cells += 1
        else:
            study_w_in[study].append(study_w[study][-1])
        errors += [abs(min(1, max(0, (p - mn) / (mx - mn))) - (r["response"] - mn) / (mx - mn))
                   for r, p in items if p is not None]
    return {"w": np.mean([np.mean(v) for v in study_w.values()]),
            "u": np.mean([np.mean(v) for v in study_u.values()]),
            "w_in": np.mean([np.mean(v) for v in study_w_in.values()]), "outside": outside_cells,
            "acc": 1 - np.mean(errors), "studies": len(study_w)}


def _stated(stimulus: str) -> tuple[int, int] | None:
    """The scale these rows (generated, and the real sample's wordings) state, read here, not with the
    parser under test: the last "Only return" sentence's "from LO to HI", "N for ...", "N if ... up to M if"."""
    tail = stimulus[stimulus.rfind("Only return"):] if "Only return" in stimulus else ""
    m = re.match(r"Only return (?:an integer|a number) from (-?\d+) to (-?\d+)", tail)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        return (lo, hi) if lo < hi else None
    m = re.match(r"Only return (\d+) if .* up to (\d+) if", tail)
    if m:
        return int(m.group(1)), int(m.group(2))
    values = [int(v) for v in re.findall(r"(?:return |; | or )(\d+) for ", tail)]
    return (min(values), max(values)) if len(values) >= 2 else None


def records(rows, preds) -> list[Record]:
    return [Record(r["study_id"], r["condition_num"], r["task_num"], r["response"],
                   parse_scale(r["stimuli"]), r.get("demographic") or {}, sample=p)
            for r, p in zip(rows, preds)]


def _check(rows):
    preds = [fixed_predictor(r) for r in rows]
    preds[::17] = [None] * len(preds[::17])  # unparseable answers: counted, not scored
    ref = reference(rows, preds)
    m = evaluate(records(rows, preds), "sample")
    assert m["wasserstein"] == pytest.approx(ref["w"], abs=1e-9)
    assert m["wasserstein_uniform"] == pytest.approx(ref["u"], abs=1e-9)
    assert m["wasserstein_in_scale"] == pytest.approx(ref["w_in"], abs=1e-9)
    assert m["cells_out_of_scale"] == ref["outside"]
    assert m["individual_accuracy"] == pytest.approx(ref["acc"], abs=1e-9)
    assert m["studies_scored"] == ref["studies"]
    assert m["invalid_answers"] == len(preds[::17])
    return m


def test_generated_rows_match_independent_computation():
    m = _check(generated_rows())
    # The edge cells of study ddddd: one single-answer, one constant, one unbounded, one with no stated scale.
    assert (m["cells_too_few"], m["cells_constant"], m["cells_unbounded"], m["cells_no_scale"]) == (1, 1, 1, 1)
    assert ["ddddd", 2, 2] not in [c["cell"] for c in m["cells"]]
    assert {"cell": ["ddddd", 2, 2], "n": 12, "scale": None, "scale_source": None, "out_of_scale": None,
            "skipped": "no_scale"} in m["cells_skipped"]
    assert m["cells_scored"] + 4 == m["cells_total"]
    # eeeee 1/1: answers 3, 7, 12 lie outside the stated 1..2; scored and flagged, and the only such cell.
    flagged = [c for c in m["cells"] if c["out_of_scale"]]
    assert [(c["cell"], c["out_of_scale"]) for c in flagged] == [(["eeeee", 1, 1], 3)]
    assert m["cells_out_of_scale"] == 1 and m["wasserstein_in_scale"] != m["wasserstein"]


def test_out_of_scale_headline_by_hand():
    """Two studies; one cell's answers leave its stated 1..2. W with it and without it, computed by hand."""
    recs = [Record("s", 1, 1, v, (1, 2), sample=1) for v in (1, 2)]  # humans {0, 1}, model all 0: W 0.5
    recs += [Record("t", 1, 1, v, (1, 5), sample=v) for v in (1, 5)]  # perfect: W 0
    recs += [Record("t", 1, 2, v, (1, 2), sample=2) for v in (1, 3)]  # 3 is outside 1..2; model 2 -> 0.5: W 0.5
    m = evaluate(recs, "sample")
    # With: study s 0.5, study t (0 + 0.5) / 2 = 0.25 -> 0.375. Without: s 0.5, t 0 -> 0.25.
    assert m["wasserstein"] == pytest.approx(0.375) and m["wasserstein_in_scale"] == pytest.approx(0.25)
    assert m["cells_out_of_scale"] == 1
    # Uniform guess: s humans {0, 1} vs 1..2 -> {0, 1}: 0. t/1 humans {0, 1} vs {0, .25, .5, .75, 1}: CDF gaps
    # .3, .1, .1, .3 over quarters = 0.2. t/2 humans 1, 3 -> {0, 1} vs 1..2 -> {0, .5}: gap .5 over [.5, 1) = 0.25.
    assert m["wasserstein_uniform"] == pytest.approx((0 + (0.2 + 0.25) / 2) / 2)
    assert m["wasserstein_uniform_in_scale"] == pytest.approx((0 + 0.2) / 2)


@needs_real_sample
def test_real_sample_matches_independent_computation():
    rows = [json.loads(line) for line in REAL_SAMPLE.open(encoding="utf-8")]
    m = _check(rows)
    assert m["cells_unbounded"] > 0 and m["cells_constant"] > 0 and m["cells_too_few"] > 0
    # The paper's uniform-guess row is 0.203 on all unseen studies; 20 real studies land near it.
    assert 0.15 < m["wasserstein_uniform"] < 0.25


def test_perfect_predictor_scores_zero_and_uniform_distribution_equals_uniform_guess():
    rows = generated_rows()
    m = evaluate(records(rows, [r["response"] for r in rows]), "sample")
    assert m["wasserstein"] == pytest.approx(0.0, abs=1e-12) and m["individual_accuracy"] == pytest.approx(1.0)
    dist = []
    for r in (r for r in rows if parse_scale(r["stimuli"])):
        lo, hi = parse_scale(r["stimuli"])
        values = list(range(lo, hi + 1))
        dist.append(Record(r["study_id"], r["condition_num"], r["task_num"], r["response"], (lo, hi),
                           values=values, probs=[1.0] * len(values)))
    d = evaluate(dist, "distribution")
    assert d["wasserstein"] == pytest.approx(d["wasserstein_uniform"], abs=1e-12)
    assert d["individual_accuracy"] == pytest.approx(d["individual_accuracy_uniform"], abs=1e-12)


def test_distribution_mode_is_the_weighted_mixture_of_rows():
    a = Record("s", 1, 1, 1, (1, 3), values=[1, 2, 3], probs=[0.5, 0.5, 0.0])
    b = Record("s", 1, 1, 3, (1, 3), values=[1, 2, 3], probs=[0.0, 0.0, 2.0])  # unnormalized on purpose
    m = evaluate([a, b], "distribution")
    # Mixture: 1 -> .25, 2 -> .25, 3 -> .5 on the rescaled axis {0, .5, 1}; humans at {0, 1}.
    expected = wasserstein_distance([0, 1], [0, 0.5, 1], None, [0.25, 0.25, 0.5])
    assert m["wasserstein"] == pytest.approx(expected, abs=1e-12)
    assert m["individual_accuracy"] == pytest.approx(1 - (0.25 + 0.0) / 2)


def test_demographic_parity_gap_is_worst_minus_best_group():
    rows = [Record("s", 1, 1, v, (1, 5), {"gender": g}, sample=v if g == "F" else 5)
            for g in ("F", "M") for v in [1, 2, 3, 4, 5] * 4]
    dpd = evaluate(rows, "sample", min_group_rows=10)["demographic_parity_difference"]
    # F is always right (error 0); M always answers 5: mean |5 - v| / 4 over v = 1..5 is 0.5.
    assert dpd["fields"]["gender"]["gap"] == pytest.approx(0.5)
    assert dpd["value"] == pytest.approx(0.5) and dpd["fields"]["gender"]["worst"] == "M"


@pytest.mark.parametrize("text,scale", [
    ("... Only return an integer from 1 to 7, where 1 means ..., nothing else.", (1, 7)),
    ("Only return a number from 0 to 100, nothing else.", (0, 100)),
    ("Only return 1 for “Yes” or 2 for “No”, nothing else.", (1, 2)),
    ("Only return 1 for 'a'; 2 for 'b'; 3 for 'c', nothing else.", (1, 3)),
    ("Only return 1 if you accept it as final, up to 4 if you strongly disagree.", (1, 4)),
    ("Do you support increasing minimum wage? (1-7 scale)", (1, 7)),
    ("Only return an integer representing the hours saved, nothing else.", None),
    ("Only return an integer from 5 to 5.", None),
])
def test_parse_scale(text, scale):
    assert parse_scale(text) == scale


@pytest.mark.parametrize("text,value", [("5", 5), (" 7<|im_end|>", 7), ("I'd say 3 or 4", 3),
                                        ("1,200", 1200), ("-2", -2), ("maybe", None), ("", None)])
def test_parse_answer_takes_the_first_integer(text, value):
    assert parse_answer(text) == value
