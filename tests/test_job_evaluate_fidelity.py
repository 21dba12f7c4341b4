"""Fidelity to the paper's protocol on real wordings (issue #11): the answer scale read right for every
SocSci210 wording, the model-free uniform baseline against a from-scratch computation written here,
cells.jsonl, `prepare --split all-test`, and prompt-less rows rendered in the source's field order.

Nothing here calls the project's scale parser to compute an expected value: the wordings table is
written by hand, the real sample's scales come from `reference_scale` below, and W from `w1` below.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from contracts.scale import Scale, instruction, parse_scale
from job.__main__ import main as job_main
from conftest import REAL_SAMPLE, REPO, needs_real_sample


def R(lo: int, hi: int, step: int = 1) -> list[int]:
    return list(range(lo, hi + 1, step))


# Every distinct answer instruction of ../shared/fixtures/socsci210_real_sample.jsonl (51 wordings,
# 20 studies), then the wordings the issue and the dataset card name that the sample lacks.
SAMPLE_WORDINGS = [
    ("Only return 1 for 'A lot of money' or 2 for 'Very little money', nothing else.\"", R(1, 2)),
    ("Only return 1 for 'Because the doctor felt it was the right thing to do.'; 2 for 'Because the doctor wanted "
     "to maintain a strong doctor-patient relationship with me.'; 3 for 'Because the doctor was hoping I would not "
     "file a malpractice lawsuit.', nothing else.", R(1, 3)),
    ("Only return 1 for 'Their environmental impact is lower' or 2 for 'Their environmental impact is the same', "
     "nothing else.\"", R(1, 2)),
    ("Only return 1 for 'Yes' or 2 for 'No', nothing else.", R(1, 2)),
    ("Only return 1 for Yes or 2 for No, nothing else.\u201d", R(1, 2)),
    ("Only return 1 for \u201cYes\u201d or 2 for \u201cNo\u201d, nothing else.", R(1, 2)),
    ("Only return 1 if you accept it as final, up to 4 if you strongly believe it should be challenged.", R(1, 4)),
    ("Only return a number from 1 to 4, nothing else.", R(1, 4)),
    ("Only return a number from 1 to 6, nothing else.", R(1, 6)),
    ("Only return an integer from 0 to 10, where 0 means environment is not at all a high priority for this family "
     "and 10 means environment is a very high priority for this family, nothing else.\"", R(0, 10)),
    ("Only return an integer from 0 to 10, where 0 means not at all and 10 means very much, nothing else.\"", R(0, 10)),
    ("Only return an integer from 0 to 10, where 0 means not at all ethical and 10 means very ethical, nothing "
     "else.\"", R(0, 10)),
    ("Only return an integer from 0 to 10, where 0 means not at all knowledgeable and 10 means very knowledgeable, "
     "nothing else.\"", R(0, 10)),
    ("Only return an integer from 0 to 100 representing how human-like or evolved they appear, nothing else.", R(0, 100)),
    ("Only return an integer from 0 to 100 representing percent likelihood, nothing else.\"", R(0, 100)),
    ("Only return an integer from 0 to 100 representing that percentage, nothing else.", R(0, 100)),
    ("Only return an integer from 0 to 100, nothing else.", R(0, 100)),
    ("Only return an integer from 0 to 100, where 0 means 'Cold' and 100 means 'Warm'.", R(0, 100)),
    ("Only return an integer from 0 to 100, where 0 means 'Not disappointed at all' and 100 means 'Extremely "
     "disappointed'.", R(0, 100)),
    ("Only return an integer from 0 to 1200 representing dollars, nothing else.\"", R(0, 1200)),
    ("Only return an integer from 0 to 2000 representing dollars, nothing else.\"", R(0, 2000)),
    ("Only return an integer from 0 to 2800 representing dollars, nothing else.\"", R(0, 2800)),
    ("Only return an integer from 0 to 6, where 0 means 'in all cases' and 6 means 'never \u2013 in no cases'.", R(0, 6)),
    ("Only return an integer from 1 to 4 where 1 means Very fair and 4 means Very unfair, nothing else.\"", R(1, 4)),
    ("Only return an integer from 1 to 4, nothing else.", R(1, 4)),
    ("Only return an integer from 1 to 4, where 1 means Strongly Disagree and 4 means Strongly Agree.", R(1, 4)),
    ("Only return an integer from 1 to 4, where 1 means Very Unlikely and 4 means Very Likely.", R(1, 4)),
    ("Only return an integer from 1 to 5, nothing else.", R(1, 5)),
    ("Only return an integer from 1 to 5, nothing else.\u201d", R(1, 5)),
    ("Only return an integer from 1 to 5, where 1 = 'Extremely closely' and 5 = 'Not closely at all', nothing else.",
     R(1, 5)),
    ("Only return an integer from 1 to 5, where 1 = Not interested at all and 5 = Extremely interested.\"", R(1, 5)),
    ("Only return an integer from 1 to 5, where 1 means 'Agree strongly' and 5 means 'Disagree strongly'.", R(1, 5)),
    ("Only return an integer from 1 to 5, where 1 means 'Not at all' and 5 means 'Extremely', nothing else.", R(1, 5)),
    ("Only return an integer from 1 to 5, where 1 means Angry and 5 means Calm.'", R(1, 5)),
    ("Only return an integer from 1 to 5, where 1 means Strongly disagree and 5 means Strongly agree, nothing "
     "else.\u201d", R(1, 5)),
    ("Only return an integer from 1 to 6, where 1 means 'Strongly support' and 6 means 'Strongly oppose'.", R(1, 6)),
    ("Only return an integer from 1 to 7, nothing else.", R(1, 7)),
    ("Only return an integer from 1 to 7, nothing else.\u201d", R(1, 7)),
    ("Only return an integer from 1 to 7, where 1 = 'Extremely likely' and 7 = 'Extremely unlikely', nothing else.",
     R(1, 7)),
    ("Only return an integer from 1 to 7, where 1 = 'Reduce liberties to fight terrorism' and 7 = 'Preserve "
     "freedoms even with some risk', nothing else.", R(1, 7)),
    ("Only return an integer from 1 to 7, where 1 = 'Strongly support' and 7 = 'Strongly oppose', nothing else.",
     R(1, 7)),
    ("Only return an integer from 1 to 7, where 1 means 'Strongly favor', 2 means 'Somewhat favor', 3 means "
     "'Slightly favor', 4 means 'Neither favor nor oppose', 5 means 'Slightly oppose', 6 means 'Somewhat oppose', "
     "7 means 'Strongly oppose', nothing else.", R(1, 7)),
    ("Only return an integer from 1 to 7, where 1 means Not Concerned At All and 7 means Extremely Concerned, "
     "nothing else.\u201d", R(1, 7)),
    ("Only return an integer from 1 to 7, where 1 means Not Likely At All and 7 means Extremely Likely, nothing "
     "else.\u201d", R(1, 7)),
    ("Only return an integer from 1 to 7, where 1 means Strongly Disagree and 7 means Strongly Agree, nothing "
     "else.\u201d", R(1, 7)),
    ("Only return an integer from 1 to 7, where 1 means Strongly Oppose and 7 means Strongly Support, nothing "
     "else.\u201d", R(1, 7)),
    ("Only return an integer from 1 to 7, where 1 means Strongly disagree and 7 means Strongly agree, nothing else.",
     R(1, 7)),
    ("Only return an integer from 1 to 7, where 1 means Very dissatisfied and 7 means Very satisfied, nothing else.",
     R(1, 7)),
    ("Only return an integer from 1 to 7, where 1 means strongly favor and 7 means strongly oppose.", R(1, 7)),
    ("Only return an integer representing the estimated monthly cost in dollars, nothing else.", None),
    ("Only return an integer representing the estimated monthly hours saved, nothing else.", None),
]

OTHER_WORDINGS = [
    # labels or amounts in parentheses after either end
    ("Only return an integer from 1 (Decreased a lot) to 5 (Increased a lot), nothing else.", R(1, 5)),
    ("Only return an integer from 1 ($0) to 9 ($45), nothing else.", R(1, 9)),
    ("On a scale from 1 (Not at all extreme) to 5 (Very extreme), how extreme do you think this person is? "
     "Only return an integer, nothing else.", R(1, 5)),
    ("How \u201cAsian\u201d would you say she is on a scale from 1 (not at all Asian) to 5 (who I think of when I "
     "think of \u201cAsian\u201d)? Only return an integer from 1 to 5, nothing else.", R(1, 5)),
    # step grids
    ("Only return a multiple of 100 between 0 and 1000, nothing else.", R(0, 1000, 100)),
    ("How many cents would you give? Only return a multiple of 10 between 0 and 100.", R(0, 100, 10)),
    ("Only return a multiple of 25 between 10 and 100, nothing else.", [25, 50, 75, 100]),
    ("Only return an integer from 0 to 100 in steps of 5, nothing else.", R(0, 100, 5)),
    # negative ends, thousands separators, other joiners
    ("Only return an integer between -10 and 10, nothing else.", R(-10, 10)),
    ("Only return an integer from \u22123 (very cold) to +3 (very warm), nothing else.", R(-3, 3)),
    ("Only return an integer from -5 to -1, nothing else.", R(-5, -1)),
    ("Only return an integer from 0 to 1,000 representing dollars, nothing else.", R(0, 1000)),
    ("Only return a multiple of 1,000 between 0 and 10,000, nothing else.", R(0, 10000, 1000)),
    ("Only return an integer from 1 through 7, nothing else.", R(1, 7)),
    ("Only return an integer, where 1 means Strongly disagree and 5 means Strongly agree.", R(1, 5)),
    # enumerated options
    ("Only return 0 or 1, nothing else.", R(0, 1)),
    ("Only return 1, 2, 3 or 4, nothing else.", R(1, 4)),
    ("Only return 1, 3 or 5, nothing else.", [1, 3, 5]),
    ("Only return 1 for 'Agree'; 2 for 'Neutral'; 3 for 'Disagree', nothing else.", R(1, 3)),
    # the `predict` shorthand
    ("Do you support increasing minimum wage? (1-7 scale)", R(1, 7)),
    ("Should taxes rise? (0 to 10)", R(0, 10)),
    # the instruction wins over a range in the passage; a range with no scale word is no scale
    ("The mover rate increased from 8.4% in 2020 to 9.3% in 2021, from 3 to 4 million people. "
     "Only return an integer from 1 to 7, nothing else.", R(1, 7)),
    ("Prices rose from 3 to 4 dollars. Only return an integer representing the price, nothing else.", None),
    ("Only return an integer from 5 to 5.", None),
    ("", None),
]


@pytest.mark.parametrize("text,values", SAMPLE_WORDINGS + OTHER_WORDINGS)
def test_scale_wordings(text, values):
    s = parse_scale(text)
    assert (s.values() if s is not None else None) == values


def test_stated_scale_reads_back_through_its_instruction():
    """What `predict` appends to a scenario without an instruction states the same scale again."""
    for s in (Scale(1, 7), Scale(-3, 3), Scale(0, 1000, 100), Scale(0, 100, 5), Scale(10, 100, 25, (25, 50, 75, 100)),
              Scale(1, 5, 1, (1, 3, 5))):
        back = parse_scale(instruction(s))
        assert back is not None and back.values() == s.values()
    assert Scale(1, 7) == (1, 7) and tuple(Scale(1, 7)) == (1, 7)  # the (lo, hi) view older callers use
    assert Scale(0, 1000, 100) != (0, 1000)  # a grid is not the plain range


# --- An independent reference: scale, W, the per-cell protocol ---------------------------------------

def reference_scale(stimulus: str) -> list[int] | None:
    """The scale of a stimulus as this test reads it, written only for the wordings of the real sample
    and of `generated_rows` (table above): the last "Only return" sentence decides."""
    at = stimulus.rfind("Only return")
    if at < 0:
        return None
    tail = stimulus[at:]
    m = re.match(r"Only return (?:an integer|a number) from (\d+)(?: \([^)]*\))? to (\d+)", tail)
    if m:
        return R(int(m.group(1)), int(m.group(2)))
    m = re.match(r"Only return a multiple of (\d+) between (\d+) and (\d+)", tail)
    if m:
        step, lo, hi = map(int, m.groups())
        return [v for v in range(lo, hi + 1) if v % step == 0]
    m = re.match(r"Only return (\d+) if .* up to (\d+) if", tail)
    if m:
        return R(int(m.group(1)), int(m.group(2)))
    if re.match(r"Only return \d+ for ", tail):
        return sorted({int(v) for v in re.findall(r"(?:return |; | or )(\d+) for ", tail)})
    return None


def w1(u: list[float], v: list[float]) -> float:
    """1-D Wasserstein-1 between two equal-weight samples: the area between their CDFs."""
    pts = sorted(set(u) | set(v))
    total = 0.0
    for a, b in zip(pts, pts[1:]):
        fu = sum(x <= a for x in u) / len(u)
        fv = sum(x <= a for x in v) / len(v)
        total += abs(fu - fv) * (b - a)
    return total


def reference_uniform(rows: list[dict]) -> dict:
    """The paper's protocol for the uniform guess, from scratch: per cell (study, condition, task) with
    a stated scale of <= 101 answers (none stated: skipped) and >= 2 human answers that are not all
    equal, W between the rescaled humans and the scale's answers rescaled the same way (min/max of
    the humans) and clipped to [0, 1]; mean per study, then over studies. `outside`: the cell's human
    answers that are not on its scale; `w_in`: the mean without the cells that have any."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        cells[(r["study_id"], r["condition_num"], r["task_num"])].append(r)
    per_cell: dict[tuple, dict] = {}
    for key, rs in cells.items():
        human = [float(r["response"]) for r in rs]
        stated = {tuple(s) for s in (reference_scale(r["stimuli"]) for r in rs) if s is not None}
        assert len(stated) <= 1, f"cell {key}: rows state different scales"
        values = list(next(iter(stated))) if stated else None
        source = "stated" if stated else None
        outside = sum(x not in values for x in human) if values else None
        if not values or len(human) < 2 or min(human) == max(human) or len(values) > 101:
            per_cell[key] = {"source": source, "values": values, "w": None, "outside": outside}
            continue
        lo, span = min(human), max(human) - min(human)
        h = [(x - lo) / span for x in human]
        u = [min(1.0, max(0.0, (v - lo) / span)) for v in values]
        per_cell[key] = {"source": source, "values": values, "w": w1(h, u), "outside": outside}

    def mean_over_studies(keep) -> float:
        studies: dict[str, list[float]] = defaultdict(list)
        for (study, _, _), c in per_cell.items():
            if c["w"] is not None and keep(c):
                studies[study].append(c["w"])
        return sum(sum(v) / len(v) for v in studies.values()) / len(studies), len(studies)

    overall, n_studies = mean_over_studies(lambda c: True)
    in_scale, _ = mean_over_studies(lambda c: not c["outside"])
    return {"cells": per_cell, "w": overall, "w_in": in_scale, "studies": n_studies}


def score_baseline(rows: list[dict], tmp: Path) -> tuple[dict, dict[tuple, dict]]:
    """prepare --split all-test, then evaluate --baseline uniform, through the CLI: (result, cells.jsonl)."""
    src = tmp / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert job_main(["prepare", "--data", str(src), "--split", "all-test", "--out", str(tmp / "data")]) == 0
    assert (tmp / "data" / "train.jsonl").read_text() == ""
    assert job_main(["evaluate", "--data", str(tmp / "data"), "--baseline", "uniform", "--out", str(tmp / "eval")]) == 0
    metrics = json.loads((tmp / "eval" / "metrics.json").read_text())
    lines = [json.loads(x) for x in (tmp / "eval" / "cells.jsonl").read_text().splitlines()]
    cells = {(c["study_id"], c["condition_num"], c["task_num"]): c for c in lines}
    assert len(cells) == len(lines)
    return metrics["results"]["uniform/distribution"], cells


def check_against_reference(rows: list[dict], result: dict, cells: dict[tuple, dict]) -> dict:
    ref = reference_uniform(rows)
    assert set(cells) == set(ref["cells"])  # one line per cell, every cell of the file
    for key, want in ref["cells"].items():
        got = cells[key]
        assert got["human_n"] == sum(1 for r in rows if (r["study_id"], r["condition_num"], r["task_num"]) == key)
        assert got["scale_source"] == want["source"], key
        assert got["out_of_scale"] == want["outside"], key
        s = got["scale"]
        got_values = s and (s.get("values") or R(s["lo"], s["hi"], s["step"]))
        assert got_values == want["values"], key
        if want["w"] is None:
            assert got["w"] == {} and got["skipped"], key
        else:
            assert got["w"]["uniform/distribution"] == pytest.approx(want["w"], abs=1e-9), key
            assert got["w"]["uniform"] == pytest.approx(want["w"], abs=1e-9), key
    assert result["wasserstein"] == pytest.approx(ref["w"], abs=1e-9)
    assert result["wasserstein_uniform"] == pytest.approx(ref["w"], abs=1e-9)
    assert result["wasserstein_in_scale"] == pytest.approx(ref["w_in"], abs=1e-9)
    assert result["cells_out_of_scale"] == sum(bool(c["outside"]) for c in ref["cells"].values() if c["w"] is not None)
    assert result["cells_no_scale"] == sum(c["values"] is None for c in ref["cells"].values())
    assert result["studies_scored"] == ref["studies"]
    assert result["cells_scored"] == sum(c["w"] is not None for c in ref["cells"].values())
    return ref


# --- Generated rows (a fresh clone without ../shared) ------------------------------------------------------

def generated_rows() -> list[dict]:
    """Cells whose humans use only part of the stated scale (so the human range would be too easy),
    in the wordings the real data has: labels in parentheses, a step grid, enumerated options."""
    spec = [  # (study, stimulus tail, human answers)
        ("aaaaa", "Only return an integer from 1 (Decreased a lot) to 5 (Increased a lot), nothing else.", [1, 2, 2, 1, 2]),
        ("aaaaa", "Only return an integer from 1 to 7, where 1 means Strongly disagree and 7 means Strongly agree.",
         [3, 4, 5, 4]),
        ("bbbbb", "Only return a multiple of 100 between 0 and 1000, nothing else.", [100, 200, 300, 200, 100]),
        ("bbbbb", "Only return 1 for 'Yes' or 2 for 'No', nothing else.", [1, 2, 2]),
        ("ccccc", "Only return 1 if you accept it as final, up to 4 if you strongly disagree.", [2, 3, 3]),
        ("ccccc", "Only return an integer from 0 to 100 representing percent, nothing else.", [40, 60, 50, 45]),
        ("ccccc", "Only return an integer representing the hours saved, nothing else.", [3, 9, 4]),  # no scale
        ("ccccc", "Only return 1 for the first scenario; 2 for the second, nothing else.", [1, 2, 12, 7]),  # outside
        ("ccccc", "Only return an integer from 0 to 5000 representing dollars, nothing else.", [10, 900]),  # > 101
        ("ddddd", "Only return an integer from 1 to 5, nothing else.", [4]),  # one answer
        ("ddddd", "Only return an integer from 1 to 5, nothing else.", [2, 2, 2]),  # constant
    ]
    rows = []
    for task, (study, tail, answers) in enumerate(spec):
        for i, a in enumerate(answers):
            rows.append({"study_id": study, "condition_num": 1, "task_num": task, "response": a,
                         "stimuli": f"You read a passage and then were asked: question {task}? {tail}",
                         "demographic": {"age": 20 + i, "gender": "Female"}})
    return rows


def test_uniform_baseline_matches_reference_on_generated_rows(tmp_path):
    rows = generated_rows()
    result, cells = score_baseline(rows, tmp_path)
    ref = check_against_reference(rows, result, cells)
    # The stated scale, not the humans' range. Humans 1,2,2,1,2 on 1..5 rescale to {0: 2/5, 1: 3/5}; the
    # scale's 1..5 to {0: 1/5, 1: 4/5} (3, 4, 5 clip to 1): W = 0.2 (over the humans' 1..2 it would be 0.1).
    assert cells[("aaaaa", 1, 0)]["w"]["uniform"] == pytest.approx(0.2, abs=1e-12)
    assert cells[("bbbbb", 1, 2)]["scale"] == {"lo": 0, "hi": 1000, "step": 100}
    # No stated scale: skipped and counted, never scored on the answers' 3..9.
    assert cells[("ccccc", 1, 6)]["skipped"] == {"uniform/distribution": "no_scale"}
    assert cells[("ccccc", 1, 6)]["scale"] is None and cells[("ccccc", 1, 6)]["w"] == {}
    # Answers 12 and 7 under "1 for ...; 2 for ...": scored, flagged with the count.
    assert cells[("ccccc", 1, 7)]["out_of_scale"] == 2 and "uniform" in cells[("ccccc", 1, 7)]["w"]
    assert cells[("ccccc", 1, 8)]["skipped"] == {"uniform/distribution": "unbounded"}
    assert (result["cells_too_few"], result["cells_constant"], result["cells_unbounded"]) == (1, 1, 1)
    assert result["cells_no_scale"] == 1 and result["cells_scale_conflict"] == 0 and result["cells_out_of_scale"] == 1
    assert result["wasserstein_in_scale"] < result["wasserstein"]
    assert ref["studies"] == 3
    # The report names the split, shows W with and without the flagged cell, the counts, and the cell.
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "<th>split</th>" in page and "<td>all-test</td>" in page
    assert f"<td>{result['wasserstein']:.4f}</td><td>{ref['w_in']:.4f}</td>" in page
    assert "<td>1</td><td>1 / 1 / 1</td>" in page  # flagged; skipped no scale / <2 / constant
    assert "<td>ccccc</td><td>1</td><td>7</td><td>1..2</td><td>2 of 4</td><td>1..12</td>" in page


def test_cell_whose_rows_state_different_scales_is_reported_not_merged(tmp_path):
    rows = generated_rows()
    for r in rows:
        if r["task_num"] == 1 and r["demographic"]["age"] == 20:
            r["stimuli"] = r["stimuli"].replace("from 1 to 7", "from 1 to 5")
    result, cells = score_baseline(rows, tmp_path)
    line = cells[("aaaaa", 1, 1)]
    assert line["skipped"] == {"uniform/distribution": "scale_conflict"} and line["w"] == {}
    assert [s["hi"] for s in line["scales"]] == [5, 7]
    assert result["cells_scale_conflict"] == 1
    assert ["aaaaa", 1, 1] not in [c["cell"] for c in result["cells"]]


def test_distribution_candidates_are_the_stated_grid():
    from job import data as D
    from job.evaluate import baseline_records
    from job.scoring import answer_tree, row_scales
    from job.tokenizer import qwen25_offline

    rows = [r for r in generated_rows() if r["study_id"] == "bbbbb"]
    grid = R(0, 1000, 100)
    scales = row_scales(rows)
    assert all(s.values() == grid for s, r in zip(scales, rows) if "multiple" in r["stimuli"])
    tok = qwen25_offline()
    assert answer_tree(tok, scales[0], D.answer_end_id(tok)).values == grid
    recs = baseline_records(rows)
    assert recs[0].values == grid and recs[0].probs == [1.0] * len(grid)


def test_baseline_loads_no_model_and_writes_what_a_model_run_writes(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in generated_rows()), encoding="utf-8")
    assert job_main(["prepare", "--data", str(src), "--split", "all-test", "--out", str(tmp_path / "data")]) == 0
    code = ("import sys; from job.__main__ import main; "
            f"rc = main(['evaluate', '--data', {str(tmp_path / 'data')!r}, '--baseline', 'uniform', "
            f"'--out', {str(tmp_path / 'eval')!r}]); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "eval"
    for name in ("metrics.json", "cells.jsonl", "report.html", "per_study.png", "cells.png", "events.jsonl"):
        assert (out / name).is_file(), name
    result = json.loads((out / "metrics.json").read_text())["results"]["uniform/distribution"]
    for key in ("wasserstein", "wasserstein_uniform", "individual_accuracy", "per_study", "cells",
                "demographic_parity_difference", "cells_scored"):
        assert key in result, key
    assert "uniform/distribution" in (out / "report.html").read_text()


@pytest.mark.parametrize("argv,needle", [
    (["--baseline", "uniform", "--mode", "sample"], "--mode sample with --baseline uniform: not accepted"),
    (["--baseline", "median"], "invalid choice: 'median'"),
    ([], "give --config FILE"),
])
def test_evaluate_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, needle):
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in generated_rows()), encoding="utf-8")
    assert job_main(["prepare", "--data", str(src), "--split", "all-test", "--out", str(tmp_path / "data")]) == 0
    capsys.readouterr()
    try:
        rc = job_main(["evaluate", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "eval"), *argv])
    except SystemExit as e:  # argparse's own refusals exit from parse_args
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_prepared_rows_keep_the_demographic_order():
    """The source's field order survives prepare; rendering lists the fields in that order."""
    from job import data as D

    rows = generated_rows()
    for r in rows:
        r["demographic"] = {"gender": "Male", "age": 40, "party_id": "Independent", "education": "College"}
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "rows.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        assert job_main(["prepare", "--data", str(src), "--split", "all-test", "--out", str(Path(d) / "data")]) == 0
        prepared = D.read_split(Path(d) / "data", "test")
    assert list(prepared[0]["demographic"]) == ["gender", "age", "party_id", "education"]
    assert D.render_prompt(prepared[0]).startswith(
        "You are a survey respondent with the following demographic profile:\n"
        "- Gender: Male\n- Age: 40\n- Party Id: Independent\n- Education: College\n\n")


# --- The real sample -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample_rows():
    return [json.loads(line) for line in REAL_SAMPLE.open(encoding="utf-8")]


@needs_real_sample
def test_sample_wordings_table_is_complete(sample_rows):
    """Every distinct instruction of the sample is in the table, and the reference reads it as the table says."""
    table = dict(SAMPLE_WORDINGS)
    tails = {r["stimuli"][r["stimuli"].rfind("Only return"):] for r in sample_rows}
    assert tails == set(table)
    for text, values in table.items():
        assert reference_scale(text) == values, text


@pytest.mark.slow
@needs_real_sample
def test_uniform_baseline_matches_reference_on_real_sample(sample_rows, tmp_path):
    result, cells = score_baseline(sample_rows, tmp_path)
    ref = check_against_reference(sample_rows, result, cells)
    # The cells skipped for stating no scale are exactly those whose rows state none (study zrwjp: "an
    # integer representing ... dollars"), and on the sample no scored cell has an answer off its scale.
    no_scale = {k for k, c in cells.items() if c["skipped"].get("uniform/distribution") == "no_scale"}
    stating = {(r["study_id"], r["condition_num"], r["task_num"]) for r in sample_rows
               if reference_scale(r["stimuli"]) is not None}
    assert no_scale == set(cells) - stating and {k[0] for k in no_scale} == {"zrwjp"}
    assert result["cells_no_scale"] == len(no_scale) == 4
    assert result["cells_out_of_scale"] == 0 and result["wasserstein_in_scale"] == result["wasserstein"]
    assert result["cells_scale_conflict"] == 0
    assert 0.15 < ref["w"] < 0.25  # the paper's uniform guess: 0.203 over all unseen studies


@needs_real_sample
def test_promptless_sample_renders_each_prompt_byte_for_byte_after_prepare(sample_rows, tmp_path):
    from job import data as D

    src = tmp_path / "promptless.jsonl"
    src.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "prompt"}, ensure_ascii=False) + "\n"
                           for r in sample_rows), encoding="utf-8")
    assert job_main(["prepare", "--data", str(src), "--split", "all-test", "--out", str(tmp_path / "data")]) == 0
    prepared = D.read_split(tmp_path / "data", "test")
    assert len(prepared) == len(sample_rows) and all("prompt" not in r for r in prepared)
    # all-test keeps the source's row order (sample_id repeats across studies: rows pair by position).
    assert [r["stimuli"] for r in prepared] == [r["stimuli"] for r in sample_rows]
    wrong = [i for i, (p, r) in enumerate(zip(prepared, sample_rows)) if D.render_prompt(p) != r["prompt"]]
    assert wrong == []


# --- No test label decides a scale -------------------------------------------------------------------

QUESTION_SKIPS = ("no_scale", "scale_conflict", "unbounded")  # decided from the questions alone


def scales_seen(rows: list[dict]) -> dict[tuple, tuple]:
    """Per cell, what the evaluation decided from the questions: its scale (the uniform guess's answers),
    its source, and whether it was skipped for a question-side reason."""
    from job import metrics as M
    from job.evaluate import baseline_records

    recs = baseline_records(rows)
    m = M.evaluate(recs, "distribution")
    seen = {}
    for c in m["cells"] + m["cells_skipped"]:
        why = c.get("skipped")
        seen[tuple(c["cell"])] = (json.dumps(c["scale"], sort_keys=True), c["scale_source"],
                                  why if why in QUESTION_SKIPS else None)
    candidates = {}  # what each row would be scored over
    for r, rec in zip(rows, recs):
        candidates.setdefault((r["study_id"], r["condition_num"], r["task_num"]), set()).add(
            tuple(rec.values) if rec.values else None)
    return {k: (*v, frozenset(candidates[k])) for k, v in seen.items()}


def check_labels_decide_no_scale(rows: list[dict], picks: list[int]) -> None:
    """One test label changed at a time (to a value far outside any scale, and to 1 + itself), then all
    of them at once: no cell's scale, scale source, question-side skip or candidate answers changes; and
    each cell's scale is the one this test reads from its questions (reference_scale), or none."""
    before = scales_seen(rows)
    for key, (scale, source, _, _) in before.items():
        stated = {tuple(reference_scale(r["stimuli"]) or ()) for r in rows
                  if (r["study_id"], r["condition_num"], r["task_num"]) == key}
        want = None if stated == {()} else list(next(iter(stated)))
        got = json.loads(scale)
        assert (got and (got.get("values") or R(got["lo"], got["hi"], got["step"]))) == want, key
    for i in picks:
        for new in (10**6, rows[i]["response"] + 1):
            changed = [dict(r, response=new) if j == i else r for j, r in enumerate(rows)]
            assert scales_seen(changed) == before, (i, new)
    assert scales_seen([dict(r, response=r["response"] * 7 + 3) for r in rows]) == before


def test_changing_a_test_label_changes_no_scale_on_generated_rows():
    rows = generated_rows()
    # Every row: the no-scale cell (once scored on its answers' range), the flagged cell, the grid, ...
    check_labels_decide_no_scale(rows, list(range(len(rows))))


@needs_real_sample
def test_changing_a_test_label_changes_no_scale_on_real_sample(sample_rows):
    import random

    no_scale = {}
    for i, r in enumerate(sample_rows):
        if reference_scale(r["stimuli"]) is None:
            no_scale.setdefault((r["study_id"], r["condition_num"], r["task_num"]), i)
    assert len(no_scale) == 4  # study zrwjp's 4 cells
    # A row of each no-scale cell (where the old fallback read the scale from the answers), and 4 others.
    check_labels_decide_no_scale(sample_rows, [*no_scale.values(), *random.Random(5).sample(range(len(sample_rows)), 4)])
