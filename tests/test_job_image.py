"""The job image: the Dockerfile installs the hash-pinned lock and runs `python -m job`; the lock resolves."""
from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

from conftest import REPO

LOCK = REPO / "requirements" / "job.lock"


def test_dockerfile_uses_the_lock_a_pinned_base_and_the_job_entrypoint():
    text = (REPO / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(re.search(r"@sha256:[0-9a-f]{64}$", f) for f in froms), froms
    assert re.search(r'^ENTRYPOINT \["python", "-m", "job"\]', text, re.M)
    for folder in ("contracts/", "job/", "configs/"):
        assert re.search(rf"^COPY {folder} ", text, re.M)


def test_lock_pins_every_package_with_hashes():
    text = LOCK.read_text()
    reqs = re.findall(r"^([A-Za-z0-9_.\-\[\],]+)==([^\s\\]+)", text, re.M)
    names = {n.lower().replace("_", "-") for n, _ in reqs}
    assert {"torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "dashscope"} <= names
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1] if text.startswith("#") else text)
    for block in blocks:
        if "==" in block.splitlines()[0]:
            assert "--hash=sha256:" in block, block.splitlines()[0]
    wanted = dict(line.split("==") for line in (REPO / "requirements" / "job.in").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    pinned = {n.lower(): v for n, v in reqs}
    for name, version in wanted.items():
        assert pinned[name.lower()] == version.strip(), name


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _pypi_reachable(), reason="PyPI unreachable: the lock can't be resolved offline")
def test_lock_resolves_for_linux_x86_64_py312(tmp_path):
    # Every manylinux tag a manylinux_2_28 host accepts: pip does not widen --platform by itself.
    platforms = [f"manylinux_2_{i}_x86_64" for i in range(17, 29)] + ["manylinux2014_x86_64"]
    # --ignore-requires-python: pip 23.x checks Requires-Python against the running interpreter (3.11)
    # instead of --python-version for some wheels (contourpy 1.4.0); the cp312 ABI tags below already
    # make every picked wheel a Python 3.12 one. Hashes are still checked (--require-hashes).
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--require-hashes",
           "--only-binary=:all:", "--python-version", "3.12", "--ignore-requires-python", "--target", str(tmp_path / "t"), "-r", str(LOCK),
           "--isolated", "--index-url", "https://pypi.org/simple", "--no-cache-dir"]
    for p in platforms:
        cmd += ["--platform", p]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Would install" in r.stdout and "torch-2.11.0" in r.stdout and "bitsandbytes-0.50.2" in r.stdout
    assert "liger_kernel-0.8.5" in r.stdout or "liger-kernel-0.8.5" in r.stdout, r.stdout[-2000:]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest))
            buf = ""
    return out


def test_the_image_installs_exactly_the_lock_with_hashes():
    """No daemon here (`docker info` fails), so the Dockerfile is checked as text: the only Python
    packages it installs are the locks' (uv from requirements/uv.lock, the job's from requirements/job.lock),
    hash-checked, nothing resolved at build time. tests/test_rehearsal.py runs these steps for real."""
    steps = _instructions((REPO / "Dockerfile").read_text())
    runs = [args for ins, args in steps if ins == "RUN"]
    installs = [cmd.strip() for args in runs for cmd in re.split(r"&&|;", args)
                if re.search(r"\b(pip|uv)\b.*\b(install|sync)\b", cmd)]
    assert installs, runs
    locks = []
    for cmd in installs:
        words = cmd.split()
        assert "--require-hashes" in words, cmd
        verb = "install" if "install" in words else "sync"
        if verb == "install":
            assert "--no-deps" in words, cmd  # `uv pip sync` installs exactly the file's packages by itself
        # Nothing but options (and their values) and one lock file: no package named on the command line.
        args, skip = [], False
        for w in words[words.index(verb) + 1:]:
            if skip:
                skip = False
            elif w in ("-r", "--target", "--python"):
                skip = w != "-r"
            elif not w.startswith("-"):
                args.append(w)
        assert len(args) == 1 and re.fullmatch(r"requirements/(uv|job)\.lock", args[0]), cmd
        locks.append(args[0])
    assert sorted(locks) == ["requirements/job.lock", "requirements/uv.lock"]
    copies = [args.split() for ins, args in steps if ins == "COPY"]
    assert ["requirements/uv.lock", "requirements/job.lock", "requirements/"] in copies
    assert any(ins == "FROM" for ins, _ in steps)


def test_the_image_copies_every_path_the_job_imports_or_reads():
    """Every repo package the job imports (job/ -> job, contracts, ...) and every repo folder it reads
    through its own location (`Path(__file__)...parents[1] / "configs"`) is COPY'd into the image."""
    import ast

    steps = _instructions((REPO / "Dockerfile").read_text())
    copied = {args.split()[0].rstrip("/") for ins, args in steps if ins == "COPY"}
    local_packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    needed, todo, seen = set(), ["job"], set()
    while todo:  # the job's imports, transitively, among the repo's own packages
        pkg = todo.pop()
        if pkg in seen:
            continue
        seen.add(pkg)
        needed.add(pkg)
        for f in (REPO / pkg).rglob("*.py"):
            tree = ast.parse(f.read_text())
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                todo += [n.split(".")[0] for n in names if n.split(".")[0] in local_packages]
            # Repo folders read relative to the package: parents[1] / "configs" ...
            for m in re.finditer(r'(?:parents\[1\]|parent\.parent)\s*/\s*"([^"]+)"', f.read_text()):
                top = m.group(1).split("/")[0]
                if (REPO / top).exists() and not top.startswith("."):
                    needed.add(top)
    assert {"job", "contracts", "configs"} <= needed, needed
    assert "launcher" not in needed  # the job never imports the launcher
    assert needed <= copied, f"the Dockerfile does not COPY {sorted(needed - copied)}"
