"""A real network partition (not a frozen process): each shard is its own host in a network
namespace this test creates (tests/netns.py: veth pairs and a bridge; traffic only between those
hosts and the test), ZooKeeper and the API server on the test's side. One shard — the owner of
the channel under test — is cut off from its peers and from ZooKeeper while its clients still
reach it over their own path; then the network heals.

Checked: every send, on either side of the cut, is answered within the bound (``ack`` or
``unavailable``); the cut-off owner stops acking once it loses ZooKeeper, and the channel moves
to a survivor only after its session expired (no seq is ever given twice: the store stays
gap-free with each client_msg_id once, every ack names what was stored); writes resume after the
heal; every device ends with every message once, in order."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trio

from chatd.discovery.view import View
from tests.cluster import Cluster, Device, ZooKeeper, settle, zookeeper_available
from tests.faults import SendLog, check_store, keep_sending, traffic_flows
from tests.helpers import dm, eventually
from tests.netns import Lan, unavailable_reason

SESSION_S = 2.0

_why_not = None if not zookeeper_available() else unavailable_reason()
pytestmark = [
    pytest.mark.skipif(not zookeeper_available(), reason="ZooKeeper not installed (apt-get install zookeeper)"),
    pytest.mark.skipif(_why_not is not None, reason=f"partition tests skipped: {_why_not}"),
]


class LanCluster(Cluster):
    """:class:`Cluster` with every shard on its own host of ``lan``."""

    def __init__(self, lan: Lan, *args, **kw):
        self.lan = lan
        super().__init__(*args, **kw)

    def start_shard(self, sid: str) -> None:
        addr = self.lan.addrs[sid]
        env = dict(os.environ, CHATD_SERVER__WS_HOST="0.0.0.0", CHATD_CLUSTER__LINK_HOST=addr,
                   CHATD_SERVER__PUBLIC_WS_URL=f"ws://{addr}:{self.ws_ports[sid]}/")
        log = open(self.dir / f"{sid}.log", "ab")
        self.procs[sid] = subprocess.Popen(
            [*self.lan.exec_prefix(sid), sys.executable, "-m", "chatd.cli", "shard", "--shard-id", sid,
             "--ws-port", str(self.ws_ports[sid]), "--http-port", str(self.http_ports[sid]),
             "--config", str(self.config)], stdout=log, stderr=log, env=env)

    def ws_url(self, sid: str) -> str:
        return f"ws://{self.lan.addrs[sid]}:{self.ws_ports[sid]}/"

    def direct_url(self, sid: str) -> str:
        """The path the partition leaves up (a client in the same room as the shard)."""
        return f"ws://{self.lan.direct[sid]}:{self.ws_ports[sid]}/"


@pytest.fixture
def lan():
    net = Lan(["s1", "s2", "s3"])
    try:
        yield net
    finally:
        net.close()


async def test_partitioned_owner(lan, tmp_path, nursery):
    zk = ZooKeeper(tmp_path / "zk", host=lan.root_addr)
    cluster = LanCluster(lan, zk, tmp_path, n=3, session_timeout_s=SESSION_S, heartbeat_s=0.3)
    try:
        await cluster.start()
        view = View(0, {s: None for s in cluster.shard_ids})
        # x: a device connected to the victim over its direct path; y: a device on a survivor.
        # 'cut' is owned by the victim; 'free' by a survivor.
        x = await cluster.api.signup_login("part-x")
        y = None
        for i in range(60):
            p = await cluster.api.signup_login(f"part-{i}")
            if y is None and p["shard_id"] != view.owner_of(dm(x, p)):
                y = p
                victim = view.owner_of(dm(x, y))
                cut = dm(x, y)
            elif y is not None and view.owner_of(dm(y, p)) not in (victim, y["shard_id"]):
                free = dm(y, p)
                break
        else:
            pytest.fail("no suitable users")
        dx, dy = Device(cluster, x, "x"), Device(cluster, y, "y")
        dx.follow(cut)
        dy.follow(cut, free)
        await dx.connect(nursery, cluster.direct_url(victim))
        await dy.connect(nursery)
        log = SendLog()
        await log.send_until_acked(dx.client, cut, "before", "before-x")
        stop = trio.Event()
        async with trio.open_nursery() as n:
            n.start_soon(keep_sending, log, dx.client, cut, "x", stop, 0.05)
            n.start_soon(keep_sending, log, dy.client, cut, "y", stop, 0.05)
            n.start_soon(keep_sending, log, dy.client, free, "free", stop, 0.05)
            await traffic_flows(log, [cut, free])
            lan.cut(victim)
            t_cut = trio.current_time()
            # the survivors take the channel over once the victim's session expired
            takeover_s = await eventually(lambda: log.first_ack_after(t_cut + SESSION_S, cut), timeout=30) - t_cut

            def x_answered_after(t):
                return [r for r in log.records if r.client_msg_id.startswith("x-") and r.sent_at > t and r.reply]
            # the cut goes on until the cut-off owner's client has had a send answered after the takeover
            t_taken = trio.current_time()
            await eventually(lambda: x_answered_after(t_taken), timeout=30)
            lan.heal(victim)
            t_heal = trio.current_time()
            # the old owner re-registers under a new session; its client's writes resume
            x_back_s = await eventually(
                lambda: log.first_ack_after(t_heal, cut) and
                min((r.answered_at for r in x_answered_after(t_heal) if r.reply["type"] == "ack"), default=None),
                timeout=30) - t_heal
            await traffic_flows(log, [cut, free])
            stop.set()
        x_during = [r for r in log.records if r.client_msg_id.startswith("x-") and t_cut + SESSION_S < r.sent_at < t_heal]
        print(f"partition: new owner's first ack {takeover_s:.2f} s after the cut; the cut-off owner's client "
              f"acked again {x_back_s:.2f} s after the heal; {len(log.unavailable())} of {len(log.records)} "
              f"sends answered unavailable; slowest answer {max(r.waited_s for r in log.records):.2f} s")
        assert log.late() == [], [(r.client_msg_id, r.waited_s, r.reply) for r in log.late()]
        # cut off from ZooKeeper, the old owner refused writes (no seq can be given twice)
        assert x_during and all(r.reply["type"] == "error" for r in x_during), \
            [(r.client_msg_id, r.reply) for r in x_during]
        assert x_back_s <= 3.0 + 2.0, x_back_s  # expired session: the promise is 3 s; room for CI
        heads = {ch: await check_store(cluster, ch, y["token"], log) for ch in (cut, free)}
        await settle([dx, dy], heads, timeout=30)
        for d in (dx, dy):
            assert d.anomalies == [], d.anomalies
            for ch in d.cursors:
                assert d.received[ch] == list(range(1, heads[ch] + 1)), (d.name, ch)
    finally:
        cluster.stop()
        zk.stop()
