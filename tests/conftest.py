"""Fixtures that run a real chatd (``serve_run``: API + shard + SQLite) on loopback port 0."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from chatd.config import Config
from chatd.node import serve_run
from tests.helpers import API

# A real Apache Cassandra, started once per session when a collected test needs it.
pytest_plugins = ["tests.cassandra_server"]


class RunningServer:
    def __init__(self, nursery, config: Config):
        self.nursery = nursery
        self.config = config
        self.node = None
        self.info = None
        self.api: API | None = None
        self._done = None

    async def start(self):
        box: list = []
        self._done = trio.Event()
        done = self._done

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            try:
                await serve_run(self.config, task_status=task_status, node_out=box)
            finally:
                done.set()

        self.info = await self.nursery.start(run)
        self.node = box[0]
        self.api = API(self.info.api_url)
        return self

    @property
    def ws_url(self) -> str:
        return self.info.ws_url

    async def stop(self):
        self.node.request_stop()
        with trio.fail_after(20):
            await self._done.wait()

    async def restart(self):
        await self.stop()
        # keep the same ports is not needed: clients log in again and get the new ws_url
        return await self.start()


def make_config(tmp_path, **limits) -> Config:
    cfg = Config.from_mapping({
        "data_dir": str(tmp_path / "data"),
        "server": {"api_port": 0, "ws_port": 0, "shutdown_grace_s": 3.0},
        # Cheaper password hashing keeps the 100-member tests quick; same code path.
        "auth": {"scrypt_n": 2**10},
        # Durable commits are what we promise; tests keep them (fsync on tmpfs/ext4 is fast enough).
        "store": {"sqlite_synchronous": "full"},
    })
    cfg.update({"limits": limits}, source="test")
    cfg.validate()
    return cfg


@pytest.fixture
def config(tmp_path):
    return make_config(tmp_path)


@pytest.fixture
async def server(nursery, config):
    srv = RunningServer(nursery, config)
    await srv.start()
    yield srv
    if not srv._done.is_set():
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
