"""`python -m job.stack`: can this python import the job's whole stack? The last line of the setup block.

Run with the job's python right after the install, so a venv that misses a package (or a lock installed
into another interpreter) fails setup with one line naming what is missing, before any step is paid for.
Stdlib only at import time: it must run, and say why, in a broken environment.
"""
from __future__ import annotations

import importlib
import sys

# The import names of every third-party package job/ and contracts/ import (tests/test_rehearsal.py checks
# this list against their sources), in the order a failure is most telling.
MODULES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "safetensors",
           "tokenizers", "huggingface_hub", "numpy", "pyarrow", "scipy", "matplotlib", "yaml", "tensorboard",
           "dashscope", "liger_kernel", "triton")


def missing(modules: tuple[str, ...] = MODULES) -> list[str]:
    """`name (ErrorType: first line)` for each module that does not import."""
    out = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure to import is the answer, not a crash
            first = (str(e).strip().splitlines() or [""])[0][:160]
            out.append(f"{name} ({type(e).__name__}: {first})")
    return out


def main() -> int:
    bad = missing()
    if bad:
        print(f"setup: the job's python {sys.executable} cannot import: {'; '.join(bad)}", file=sys.stderr)
        return 1
    print(f"setup: the job's stack imports in {sys.executable} (python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
