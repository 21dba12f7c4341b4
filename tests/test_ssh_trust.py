"""Issue #13 against a real sshd on 127.0.0.1 (tests/sshd.py): per-run data, what comes back over SFTP,
secrets for `job check`, private remote folders, results kept for a provider stop, no trust from run.json.
The host is this machine, so the remote side is inspected directly on disk."""
from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

import pytest

from contracts.config import load_config
from launcher import registry
from launcher.backends.base import BackendError
from sshd import PYTHON, REPO, SshServer, ssh_backend, sshd, sshd_available  # noqa: F401

pytestmark = pytest.mark.ssh
paramiko = pytest.importorskip("paramiko")

from launcher.backends.ssh import SshBackend  # noqa: E402

# Writes an adapter and a manifest like the job, after STEPS short steps.
FAKE_JOB = textwrap.dedent("""\
    python - <<'PY'
    import os, time
    from pathlib import Path
    from contracts import events, manifest
    out = Path(os.environ["OUT"]); w = events.EventWriter(out / "events.jsonl", echo=True)
    (out / "adapter").mkdir(exist_ok=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    (out / "adapter" / "adapter_config.json").write_text("{}")
    manifest.write(out, meta={"run": os.environ["SOCRATES_RUN_ID"]})
    w.emit("done", reason="completed")
    PY
    """)


@pytest.fixture(autouse=True)
def runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(tmp_path / "runs"))


def backend(srv: SshServer, tmp: Path, run_block: str | None = FAKE_JOB, **kw) -> SshBackend:
    return ssh_backend(srv, tmp, run_block, **kw)


def new_run(srv: SshServer, name: str, data: Path | None = None) -> registry.Run:
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    if data is not None:
        cfg = cfg.with_overrides({"data.source": str(data)})
    return registry.new_run(name, f"ssh://root@127.0.0.1:{srv.port}", config=cfg.to_dict())


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_run_trains_on_exactly_its_data_not_a_same_named_earlier_one(sshd, tmp_path):
    """Issue case 1: run 1 sends data/ with three files, run 2 a data/ of the same name with one: run 2's
    remote data is exactly its one file (the old cache gave it the union), run 1's is untouched."""
    first, second = tmp_path / "a" / "data", tmp_path / "b" / "data"
    for folder, names in ((first, ("x.jsonl", "y.jsonl", "z.jsonl")), (second, ("x.jsonl",))):
        folder.mkdir(parents=True)
        for n in names:
            (folder / n).write_text(f'{{"from": "{folder.parent.name}/{n}"}}\n')
    runs = []
    for folder in (first, second):
        run = new_run(sshd, "data", data=folder)
        b = backend(sshd, tmp_path)
        b.launch(run)
        assert b.follow(run, lambda e: None) == 0
        runs.append(run)
    remote = [Path(r.backend_state["data"]["remote"]) for r in runs]
    assert _files(remote[1]) == _files(second) and _files(remote[0]) == _files(first)
    assert remote[0] != remote[1]
    for r in runs:
        backend(sshd, tmp_path).down(r)


def test_a_symlink_in_out_is_refused_over_sftp(sshd, tmp_path):
    """Issue case 6 through a real server: a link in out/ (to a file outside) fails the download."""
    run = new_run(sshd, "link")
    b = backend(sshd, tmp_path, FAKE_JOB + 'ln -s /etc/hostname "$OUT/adapter/extra"\n')
    b.launch(run)
    try:
        assert b.follow(run, lambda e: None) == 0
        with pytest.raises(BackendError, match="symlink or special file is not accepted"):
            b.download(run, tmp_path / "dl")
        assert not os.path.lexists(tmp_path / "dl" / "adapter" / "extra")
    finally:
        b.down(run)


def test_remote_folders_are_private(sshd, tmp_path):
    run = new_run(sshd, "private")
    b = backend(sshd, tmp_path)
    b.launch(run)
    try:
        for sub in ("cache", "runs"):
            assert stat.S_IMODE((tmp_path / "remote" / sub).stat().st_mode) == 0o700, sub
    finally:
        b.down(run)


def test_a_provider_stop_after_a_failed_pull_keeps_the_results_on_the_host(sshd, tmp_path):
    """Issue case 8: the job succeeded, the pull failed; `--on-teardown` (a provider stop keeps the disk)
    runs, but the run's folder with the adapter is not deleted first."""
    marker = tmp_path / "stopped"
    run = new_run(sshd, "keep")
    b = backend(sshd, tmp_path, on_teardown=f"touch {marker}")
    b.launch(run)
    assert b.follow(run, lambda e: None) == 0
    run.update(exit_code=0)  # verified stays False: the results never came back
    work = Path(run.backend_state["work"])
    b.down(run)
    assert marker.exists() and (work / "out" / "manifest.json").is_file()
    assert run.backend_state["results_kept"].endswith(f"{work}/out")


def test_job_check_sees_the_secrets(sshd, tmp_path, monkeypatch):
    """Issue case 10: `job check` on the host gets HF_TOKEN (by value over stdin, as the job does)."""
    code = tmp_path / "code"
    (code / "job").mkdir(parents=True)
    (code / "job" / "__init__.py").write_text("")
    (code / "job" / "__main__.py").write_text(textwrap.dedent("""\
        import os, sys
        if sys.argv[1] == "check" and not os.environ.get("HF_TOKEN"):
            print("check: the model is gated and HF_TOKEN is not set", file=sys.stderr)
            sys.exit(2)
        """))
    (code / "sky").mkdir()
    (code / "sky" / "train.yaml").write_text((REPO / "sky" / "train.yaml").read_text())
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    run = new_run(sshd, "check")
    b = backend(sshd, tmp_path, run_block=None, code_root=code)
    try:
        b.launch(run)  # the check passed: the job was started
        assert run.backend_state.get("pid")
    finally:
        b.down(run)


def test_trust_new_host_from_run_json_is_not_reused(sshd, tmp_path):
    run = new_run(sshd, "trust")
    run.update(backend_state={"options": backend(sshd, tmp_path).opts.to_dict()})
    restored = SshBackend(run.infra)
    restored._bind(run)
    assert run.backend_state["options"]["trust_new_host"] is True and restored.opts.trust_new_host is False
    assert restored.opts.key == str(sshd.client_key)  # the rest of the record's options are used
