"""`--gpu NAME:COUNT`: parsed and checked before anything is created (SkyPilot's accelerator names)."""
from __future__ import annotations

from dataclasses import dataclass

from contracts.errors import ContractError

# SkyPilot's accelerator names for the cards a 14B QLoRA run can use (the optimizer checks offers).
KNOWN_GPUS = (
    "A10", "A10G", "A100", "A100-80GB", "A100-80GB-SXM", "A40", "A6000", "B200", "GH200", "H100",
    "H100-MEGA", "H100-SXM", "H200", "L4", "L40", "L40S", "RTX4090", "RTX6000-Ada", "RTXA6000",
    "T4", "V100", "V100-32GB",
)
MAX_COUNT = 8
_CANONICAL = {g.lower(): g for g in KNOWN_GPUS}


@dataclass(frozen=True)
class GpuSpec:
    name: str
    count: int = 1

    def __str__(self) -> str:
        return f"{self.name}:{self.count}"


def parse_gpu(text: str | GpuSpec) -> GpuSpec:
    """'A100:1' -> GpuSpec('A100', 1); names are case-insensitive, the count defaults to 1."""
    if isinstance(text, GpuSpec):
        return text
    accepted = f"NAME:COUNT with NAME one of {', '.join(KNOWN_GPUS)} and COUNT 1..{MAX_COUNT}, e.g. A100:1"
    name, colon, count_text = str(text).strip().partition(":")
    canonical = _CANONICAL.get(name.strip().lower())
    if canonical is None:
        raise ContractError(f"--gpu {text!r}: unknown card {name!r} (accepted: {accepted})")
    if colon and not count_text.strip():
        raise ContractError(f"--gpu {text!r}: a ':' with no count after it (accepted: {accepted})")
    try:
        count = int(count_text) if count_text else 1
    except ValueError:
        raise ContractError(f"--gpu {text!r}: count {count_text!r} is not a whole number (accepted: {accepted})") from None
    if not 1 <= count <= MAX_COUNT:
        raise ContractError(f"--gpu {text!r}: count {count} is out of range (accepted: {accepted})")
    return GpuSpec(canonical, count)
