"""A real S3 server for the test session (a pytest plugin, loaded by tests/conftest.py): SeaweedFS
(``bin/chatd-s3``: built once from the Go module proxy, cached in ~/.cache/chatd), started on first
use on free loopback ports in a temporary directory with one SigV4 identity, stopped (SIGTERM, then
SIGKILL after 10 s) at the end of the session, with one bucket (``s3_bucket``).

``CHATD_TEST_S3=skip`` lets a developer without Go opt out (those tests are skipped, saying so);
otherwise a server that cannot be built or started is an *error* of every test that needs it,
never a skip: CI must not go green without having run them. README's test command (and .ci/run)
runs ``bin/chatd-s3 fetch`` first, so the build is not inside the session's time limit."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bin" / "chatd-s3"


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str

    def media(self, bucket: str, **kw) -> dict:
        """The ``[media]`` settings of a chatd using ``bucket`` on this server."""
        return {"backend": "s3", "s3_endpoint": self.endpoint, "s3_bucket": bucket, "s3_region": self.region,
                "s3_access_key": self.access_key, "s3_secret_key": self.secret_key, **kw}

    def toml(self, bucket: str, **kw) -> str:
        return "[media]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in self.media(bucket, **kw).items())


@pytest.fixture(scope="session")
def s3_server():
    if os.environ.get("CHATD_TEST_S3") == "skip":
        pytest.skip("CHATD_TEST_S3=skip: no S3 server for this run (CI builds and runs SeaweedFS)")
    workdir = Path(tempfile.mkdtemp(prefix="chatd-s3-"))
    out = subprocess.run([sys.executable, str(SCRIPT), "start", "--dir", str(workdir)], capture_output=True,
                         text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"bin/chatd-s3 start failed: {out.stderr.strip()}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    try:
        yield S3Server(info["endpoint"], info["access_key"], info["secret_key"], info["region"])
    finally:
        subprocess.run([sys.executable, str(SCRIPT), "stop", "--dir", str(workdir)], timeout=60)


@pytest.fixture(scope="session")
def s3_bucket(s3_server):
    """The session's bucket (created through chatd's own backend). One for all tests: SeaweedFS
    gives each bucket volumes of its own, and media keys are random ids anyway."""
    import trio

    from chatd.media.s3 import S3Backend
    name = f"t-{secrets.token_hex(6)}"

    async def create():
        b = S3Backend(s3_server.endpoint, name, s3_server.region, s3_server.access_key, s3_server.secret_key)
        try:
            await b.create_bucket()
        finally:
            await b.aclose()
    trio.run(create)
    return name
