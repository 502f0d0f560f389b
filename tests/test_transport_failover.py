"""SSE and long-poll devices through kill -9 of the shard that serves them, in a real cluster
(ZooKeeper, three shard processes): they resume on another shard from their resume tokens and
receive every acked message exactly once, in order; every send made over ``POST /v1/frames``
meanwhile is answered within the bound (``ack``, or ``unavailable`` and resent with the same
``client_msg_id``), and the store holds each once."""

from __future__ import annotations

import signal

import pytest
import trio

from tests.cluster import Cluster, zookeeper_available
from tests.faults import ANSWER_BOUND_S, SendLog, check_store
from tests.helpers import dm
from tests.transports import FramesClient, RobustReceiver, http_base

pytestmark = pytest.mark.skipif(not zookeeper_available(),
                                reason="ZooKeeper not installed (apt-get install zookeeper); .ci/run installs it")


async def test_sse_and_poll_devices_survive_kill_9_of_their_shard(zk, tmp_path, nursery, store_toml):
    """On both store backends (``store_toml``: one shared SQLite file, or a real Cassandra)."""
    cluster = Cluster(zk, tmp_path, n=3, session_timeout_s=2.0, heartbeat_s=0.3, store_toml=store_toml)
    try:
        await cluster.start()
        alice = await cluster.api.signup_login("tf-alice")
        for i in range(60):
            bob = await cluster.api.signup_login(f"tf-bob{i}")
            if bob["shard_id"] != alice["shard_id"]:
                break
        else:
            pytest.fail("no user homed on another shard")
        victim = bob["shard_id"]
        bob2 = await cluster.api.login(bob["user"]["username"])  # bob's second device, same shard
        assert bob2["shard_id"] == victim
        ch = dm(alice, bob)
        sender = FramesClient(http_base(alice["ws_url"]), alice["token"])
        log = SendLog()
        await log.send_until_acked(sender, ch, "first", "m-0")
        sse = await nursery.start(RobustReceiver(cluster.api, bob, "sse").run)
        poller = await nursery.start(RobustReceiver(cluster.api, bob2, "poll").run)
        total = 40
        for i in range(1, total):
            if i == 15:
                await sse.wait_for(ch, log.acked["m-14"][1])
                await poller.wait_for(ch, log.acked["m-14"][1])
                cluster.kill(victim, signal.SIGKILL)
            await log.send_until_acked(sender, ch, f"m {i}", f"m-{i}")
        head = await check_store(cluster, ch, alice["token"], log)
        assert head == total
        for device in (sse, poller):
            await device.wait_for(ch, head)
            assert device.seqs[ch] == list(range(2, head + 1)) or device.seqs[ch] == list(range(1, head + 1)), \
                (device.kind, device.seqs[ch])
            assert device.reconnects >= 1, device.kind  # it did go through the failover
        assert log.late(ANSWER_BOUND_S) == []
    finally:
        cluster.stop()
