"""Three-node clusters (issue 24, item 5): chatd (two shards and an API server, real processes) on a
real 3-node Apache Cassandra (``bin/chatd-cassandra start --nodes 3``: 127.0.0.1-3, same ports on
each address, 512 MB heap each; keyspace RF 3, LOCAL_QUORUM reads and writes, chatd given only
127.0.0.1 as contact point) and a real 3-server ZooKeeper ensemble (tests/cluster.py
``ZooKeeperEnsemble``), under continuous load: four senders, each on its own DM channel, keep one
send in flight (resent with its ``client_msg_id`` after ``retry_after_ms`` when answered
``unavailable``, as docs/protocol.md says), and a receiving device follows each channel.

* kill -9 of the Cassandra node that is chatd's only contact point, then its restart: every send
  acked, each answered within the bound, nothing lost, delivered once, in order;
* kill -9 of the ZooKeeper leader: the same;
* kill -9 of two Cassandra nodes (quorum lost): every send answered - ``unavailable`` - within the
  bound, for as long as it lasts; both restarted: writes resume. Measured and printed (not asserted
  as speed): Cassandra's failure-detection delay (kill to the survivor's gossip logging each node
  DOWN), the restart command to the survivor logging the first node UP (the quorum's return, as
  the coordinator sees it), and from then to the first acked write;
* everything restarted (the ZooKeeper ensemble, all Cassandra nodes, both shards, the API):
  the history is exact - every acked message there once, at its seq, gap-free, with its body.

The tier is behind the ``threenode`` marker: the default ``python -m pytest`` leaves it out
(pytest.ini) and ``.ci/run`` runs it as a second invocation, ``python -m pytest -m threenode``.
Resources: the module's fixture starts and stops every JVM and process (the JVMs in a temporary
directory; ``bin/chatd-cassandra stop``)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from tests.cassandra_server import ENV as CASSANDRA_ENV, fresh_keyspace
from tests.cluster import Cluster, Device, ZooKeeperEnsemble, settle, zookeeper_available
from tests.faults import ANSWER_BOUND_S, SendLog, check_store, keep_sending, stored_messages, traffic_flows
from tests.helpers import dm, eventually

pytestmark = [
    pytest.mark.threenode,
    pytest.mark.skipif(not zookeeper_available(),
                       reason="ZooKeeper not installed (apt-get install zookeeper); .ci/run installs it"),
    pytest.mark.skipif(os.environ.get(CASSANDRA_ENV) == "skip",
                       reason=f"{CASSANDRA_ENV}=skip: this run opted out of the real-Cassandra tests"),
    # the module's fixture (three JVMs, an ensemble, a migration) is set up inside the first test's
    # time; restarts of Cassandra nodes take 20-60 s each on a loaded 2-core machine
    pytest.mark.timeout(420),
]

SCRIPT = Path(__file__).resolve().parent.parent / "bin" / "chatd-cassandra"
_loader = importlib.machinery.SourceFileLoader("chatd_cassandra_script", str(SCRIPT))
script = importlib.util.module_from_spec(importlib.util.spec_from_loader(_loader.name, _loader))
_loader.exec_module(script)  # gossip_events: the script's reading of a node's system.log

SENDERS = 4
GIVE_UP_S = 300.0  # a send resent this long without an ack fails the test (quorum lost lasts ~1 min)
RESUME_BOUND_S = 3.0  # quorum back (the coordinator's gossip) -> first acked write; ~1 s + room for load


class Cassandra3:
    """The 3-node cluster of ``bin/chatd-cassandra`` in ``dir``; node i on 127.0.0.i."""

    def __init__(self, workdir: Path):
        """Starts the cluster in the background: ``wait`` returns once every node is UN."""
        self.dir = workdir
        self.state = None
        self._starting = subprocess.Popen([sys.executable, str(SCRIPT), "start", "--nodes", "3", "--dir", str(workdir)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait(self) -> None:
        out, err = self._starting.communicate(timeout=400)
        assert self._starting.returncode == 0, f"bin/chatd-cassandra start --nodes 3 failed: {err.strip()}"
        self.state = json.loads(out.strip().splitlines()[-1])
        t = time.monotonic()
        self.driver_sees_all()
        print(f"3-node Cassandra: every node UN {self.state['up_s']:.1f} s after the start command, "
              f"the driver's metadata all three {time.monotonic() - t:.1f} s after that")

    def driver_sees_all(self, timeout: float = 120) -> None:
        """Until a driver given only 127.0.0.1 learns all three nodes, up: gossip marks a node UP
        before the others' system.peers hold its CQL address, and ``chatd store migrate`` counts
        the driver's nodes (it refuses RF 3 while it sees two)."""
        from cassandra import ProtocolVersion
        from cassandra.cluster import Cluster as DriverCluster

        from chatd.store.cql import live_nodes_by_dc
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            driver = DriverCluster(contact_points=["127.0.0.1"], port=self.state["port"],
                                   protocol_version=ProtocolVersion.V4)
            try:
                driver.connect()
                seen = live_nodes_by_dc(driver)
                if seen == {self.state["dc"]: 3}:
                    return
            except Exception as e:  # noqa: BLE001 - not up yet: look again
                seen = e
            finally:
                driver.shutdown()
            time.sleep(0.5)  # another process's state: nothing to wait on
        raise AssertionError(f"the driver did not see three live nodes within {timeout:.0f} s: {seen}")

    def _run(self, *args: str) -> dict:
        proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--dir", str(self.dir)],
                              capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, f"bin/chatd-cassandra {' '.join(args)} failed: {proc.stderr.strip()}"
        last = proc.stdout.strip().splitlines()[-1]
        return json.loads(last) if last.startswith("{") else {"said": last}

    async def start_all(self) -> dict:
        return await trio.to_thread.run_sync(self._run, "start", "--nodes", "3")

    async def restart(self, i: int) -> dict:
        """Start node ``i`` again; returns once it and every live node see each other UP."""
        return await trio.to_thread.run_sync(self._run, "restart", "--node", str(i))

    def all_up(self) -> dict | None:
        proc = subprocess.run([sys.executable, str(SCRIPT), "status", "--dir", str(self.dir)],
                              capture_output=True, text=True, timeout=30)
        return json.loads(proc.stdout) if proc.stdout.startswith("{") else None

    def kill(self, *nodes: int) -> float:
        """kill -9 of ``nodes`` (at once); the wall-clock time of the kill."""
        pids = [n["pid"] for n in self.all_up()["nodes"] if n["node"] in nodes]
        assert None not in pids and len(pids) == len(nodes), pids
        t = time.time()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for i in nodes:
            self._run("kill", "--node", str(i))  # waits until it is gone
        return t

    def log_size(self, i: int) -> int:
        return (self.dir / f"node{i}" / "logs" / "system.log").stat().st_size

    def gossip(self, i: int, since: int) -> list[tuple[float, str, str]]:
        """(wall-clock time, peer, "UP"/"DOWN") that node i's gossip logged from byte ``since``."""
        return [(log_time(t), host, what) for t, host, what in script.gossip_events(self.dir / f"node{i}", since)]

    def toml(self, keyspace: str) -> str:
        return ('[store]\nbackend = "cassandra"\n'
                f'[cassandra]\ncontact_points = "127.0.0.1"\nport = {self.state["port"]}\n'
                f'local_dc = "{self.state["dc"]}"\nkeyspace = "{keyspace}"\n'
                f"replication = \"{{'class': 'NetworkTopologyStrategy', '{self.state['dc']}': 3}}\"\n"
                'read_consistency = "LOCAL_QUORUM"\nwrite_consistency = "LOCAL_QUORUM"\n')

    def stop(self) -> None:
        if self._starting.poll() is None:
            self._starting.kill()
            self._starting.wait()
        subprocess.run([sys.executable, str(SCRIPT), "stop", "--dir", str(self.dir)], capture_output=True, timeout=120)


def log_time(text: str) -> float:
    """A logback ISO8601 time of the nodes' system.log ("2026-12-02 05:12:10,372", local time) as epoch s."""
    return time.mktime(time.strptime(text[:19], "%Y-%m-%d %H:%M:%S")) + int(text[20:23]) / 1000


class Clock:
    """Wall-clock times (Cassandra's log) as trio times (the send log's)."""

    def __init__(self):
        self.offset = trio.current_time() - time.time()

    def trio(self, wall: float) -> float:
        return wall + self.offset


class Three:
    """The module's clusters: Cassandra, ZooKeeper, chatd on both."""

    def __init__(self, workdir: Path):
        self.cassandra = self.zk = self.chatd = None
        try:
            self.cassandra = Cassandra3(workdir / "cassandra")  # the long one: the ensemble forms meanwhile
            self.zk = ZooKeeperEnsemble(workdir / "zk")
            self.cassandra.wait()
            (workdir / "chatd").mkdir()
            self.chatd = Cluster(self.zk, workdir / "chatd", n=2, session_timeout_s=4.0,
                                 store_toml=self.cassandra.toml(fresh_keyspace()))
            trio.run(self.chatd.start)
        except BaseException:
            self.stop()
            raise

    def healthy(self) -> None:
        """Every Cassandra node and ZooKeeper server is running (each test leaves them so)."""
        state = self.cassandra.all_up()
        assert state and all(n["pid"] for n in state["nodes"]), f"a Cassandra node is down: {state}"
        assert all(p.poll() is None for p in self.zk.procs.values()), "a ZooKeeper server is down"
        assert all(p.poll() is None for p in self.chatd.procs.values()), "a chatd process exited"

    def stop(self) -> None:
        if self.chatd:
            self.chatd.stop()
        if self.cassandra:
            self.cassandra.stop()
        if self.zk:
            self.zk.stop()


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    t = Three(tmp_path_factory.mktemp("three"))
    yield t
    t.stop()


class Load:
    """``SENDERS`` senders, each on its own DM channel with a receiving device."""

    def __init__(self, cluster: Cluster, tag: str):
        self.cluster, self.tag = cluster, tag
        self.log = SendLog()
        self.senders: dict[str, Device] = {}  # channel -> the sender's device
        self.receivers: list[Device] = []

    async def connect(self, nursery) -> "Load":
        api = self.cluster.api
        for k in range(SENDERS):
            a = await api.signup_login(f"{self.tag}-a{k}")
            b = await api.signup_login(f"{self.tag}-b{k}")
            ch = dm(a, b)
            sender, receiver = Device(self.cluster, a, f"{self.tag}-a{k}"), Device(self.cluster, b, f"{self.tag}-b{k}")
            for d in (sender, receiver):
                d.follow(ch)
                await d.connect(nursery)
            self.senders[ch] = sender
            self.receivers.append(receiver)
        return self

    @property
    def channels(self) -> list[str]:
        return list(self.senders)

    def start(self, nursery, stop: trio.Event) -> None:
        for k, (ch, dev) in enumerate(self.senders.items()):
            nursery.start_soon(keep_sending, self.log, dev.client, ch, f"{self.tag}{k}", stop, 0.05, GIVE_UP_S)

    async def check(self) -> dict[str, int]:
        """Nothing acked lost, nothing stored twice, gap-free; each receiver got every message once, in order."""
        heads = {}
        for ch, dev in self.senders.items():
            heads[ch] = await check_store(self.cluster, ch, dev.creds["token"], self.log)
        await settle(self.receivers, heads, timeout=60)
        for d in self.receivers:
            assert d.anomalies == [], d.anomalies[:5]
            for ch in d.cursors:
                assert d.received[ch] == list(range(1, heads[ch] + 1)), ch
        acked = set(self.log.acked)
        sent = {r.client_msg_id for r in self.log.records}
        assert acked == sent, f"{len(sent - acked)} sends never acked"
        return heads

    def summary(self) -> str:
        waits = [r.waited_s for r in self.log.records]
        return (f"{len(self.log.acked)} messages acked, {len(self.log.unavailable())} of {len(waits)} sends "
                f"answered unavailable, slowest answer {max(waits):.2f} s")


def answered_in_time(load: Load) -> None:
    late = load.log.late(ANSWER_BOUND_S)
    assert late == [], [(r.client_msg_id, round(r.waited_s, 2), r.reply) for r in late[:5]]


async def test_only_contact_point_killed_and_restarted(three, nursery):
    three.healthy()
    load = await Load(three.chatd, "cp").connect(nursery)
    stop = trio.Event()
    async with trio.open_nursery() as n:
        load.start(n, stop)
        await traffic_flows(load.log, load.channels)
        three.cassandra.kill(1)  # 127.0.0.1: chatd's only contact point, the seed
        t_kill = trio.current_time()
        await trio.sleep(5)  # traffic meanwhile
        assert load.log.acks_after(t_kill) > 0
        await three.cassandra.restart(1)  # under load
        await traffic_flows(load.log, load.channels)
        stop.set()
    print(f"contact point killed and restarted: {load.summary()}")
    answered_in_time(load)
    await load.check()


async def test_zookeeper_leader_killed(three, nursery):
    three.healthy()
    zk = three.zk
    leader = await eventually(zk.leader, timeout=10)
    load = await Load(three.chatd, "zk").connect(nursery)
    stop = trio.Event()
    async with trio.open_nursery() as n:
        load.start(n, stop)
        await traffic_flows(load.log, load.channels)
        zk.kill(leader)
        t_kill = trio.current_time()
        new = await eventually(zk.leader, timeout=30)
        elected_s = trio.current_time() - t_kill
        assert new != leader
        await trio.sleep(5)  # traffic meanwhile: sessions moved to the other servers
        await traffic_flows(load.log, load.channels)
        zk.spawn(leader)
        await trio.to_thread.run_sync(zk.wait_serving, zk.ids)
        await traffic_flows(load.log, load.channels)
        stop.set()
    print(f"ZooKeeper leader {leader} killed: server {new} led {elected_s:.2f} s later (seen by srvr); {load.summary()}")
    answered_in_time(load)
    await load.check()


async def test_quorum_lost_and_back(three, nursery):
    three.healthy()
    c = three.cassandra
    load = await Load(three.chatd, "q").connect(nursery)
    probes = SendLog()  # one fresh send every 0.1 s, not resent: when writes resume, to 0.1 s
    probe_ch = load.channels[0]
    probe_client = load.senders[probe_ch].client
    stop = trio.Event()

    async def probe() -> None:
        async with trio.open_nursery() as p:
            i = 0
            while not stop.is_set():
                p.start_soon(probes.send, probe_client, probe_ch, f"probe {i}", f"q-probe-{i}")
                i += 1
                await trio.sleep(0.1)
    async with trio.open_nursery() as n:
        load.start(n, stop)
        await traffic_flows(load.log, load.channels)
        clock = Clock()
        mark = c.log_size(1)
        n.start_soon(probe)
        t_kill = clock.trio(c.kill(2, 3))

        def convicted() -> dict[str, float] | None:
            down = {host: t for t, host, what in c.gossip(1, mark) if what == "DOWN"}
            return down if {"127.0.0.2", "127.0.0.3"} <= down.keys() else None
        down = await eventually(convicted, timeout=90)
        detect_s = [clock.trio(t) - t_kill for t in down.values()]
        await trio.sleep(2)  # answered at once now that the survivor knows: unavailable
        assert not load.log.acks_after(t_kill + ANSWER_BOUND_S), "acked with two of three replicas dead"
        mark = c.log_size(1)
        t_restart = trio.current_time()
        async with trio.open_nursery() as r:
            r.start_soon(c.restart, 2)
            r.start_soon(c.restart, 3)
        up = [clock.trio(t) for t, host, what in c.gossip(1, mark) if what == "UP"]
        assert up, "node 1 never logged a node UP"
        t_quorum = min(up)
        await traffic_flows(load.log, load.channels)
        stop.set()
    acks = [r.answered_at for log in (load.log, probes) for r in log.records
            if r.reply and r.reply["type"] == "ack" and r.answered_at > t_kill + ANSWER_BOUND_S]
    t_resume = min(acks)
    resume_s = t_resume - t_quorum
    print(f"quorum lost: Cassandra's failure detector convicted the two dead nodes "
          f"{min(detect_s):.1f}-{max(detect_s):.1f} s after the kill; restart command -> survivor saw the first node "
          f"UP {t_quorum - t_restart:.1f} s (both nodes UN after {trio.current_time() - t_restart:.1f} s); "
          f"first acked write {resume_s:+.2f} s after the quorum's return; "
          f"{len(probes.unavailable())} of {len(probes.records)} probes unavailable, slowest probe answer "
          f"{max(r.waited_s for r in probes.records):.2f} s; {load.summary()}")
    answered_in_time(load)
    late = probes.late(ANSWER_BOUND_S)
    assert late == [], [(r.client_msg_id, round(r.waited_s, 2), r.reply) for r in late[:5]]
    assert probes.unavailable() and load.log.unavailable()
    assert resume_s <= RESUME_BOUND_S, resume_s
    await load.check()
    await check_store(three.chatd, probe_ch, load.senders[probe_ch].creds["token"], probes)


async def test_everything_restarted_history_exact(three, nursery):
    three.healthy()
    chatd = three.chatd
    load = await Load(chatd, "all").connect(nursery)
    stop = trio.Event()
    async with trio.open_nursery() as n:
        load.start(n, stop)
        await traffic_flows(load.log, load.channels, n=20)
        stop.set()
    heads = await load.check()
    bodies = {ch: [(m["seq"], m["client_msg_id"], m["body"])
                   for m in await stored_messages(chatd, ch, dev.creds["token"])] for ch, dev in load.senders.items()}
    # kill -9 everything: the shards and the API, every Cassandra node; the ensemble stopped
    for name in list(chatd.procs):
        chatd.kill(name)
    three.cassandra.kill(1, 2, 3)
    three.zk.stop()
    t0 = trio.current_time()
    await trio.to_thread.run_sync(three.zk.start_again)
    state = await three.cassandra.start_all()
    for sid in chatd.shard_ids:
        chatd.start_shard(sid)
    chatd._spawn("api", ["api", "--api-port", str(chatd.api_port)])
    await chatd.wait_shards(set(chatd.shard_ids), timeout=60)
    print(f"everything restarted in {trio.current_time() - t0:.1f} s (Cassandra UN in {state['up_s']:.1f} s)")
    for ch, dev in load.senders.items():
        after = [(m["seq"], m["client_msg_id"], m["body"])
                 for m in await stored_messages(chatd, ch, dev.creds["token"])]
        assert after == bodies[ch], ch
    # each receiver, reconnected (a fresh login, its cursors kept), misses nothing and gets nothing twice;
    # a new device of each sender reads the whole history
    for d in load.receivers:
        await d.connect(nursery, relogin=True)
    await settle(load.receivers, heads, timeout=60)
    for ch, dev in load.senders.items():
        fresh = Device(chatd, await chatd.api.login(dev.creds["user"]["username"]), "fresh")
        fresh.follow(ch)
        await fresh.connect(nursery)
        await settle([fresh], heads, timeout=60)
        assert fresh.anomalies == [] and fresh.received[ch] == list(range(1, heads[ch] + 1)), ch
    # and writes go on, after the last seq
    again = SendLog()
    for ch, dev in load.senders.items():
        await dev.connect(nursery, relogin=True)
        reply = await again.send_until_acked(dev.client, ch, "after the restart", f"after-{ch}")
        assert reply["seq"] == heads[ch] + 1, (reply, heads[ch])
