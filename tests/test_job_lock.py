"""The lock holds every third-party package the job imports: the CUDA-only branches too.

The job's imports are read from its source (AST: imports inside functions, `try` blocks and
`if torch.cuda...` branches count, and so do `importlib.import_module("x")`/`find_spec("x")`),
never by importing it, so a package only the GPU path touches (liger_kernel) can't hide on a
CPU-only test machine. Import names map to PyPI distributions through the table below, written
by hand: an import that is neither stdlib, the repo's own, nor in the table fails with a line
saying so.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from conftest import REPO

LOCK = REPO / "requirements" / "job.lock"
# What the image copies and runs (Dockerfile: COPY contracts/ job/).
JOB_PACKAGES = ("job", "contracts")

# import name -> PyPI distribution (normalized). Where they differ, the PyPI project pages say so.
DIST_OF = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "trl": "trl",
    "accelerate": "accelerate",
    "bitsandbytes": "bitsandbytes",
    "datasets": "datasets",
    "safetensors": "safetensors",
    "huggingface_hub": "huggingface-hub",
    "tokenizers": "tokenizers",
    "liger_kernel": "liger-kernel",
    "numpy": "numpy",
    "scipy": "scipy",
    "matplotlib": "matplotlib",
    "pyarrow": "pyarrow",
    "pandas": "pandas",
    "yaml": "pyyaml",
    "dashscope": "dashscope",
    "tiktoken": "tiktoken",
    "triton": "triton",
}


def third_party_imports(paths) -> dict[str, list[str]]:
    """Top-level module names imported anywhere in these files -> 'file:line' where."""
    found: dict[str, list[str]] = {}
    for path in paths:
        tree = ast.parse(Path(path).read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                fn = node.func
                called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                if called in ("import_module", "find_spec", "__import__"):
                    names = [node.args[0].value]
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in JOB_PACKAGES or top == "__future__":
                    continue
                found.setdefault(top, []).append(f"{Path(path).name}:{node.lineno}")
    return found


def locked_distributions() -> set[str]:
    return {re.sub(r"[-_.]+", "-", n).lower()
            for n in re.findall(r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)==", LOCK.read_text(), re.M)}


def missing_from_lock(imports: dict[str, list[str]], locked: set[str]) -> list[str]:
    problems = []
    for top, where in sorted(imports.items()):
        dist = DIST_OF.get(top)
        if dist is None:
            problems.append(f"{top} (imported at {', '.join(where)}): not in this test's import->package table; add it")
        elif dist not in locked:
            problems.append(f"{top} (imported at {', '.join(where)}): package {dist} is not in requirements/job.lock")
    return problems


def _job_sources():
    return [p for pkg in JOB_PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]


def test_every_package_the_job_imports_is_in_the_lock():
    imports = third_party_imports(_job_sources())
    # The walk really sees the CUDA-only and lazily imported packages (else it proves nothing).
    assert {"torch", "liger_kernel", "bitsandbytes", "dashscope"} <= set(imports), sorted(imports)
    assert missing_from_lock(imports, locked_distributions()) == []


def test_setups_import_check_covers_every_package_the_job_imports():
    """sky/train.yaml's setup ends with `python -m job.stack`: a package it does not try to import could
    be missing from the job's venv and only fail hours later, in the step that imports it."""
    from job.stack import MODULES

    imports = third_party_imports(_job_sources())
    assert sorted(set(imports) - set(MODULES)) == []


def test_the_import_check_fails_with_one_line_naming_what_is_missing(tmp_path):
    """What setup prints when the lock went into another interpreter (the failure rehearsed in
    tests/test_rehearsal.py): a bare python (this venv's base, without the job's stack) runs it."""
    import subprocess

    base = getattr(sys, "_base_executable", None) or sys.executable
    probe = subprocess.run([base, "-c", "import torch"], capture_output=True)
    if probe.returncode == 0:
        import pytest

        pytest.skip(f"{base} has torch: no bare interpreter to run the check with")
    r = subprocess.run([base, "-m", "job.stack"], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("setup: the job's python ")
    assert "torch (ModuleNotFoundError: No module named 'torch')" in lines[0]


def test_the_walk_catches_an_import_hidden_in_a_cuda_branch(tmp_path):
    src = tmp_path / "fastpath.py"
    src.write_text("import os\nimport torch\n\n"
                   "def go(model):\n"
                   "    if torch.cuda.is_available():\n"
                   "        try:\n"
                   "            from flash_attn_x.ops import kernel\n"
                   "        except ImportError:\n"
                   "            return False\n"
                   "    import importlib\n"
                   "    return importlib.util.find_spec('liger_kernel') is not None\n")
    imports = third_party_imports([src])
    assert set(imports) == {"torch", "flash_attn_x", "liger_kernel"}
    assert imports["flash_attn_x"] == ["fastpath.py:7"]
    problems = missing_from_lock(imports, {"torch"})
    assert len(problems) == 2
    assert "flash_attn_x" in problems[0] and "table" in problems[0]
    assert "liger-kernel is not in requirements/job.lock" in problems[1]


def test_the_speed_packages_are_locked_at_the_benched_versions():
    # bench/RESULTS.md's runs: what configs/throughput.yaml's rate was measured with.
    pins = dict(re.findall(r"^([a-z0-9\-]+)==(\S+)", LOCK.read_text(), re.M))
    assert {k: pins.get(k) for k in ("torch", "liger-kernel", "bitsandbytes", "transformers", "peft",
                                      "accelerate", "trl")} == {
        "torch": "2.11.0", "liger-kernel": "0.8.5", "bitsandbytes": "0.50.2", "transformers": "5.17.0",
        "peft": "0.21.0", "accelerate": "1.15.0", "trl": "1.16.0"}


def test_the_throughput_rate_is_for_exactly_what_the_lock_installs():
    """configs/throughput.yaml's measured rate names its package versions: a lock bump without a
    re-measure fails here (the estimate would quote a rate for other code)."""
    import yaml

    from contracts.events import LEVERS

    table = yaml.safe_load((REPO / "configs" / "throughput.yaml").read_text())
    pins = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", LOCK.read_text(), re.M)}
    measured = [e for sizes in table["measured"].values() for e in sizes.values() if "tokens_per_s" in e]
    assert measured
    for entry in measured:
        assert set(entry["levers"]) == set(LEVERS), entry["levers"]
        assert entry["packages"], entry
        for dist, version in entry["packages"].items():
            assert pins.get(dist) == str(version), (dist, version, pins.get(dist))
