"""A real S3-protocol server for tests: moto's server mode on 127.0.0.1, a free port, its own process.

`s3_server` (module-scoped) starts `python -m moto.server` (requirements/dev.txt: moto[server]),
waits until it answers, and yields an `S3Server` whose `env` points boto3 at it (AWS_ENDPOINT_URL and
throwaway credentials: nothing of the user's ~/.aws is read). The server is stopped (its process, by
pid) at the end. Clients talk HTTP to it like to S3: nothing of boto3 is mocked.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from ports import free_port


@dataclass
class S3Server:
    url: str
    env: dict

    def client(self):
        import boto3

        return boto3.session.Session(aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                                     aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
                                     region_name="us-east-1").client("s3", endpoint_url=self.url)


def _env(url: str, home: Path) -> dict:
    return {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(home / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"), "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    pytest.importorskip("boto3", reason="boto3 is not installed (requirements/dev.txt)")
    pytest.importorskip("moto.server", reason="moto[server] is not installed (requirements/dev.txt)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home = tmp_path_factory.mktemp("s3home")
    log = open(home / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **_env(url, home)})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {(home / 'moto.log').read_text()[-2000:]}")
                time.sleep(0.1)
        yield S3Server(url=url, env=_env(url, home))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
