"""A free TCP port on 127.0.0.1, for the servers and rank groups the tests start (no conftest import:
tests/skyfix.py, which conftest imports, uses it too)."""
from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
