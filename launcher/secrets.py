"""Secrets travel only as SkyPilot secrets or process environment; never into files, YAML or argv."""
from __future__ import annotations

import os
from typing import Mapping

from contracts.remote import clean

SECRET_NAMES = ("HF_TOKEN", "WANDB_API_KEY")


def collect(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The secrets set in the caller's environment (empty ones skipped)."""
    env = os.environ if env is None else env
    return {k: env[k] for k in SECRET_NAMES if env.get(k)}


def redact(text: str, secrets: Mapping[str, str] | None = None) -> str:
    """`text` with every secret value replaced (log lines on their way to disk or the terminal)."""
    for value in (collect() if secrets is None else secrets).values():
        if value and len(value) >= 4:
            text = text.replace(value, "<redacted>")
    return text


def plain(text: str) -> str:
    """An error as it is saved and shown: colour codes and every other escape sequence or control
    character removed (run.json holds plain text; a machine's text never drives the terminal)."""
    return clean(text)
