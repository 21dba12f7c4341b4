"""What a run's machine gets (issue #29): the staged folder (launcher/stage.py), its line in the dry
run, and `socrates-launch init`. The reference for "the job's files" is git's own list of job/ and
contracts/, not the code under test. (tests/test_package.py does the same from an installed wheel.)"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from launcher_helpers import REPO, cli, launcher_env


def _expected() -> dict[str, Path]:
    """rel path -> the repo file a staged folder must hold a copy of."""
    r = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "job", "contracts"],
                       cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"git ls-files failed here: {r.stderr.strip()[:200]}")
    want = {rel: REPO / rel for rel in r.stdout.split() if rel.endswith(".py") and (REPO / rel).is_file()}
    want |= {f"requirements/{p.name}": p for p in (REPO / "requirements").glob("*.lock")}
    want |= {"Dockerfile": REPO / "Dockerfile", "configs/socsci210_stats.json": REPO / "configs" / "socsci210_stats.json"}
    return want


def test_the_staged_folder_holds_exactly_the_jobs_files(tmp_path):
    from launcher import stage

    staged = stage.build(tmp_path / "code")
    got = {p.relative_to(staged.path).as_posix(): p for p in staged.path.rglob("*") if p.is_file()}
    want = _expected()
    assert set(got) == set(want), (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    for rel, src in want.items():
        assert got[rel].read_bytes() == src.read_bytes() and not got[rel].is_symlink(), rel
    assert (staged.files, staged.bytes) == (len(want), sum(p.stat().st_size for p in want.values()))


def test_the_dry_run_shows_the_staged_workdir_and_its_size_and_leaves_nothing(tmp_path):
    r = cli(["up", "--infra", "local", "--dryrun"], launcher_env(tmp_path / "runs"), cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    m = re.search(r"^workdir: (\S+) \((\d+) files, ([\d,]+) bytes: ([^)]*)\)", r.stdout, re.M)
    assert m, r.stdout[-3000:]
    want = _expected()
    assert int(m.group(2)) == len(want) and int(m.group(3).replace(",", "")) == sum(p.stat().st_size for p in want.values())
    assert m.group(4).split() == ["Dockerfile", "configs/", "contracts/", "job/", "requirements/"]
    assert not Path(m.group(1)).exists()  # the dry run's temporary copy is gone
    assert not (tmp_path / "runs").exists()


def test_init_writes_editable_copies_and_refuses_to_overwrite(tmp_path):
    env = launcher_env(tmp_path / "runs")
    r = cli(["init", "mine"], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("paper.yaml", "smoke.yaml"):
        assert (tmp_path / "mine" / name).read_bytes() == (REPO / "configs" / name).read_bytes()
    (tmp_path / "mine" / "paper.yaml").write_text("mine\n")
    (tmp_path / "mine" / "smoke.yaml").unlink()
    again = cli(["init", "mine"], env, cwd=tmp_path)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert "paper.yaml" in again.stderr and "nothing was written" in again.stderr
    assert (tmp_path / "mine" / "paper.yaml").read_text() == "mine\n" and not (tmp_path / "mine" / "smoke.yaml").exists()
    (tmp_path / "afile").write_text("x")
    bad = cli(["init", "afile"], env, cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "afile" in bad.stderr, bad.stderr
    edited = (tmp_path / "mine" / "paper.yaml")
    edited.write_text((REPO / "configs" / "smoke.yaml").read_text().replace("name: smoke", "name: edited"))
    plan = cli(["estimate", "--infra", "local", "--config", "mine/paper.yaml", "--explain"], env, cwd=tmp_path)
    assert plan.returncode == 0 and "name edited" in plan.stdout, (plan.stdout + plan.stderr)[-2000:]
