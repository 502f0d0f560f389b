"""The fixtures every test module may use: a real chatd in-process (``server``: ``serve_run`` with API
+ shard + SQLite on loopback port 0; ``server_with`` for changed settings), and the clean-up that
kills stray processes after the run. The real-cluster fixtures (``zk``, ``store_toml``, ``cluster``)
come from tests/cluster.py and a real Apache Cassandra (``cassandra_server``) from
tests/cassandra_server.py, both registered here as plugins; plain helpers are in tests/helpers.py.
Test modules take fixtures from here, never from each other."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.helpers import RunningServer, make_config

__all__ = ["RunningServer", "make_config"]  # the names test modules still import from here

# A real Apache Cassandra, started once per session when a collected test needs it; ZooKeeper and
# cluster processes for the cluster tests.
pytest_plugins = ["tests.cassandra_server", "tests.cluster", "tests.s3_server"]


@pytest.fixture
def config(tmp_path):
    return make_config(tmp_path)


@pytest.fixture
async def server(nursery, config):
    srv = RunningServer(nursery, config)
    await srv.start()
    yield srv
    if not srv.stopped:
        await srv.stop()


@pytest.fixture
async def server_with(nursery, tmp_path):
    """``await server_with(limits..., auth={...})``: a server with some settings changed (as many as
    the test starts, each in its own directory; all stopped at the end)."""
    started = []

    async def start(auth=None, **limits):
        cfg = make_config(tmp_path / str(len(started)), **limits)
        if auth:
            cfg.update({"auth": auth}, source="test")
            cfg.validate()
        srv = RunningServer(nursery, cfg)
        started.append(await srv.start())
        return srv
    yield start
    for srv in started:
        if not srv.stopped:
            await srv.stop()


@pytest.fixture(scope="session", autouse=True)
def no_orphans():
    """After the run, kill any process a test started and failed to stop (a test cut short by
    pytest-timeout skips its own clean-up): CI must not inherit stray shards or ZooKeepers."""
    yield
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # the parent pid
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
            except OSError:
                pass
