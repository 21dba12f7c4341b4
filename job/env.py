"""Facts about the machine the job runs on: the card, package versions, the code's git revision."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

from job.errors import JobCannotRun

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "safetensors",
            "tokenizers")


def card_info() -> dict:
    """Name, memory, capability, driver/CUDA, bf16 of GPU 0; {'name': 'cpu', ...} without one."""
    import torch

    if not torch.cuda.is_available():
        return {"name": "cpu", "gpus": 0, "memory_gib": 0.0, "capability": None, "cuda": None,
                "driver": None, "bf16": False}
    p = torch.cuda.get_device_properties(0)
    return {
        "name": p.name, "gpus": torch.cuda.device_count(), "memory_gib": round(min(p.total_memory / 2**30, memory_cap_gib() or 1e9), 2),
        "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda, "driver": _driver(),
        "bf16": bool(torch.cuda.is_bf16_supported()),
    }


MEMORY_CAP_ENV = "SOCRATES_GPU_MEMORY_GIB"


def memory_cap_gib() -> float | None:
    """$SOCRATES_GPU_MEMORY_GIB: use at most this much of each GPU, as if the card were that small
    (rehearse a 24 GiB card's run on a big one, or share a card). Unset: the whole card."""
    raw = os.environ.get(MEMORY_CAP_ENV, "").strip()
    if not raw:
        return None
    try:
        cap = float(raw)
    except ValueError:
        cap = float("nan")
    if not cap > 0 or cap != cap or cap == float("inf"):
        raise JobCannotRun(f"{MEMORY_CAP_ENV}={raw!r}: expected a number of GiB > 0 (e.g. 22.5), or unset")
    return cap


def apply_memory_cap(device) -> float | None:
    """Make the allocator refuse past memory_cap_gib() on `device` (an OOM there is the small card's OOM)."""
    import torch

    cap = memory_cap_gib()
    if cap is None or device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    return cap


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    import platform

    out["python"] = platform.python_version()
    return out


def git_revision() -> str | None:
    """HEAD of the code's checkout (+ '-dirty' with local changes); SOCRATES_GIT_REV when synced without .git."""
    if os.environ.get("SOCRATES_GIT_REV"):
        return os.environ["SOCRATES_GIT_REV"]
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "job", "contracts", "configs"],
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def disk_free_gib(path: str | os.PathLike = ".") -> float:
    p = Path(path)
    while not p.exists():
        p = p.parent
    return round(shutil.disk_usage(p).free / 2**30, 2)


def host_mem_available_gib() -> float | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


def quiet_bnb_cpu_notice() -> None:
    """bitsandbytes warns on CPU import that an optional `kernels` package is missing; the job's
    CPU path does not need it, and the notice would break 'one line on stderr' for exit 2/3."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def image_info() -> dict | None:
    """The job image this runs in (SOCRATES_IMAGE, set by the launcher's task with --image): its
    reference and, when the reference pins one, its digest. None: not run from a prebuilt image."""
    ref = os.environ.get("SOCRATES_IMAGE", "").strip()
    if not ref:
        return None
    digest = ref.split("@", 1)[1] if "@" in ref else None
    return {"ref": ref, "digest": digest}
