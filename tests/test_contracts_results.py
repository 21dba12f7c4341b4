"""contracts/results.py: metrics.json, cells.jsonl and the predict result line, as the job writes them
and as the launcher reads what comes back (untrusted: refused in one line, never a traceback)."""
import json
import math
import random

import pytest

from contracts import results as R
from contracts.errors import ContractError
from launcher.cli import main as cli_main


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# --- metrics.json ----------------------------------------------------------------------------------

@pytest.mark.parametrize("content,needle", [
    (b"{not json", "unreadable metrics (Expecting property name"),
    (b"\xff\xfe{}", "unreadable metrics ('utf-8' codec can't decode byte 0xff"),
    (b"[" * 200_000 + b"]" * 200_000, "unreadable metrics ("),  # nested past the parser's recursion limit
    (b"[1, 2]", "not an evaluation metrics file (a JSON list, expected an object with 'results')"),
    (b'{"results": [1]}', "results is list, not an object of model/mode -> metrics"),
    (b'{"results": "x"}', "results is str, not an object of model/mode -> metrics"),
])
def test_a_bad_metrics_file_is_refused_in_one_line_naming_it(tmp_path, content, needle):
    path = tmp_path / "metrics.json"
    path.write_bytes(content)
    with pytest.raises(ContractError) as err:
        R.read_metrics(path)
    line = _one_line(err)
    assert line.startswith(f"{path}: ") and needle in line, line
    assert line.endswith("`socrates-launch download` pulls it again")


def test_an_oversized_or_unreadable_metrics_file_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"results": {"base/sample": {"rows": 1}}}))
    monkeypatch.setattr(R, "MAX_METRICS_BYTES", 16)
    with pytest.raises(ContractError) as err:
        R.read_metrics(path)
    assert f"({path.stat().st_size:,} bytes, over the 16 accepted)" in _one_line(err)
    with pytest.raises(ContractError) as err:
        R.read_metrics(tmp_path / "absent.json")
    assert "unreadable metrics (No such file or directory)" in _one_line(err)


def test_metrics_without_results_reads_as_none_yet(tmp_path):
    (tmp_path / "metrics.json").write_text('{"paper_table2": {}}')
    assert R.read_metrics(tmp_path / "metrics.json") == {"paper_table2": {}, "results": {}}


def test_write_metrics_accumulates_results_and_replaces_a_damaged_file(tmp_path):
    (tmp_path / "metrics.json").write_text("[1, 2")  # damaged: replaced, not trusted
    R.write_metrics(tmp_path, R.result_key("base", "sample"), {"rows": 3}, paper_table2={"x": 0.2})
    R.write_metrics(tmp_path, R.result_key("fine-tuned", "distribution"), {"rows": 4})
    R.write_metrics(tmp_path, "base/sample", {"rows": 5})
    got = json.loads((tmp_path / "metrics.json").read_text())
    assert got == {"results": {"base/sample": {"rows": 5}, "fine-tuned/distribution": {"rows": 4}},
                   "paper_table2": {"x": 0.2}}


def test_summary_names_every_number_and_tolerates_what_is_not_a_result():
    s = R.summary({"mode": "sample", "wasserstein": 0.1, "demographic_parity_difference": {"value": 0.02},
                   "cells_scale_conflict": 1, "extra": "not shown"})
    assert list(s) == ["mode", "model", "split", "rows", "cells_scored", "studies_scored", "wasserstein",
                       "wasserstein_in_scale", "wasserstein_uniform", "individual_accuracy", "invalid_rate",
                       "cells_no_scale", "cells_out_of_scale", "cells_unbounded", "cells_scale_conflict",
                       "prompt_tokens_per_s", "demographic_parity_difference"]
    assert (s["mode"], s["wasserstein"], s["cells_scale_conflict"], s["demographic_parity_difference"]) == \
        ("sample", 0.1, 1, 0.02)
    assert s["rows"] is None
    assert R.summary({"demographic_parity_difference": 0.3})["demographic_parity_difference"] == 0.3
    assert set(R.summary("str").values()) == {None}


def test_report_refuses_metrics_nested_too_deep_in_one_line(tmp_path, monkeypatch, capsys):
    """A machine's metrics.json that would blow the JSON parser's stack: exit 2, one line."""
    from launcher import registry

    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(tmp_path / "runs"))
    run_dir = registry.new_run("smoke", "local").dir
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "metrics.json").write_text('{"results": ' + "[" * 200_000 + "]" * 200_000 + "}")
    assert cli_main(["report"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.json: unreadable metrics" in err and "Traceback" not in err


# --- cells.jsonl -------------------------------------------------------------------------------------

def _evaluated() -> dict:
    """Two results of job/metrics.py over the same cells (one of them constant for the humans)."""
    from job import metrics as M

    rng = random.Random(3)
    records = []
    for study in ("s1", "s2"):
        for task in (1, 2):
            for _ in range(12):
                v = rng.randint(1, 5)
                records.append(M.Record(study, 1, task, v, (1, 5), {}, sample=rng.randint(1, 5)))
    records += [M.Record("s3", 2, 1, 4, (1, 5), {}, sample=2) for _ in range(5)]  # constant human answers
    return {"base/sample": M.evaluate(records, "sample"),
            "uniform/distribution": M.evaluate(
                [M.Record(r.study_id, r.condition_num, r.task_num, r.response, r.scale, {}, values=[1, 2, 3, 4, 5],
                          probs=[0.2] * 5) for r in records], "distribution")}


def test_cells_file_round_trips_one_line_per_cell_with_each_results_w(tmp_path):
    res = _evaluated()
    path = R.write_cells(tmp_path, res)
    lines = R.read_cells(path)
    assert [(c["study_id"], c["condition_num"], c["task_num"]) for c in lines] == \
        [("s1", 1, 1), ("s1", 1, 2), ("s2", 1, 1), ("s2", 1, 2), ("s3", 2, 1)]
    by_cell = {tuple(c["cell"]): c for c in res["base/sample"]["cells"]}
    first = lines[0]
    assert first["w"]["base/sample"] == by_cell[("s1", 1, 1)]["w"]
    assert first["scale"] == {"lo": 1, "hi": 5, "step": 1} and first["scale_source"] == "stated"
    assert first["human_n"] == 12 and first["skipped"] == {} and first["out_of_scale"] == 0
    assert lines[-1]["skipped"] == {"base/sample": "constant", "uniform/distribution": "constant"}
    assert lines[-1]["w"] == {}


@pytest.mark.parametrize("change,needle", [
    ({"study_id": 7}, "study_id 7 is not accepted (text)"),
    ({"task_num": True}, "task_num true is not accepted (a whole number)"),
    ({"human_n": -1}, "human_n -1 is not accepted"),
    ({"out_of_scale": 1.5}, "out_of_scale 1.5 is not accepted (a whole number >= 0, or null)"),
    ({"scale_source": "guessed"}, "scale_source \"guessed\" is not accepted (stated | human_range | conflict or null)"),
    ({"scale": {"lo": 5, "hi": 1, "step": 1}}, "scale {\"lo\": 5, \"hi\": 1, \"step\": 1} is not accepted"),
    ({"w": {"base/sample": "0.2"}}, "w {\"base/sample\": \"0.2\"} is not accepted"),
    ({"w": {"base/sample": math.inf}}, "Infinity is not accepted (finite numbers only)"),  # refused as it is read
    ({"skipped": {"base/sample": "bored"}}, "skipped {\"base/sample\": \"bored\"} is not accepted"),
    ({"colour": "red"}, "unknown key 'colour'"),
])
def test_a_bad_cell_line_is_refused_naming_the_line_and_field(tmp_path, change, needle):
    good = {"study_id": "s1", "condition_num": 1, "task_num": 2, "scale": {"lo": 1, "hi": 7, "step": 1},
            "scale_source": "stated", "human_n": 9, "w": {"base/sample": 0.25, "uniform": 0.3}, "skipped": {}}
    assert R.validate_cell_line(dict(good)) == good
    path = tmp_path / "cells.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **change}) + "\n")
    with pytest.raises(ContractError) as err:
        R.read_cells(path)
    line = _one_line(err)
    assert line.startswith(f"{path} (line 2): ") and needle in line, line


def test_cells_lines_that_are_not_objects_are_refused(tmp_path):
    path = tmp_path / "cells.jsonl"
    for body, needle in (("{oops\n", "(line 1): not JSON"), ("[1]\n", "(line 1): a JSON list is not a cell line"),
                         ('{"study_id": "s"}\n', "(line 1): missing condition_num, task_num")):
        path.write_text(body)
        with pytest.raises(ContractError) as err:
            R.read_cells(path)
        assert needle in _one_line(err)


# --- the predict result line ---------------------------------------------------------------------

GOOD = {"scale": [1, 3], "values": [1, 2, 3], "probs": [0.25, 0.5, 0.25], "valid_mass": 0.9, "sample": 2,
        "sample_text": "2", "human": None, "example": None, "prompt": "p", "prompt_tokens": 12}


def test_predict_line_round_trips_and_other_lines_are_not_results():
    line = R.predict_line(dict(GOOD))
    assert line.startswith("@@socrates-predict {") and "\n" not in line
    assert R.parse_predict_line(line) == GOOD
    assert R.parse_predict_line("loading model...") is None
    err = R.predict_line({"error": "scenario states no answer scale"})
    assert R.parse_predict_line(err) == {"error": "scenario states no answer scale"}


@pytest.mark.parametrize("change,needle", [
    ({"probs": [0.5, 0.5, 0.5]}, "probs [0.5, 0.5, 0.5] is not accepted (one probability >= 0 per value, summing to 1)"),
    ({"probs": [0.5, 0.5]}, "probs [0.5, 0.5] is not accepted"),
    ({"probs": [1.5, -0.25, -0.25]}, "is not accepted (one probability >= 0"),
    ({"values": [3, 2, 1]}, "values [3, 2, 1] is not accepted (the scale's answers: whole numbers, ascending"),
    ({"values": [1, 2, 9]}, "values [1, 2, 9] is not accepted"),
    ({"values": []}, "values [] is not accepted"),
    ({"scale": [3]}, "scale [3] is not accepted ([lo, hi], two whole numbers, lo <= hi)"),
    ({"valid_mass": 1.5}, "valid_mass 1.5 is not accepted (a number from 0 to 1)"),
    ({"sample": True}, "sample true is not accepted (a whole number or null)"),
    ({"sample": 2.5}, "sample 2.5 is not accepted"),
    ({"prompt_tokens": -1}, "prompt_tokens -1 is not accepted"),
    ({"prompt": None}, "prompt null is not accepted (text)"),
    ({"example": -3}, "example -3 is not accepted (a row number or null)"),
    ({"secret": 1}, "unknown key 'secret'"),
])
def test_a_bad_predict_result_is_refused_in_one_line(change, needle):
    with pytest.raises(ContractError) as err:
        R.parse_predict_line("@@socrates-predict " + json.dumps({**GOOD, **change}))
    line = _one_line(err)
    assert line.startswith("job predict result: ") and needle in line, line
    with pytest.raises(ContractError):  # the job refuses to print it, too
        R.predict_line({**GOOD, **change})


@pytest.mark.parametrize("body,needle", [
    ("{oops", "job predict: a result line that is not JSON"),
    ('{"values": NaN}', "NaN is not accepted (finite numbers only)"),  # refused as it is read
    ("[1]", "job predict result: a JSON list is not accepted (expected an object)"),
    ('{"error": 3}', "error 3 is not accepted"),
    ('{"error": "x", "probs": []}', "is not accepted (an object {\"error\": \"<text>\"} and nothing else)"),
])
def test_predict_lines_that_are_not_results_are_refused(body, needle):
    with pytest.raises(ContractError) as err:
        R.parse_predict_line("@@socrates-predict " + body)
    assert needle in _one_line(err)


def test_launcher_predict_refuses_a_malformed_result_from_the_job(tmp_path, capsys):
    """A job (here a stand-in interpreter) that prints a result breaking the schema: `predict` says so in
    one line and exits 2; it renders nothing from it."""
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    fake = tmp_path / "python"
    bad = json.dumps({**GOOD, "probs": [0.9, 0.9, 0.9]})
    fake.write_text(f"#!/bin/sh\necho 'loading'\necho '@@socrates-predict {bad}'\n")
    fake.chmod(0o755)
    rc = cli_main(["predict", "--adapter", str(tmp_path / "adapter"), "--python", str(fake),
                   "--demographics", "Age: 25", "--scenario", "Q? (1-3 scale)"])
    out = capsys.readouterr()
    assert rc == 2 and "predicted distribution" not in out.out
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and "job predict result: probs [0.9, 0.9, 0.9] is not accepted" in err
