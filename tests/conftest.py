"""Shared fixtures: `sky_home` (an offline SkyPilot API server with a seeded catalog, tests/skyfix.py).

The repository root is on sys.path, so tests import the benchmarks' references (bench/reference.py)."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from skyfix import sky_home  # noqa: E402,F401  (re-exported for every test module)
