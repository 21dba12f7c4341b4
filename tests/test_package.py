"""An installed tool, not a checkout (issue #29).

The shape `pipx install` / `uv tool install` give: a wheel built from the repo, installed
non-editable into a venv of its own, in a temp folder far from the checkout, and run from an empty
folder. The job's heavy third-party packages (torch, transformers, skypilot: minutes to install on
2 cores) are borrowed from the dev venv by a path line in a .pth file; a path line does not run the
dev venv's editable finder, so `launcher`, `job` and `contracts` can only come from the fresh
venv's site-packages, which the tests assert. The wheel's own file list (setuptools' output) is
the independent reference for what the package ships and what a run's staged folder must hold.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REAL_SAMPLE, REPO
from skyfix import sky_home  # noqa: F401  (the offline SkyPilot API server, for the dry run)

pytestmark = pytest.mark.slow  # builds a wheel, makes a venv, runs the real smoke job

RESOURCES = "launcher/resources/"
# What the launcher and the job read at run time (launcher/resources/__init__.py, cost.py, plan.py, stage.py).
NEEDED = ("sky/train.yaml", "configs/paper.yaml", "configs/smoke.yaml", "configs/throughput.yaml",
          "configs/socsci210_stats.json", "requirements/job.lock", "Dockerfile")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                        "."], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (whl,) = dist.glob("socrates_launch-*.whl")
    return whl


@pytest.fixture(scope="module")
def tool(wheel, tmp_path_factory) -> dict:
    """The fresh venv with only the wheel installed; the empty folder the commands run in; their env."""
    root = tmp_path_factory.mktemp("installed")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz_dev_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # appended after site-packages
    empty = root / "empty"
    empty.mkdir()
    (root / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOCRATES_", "SKYPILOT_", "PYTHON"))}
    env.update(HOME=str(root / "home"), COLUMNS="200", HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}")
    return {"venv": venv, "py": py, "site": site.resolve(), "cwd": empty, "env": env,
            "exe": str(venv / "bin" / "socrates-launch")}


def _run(tool: dict, args: list[str], env: dict | None = None, timeout: float = 300, cwd: Path | None = None):
    return subprocess.run([tool["exe"], *args], cwd=cwd or tool["cwd"], env=env or tool["env"], capture_output=True,
                          text=True, timeout=timeout)


def test_the_wheel_ships_what_runs_need_and_no_sky_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n[len(RESOURCES):] for n in names if n.startswith(RESOURCES)}
    locks = {f"requirements/{p.name}" for p in (REPO / "requirements").glob("*.lock")}
    assert set(NEEDED) | locks <= shipped, sorted(set(NEEDED) | locks - shipped)
    for rel in NEEDED:  # byte for byte the repo's top-level files (one copy in the repo)
        assert zipfile.ZipFile(wheel).read(RESOURCES + rel) == (REPO / rel).read_bytes(), rel
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"launcher", "job", "contracts"}, top  # never a top-level `sky` (SkyPilot's name)
    info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert sorted(zipfile.ZipFile(wheel).read(info).decode().split()) == ["contracts", "job", "launcher"]


def test_the_installed_packages_come_from_the_fresh_venv(tool):
    code = ("import json, launcher, job, contracts, launcher.resources as r; "
            "print(json.dumps({m.__name__: m.__file__ for m in (launcher, job, contracts)} | {'configs': str(r.path('configs'))}))")
    r = subprocess.run([str(tool["py"]), "-c", code], cwd=tool["cwd"], env=tool["env"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for name, path in json.loads(r.stdout).items():
        assert Path(path).resolve().is_relative_to(tool["site"]), (name, path)
        assert not Path(path).resolve().is_relative_to(REPO), (name, path)
    assert list(tool["cwd"].iterdir()) == []  # the commands run from an empty folder
    v = _run(tool, ["--version"])
    assert v.returncode == 0 and re.fullmatch(r"socrates-launch \d+\.\d+\.\d+\S*\n", v.stdout), v.stdout + v.stderr


def test_init_writes_editable_configs_and_never_overwrites(tool, tmp_path):
    r = _run(tool, ["init", str(tmp_path / "mine")])
    assert r.returncode == 0, r.stderr
    for name in ("paper.yaml", "smoke.yaml"):
        assert (tmp_path / "mine" / name).read_bytes() == (REPO / "configs" / name).read_bytes()
    (tmp_path / "mine" / "smoke.yaml").write_text("edited\n")
    again = _run(tool, ["init", str(tmp_path / "mine")])
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1 and "smoke.yaml" in again.stderr
    assert (tmp_path / "mine" / "smoke.yaml").read_text() == "edited\n"  # nothing overwritten
    assert again.stdout == ""


def test_estimate_and_the_dry_run_from_the_installed_wheel(tool, sky_home):  # noqa: F811
    env = {**tool["env"], "HOME": sky_home.env["HOME"],
           "SKYPILOT_API_SERVER_ENDPOINT": sky_home.env["SKYPILOT_API_SERVER_ENDPOINT"],
           "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
    est = _run(tool, ["estimate", "--gpu", "A100:1", "--subset", "0.1", "--explain"], env=env)
    assert est.returncode == 0, est.stdout[-2000:] + est.stderr[-2000:]
    packaged = str(tool["site"] / "launcher" / "resources" / "configs" / "paper.yaml")
    assert re.search(r"^config: (\S+) ", est.stdout, re.M).group(1) == packaged, est.stdout[-2000:]

    up = _run(tool, ["up", "--gpu", "A100:1", "--subset", "0.1", "--dryrun"], env=env, timeout=600)
    out = up.stdout + up.stderr
    assert up.returncode == 0, out[-3000:]
    m = re.search(r"^workdir: (\S+) \((\d+) files, ([\d,]+) bytes: ([^)]*)\)", up.stdout, re.M)
    assert m, out[-3000:]
    assert m.group(4).split() == ["Dockerfile", "configs/", "contracts/", "job/", "requirements/"]
    assert re.search(rf"^workdir: {re.escape(m.group(1))}$", up.stdout, re.M)  # the rendered task syncs that folder
    workdir = Path(m.group(1))
    assert not workdir.is_relative_to(tool["site"]) and not workdir.is_relative_to(REPO) and \
        not workdir.is_relative_to(tool["cwd"])
    assert not workdir.exists()  # a dry run leaves nothing behind
    assert "chosen: cloud" in up.stdout and "dry run: nothing was provisioned" in up.stdout, out[-3000:]
    assert list(tool["cwd"].iterdir()) == []  # no run was created


def test_the_demo_runs_from_the_installed_wheel_and_ships_only_the_staged_job(tool, wheel):
    """The demo from the installed wheel (the packaged configs/smoke.yaml: 40 steps of real QLoRA on the CPU), which
    is also the smoke acceptance: on 10% of the real SocSci210 rows where ../shared is there (else on the demo's
    generated rows), the adapter verifies and the loss falls."""
    from contracts import manifest
    from contracts.events import read_all

    data = ["--data", str(REAL_SAMPLE), "--subset", "0.1"] if REAL_SAMPLE.is_file() else []
    r = _run(tool, ["up", "--infra", "local", "--yes", *data], timeout=1500)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "(verified against manifest.json)" in out, out[-3000:]
    (rec_path,) = (tool["cwd"] / "runs").glob("*/run.json")
    rec = json.loads(rec_path.read_text())
    assert rec["state"] == "done" and rec["verified"] is True and Path(rec["adapter"]).is_dir()
    assert rec["options"]["config_file"].endswith("launcher/resources/configs/smoke.yaml")
    # What the machine got: the wheel's job/ and contracts/ modules, the locks, the Dockerfile, the one
    # table the job reads; nothing else (no launcher/, sky/, tests/, pyproject.toml, site-packages).
    names = zipfile.ZipFile(wheel).namelist()
    want = {n for n in names if n.startswith(("job/", "contracts/"))}
    want |= {n[len(RESOURCES):] for n in names if n.startswith(RESOURCES + "requirements/")}
    want |= {"Dockerfile", "configs/socsci210_stats.json"}
    staged = rec_path.parent / "code"
    got = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert got == want, (sorted(got - want), sorted(want - got))
    for rel in want:  # the installed copies, byte for byte
        src = zipfile.ZipFile(wheel).read(rel if rel.startswith(("job/", "contracts/")) else RESOURCES + rel)
        assert (staged / rel).read_bytes() == src, rel

    # The smoke acceptance, on what came back.
    run_dir = rec_path.parent
    assert manifest.verify(run_dir) == []
    m = manifest.load(run_dir)
    paths = {f["path"] for f in m["files"]}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json"} <= paths
    assert m["data_hash"] and m["config"]["name"] == "smoke" and m["packages"]["trl"] and m["card"]["name"] == "cpu"
    assert "git_revision" in m and m["steps"] == 40
    events = read_all(run_dir / "events.jsonl")
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 41))
    first, last = steps[:5], steps[-5:]
    assert sum(e["loss"] for e in last) / 5 < sum(e["loss"] for e in first) / 5 - 2.0, [e["loss"] for e in steps]
    assert all(e["tokens_per_s"] > 0 and e["eta_s"] is not None for e in steps)
    done = [e for e in events if e["event"] == "done"]
    assert done and done[-1]["reason"] == "max_steps"
    source = next(e["source"] for e in events if e["event"] == "start" and e.get("verb") == "prepare")
    assert source.endswith(REAL_SAMPLE.name if data else "synthetic:240"), source
