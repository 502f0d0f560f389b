"""A real Apache Cassandra for the test session (a pytest plugin, loaded by tests/conftest.py).

If any collected test uses the ``cassandra_server`` fixture, the session starts one single-node
Cassandra with ``bin/chatd-cassandra start`` (Apache's cassandra-all from Maven Central, on a free
loopback port, in a temporary directory) *in the background at collection time*, so its ~10-30 s of
start-up overlap the tests that do not need it; the fixture waits for it. It is stopped at the end
of the session. Each user of the server makes its own keyspace (``fresh_keyspace``) and drops it.

Environment:
* ``CHATD_TEST_CASSANDRA=host:port`` - use that server instead of starting one
  (``CHATD_TEST_CASSANDRA_DC`` names its data center if the driver's pick is wrong).
* ``CHATD_TEST_CASSANDRA=skip`` - a developer without Java/Maven opts out: those tests are skipped,
  saying so. Without it, a Cassandra that cannot be started is an *error* of every test that needs
  it, never a skip: CI must not go green without having run them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ENV = "CHATD_TEST_CASSANDRA"
SCRIPT = Path(__file__).resolve().parent.parent / "bin" / "chatd-cassandra"


@dataclass
class CassandraServer:
    host: str
    port: int
    dc: str
    version: str
    pid: int | None = None  # the JVM's, when this session started it (None: an outside server)

    def config(self, keyspace: str | None = None, **kw):
        from chatd.config import CassandraConfig
        return CassandraConfig(contact_points=self.host, port=self.port, local_dc=self.dc,
                               keyspace=keyspace or fresh_keyspace(),
                               replication="{'class': 'SimpleStrategy', 'replication_factor': 1}", **kw)

    def toml(self, keyspace: str) -> str:
        """The ``[store]`` and ``[cassandra]`` sections of a chatd config file for ``keyspace``."""
        return ('[store]\nbackend = "cassandra"\n'
                f'[cassandra]\ncontact_points = "{self.host}"\nport = {self.port}\nlocal_dc = "{self.dc}"\n'
                f'keyspace = "{keyspace}"\n'
                "replication = \"{'class': 'SimpleStrategy', 'replication_factor': 1}\"\n")


def fresh_keyspace() -> str:
    return "chatd_test_" + secrets.token_hex(6)


class _Launcher:
    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None
        self.server: CassandraServer | None = None
        self.error: str | None = None

    def begin(self) -> None:
        if self.proc is not None or os.environ.get(ENV):
            return
        self.dir = Path(tempfile.mkdtemp(prefix="chatd-cassandra-"))
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), "start", "--dir", str(self.dir)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def get(self) -> CassandraServer:
        target = os.environ.get(ENV, "")
        if target == "skip":
            pytest.skip(f"{ENV}=skip: this run opted out of the real-Cassandra tests")
        if self.server:
            return self.server
        if self.error:
            pytest.fail(self.error, pytrace=False)
        if target:
            host, _, port = target.rpartition(":")
            self.server = CassandraServer(host or target, int(port) if host else 9042,
                                          os.environ.get(ENV + "_DC", ""), "external")
            return self.server
        self.begin()
        out, err = self.proc.communicate(timeout=300)
        if self.proc.returncode != 0:
            self.error = f"could not start Apache Cassandra for the tests: {err.strip() or out.strip()}"
            pytest.fail(self.error, pytrace=False)
        state = json.loads(out.strip().splitlines()[-1])
        self.server = CassandraServer(state["host"], state["port"], state["dc"], state["version"], state["pid"])
        return self.server

    def end(self) -> None:
        if self.dir is None:
            return
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.server is not None and self.server.pid is not None:  # (a test cut short while it paused it)
            with contextlib.suppress(OSError):
                os.kill(self.server.pid, signal.SIGCONT)
        subprocess.run([sys.executable, str(SCRIPT), "stop", "--dir", str(self.dir)], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


_launcher = _Launcher()


def pytest_collection_modifyitems(session, config, items):
    if any("cassandra_server" in getattr(item, "fixturenames", ()) for item in items):
        _launcher.begin()


def pytest_sessionfinish(session, exitstatus):
    _launcher.end()


def pytest_report_header(config):
    return f"cassandra: {os.environ.get(ENV) or 'a real Apache Cassandra started by bin/chatd-cassandra when needed'}"


@pytest.fixture(scope="session")
def cassandra_server() -> CassandraServer:
    return _launcher.get()
