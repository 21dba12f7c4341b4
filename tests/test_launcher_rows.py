"""Local rows are checked against the job's schema before anything exists (issue #12): `up` and
`estimate` refuse a row missing a column with one line naming file, row and column, exit 2, no
run folder; the check is the job's own (contracts/rows.py), stdlib only; parquet input without
pyarrow is one line naming the extra."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import one_line
from launcher_helpers import REPO, cli, cli_here, launcher_env

GOOD = {"study_id": "s1", "response": 3, "condition_num": 1, "task_num": 2,
        "stimuli": "How much do you agree?", "demographic": {"age": 30}}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _without(row: dict, key: str) -> dict:
    return {k: v for k, v in row.items() if k != key}


@pytest.mark.parametrize("bad_row,row_index,named", [
    (_without(GOOD, "task_num"), 2, "missing column(s) task_num"),
    (_without(GOOD, "stimuli"), 2, "missing column(s) stimuli"),
    ({**GOOD, "response": "agree"}, 2, "response 'agree' is not an integer"),
    ({**GOOD, "condition_num": 1.5}, 2, "condition_num 1.5 is not an integer"),
    # Past the first 1000 rows (the launcher used to parse only those).
    (_without(GOOD, "study_id"), 1500, "missing column(s) study_id"),
])
def test_up_and_estimate_refuse_a_bad_row_naming_file_row_and_column(tmp_path, bad_row, row_index, named, capsys,
                                                                     monkeypatch):
    """In this process (cli_here): the rows are read before anything else; the entry point as a process is
    the next test's."""
    rows = [dict(GOOD, study_id=f"s{i % 7}") for i in range(row_index)] + [bad_row, GOOD]
    data = write_jsonl(tmp_path / "rows_missing_columns.jsonl", rows)
    runs = tmp_path / "runs"
    for argv in (["up", "--infra", "local", "--yes"], ["estimate"], ["up", "--gpu", "A100:1", "--dryrun"]):
        line = one_line(cli_here([*argv, "--data", str(data)], runs, capsys, monkeypatch), both=True)
        assert str(data) in line and f"row {row_index}" in line and named in line, (argv, line)
        assert f"line {row_index + 1}" in line, line  # the file's line too, for an editor
    assert not runs.exists()


def test_a_bad_row_in_the_configs_data_source_is_refused_too(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", [GOOD, _without(GOOD, "response")])
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text((REPO / "configs" / "smoke.yaml").read_text() + "\n# data from here\n")
    import yaml

    doc = yaml.safe_load(cfg.read_text())
    doc.setdefault("data", {})["source"] = str(data)
    cfg.write_text(yaml.safe_dump(doc))
    runs = tmp_path / "runs"
    line = one_line(cli(["up", "--infra", "local", "--config", str(cfg), "--yes"], launcher_env(runs)), both=True)
    assert str(data) in line and "row 1" in line and "response" in line
    assert not runs.exists()


def test_a_good_file_passes_and_a_parquet_with_a_bad_row_is_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    good = write_jsonl(tmp_path / "good.jsonl", [dict(GOOD, study_id=f"s{i}") for i in range(40)])
    r = cli(["estimate", "--infra", "local", "--data", str(good)], launcher_env(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "40 rows counted" in r.stdout.replace("\n", " ") or "40 rows" in r.stdout, r.stdout[-3000:]
    table = pa.Table.from_pylist([dict(GOOD), dict(GOOD)] + [{k: v for k, v in GOOD.items() if k != "task_num"}])
    pq.write_table(table, tmp_path / "bad.parquet")  # parquet fills the missing key with null
    line = one_line(cli(["estimate", "--data", str(tmp_path / "bad.parquet")], launcher_env(tmp_path / "runs")), both=True)
    assert "bad.parquet" in line and "row 2" in line and "task_num" in line, line


def test_the_job_refuses_the_same_row_with_the_same_words(tmp_path):
    """One schema, both sides: `job prepare` names the same row and column as the launcher."""
    data = write_jsonl(tmp_path / "rows.jsonl", [GOOD, GOOD, _without(GOOD, "task_num")])
    r = subprocess.run([sys.executable, "-m", "job", "prepare", "--config", str(REPO / "configs" / "smoke.yaml"),
                        "--data", str(data), "--out", str(tmp_path / "prepared")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "row 2 is missing column(s) task_num" in r.stderr and str(data) in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "prepared" / "stats.json").exists()


def test_the_row_schema_module_is_stdlib_only():
    for mod in ("contracts/rows.py", "launcher/rows.py"):
        tree = ast.parse((REPO / mod).read_text())
        tops = {(a.name if isinstance(n, ast.Import) else n.module).split(".")[0]
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and getattr(n, "level", 0) == 0
                for a in (n.names if isinstance(n, ast.Import) else [n])}
        third = {t for t in tops if t not in sys.stdlib_module_names and t not in ("contracts", "launcher", "__future__")}
        assert third <= ({"pyarrow"} if mod.startswith("launcher") else set()), (mod, third)


def test_parquet_without_pyarrow_is_one_line_naming_the_extra(tmp_path):
    shadow = tmp_path / "shadow" / "pyarrow"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named pyarrow (shadowed by the test)')\n")
    (tmp_path / "x.parquet").write_bytes(b"PAR1 whatever PAR1")
    env = launcher_env(tmp_path / "runs")
    env["PYTHONPATH"] = f"{tmp_path / 'shadow'}:{env['PYTHONPATH']}"
    for argv in (["estimate"], ["up", "--infra", "local", "--yes"]):
        line = one_line(cli([*argv, "--data", str(tmp_path / "x.parquet")], env), both=True)
        assert "x.parquet" in line and "pyarrow" in line and "socrates-launch[parquet]" in line, line
    assert not (tmp_path / "runs").exists()


def test_pyproject_declares_pyarrow_as_the_parquet_extra():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.replace(" ", "").startswith("pyarrow") for d in extras["parquet"]), extras


def test_the_launchers_imports_are_declared_in_pyproject():
    """Every third-party package launcher/ imports is a dependency or an extra of the package (a plain
    `pip install socrates-launch` imports nothing undeclared on its main paths)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {d.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()
                for d in project["dependencies"] + [x for xs in project["optional-dependencies"].values() for x in xs]}
    dist_of = {"yaml": "pyyaml", "rich": "rich", "sky": "skypilot", "paramiko": "paramiko", "pyarrow": "pyarrow",
               "boto3": "boto3", "botocore": "botocore"}
    used = set()
    for f in (REPO / "launcher").rglob("*.py"):
        for n in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                [n.module] if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module else []
            used |= {x.split(".")[0] for x in names}
    third = {t for t in used if t not in sys.stdlib_module_names and t not in ("launcher", "contracts", "__future__")}
    assert third <= set(dist_of), f"add {sorted(third - set(dist_of))} to this table and to pyproject.toml"
    assert {dist_of[t] for t in third} <= declared, sorted({dist_of[t] for t in third} - declared)


def test_unseen_participants_without_participant_ids_is_refused_before_anything_exists(tmp_path):
    """split unseen-participants on rows lacking `participant`: one line, exit 2, no run folder; with
    ids on every row the same file passes."""
    import yaml

    rows = [dict(GOOD, study_id=f"s{i % 3}", participant=i // 2) for i in range(30)]
    rows[4]["participant"] = None
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    doc = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    doc["data"].update(source=str(data), split="unseen-participants")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    runs = tmp_path / "runs"
    for argv in (["up", "--infra", "local", "--yes"], ["estimate", "--infra", "local"]):
        line = one_line(cli([*argv, "--config", str(cfg)], launcher_env(runs)), both=True)
        assert f"--data {data}: --split unseen-participants needs participant ids, and 1 of 30 rows have none " \
               f"({data} line 5, study s1)" in line, line
    assert not runs.exists()
    rows[4]["participant"] = 2
    write_jsonl(data, rows)
    r = cli(["estimate", "--infra", "local", "--config", str(cfg)], launcher_env(runs))
    assert r.returncode == 0 and "split unseen-participants" in " ".join(r.stdout.split()), r.stderr[-2000:]
