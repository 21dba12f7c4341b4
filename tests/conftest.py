"""Shared fixtures: `sky_home` (an offline SkyPilot API server with a seeded catalog, tests/skyfix.py)."""
from skyfix import sky_home  # noqa: F401  (re-exported for every test module)
