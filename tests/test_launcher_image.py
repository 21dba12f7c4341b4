"""The job image on every backend (issue #12): `image build [--push REPO]` (docker buildx, the tag
from the lock's hash, one line where no daemon exists), `up --image REF` (or `image:` in the config)
renders the SkyPilot task with `image_id: docker:REF` and nothing installed in setup, checked
through the real SkyPilot SDK offline; without it the rendered task is the template's."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import one_line
from launcher_helpers import CANARY, REPO, cli, launcher_env

DIGEST = "sha256:" + "ab" * 32
REF = f"ghcr.io/you/socrates-job:lock-0123456789ab@{DIGEST}"


def expected_tag() -> str:
    h = hashlib.sha256()
    for f in ("requirements/job.lock", "requirements/uv.lock", "Dockerfile"):
        h.update((REPO / f).read_bytes() + b"\0")
    return f"lock-{h.hexdigest()[:12]}"


def _fake_docker(tmp_path: Path, info_rc: int = 0, buildx: bool = True) -> Path:
    """A `docker` first on PATH: records its argv, answers `info` (or fails it the way a CLI without a
    daemon does), and for `buildx build` writes the metadata file buildx writes after a push."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "docker"
    script.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {tmp_path}/docker.argv
if [ "$1" = info ]; then
  if [ {info_rc} != 0 ]; then echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?" >&2; exit 1; fi
  echo 28.2.2; exit 0
fi
if [ "$1" = buildx ] && [ "$2" = version ]; then
  if [ {int(buildx)} = 1 ]; then echo "github.com/docker/buildx v0.20.0"; exit 0; fi
  echo "docker: unknown command: docker buildx" >&2; exit 1
fi
if [ "$1" = buildx ] && [ "$2" = build ]; then
  while [ $# -gt 0 ]; do
    if [ "$1" = --metadata-file ]; then printf '{{"containerimage.digest": "{DIGEST}"}}' > "$2"; fi
    shift
  done
  exit 0
fi
exit 1
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _env(tmp_path: Path, bin_dir: Path | None = None) -> dict:
    env = launcher_env(tmp_path / "runs")
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


# --- image build / tag -----------------------------------------------------------------------

def test_the_tag_derives_from_the_lock_and_the_dockerfile(tmp_path):
    r = cli(["image", "tag"], _env(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == f"socrates-launch-job:{expected_tag()}", r
    r = cli(["image", "tag", "--push", "ghcr.io/you/socrates-job"], _env(tmp_path))
    assert r.stdout.strip() == f"ghcr.io/you/socrates-job:{expected_tag()}"


def test_no_docker_daemon_is_one_line_exit_2(tmp_path):
    line = one_line(cli(["image", "build"], _env(tmp_path, _fake_docker(tmp_path, info_rc=1))), both=True)
    assert "no docker daemon reachable" in line and "Cannot connect to the Docker daemon" in line, line
    argv = (tmp_path / "docker.argv").read_text()
    assert "buildx build" not in argv


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI here")
def test_the_real_docker_cli_without_a_daemon_is_one_line_exit_2(tmp_path):
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0:
        pytest.skip("a docker daemon runs here: `image build` would really build")
    line = one_line(cli(["image", "build"], _env(tmp_path)), both=True)
    assert "no docker daemon reachable" in line


def test_no_buildx_is_one_line_exit_2(tmp_path):
    line = one_line(cli(["image", "build"], _env(tmp_path, _fake_docker(tmp_path, buildx=False))), both=True)
    assert "buildx is not installed" in line


def test_build_and_push_runs_buildx_with_the_lock_tag_and_prints_the_pinned_ref(tmp_path):
    bin_dir = _fake_docker(tmp_path)
    r = cli(["image", "build", "--push", "ghcr.io/you/socrates-job"], _env(tmp_path, bin_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    build = [ln for ln in (tmp_path / "docker.argv").read_text().splitlines() if ln.startswith("buildx build")][0]
    ref = f"ghcr.io/you/socrates-job:{expected_tag()}"
    assert f"-t {ref} " in build and "--push" in build and "--platform linux/amd64" in build, build
    assert f"pushed {ref}@{DIGEST}" in r.stdout and f"socrates-launch up --image {ref}@{DIGEST}" in r.stdout
    r = cli(["image", "build"], _env(tmp_path, bin_dir))  # local: loaded, not pushed
    build = [ln for ln in (tmp_path / "docker.argv").read_text().splitlines() if ln.startswith("buildx build")][-1]
    assert f"-t socrates-launch-job:{expected_tag()} " in build and "--load" in build and "--push" not in build


@pytest.mark.parametrize("repo", ["ghcr.io/you/socrates-job:v1", f"ghcr.io/you/x@{DIGEST}", "Not A Repo"])
def test_push_takes_a_repository_without_a_tag(tmp_path, repo):
    line = one_line(cli(["image", "build", "--push", repo], _env(tmp_path, _fake_docker(tmp_path))), both=True)
    assert repr(repo) in line and "repository without a tag" in line
    assert not (tmp_path / "docker.argv").exists()  # refused before docker is asked anything


# --- up --image ------------------------------------------------------------------------------

def test_image_is_refused_where_it_cant_apply_or_is_not_a_reference(tmp_path):
    line = one_line(cli(["up", "--infra", "local", "--image", REF, "--yes"], _env(tmp_path)), both=True)
    assert "--image" in line and "--infra local" in line
    line = one_line(cli(["up", "--gpu", "A100:1", "--image", "a b;rm -rf /", "--dryrun"], _env(tmp_path)), both=True)
    assert "image" in line and "docker image reference" in line
    assert not (tmp_path / "runs").exists()


def _render(options: dict) -> dict:
    from contracts.config import load_config
    from launcher import registry, task as tasklib

    cfg = load_config(REPO / "configs" / "paper.yaml")
    run = registry.Run(id="t", dir=Path("/nonexistent"), name="t", config=cfg.to_dict(),
                       options={"eval": True, **options})
    return tasklib.render(run, gpu="A100:1")


def test_without_an_image_the_rendered_task_keeps_the_templates_setup_and_resources():
    template = yaml.safe_load((REPO / "sky" / "train.yaml").read_text())
    plain = _render({})
    assert plain["setup"] == template["setup"] and "uv\" pip sync" in plain["setup"]
    assert "image_id" not in plain["resources"] and "SOCRATES_IMAGE" not in plain["envs"]
    assert plain == _render({"image": None})
    with_image = _render({"image": REF})
    # Only the image's keys differ.
    assert {k: v for k, v in with_image["resources"].items() if k != "image_id"} == plain["resources"]
    assert {k: v for k, v in with_image["envs"].items() if k != "SOCRATES_IMAGE"} == {**plain["envs"], "JOB_PYTHON": "/opt/venv/bin/python"}
    assert with_image["run"] == plain["run"]


def test_the_run_script_passes_the_image_to_the_job_for_its_manifest(monkeypatch):
    from launcher import task as tasklib

    script = tasklib.run_script(_render({"image": REF}))
    assert f"export SOCRATES_IMAGE={REF}" in script
    from job import env

    monkeypatch.setenv("SOCRATES_IMAGE", REF)
    assert env.image_info() == {"ref": REF, "digest": DIGEST}
    monkeypatch.delenv("SOCRATES_IMAGE")
    assert env.image_info() is None


@pytest.mark.sky
def test_the_image_task_through_the_real_skypilot_sdk(sky_home):
    code = f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
import sky
from pathlib import Path
from launcher import registry, task as tasklib
from contracts.config import load_config
cfg = load_config("configs/paper.yaml")
out = {{}}
for key, image in (("image", {REF!r}), ("plain", None)):
    run = registry.Run(id="t", dir=Path("/nonexistent"), name="t", config=cfg.to_dict(), options={{"eval": True, "image": image}})
    task = sky.Task.from_yaml_config(tasklib.render(run, gpu="A100:1", cloud="runpod"))
    res = list(task.resources)[0]
    out[key] = {{"image_id": res.image_id, "setup": task.setup, "job_python": task.envs.get("JOB_PYTHON"),
                "extract": res.extract_docker_image()}}
print(json.dumps(out))
"""
    r = sky_home.python(code)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    image, plain = got["image"], got["plain"]
    assert image["extract"] == REF and "docker:" + REF in json.dumps(image["image_id"]), image
    commands = [ln.split("#")[0] for ln in image["setup"].splitlines()]
    assert not any(re.search(r"\bpip\b|\buv\b|venv|job\.lock|apt-get|conda", c) for c in commands), image["setup"]
    assert any("> .socrates-t0" in c for c in commands)  # the deadline still counts from setup's start
    assert image["job_python"] == "/opt/venv/bin/python"
    assert plain["image_id"] is None and plain["extract"] is None
    assert "uv\" pip sync" in plain["setup"] and "--require-hashes" in plain["setup"]


@pytest.mark.slow  # a dry run through the real API server: ~10 s on 2 cores alone, over 15 s beside other tests
@pytest.mark.sky
def test_dryrun_with_an_image_says_so_and_the_optimizer_takes_it(sky_home, tmp_path):
    runs = tmp_path / "runs"
    env = {**sky_home.env, "SOCRATES_RUNS_DIR": str(runs), "HF_TOKEN": CANARY}
    r = cli(["up", "--gpu", "A100-80GB:1", "--cloud", "runpod", "--subset", "0.1", "--image", REF, "--dryrun", "--yes"],
            env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert f"image_id: docker:{REF}" in out and f"environment: the job image {REF}" in out
    assert "uv pip install" not in out and "chosen:" in out
    r = cli(["up", "--gpu", "A100-80GB:1", "--cloud", "runpod", "--subset", "0.1", "--dryrun", "--yes"], env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "image_id" not in out and "environment: a venv from requirements/job.lock" in out
    assert not runs.exists()


# --- the SSH backend uses the same reference -------------------------------------------------

def test_ssh_uses_the_given_image_and_pulls_it(tmp_path, monkeypatch):
    pytest.importorskip("paramiko")
    import argparse

    from launcher import plan as up
    from launcher.backends import ssh

    p = argparse.ArgumentParser()
    up.add_arguments(p)
    plan = up.resolve(p.parse_args(["--infra", "ssh://me@host", "--image", REF, "--config", "configs/paper.yaml"]))
    assert plan.options.image == REF and plan.options.ssh["image"] == REF and plan.options.ssh["pull_image"]
    plain = up.resolve(p.parse_args(["--infra", "ssh://me@host", "--config", "configs/paper.yaml"]))
    assert plain.options.ssh["image"] == f"socrates-launch-job:{expected_tag()}" and not plain.options.ssh["pull_image"]
    seen = []
    from launcher.ssh_transport import Result

    def record(client, cmd, **kw):  # the host's answer: the command worked
        seen.append(cmd)
        return Result(0, "", "")

    monkeypatch.setattr(ssh, "ssh_run", record)
    for opts, verb in ((plan.options.ssh, "docker pull -q"), (plain.options.ssh, "docker build -q")):
        ssh.SshBackend("ssh://me@host", **opts)._docker_image(None, "/base")
        assert verb in seen[-1] and opts["image"] in seen[-1], seen[-1]


def test_a_config_image_is_not_claimed_by_a_local_run(tmp_path):
    import argparse

    from launcher import plan as up

    doc = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    doc["image"] = REF
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    p = argparse.ArgumentParser()
    up.add_arguments(p)
    assert up.resolve(p.parse_args(["--infra", "local", "--config", str(cfg)])).options.image is None
    assert up.resolve(p.parse_args(["--gpu", "A100:1", "--config", str(cfg)])).options.image == REF
