"""What the launcher and the job read at run time, shipped inside the package: the task template
(sky/train.yaml), the configs and price-independent tables (configs/), the locks (requirements/*.lock)
and the Dockerfile.

In the repo they stay at the top (sky/, configs/, requirements/, Dockerfile); this folder holds
links to them, so an editable install reads the checkout's files and a built wheel carries copies
(pyproject.toml's package-data lists what goes in: never a package named `sky`, SkyPilot's name).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

TEMPLATE = "sky/train.yaml"
CONFIGS = "configs"
LOCKS = "requirements"
DOCKERFILE = "Dockerfile"


def path(rel: str) -> Path:
    """The packaged file or folder `rel` (e.g. 'configs/paper.yaml') as a path on disk: the package is
    installed as files (pip, pipx and uv install wheels unpacked), so no temporary copy is needed."""
    return Path(str(resources.files(__name__).joinpath(rel)))


def locks() -> list[Path]:
    """Every lock the machine installs from (requirements/*.lock): sky/train.yaml's setup reads them."""
    return sorted(path(LOCKS).glob("*.lock"))
