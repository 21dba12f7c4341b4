"""The HTML report (job/report.py) and `socrates-launch report` reading what a run brought home."""
import json
import random

import pytest

from job import metrics as M
from job import report as R
from launcher.cli import main as cli_main


def _results(seed: int, noise: int) -> dict:
    rng = random.Random(seed)
    records = []
    for study in ("s1", "s2", "s3"):
        for task in (1, 2):
            for _ in range(30):
                v = rng.randint(1, 7)
                records.append(M.Record(study, 1, task, v, (1, 7), {"gender": rng.choice("MF")},
                                        sample=v + rng.randint(-noise, noise) if rng.random() > 0.1 else None))
    return M.evaluate(records, "sample") | {"model": "fine-tuned" if noise == 1 else "base"}


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    from launcher import registry

    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(tmp_path / "runs"))
    return registry.new_run("smoke", "local").dir


def test_report_lists_each_model_with_its_mode_and_the_latest_report(run_dir, capsys):
    tuned, base = _results(1, 1), _results(2, 4)
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "metrics.json").write_text(json.dumps({"results": {"fine-tuned/sample": tuned}}))
    R.write_report(run_dir / "eval", {"results": {"fine-tuned/sample": tuned}})
    both = {"results": {"fine-tuned/sample": tuned, "base/sample": base}, "paper_table2": M.PAPER_TABLE2}
    (run_dir / "eval-base").mkdir()
    (run_dir / "eval-base" / "metrics.json").write_text(json.dumps({"results": {"base/sample": base}}))
    html = R.write_report(run_dir / "eval-base", both)

    assert cli_main(["report"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if "/sample" in line.split()[0]}
    assert f"{tuned['wasserstein']:.4f}" in lines["fine-tuned/sample"]
    assert f"{base['wasserstein']:.4f}" in lines["base/sample"]
    assert f"{tuned['invalid_rate']:.1%}" in lines["fine-tuned/sample"]
    assert tuned["wasserstein"] < base["wasserstein"]  # less noise, closer to the humans
    assert f"report: {html.resolve()}" in out  # the report that shows both
    assert "SOCRATES-Qwen-14B 0.151" in out

    page = html.read_text()
    assert "fine-tuned" in page and "base" in page and "No training step events" in page


def test_report_json(run_dir, capsys):
    tuned = _results(1, 1)
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "metrics.json").write_text(json.dumps({"results": {"fine-tuned/sample": tuned}}))
    assert cli_main(["report", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["results"]["fine-tuned/sample"]["wasserstein"] == pytest.approx(tuned["wasserstein"])
    assert got["report"] is None


def test_run_without_evaluation_says_so(run_dir, capsys):
    assert cli_main(["report"]) == 1
    assert "no evaluation results yet" in capsys.readouterr().out


def test_bad_run_id_and_damaged_metrics_are_exit_2(run_dir, capsys):
    assert cli_main(["report", "no-such-run"]) == 2
    assert "no such run" in capsys.readouterr().err
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "metrics.json").write_text("{not json")
    assert cli_main(["report"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unreadable metrics" in err and len(err.splitlines()) == 1


def test_report_names_the_split_and_the_skipped_and_flagged_cells(run_dir, capsys):
    recs = [M.Record("s", 1, 1, v, (1, 2), sample=1) for v in (1, 2)]  # W 0.5
    recs += [M.Record("t", 1, 2, v, (1, 2), sample=2) for v in (1, 3)]  # 3 is outside 1..2: W 0.5, flagged
    recs += [M.Record("t", 1, 1, v, (1, 5), sample=v) for v in (1, 5)]  # W 0
    recs += [M.Record("t", 2, 1, v, None, sample=v) for v in (4, 9)]  # no stated scale: skipped
    res = M.evaluate(recs, "sample") | {"model": "base", "split": "unseen-participants"}
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "metrics.json").write_text(json.dumps({"results": {"base/sample": res}}))
    assert cli_main(["report"]) == 0
    out = capsys.readouterr().out
    # With the flagged cell: (0.5 + (0 + 0.5) / 2) / 2 = 0.375; without it: (0.5 + 0) / 2 = 0.25.
    assert "split unseen-participants; 1 cells skipped (no stated scale); 1 cells flagged (answers outside the " \
           "stated scale): W without them 0.2500" in out
    assert "0.3750" in out.splitlines()[[i for i, x in enumerate(out.splitlines()) if x.startswith("base/sample")][0]]
