"""An offline SkyPilot for tests: a temp HOME with a seeded catalog and a real API server.

`sky_home` (session-scoped) makes the HOME, writes ~/.sky/catalogs/v8 (rows written here, in the
format of SkyPilot's catalog), starts `sky.api_start()` on a free port, waits for the boot-time
`sky.check` request, enables the catalog's clouds, and stops the server at the end. Everything
SkyPilot runs in subprocesses with `sky_home.env`, so the tests' own process never imports sky
and its HOME is untouched. Needs `rsync` on PATH (SkyPilot refuses to plan launches without it).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from ports import free_port

REPO = Path(__file__).resolve().parent.parent
CLOUDS = ("lambda", "runpod")
CATALOG = {
    "common/accelerators.csv": """\
AcceleratorName,Clouds
A10,"['Lambda']"
A100,"['Lambda']"
A100-80GB,"['Lambda', 'RunPod']"
H100,"['Lambda', 'RunPod']"
L4,"['Lambda']"
""",
    "lambda/vms.csv": """\
InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,GpuInfo,SpotPrice
cpu_4x_general,,,4.0,16.0,0.2,us-east-1,,
gpu_1x_a10,A10,1.0,30.0,200.0,1.29,us-east-1,"{'Gpus': [{'Name': 'A10', 'Manufacturer': 'NVIDIA', 'Count': 1.0, 'MemoryInfo': {'SizeInMiB': 24576}}], 'TotalGpuMemoryInMiB': 24576}",
gpu_1x_l4,L4,1.0,8.0,32.0,0.79,us-east-1,"{'Gpus': [{'Name': 'L4', 'Manufacturer': 'NVIDIA', 'Count': 1.0, 'MemoryInfo': {'SizeInMiB': 23034}}], 'TotalGpuMemoryInMiB': 23034}",
gpu_1x_a100,A100,1.0,30.0,200.0,1.99,us-east-1,"{'Gpus': [{'Name': 'A100', 'Manufacturer': 'NVIDIA', 'Count': 1.0, 'MemoryInfo': {'SizeInMiB': 40960}}], 'TotalGpuMemoryInMiB': 40960}",
gpu_1x_a100,A100,1.0,30.0,200.0,2.09,us-west-1,"{'Gpus': [{'Name': 'A100', 'Manufacturer': 'NVIDIA', 'Count': 1.0, 'MemoryInfo': {'SizeInMiB': 40960}}], 'TotalGpuMemoryInMiB': 40960}",
gpu_1x_a100_sxm4_80gb,A100-80GB,1.0,30.0,200.0,2.49,us-east-1,"{'Gpus': [{'Name': 'A100-80GB', 'Manufacturer': 'NVIDIA', 'Count': 1.0, 'MemoryInfo': {'SizeInMiB': 81920}}], 'TotalGpuMemoryInMiB': 81920}",
gpu_1x_h100_pcie,H100,1.0,26.0,200.0,3.29,us-east-1,"{'Gpus': [{'Name': 'H100', 'Manufacturer': 'NVIDIA', 'Count': 1.0, 'MemoryInfo': {'SizeInMiB': 81920}}], 'TotalGpuMemoryInMiB': 81920}",
gpu_8x_h100_sxm5,H100,8.0,208.0,1800.0,23.92,us-east-1,"{'Gpus': [{'Name': 'H100', 'Manufacturer': 'NVIDIA', 'Count': 8.0, 'MemoryInfo': {'SizeInMiB': 81920}}], 'TotalGpuMemoryInMiB': 655360}",
""",
    "runpod/vms.csv": """\
InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Region,SpotPrice,Price,AvailabilityZone,GpuInfo
1x_A100-80GB_SECURE,A100-80GB,1.0,8.0,117.0,US,1.19,1.39,US-TX-1,"{'Gpus': [{'Name': 'A100 PCIe', 'Manufacturer': 'Nvidia', 'Count': 1, 'MemoryInfo': {'SizeInMiB': 81920}}], 'TotalGpuMemoryInMiB': 81920}"
1x_H100_SECURE,H100,1.0,16.0,125.0,US,2.39,2.99,US-TX-1,"{'Gpus': [{'Name': 'H100 PCIe', 'Manufacturer': 'Nvidia', 'Count': 1, 'MemoryInfo': {'SizeInMiB': 81920}}], 'TotalGpuMemoryInMiB': 81920}"
""",
}

_START = textwrap.dedent("""
    import sys, time
    import sky
    from sky import global_user_state
    from sky.clouds import CloudCapability
    sky.api_start(port=int(sys.argv[1]))
    # The server's boot-time credential check; enabling clouds before it ends would be overwritten.
    for req in sky.api_status():
        if "check" in req.name:
            try:
                sky.get(req.request_id)
            except Exception as e:
                print("boot check:", e)
    global_user_state.set_enabled_clouds(sys.argv[2].split(","), CloudCapability.COMPUTE, "default")
    print("ready")
""")


@dataclass
class SkyHome:
    home: Path
    port: int
    env: dict

    def python(self, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run `code` in a subprocess that talks to this server (for tests that call sky directly)."""
        return subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)


def seed_catalog(home: Path) -> None:
    root = home / ".sky" / "catalogs" / "v8"
    for rel, text in CATALOG.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


@pytest.fixture(scope="session")
def sky_home(tmp_path_factory):
    """Started once per test session: under pytest-xdist the first worker that needs it starts it (a file
    lock in the controller's temp folder) and every worker uses that one; the controller stops it at the
    end (pytest_sessionfinish in conftest.py, `stop_shared`)."""
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (SkyPilot needs it; `make sysdeps` installs it)")
    pytest.importorskip("sky", reason="skypilot is not installed")
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        fix = _start()
        try:
            yield fix
        finally:
            _stop(fix)
        return
    shared = tmp_path_factory.getbasetemp().parent  # the controller's basetemp: the same for every worker
    with open(shared / "skyhome.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker starts it; the others wait, then read its record
        record = shared / SHARED_RECORD
        if record.is_file():
            saved = json.loads(record.read_text())
            fix = SkyHome(home=Path(saved["home"]), port=saved["port"], env=saved["env"])
        else:
            fix = _start()
            record.write_text(json.dumps({"home": str(fix.home), "port": fix.port, "env": fix.env}))
    yield fix


SHARED_RECORD = "skyhome.json"


def _start() -> SkyHome:
    home = Path(tempfile.mkdtemp(prefix="skyhome-"))
    seed_catalog(home)
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SKYPILOT_", "SOCRATES_", "PYTEST_"))}
    env.update({"HOME": str(home), "SKYPILOT_API_SERVER_ENDPOINT": f"http://127.0.0.1:{port}",
                "SKYPILOT_DISABLE_USAGE_COLLECTION": "1", "PYTHONPATH": str(REPO), "COLUMNS": "160"})
    fix = SkyHome(home=home, port=port, env=env)
    started = subprocess.run([sys.executable, "-c", _START, str(port), ",".join(CLOUDS)], env=env,
                             capture_output=True, text=True, timeout=180)
    if started.returncode != 0 or "ready" not in started.stdout:
        _stop(fix)
        raise AssertionError(f"the offline SkyPilot API server did not start: {started.stdout} {started.stderr}")
    return fix


def _stop(fix: SkyHome) -> None:
    subprocess.run([sys.executable, "-c", "import sky; sky.api_stop()"], env=fix.env, capture_output=True,
                   timeout=60)
    _kill_server_tree(fix.port)  # api_stop leaves the server (and its workers) running here
    shutil.rmtree(fix.home, ignore_errors=True)


def stop_shared(basetemp: Path) -> None:
    """The controller's end of a pytest-xdist session: stop the server a worker started, if one did."""
    record = basetemp / SHARED_RECORD
    if record.is_file():
        saved = json.loads(record.read_text())
        _stop(SkyHome(home=Path(saved["home"]), port=saved["port"], env=saved["env"]))
        record.unlink()


def _kill_server_tree(port: int) -> None:
    """SIGKILL the API server started on `port` and every process below it (workers, executors)."""
    parents: dict[int, int] = {}
    server = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            parents[pid] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, ValueError, IndexError):
            continue
        if b"sky.server.server" in cmd and f"--port={port}".encode() in cmd:
            server.append(pid)
    doomed = set(server)
    while True:
        more = {pid for pid, ppid in parents.items() if ppid in doomed} - doomed
        if not more:
            break
        doomed |= more
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
