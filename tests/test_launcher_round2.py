"""Issue #25 (round two of hostile records and careless input), the launcher's side: destructive actions
derive their target, downloads survive a full disk, local pulls never follow links, --data folders are
walked one way, SOCRATES_RUNS_DIR is checked, status never moves an ended run backwards, runs/ is private
and the --on-teardown command is kept once, out of run.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import registry
from launcher_helpers import REPO, cli, launcher_env, pid_alive


def _record(runs: Path, infra: str, backend_state: dict, **kw) -> registry.Run:
    os.environ["SOCRATES_RUNS_DIR"] = str(runs)
    try:
        run = registry.new_run("rec", infra, config={})
        return run.transition("provisioning", machine="up", backend_state=backend_state, **kw)
    finally:
        del os.environ["SOCRATES_RUNS_DIR"]


# --- item 1: sky cancels only a launch request SkyPilot ties to the run's cluster ----------------------

def test_sky_down_does_not_cancel_another_runs_launch_request(tmp_path, monkeypatch):
    """Run B's record holds run A's request id (an edited or copied record): `down B` must not cancel A's
    launch (A's provisioner lives on); it says which cluster the request belongs to."""
    from launcher.backends.sky import SkyBackend, cluster_name_for

    monkeypatch.setenv("FAKESKY_DIR", str(tmp_path / "cloud"))
    from fakesky import FakeSky

    a = (tmp_path / "cloud") / "socrates-run-a-launching"
    a.mkdir(parents=True)
    (a / "task.json").write_text("{}")
    provisioner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    (a / "provisioner.pid").write_text(str(provisioner.pid))
    try:
        runs = tmp_path / "runs"
        b = _record(runs, "sky", {})
        monkeypatch.setenv("SOCRATES_RUNS_DIR", str(runs))
        b.update(backend_state={"cluster": cluster_name_for(b.id), "request_id": f"req-{a.name}"})
        with pytest.raises(Exception) as err:
            SkyBackend(adapter=FakeSky()).down(registry.load(b.id))
        assert pid_alive(provisioner.pid), "down B cancelled run A's launch request"
        assert a.name in str(err.value) and "not cancelled" in str(err.value)
    finally:
        provisioner.kill()
        provisioner.wait(10)


def test_sky_down_cancels_its_own_launch_request(tmp_path, monkeypatch):
    from launcher.backends.sky import SkyBackend, cluster_name_for

    monkeypatch.setenv("FAKESKY_DIR", str(tmp_path / "cloud"))
    from fakesky import FakeSky

    runs = tmp_path / "runs"
    run = _record(runs, "sky", {})
    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(runs))
    mine = (tmp_path / "cloud") / cluster_name_for(run.id)
    mine.mkdir(parents=True)
    (mine / "task.json").write_text("{}")
    provisioner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    (mine / "provisioner.pid").write_text(str(provisioner.pid))
    try:
        run.update(backend_state={"cluster": mine.name, "request_id": f"req-{mine.name}"})
        SkyBackend(adapter=FakeSky()).down(registry.load(run.id))
        provisioner.wait(10)  # cancelled: its process group was killed
        assert not mine.exists()
    finally:
        if provisioner.poll() is None:
            provisioner.kill()
            provisioner.wait(10)
