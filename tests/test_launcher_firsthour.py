"""A new user's first hour (issue #18): no cloud credentials, no catalog, no network.

The launcher runs as a subprocess with HOME pointing at an empty (or catalog-only) folder and a
proxy that refuses every connection, so SkyPilot cannot fetch anything. SkyPilot's local API
server, where one is needed, is the real one the launcher starts itself, on a free port of its own
(SKYPILOT_API_SERVER_LOCAL_PORT) so other servers on the machine are never touched.
"""
from __future__ import annotations

import calendar
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from launcher_helpers import REPO, cli, fakesky_env, launcher_env
from ports import free_port
from skyfix import _kill_server_tree, seed_catalog

NO_CLOUD = "no cloud is enabled: set one up with `sky check`"


def _server_pids(port: int) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = cmdline.read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"sky.server.server" in cmd and f"--port={port}".encode() in cmd:
            pids.append(int(cmdline.parent.name))
    return pids


@pytest.fixture
def new_user(tmp_path):
    """(env, port): an empty HOME, no network, a private API server port; any server left is killed."""
    pytest.importorskip("sky", reason="skypilot is not installed")
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    dead = "http://127.0.0.1:9"  # nothing listens there: every download fails at once
    env = launcher_env(tmp_path / "runs", HOME=str(home), SKYPILOT_API_SERVER_LOCAL_PORT=str(port),
                       SKYPILOT_DISABLE_USAGE_COLLECTION="1", HTTPS_PROXY=dead, HTTP_PROXY=dead,
                       https_proxy=dead, http_proxy=dead, NO_PROXY="127.0.0.1,localhost",
                       no_proxy="127.0.0.1,localhost", COLUMNS="80")  # the local API server stays reachable
    env.pop("SKYPILOT_API_SERVER_ENDPOINT", None)
    yield env, port
    _kill_server_tree(port)


def _check_short(r, limit: int = 6) -> list[str]:
    out = (r.stdout + r.stderr)
    lines = out.splitlines()
    assert "<sky-payload>" not in out and "rich_" not in out and "Traceback" not in out, out
    assert "\x1b[" not in out, out
    assert len(lines) <= limit, f"{len(lines)} lines:\n{out}"
    return lines


@pytest.mark.slow
def test_estimate_and_dryrun_with_no_catalog_and_no_network_are_short_and_say_why(new_user, tmp_path):
    env, port = new_user
    r = cli(["estimate", "--gpu", "A100:1", "--subset", "0.1"], env, timeout=300)
    _check_short(r)
    assert r.returncode == 0, r.stdout + r.stderr
    out = " ".join((r.stdout + r.stderr).split())
    assert "hours on A100:1" in out and "price unknown" in out
    assert "could not fetch its price catalog" in out and "check the network" in out

    # The dry run shows the plan, the hours with "price unknown" and the task, and says what a launch needs.
    r = cli(["up", "--gpu", "A100:1", "--subset", "0.1", "--dryrun"], env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "<sky-payload>" not in out and "\x1b[" not in out, out[-3000:]
    assert "hours on A100:1" in out and "price unknown" in out and "data:   socratesft/SocSci210 (subset 0.1)" in out
    assert "SkyPilot's optimizer was not run" in out and "sky check" in out and "nothing was provisioned" in out
    _assert_task_unwrapped(out)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert _server_pids(port) == []  # no SkyPilot server was left behind

    # A real launch without a price still refuses: one line, exit 2, no run.
    r = cli(["up", "--gpu", "A100:1", "--subset", "0.1", "--yes"], env, timeout=300)
    lines = _check_short(r)
    assert r.returncode == 2 and "could not fetch its price catalog" in lines[-1] and len(lines) <= 4, lines
    assert [ln for ln in lines if "error" in ln] == [lines[-1]]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _assert_task_unwrapped(out: str) -> None:
    """The rendered task is printed as YAML that loads, every line of sky/train.yaml's run block whole on
    one line (the template file is the reference), none folded at the 80 columns of the test's terminal."""
    import yaml

    block = out.split("rendered task (sky/train.yaml)", 1)[1].split("\n", 1)[1].split("\nenvironment: ", 1)[0]
    task = yaml.safe_load(block)
    template = yaml.safe_load((REPO / "sky" / "train.yaml").read_text())
    assert task["run"] == template["run"]
    printed = block.splitlines()
    long_lines = [ln for ln in template["run"].splitlines() if len(ln) > 78]
    assert long_lines and all("  " + ln in printed for ln in long_lines), long_lines


AWS_VMS = """\
InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,AvailabilityZone
p4de.test,A100,1.0,12.0,144.0,"{'Gpus': [{'Name': 'A100', 'Manufacturer': 'NVIDIA', 'Count': 1, \
'MemoryInfo': {'SizeInMiB': 40960}}], 'TotalGpuMemoryInMiB': 40960}",4.10,1.50,us-east-1,us-east-1a
"""


def test_estimate_falls_back_to_the_catalog_skypilot_cached_last(new_user):
    """A catalog SkyPilot fetched itself (its md5 in .meta) and older than its 7-hour refresh: the refresh
    fails offline, the cached copy is used, and the estimate says so with the copy's date."""
    env, _port = new_user
    root = Path(env["HOME"]) / ".sky" / "catalogs" / "v8"
    vms = root / "aws" / "vms.csv"
    vms.parent.mkdir(parents=True)
    vms.write_text(AWS_VMS)
    (root / ".meta" / "aws").mkdir(parents=True)
    (root / ".meta" / "aws" / "vms.csv.md5").write_text(hashlib.md5(vms.read_bytes()).hexdigest())
    stamp = calendar.timegm((2026, 1, 2, 3, 4, 0, 0, 0, 0))
    os.utime(vms, (stamp, stamp))
    r = cli(["estimate", "--gpu", "A100:1", "--subset", "0.1", "--cloud", "aws"], {**env, "COLUMNS": "160"},
            timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "<sky-payload>" not in out and "Failed to fetch" not in out, out
    flat = " ".join(out.split())
    assert "aws catalog could not be fetched (offline?): prices from the copy it cached on 2026-01-02 03:04 UTC" \
        in flat, out
    assert "p4de.test" in out and "4.10" in out  # the cached row is priced


@pytest.mark.slow  # starts SkyPilot's own API server twice: 30-40 s on 2 cores
@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed (SkyPilot needs it)")
def test_no_credentials_dryrun_shows_task_and_offers_and_up_refuses_before_a_run(new_user, tmp_path):
    env, port = new_user
    seed_catalog(Path(env["HOME"]))
    env = {**env, "COLUMNS": "160"}
    r = cli(["up", "--gpu", "A100:1", "--subset", "0.1", "--dryrun"], env, timeout=400)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "<sky-payload>" not in out and "Traceback" not in out and "NoCloudAccessError" not in out, out[-3000:]
    assert "rendered task" in out and "run: |" in out  # the task
    assert "Lambda" in out and "gpu_1x_a100" in out and "1.99" in out  # offers from the catalog, priced
    assert out.count(NO_CLOUD) == 1 and "nothing was provisioned" in out
    assert _server_pids(port) == [], "the API server this command started was left running"
    assert "left running" not in out

    t0 = time.monotonic()
    r = cli(["up", "--gpu", "A100:1", "--subset", "0.1", "--yes"], env, timeout=400)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert [ln for ln in out.splitlines() if "error" in ln] == [f"socrates-launch up: error: {NO_CLOUD}"], out
    assert "\x1b[" not in out and "Traceback" not in out
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "a run record was created"
    assert _server_pids(port) == [], f"API server left running ({time.monotonic() - t0:.0f} s)"


def test_up_without_credentials_with_the_fake_sky_creates_no_run(tmp_path):
    """The same refusal through the adapter seam (tests/fakesky.py), with no SkyPilot at all."""
    pytest.importorskip("sky", reason="skypilot is not installed (the estimate reads its catalog)")
    runs = tmp_path / "runs"
    env = fakesky_env(tmp_path, FAKESKY_FAIL="no-cloud")
    r = cli(["up", "--gpu", "A100:1", "--subset", "0.1", "--yes"], env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and out.strip().splitlines()[-1] == f"socrates-launch up: error: {NO_CLOUD}", out
    assert not runs.exists() or not any(runs.iterdir())


def test_report_json_names_the_run_by_its_id(tmp_path):
    runs = tmp_path / "runs"
    run_dir = runs / "demo-20260101-000000-abcd"
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({
        "id": run_dir.name, "dir": str(run_dir), "infra": "local", "name": "demo", "state": "done",
        "created_at": 1.0, "history": [{"state": "created", "ts": 1.0}]}))
    (run_dir / "eval" / "metrics.json").write_text(json.dumps(
        {"results": {"fine-tuned/sample": {"wasserstein": 0.25, "individual_accuracy": 0.5}}}))
    r = cli(["report", run_dir.name, "--json"], launcher_env(runs))
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["run"] == "demo-20260101-000000-abcd"
    r = cli(["report", run_dir.name], launcher_env(runs))
    assert r.returncode == 0 and f"run {run_dir.name}" in r.stdout, r.stdout + r.stderr


def test_report_to_is_checked_by_the_config_schema(tmp_path):
    import yaml

    from contracts.config import load_config
    from contracts.errors import ContractError

    cfg = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    assert load_config(REPO / "configs" / "smoke.yaml").train.report_to == "none"  # the default
    for ok in ("none", "tensorboard", "wandb"):
        cfg["train"]["report_to"] = ok
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        assert load_config(tmp_path / "c.yaml").train.report_to == ok
    cfg["train"]["report_to"] = "mlflow"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ContractError) as e:
        load_config(tmp_path / "c.yaml")
    assert "train.report_to" in str(e.value) and "'mlflow'" in str(e.value) and "tensorboard" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("n,split", [(240, "unseen-studies"), (60, "unseen-studies"), (300, "random")])
def test_the_estimate_counts_the_training_rows_the_job_prepares_from_synthetic_data(tmp_path, n, split):
    """The demo's header (`up`/`estimate`'s first line) says the rows the job will train: checked
    against the job's own `prepare` of the same synthetic source (the reference, run as a subprocess)."""
    import subprocess
    import sys

    from contracts.config import load_config
    from launcher.cost.tokens import count_tokens

    out = tmp_path / "prepared"
    r = subprocess.run([sys.executable, "-m", "job", "prepare", "--config", str(REPO / "configs" / "smoke.yaml"),
                        "--data", f"synthetic:{n}", "--split", split, "--subset", "1.0", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    prepared = sum(1 for line in (out / "train.jsonl").read_text().splitlines() if line.strip())
    cfg = load_config(REPO / "configs" / "smoke.yaml").with_overrides(
        {"data.source": f"synthetic:{n}", "data.split": split, "data.subset": 1.0})
    assert count_tokens(cfg).train_rows == prepared


@pytest.mark.parametrize("lines", [False, True])
def test_job_verbs_by_hand_print_plain_events_and_the_launchers_channel_keeps_its_lines(tmp_path, lines):
    """`python -m job prepare` run by hand prints its events as plain lines; with SOCRATES_EVENT_LINES=1 (set
    by sky/train.yaml's run block, which every backend runs) stdout carries the @@socrates-event lines the
    launcher parses. Either way events.jsonl (the reference) has the same events."""
    import subprocess
    import sys

    from contracts.events import LINES_ENV, parse_line, read_all

    env = {k: v for k, v in os.environ.items() if k != LINES_ENV}
    if lines:
        env[LINES_ENV] = "1"
    out = tmp_path / "prepared"
    r = subprocess.run([sys.executable, "-m", "job", "prepare", "--config", str(REPO / "configs" / "smoke.yaml"),
                        "--data", "synthetic:60", "--out", str(out)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    recorded = read_all(out / "events.jsonl")
    prepare = next(e for e in recorded if e["event"] == "prepare")
    if lines:
        echoed = [e for e in map(parse_line, r.stdout.splitlines()) if e is not None]
        assert echoed == recorded
    else:
        assert "@@socrates-event" not in r.stdout and "{" not in r.stdout.split("\n")[0], r.stdout
        assert f"[job] prepare: train_rows={prepare['train_rows']}, test_rows={prepare['test_rows']}," in r.stdout
        assert [e for e in map(parse_line, r.stdout.splitlines()) if e is not None] == []
    assert f"export {LINES_ENV}=1" in (REPO / "sky" / "train.yaml").read_text()


# --- output at 80 columns, in a pipe (acceptance 2) --------------------------------------------------------

def _table_lines(out: str, start: str, end: str) -> list[str]:
    lines = out.splitlines()
    i = next(n for n, ln in enumerate(lines) if start in ln)
    j = next(n for n in range(i + 1, len(lines)) if end in lines[n])
    return lines[i:j]


def test_estimate_spot_at_80_columns_in_a_pipe_keeps_every_cell_whole(tmp_path):
    """Piped (subprocess: not a terminal) at COLUMNS=80: the offers table fits 80 columns, no cell is cut or
    spread one letter a row: each offer's cloud, instance, card and number ranges from the seeded catalog
    (tests/skyfix.py, the reference) are whole on the offer's lines, and a left-out column is said."""
    pytest.importorskip("sky", reason="skypilot is not installed")
    import csv
    import io
    import re

    from skyfix import CATALOG

    env = fakesky_env(tmp_path, COLUMNS="80")
    r = cli(["estimate", "--subset", "0.1", "--spot"], env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "…" not in out and "..." not in out, out
    table = _table_lines(out, "What this run will cost (spot)", "* cheapest expected cost")
    assert all(len(ln) <= 80 for ln in table), "\n".join(table)
    spot = [row for row in csv.DictReader(io.StringIO(CATALOG["runpod/vms.csv"])) if row["SpotPrice"]]
    assert spot
    text = "\n".join(table)
    for row in spot:  # RunPod's spot rows: the only spot prices in the seeded catalog
        line = next(ln for ln in table if row["InstanceType"] in ln.split())  # the instance, whole
        at = table.index(line)
        near = " ".join(table[at - 1:at + 1])  # the offer wraps at its spaces: cloud and region may be a line above
        assert "RunPod" in near.split() and f"{row['AcceleratorName']}:1" in text.split(), (row, text)
    numbers = [ln for ln in table if re.search(r"\d+\.\d-\d+\.\d-\d+\.\d", ln)]
    assert len(numbers) == len(spot), text
    for ln in numbers:
        assert re.search(r"(^|\s)\d+\.\d+-\d+\.\d+-\d+\.\d+\s+\d[\d,]*-\d[\d,]*-\d[\d,]*\s*$", ln), ln
    assert "left out at 80 columns" in out or " on demand " in table[2], out


def test_runs_at_80_columns_in_a_pipe_never_cuts_an_id_or_a_state(tmp_path, monkeypatch):
    from launcher import registry

    runs = tmp_path / "runs"
    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(runs))
    made = {}
    for name, infra, state in (("socrates-qwen2.5-14b-qlora", "sky", "running"), ("smoke", "local", "done"),
                               ("socrates-qwen2.5-14b-qlora", "ssh://someone@a-long-host.example.org:2222", "downloading")):
        rec = registry.new_run(name, infra, gpu="A100:1" if infra == "sky" else None, price_per_hour=1.99)
        rec.transition("provisioning", started_at=time.time() - 4000)
        for s in {"running": ("running",), "done": ("running", "downloading", "done"),
                  "downloading": ("running", "downloading")}[state]:
            rec.transition(s)
        made[rec.id] = state
    r = cli(["runs"], launcher_env(runs, COLUMNS="80"))
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "…" not in out and "..." not in out, out
    lines = out.splitlines()
    for run_id, state in made.items():
        line = next(ln for ln in lines if run_id in ln.split())
        assert line.split()[1] == state and len(line) <= 80, line
    assert all(len(ln) <= 80 for ln in lines if not ln.lstrip().startswith("(")), out
    wide = cli(["runs"], launcher_env(runs, COLUMNS="200")).stdout
    assert "ssh://someone@a-long-host.example.org:2222" in wide and "left out" not in wide, wide


# --- the card choice (acceptance 3) ------------------------------------------------------------------------

_CARD_ROW = r"^\s*(\S+:\d+(?: PCIe)?)\s+(fast|lean|-)\s+([\d,]+\.\d)\s+(\d+\.\d\d)\s+([\d,]+)\s*(.*)$"


def _card_rows(out: str) -> dict[str, dict]:
    import re

    rows = {}
    for ln in _table_lines(out, "The same run on each card that fits", "expected hours and dollars"):
        m = re.match(_CARD_ROW, ln)
        if m:
            rows[m[1]] = {"mode": m[2], "hours": float(m[3].replace(",", "")), "price": float(m[4]),
                          "dollars": float(m[5].replace(",", "")), "marks": m[6].strip()}
    return rows


def _reference(env: dict, cards: list[str], subset: str) -> dict[str, tuple[float, float, float]]:
    """card label -> (expected hours, $/h, expected $) of that card's cheapest offer, each card estimated alone
    (`estimate --gpu CARD:1`), in one process beside the CLI's."""
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from contracts.config import load_config\n"
        "from launcher.cost.estimate import estimate_run\n"
        f"cfg = load_config({str(REPO / 'configs' / 'paper.yaml')!r}).with_overrides({{'data.subset': {subset}}})\n"
        "out = {}\n"
        "for card in sys.argv[1:]:\n"
        "    for o in estimate_run(cfg, gpu=card + ':1').offers:\n"
        "        label = f'{o.card}:1' + (' PCIe' if o.spec.endswith('-PCIE') else '')\n"
        "        if label not in out or o.dollars[1] < out[label][2]:\n"
        "            out[label] = (o.hours[1], o.price_per_h, o.dollars[1])\n"
        "print(json.dumps(out))\n")
    r = subprocess.run([sys.executable, "-c", code, *cards], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return {k: tuple(v) for k, v in json.loads(r.stdout).items()}


def test_estimate_shows_the_run_on_every_fitting_card_with_the_fastest_and_cheapest_marked(tmp_path):
    pytest.importorskip("sky", reason="skypilot is not installed")
    import csv
    import io

    from skyfix import CATALOG

    env = fakesky_env(tmp_path, COLUMNS="100")
    r = cli(["estimate", "--gpu", "A100:1", "--subset", "0.1"], env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    rows = _card_rows(out)
    assert len(rows) >= 3 and "A100:1" in rows, out
    ref = _reference(env, sorted({label.split(":")[0] for label in rows}), "0.1")
    assert set(ref) == set(rows), (ref, rows)
    for label, row in rows.items():
        hours, price, dollars = ref[label]
        assert row["hours"] == pytest.approx(hours, abs=0.051) and row["price"] == pytest.approx(price)
        assert row["dollars"] == pytest.approx(dollars, abs=0.51), (label, row, ref[label])
    # $/h from the seeded catalog itself: the lowest on-demand price of that card (PCIe: its pcie instance)
    catalog = [row for key in ("lambda/vms.csv", "runpod/vms.csv") for row in csv.DictReader(io.StringIO(CATALOG[key]))]
    for label, row in rows.items():
        card, pcie = label.split(":")[0], label.endswith("PCIe")
        prices = [float(c["Price"]) for c in catalog if c["AcceleratorName"] == card and c["AcceleratorCount"] == "1.0"
                  and ("pcie" in c["InstanceType"].lower()) == pcie]
        assert row["price"] == min(prices), (label, prices)
    fastest = min(rows, key=lambda k: ref[k][0])
    cheapest = min(rows, key=lambda k: ref[k][2])
    assert "fastest" in rows[fastest]["marks"] and "cheapest" in rows[cheapest]["marks"], rows
    assert [k for k in rows if "fastest" in rows[k]["marks"]] == [fastest]
    assert [k for k in rows if "cheapest" in rows[k]["marks"]] == [cheapest]
    assert rows["A100:1"]["marks"].startswith("<- asked") and fastest != "A100:1"
    assert "LONG RUN" not in out  # 13 h and $27 on A100: under both


@pytest.mark.slow  # five `estimate` processes reading the catalog: 12-19 s on 2 cores
def test_a_long_run_is_said_loudly_with_a_subset_and_a_card_that_bring_it_under(tmp_path):
    """The full dataset on an L4 (hundreds of hours): the warning names the largest subset (2 significant
    digits) under 24 h and $100 on that card; checked by estimating that subset and the next one up."""
    pytest.importorskip("sky", reason="skypilot is not installed")
    import re

    env = fakesky_env(tmp_path, COLUMNS="100")
    r = cli(["estimate", "--gpu", "L4:1"], env, timeout=300)
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 0 and "LONG RUN: expected" in out, out
    m = re.search(r"--subset ([\d.]+) on L4:1 \(([\d.]+) h, \$(\d+)\)", out)
    assert m, out
    subset = m[1]
    digits = len(subset.split(".")[1])
    up = f"{float(subset) + 10 ** -digits:.{digits}f}"
    for s, under in ((subset, True), (up, False)):
        est = json.loads(cli(["estimate", "--gpu", "L4:1", "--subset", s, "--json"], env, timeout=300).stdout)
        hours, dollars = est["hours"][1], est["dollars"][1]
        assert (hours <= 24 and dollars <= 100) == under, (s, hours, dollars)
        if under:
            assert float(m[2]) == pytest.approx(hours, abs=0.051) and est["warning"] is None
    # No card is under both on the full dataset: the fastest card with its own largest subset
    m = re.search(r"--gpu (\S+) --subset ([\d.]+) \(([\d.]+) h", out)
    assert m and m[1] == "H100:1", out  # the fastest card in the seeded catalog
    est = json.loads(cli(["estimate", "--gpu", m[1], "--subset", m[2], "--json"], env, timeout=300).stdout)
    assert est["hours"][1] <= 24 and est["dollars"][1] <= 100 and float(m[3]) == pytest.approx(est["hours"][1], abs=0.051)
    # Under 24 h and $100 on an A100 at 0.1: no warning (the headline run)
    est = json.loads(cli(["estimate", "--gpu", "A100:1", "--subset", "0.1", "--json"], env, timeout=300).stdout)
    assert est["warning"] is None and est["hours"][1] < 24
