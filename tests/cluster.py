"""Real-cluster test helpers and fixtures: Debian's ZooKeeper and chatd shards/API servers as OS
processes.

Nothing is mocked: ZooKeeper is the real server on a free loopback port with a temporary data
directory; every shard and API server is a ``python -m chatd.cli`` process talking over real
sockets; the store is one shared SQLite file, or a keyspace on a real Apache Cassandra
(``store_toml`` from ``CassandraServer.toml``, tests/cassandra_server.py).

The fixtures (``zk``: one ZooKeeper per test module; ``store_toml``: SQLite, then Cassandra;
``cluster``: three shards and an API server) reach every test module through tests/conftest.py,
which registers this module as a plugin. Resources: every process a fixture or ``Cluster`` starts is
stopped (SIGTERM, then SIGKILL) by ``stop``, whose output shows the processes' last log lines."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import trio

from tests.cassandra_server import fresh_keyspace
from tests.helpers import API, TEST_LINK_SECRET, TEST_TOKEN_SECRET, eventually, free_port, open_client

ZK_CLASSPATH = "/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar"


def zookeeper_available() -> bool:
    return Path("/usr/share/java/zookeeper.jar").exists() and shutil.which("java") is not None


def stop_processes(procs, wait_s: float) -> None:
    """SIGTERM to every process still running (after SIGCONT: a test may have frozen it), all at
    once, then each is waited for up to ``wait_s`` and killed (and reaped) if it has not exited."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.terminate()
    for p in procs:
        try:
            p.wait(wait_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


class ZooKeeper:
    """A standalone ZooKeeper server (tickTime 250 ms: sessions can be as short as 0.5 s)."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1"):
        self.port = free_port()
        self.host = host
        self.dir = workdir
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        cfg = workdir / "zoo.cfg"
        cfg.write_text(f"tickTime=250\ndataDir={workdir / 'data'}\nclientPort={self.port}\n"
                       f"clientPortAddress={host}\nadmin.enableServer=false\nmaxClientCnxns=0\n")
        self.log = open(workdir / "zookeeper.log", "ab")
        self.spawn()
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection((host, self.port), timeout=0.5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ZooKeeper did not start; see {workdir / 'zookeeper.log'}")
                time.sleep(0.1)  # a sync constructor (module fixtures): no trio here

    def spawn(self) -> None:
        """Start the server process on this port and data directory (again, after ``proc`` died)."""
        self.proc = subprocess.Popen(["java", "-cp", ZK_CLASSPATH, "org.apache.zookeeper.server.ZooKeeperServerMain",
                                      str(self.dir / "zoo.cfg")], stdout=self.log, stderr=self.log)

    @property
    def hosts(self) -> str:
        return f"{self.host}:{self.port}"

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        stop_processes([self.proc], 10)
        self.log.close()


class ZooKeeperEnsemble:
    """A real 3-server ZooKeeper ensemble (a quorum: server.1-3 on 127.0.0.1, each with its own
    client, quorum and election ports, data directory and ``myid``; tickTime 250 ms), for the
    three-node tests. ``hosts`` names all three, as a production connect string does; ``leader()``
    asks each server with the ``srvr`` four-letter word (whitelisted) which one leads. ``kill``
    is kill -9 of one server, ``spawn`` starts it again on its ports and data; ``stop`` stops all."""

    def __init__(self, workdir: Path, n: int = 3):
        self.dir = workdir
        self.ids = list(range(1, n + 1))
        self.ports = {i: free_port() for i in self.ids}
        quorum = "".join(f"server.{i}=127.0.0.1:{free_port()}:{free_port()}\n" for i in self.ids)
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs = {}
        for i in self.ids:
            d = workdir / f"zk{i}"
            (d / "data").mkdir(parents=True, exist_ok=True)
            (d / "data" / "myid").write_text(f"{i}\n")
            # syncLimit 4 ticks: a follower that lost its leader notices within 1 s (a killed leader's
            # sockets reset at once anyway); the election itself takes a few hundred ms here
            (d / "zoo.cfg").write_text(
                f"tickTime=250\ninitLimit=40\nsyncLimit=4\ndataDir={d / 'data'}\nclientPort={self.ports[i]}\n"
                "clientPortAddress=127.0.0.1\nadmin.enableServer=false\nmaxClientCnxns=0\n"
                "4lw.commands.whitelist=srvr,stat,ruok\n" + quorum)
            self.logs[i] = open(d / "zookeeper.log", "ab")
            self.spawn(i)
        self.wait_serving(self.ids)

    def spawn(self, i: int) -> None:
        self.procs[i] = subprocess.Popen(["java", "-Xmx128m", "-cp", ZK_CLASSPATH,
                                          "org.apache.zookeeper.server.quorum.QuorumPeerMain",
                                          str(self.dir / f"zk{i}" / "zoo.cfg")],
                                         stdout=self.logs[i], stderr=self.logs[i])

    @property
    def hosts(self) -> str:
        return ",".join(f"127.0.0.1:{self.ports[i]}" for i in self.ids)

    def mode(self, i: int) -> str | None:
        """``leader``, ``follower`` - what ``srvr`` says server ``i`` is - or None while it serves no
        clients (down, or in an election)."""
        try:
            with socket.create_connection(("127.0.0.1", self.ports[i]), timeout=1) as s:
                s.sendall(b"srvr")
                s.settimeout(2)
                out = b""
                while chunk := s.recv(4096):
                    out += chunk
        except OSError:
            return None
        for line in out.decode(errors="replace").splitlines():
            if line.startswith("Mode: "):
                return line.split(": ", 1)[1].strip()
        return None  # "This ZooKeeper instance is not currently serving requests"

    def leader(self) -> int | None:
        leaders = [i for i in self.ids if self.procs[i].poll() is None and self.mode(i) == "leader"]
        return leaders[0] if len(leaders) == 1 else None

    def wait_serving(self, ids, timeout: float = 60) -> None:
        """Until the servers ``ids`` serve clients as leader or follower (a sync wait: fixtures)."""
        deadline = time.monotonic() + timeout
        while not all(self.mode(i) in ("leader", "follower") for i in ids):
            for i in ids:
                if self.procs[i].poll() is not None:
                    raise RuntimeError(f"ZooKeeper {i} exited; see {self.dir / f'zk{i}' / 'zookeeper.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the ZooKeeper ensemble did not form within {timeout:.0f} s; see {self.dir}")
            time.sleep(0.1)

    def kill(self, i: int) -> None:
        self.procs[i].kill()
        self.procs[i].wait(10)

    def start_again(self) -> None:
        """After ``stop``: every server again on its ports and data, until the ensemble serves."""
        for i in self.ids:
            self.logs[i] = open(self.dir / f"zk{i}" / "zookeeper.log", "ab")
            self.spawn(i)
        self.wait_serving(self.ids)

    def stop(self) -> None:
        stop_processes(self.procs.values(), 10)
        for log in self.logs.values():
            log.close()


class Cluster:
    """``n`` shards (s1..sn) + one API server, all separate processes, one ZooKeeper root."""

    def __init__(self, zk: ZooKeeper, workdir: Path, n: int = 3, session_timeout_s: float = 2.0,
                 heartbeat_s: float = 0.3, extra: str = "", presence: int = 0, store_toml: str = "",
                 top: str = ""):
        """``top``: top-level config keys (before any section), e.g. ``log_levels = [...]``."""
        self.zk = zk
        self.store_toml = store_toml
        self.dir = workdir
        self.root = f"/chatd-test-{os.getpid()}-{workdir.name}"
        self.config = workdir / "cluster.toml"
        self.config.write_text(
            top + f'data_dir = "{workdir / "data"}"\n' + store_toml +
            f"[auth]\nsecret = \"{TEST_TOKEN_SECRET}\"\nscrypt_n = 1024\nsignups_unthrottled = [\"127.0.0.0/8\"]\n"
            "[limits]\nrate_frames_per_s = 100000.0\nrate_burst = 100000\n"
            f"[cluster]\nsecret = \"{TEST_LINK_SECRET}\"\nzk_hosts = \"{zk.hosts}\"\nzk_root = \"{self.root}\"\n"
            f"zk_session_timeout_s = {session_timeout_s}\nlink_port = 0\nlink_heartbeat_s = {heartbeat_s}\n"
            "load_refresh_s = 0.5\n" + extra)
        self.shard_ids = [f"s{i}" for i in range(1, n + 1)]
        self.presence_ids = [f"p{i}" for i in range(1, presence + 1)]
        self.ws_ports = {sid: free_port() for sid in self.shard_ids}
        self.http_ports = {sid: free_port() for sid in self.shard_ids}
        self.api_port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.api = API(f"http://127.0.0.1:{self.api_port}")

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.dir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "chatd.cli", *args, "--config", str(self.config)],
                                            stdout=log, stderr=log)

    def start_shard(self, sid: str) -> None:
        self._spawn(sid, ["shard", "--shard-id", sid, "--ws-port", str(self.ws_ports[sid]),
                          "--http-port", str(self.http_ports[sid])])

    def admin(self, sid: str) -> API:
        return API(f"http://127.0.0.1:{self.http_ports[sid]}")

    def start_presence(self, pid: str) -> None:
        self._spawn(pid, ["presence", "--presence-id", pid, "--link-port", "0"])

    def migrate(self) -> None:
        """``chatd store migrate`` with the cluster's config, as an operator does before the first start."""
        proc = subprocess.run([sys.executable, "-m", "chatd.cli", "store", "migrate", "--config", str(self.config)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"chatd store migrate failed: {proc.stdout}{proc.stderr}"

    async def start(self) -> "Cluster":
        if self.store_toml:  # Cassandra: the keyspace is made by `chatd store migrate`
            self.migrate()
        for pid in self.presence_ids:
            self.start_presence(pid)
        for sid in self.shard_ids:
            self.start_shard(sid)
        self._spawn("api", ["api", "--api-port", str(self.api_port)])
        await self.wait_shards(set(self.shard_ids))
        return self

    async def wait_shards(self, expected: set[str], timeout: float = 30) -> None:
        """Until the API's discovery sees exactly ``expected``."""
        async def seen() -> bool:
            for name, p in self.procs.items():
                assert p.poll() is None or name not in expected | {"api"} | set(self.presence_ids), \
                    f"{name} exited; see its log"
            try:
                r = await self.api.call("GET", "/healthz")
            except OSError:
                return False
            return r.status == 200 and set(r.body["shards"]) == expected
        await eventually(seen, timeout)

    def log_text(self, *names: str) -> str:
        """The logs of the processes ``names`` so far, one after the other."""
        return "".join((self.dir / f"{name}.log").read_text(errors="replace") for name in names)

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        self.procs[name].send_signal(sig)
        if sig == signal.SIGKILL:
            self.procs[name].wait(10)

    def ws_url(self, sid: str) -> str:
        return f"ws://127.0.0.1:{self.ws_ports[sid]}/"

    def stop(self) -> None:
        stop_processes(self.procs.values(), 15)
        # pytest shows a test's captured output only when it fails: the processes' last words
        for name in self.procs:
            lines = (self.dir / f"{name}.log").read_text(errors="replace").splitlines()
            print(f"---- {name}.log (last {min(40, len(lines))} of {len(lines)} lines) ----")
            print("\n".join(lines[-40:]))


class Device:
    """One logical device of a user, as a robust client would be: it keeps its cursors across
    reconnects, and records anything the server sends out of line (a duplicate, a gap)."""

    def __init__(self, cluster: Cluster, creds: dict, name: str):
        self.cluster = cluster
        self.creds = creds
        self.user_id = creds["user"]["id"]
        self.device_id = creds["device_id"]
        self.name = name
        self.cursors: dict[str, int] = {}
        self.received: dict[str, list[int]] = {}
        self.bodies: dict[tuple[str, int], str] = {}
        self.anomalies: list[str] = []
        self.client = None
        self.shard_url = creds["ws_url"]
        self._replaced = trio.Event()  # set when ``connect`` replaces ``client``

    def follow(self, *channels: str) -> None:
        for ch in channels:
            self.cursors.setdefault(ch, 0)

    async def connect(self, nursery, ws_url: str | None = None, relogin: bool = False):
        if relogin:
            fresh = await self.cluster.api.login(self.creds["user"]["username"], device_id=self.device_id)
            assert fresh["device_id"] == self.device_id
            self.creds = fresh
            self.shard_url = fresh["ws_url"]
        self.client = await open_client(nursery, ws_url or self.shard_url, self.creds["token"],
                                        cursors=dict(self.cursors) if self.cursors else None)
        self._replaced.set()
        self._replaced = trio.Event()
        return self.client

    async def wait_frame(self) -> None:
        """Until the client receives a frame or closes; if it is closed, until ``connect`` replaces it."""
        if self.client.closed_reason is None:
            await self.client.wait_frame()
        else:
            await self._replaced.wait()

    def caught_up(self, expected: dict[str, int]) -> bool:
        """Every channel this device follows is absorbed up to its seq in ``expected``."""
        return all(self.cursors.get(ch, 0) >= expected[ch] for ch in self.cursors if ch in expected)

    def absorb(self) -> int:
        """Take the message frames received so far into the cursors; return how many."""
        n = 0
        keep = []
        for f in self.client.inbox:
            if f.get("type") != "message":
                keep.append(f)
                continue
            ch, seq = f["channel_id"], f["seq"]
            cur = self.cursors.get(ch, seq - 1)
            if seq <= cur:
                self.anomalies.append(f"{self.name}: duplicate {ch}#{seq} (cursor {cur})")
            elif seq != cur + 1:
                self.anomalies.append(f"{self.name}: gap before {ch}#{seq} (cursor {cur})")
            self.cursors[ch] = max(cur, seq)
            self.received.setdefault(ch, []).append(seq)
            self.bodies[(ch, seq)] = f["body"]
            n += 1
        self.client.inbox[:] = keep
        return n


async def settle(devices: list[Device], expected: dict[str, int], timeout: float = 20) -> None:
    """Absorb frames as they arrive until every device has every channel it follows up to
    ``expected``; then absorb what else has arrived meanwhile."""
    with trio.fail_after(timeout):
        for d in devices:
            d.absorb()
            while not d.caught_up(expected):
                await d.wait_frame()
                d.absorb()
    for d in devices:
        d.absorb()


async def send_until_acked(client, channel_id: str, body: str, timeout: float = 20, cmid: str | None = None) -> dict:
    """Resend with one client_msg_id until acked, as a client does: after ``retry_after_ms`` when
    answered ``unavailable``, at once when not answered within 10 s."""
    cmid = cmid or str(uuid.uuid4())
    with trio.fail_after(timeout):
        while True:
            try:
                reply = await client.send_message(channel_id, body, cmid)
            except trio.TooSlowError:
                continue
            if reply["type"] == "ack":
                return reply
            assert reply["code"] == "unavailable", reply
            await trio.sleep(reply["retry_after_ms"] / 1000)  # the protocol's backoff, not a wait for state


# ---- fixtures (registered by tests/conftest.py) ----------------------------------------------------------
@pytest.fixture(scope="module")
def zk(tmp_path_factory):
    """One ZooKeeper for the test module; each ``Cluster`` has its own root in it."""
    if not zookeeper_available():
        pytest.skip("ZooKeeper not installed (apt-get install zookeeper); .ci/run installs it")
    server = ZooKeeper(tmp_path_factory.mktemp("zk"))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "cassandra"])
def store_toml(request):
    """The cluster's store: one shared SQLite file, or a fresh keyspace on the session's real Cassandra."""
    if request.param == "sqlite":
        return ""
    return request.getfixturevalue("cassandra_server").toml(fresh_keyspace())


@pytest.fixture
async def cluster(zk, tmp_path, store_toml):
    """Three shards (s1..s3) and an API server on ``zk``, ready (the API sees every shard)."""
    c = Cluster(zk, tmp_path, store_toml=store_toml)
    try:
        await c.start()
        yield c
    finally:
        c.stop()
