"""Retention in a cluster (real ZooKeeper, three shard processes, SQLite): every
shard sweeps the channels it owns, so DMs owned by each of the three shards all expire on their
own; a device below the horizon is told ``expired`` by whichever shard serves it, history starts
at the horizon, and the channel goes on with the next seq."""

from __future__ import annotations

import re

import pytest

from chatd.discovery.view import View
from tests.cluster import Cluster, zookeeper_available
from tests.helpers import dm, eventually, open_client

pytestmark = pytest.mark.skipif(not zookeeper_available(),
                                reason="ZooKeeper not installed (apt-get install zookeeper); .ci/run installs it")

KEEP_S = 4.0  # DMs are kept this long; groups forever


async def test_each_shard_expires_the_channels_it_owns(zk, tmp_path, nursery):
    # SQLite only: what this adds to tests/test_retention.py (both backends, the sweep itself) is
    # which shard sweeps what, and ownership does not depend on the store (it keeps CI's time)
    cluster = Cluster(zk, tmp_path, n=3,
                      extra=f"[retention]\ndm_messages_days = {KEEP_S / 86400}\nsweep_interval_s = 0.5\n")
    try:
        await cluster.start()
        view = View(0, {s: None for s in cluster.shard_ids})
        alice = await cluster.api.signup_login("ret-alice")
        partners, owners = [], set()
        for i in range(60):  # one DM owned by each shard
            p = await cluster.api.signup_login(f"ret-p{i}")
            owner = view.owner_of(dm(alice, p))
            if owner not in owners:
                owners.add(owner)
                partners.append(p)
            if len(owners) == 3:
                break
        assert len(owners) == 3
        r = await cluster.api.call("POST", "/v1/groups", {"name": "kept", "members": [partners[0]["user"]["id"]]},
                                   token=alice["token"])
        group = r.body["channel"]["id"]
        ca = await open_client(nursery, alice["ws_url"], alice["token"])
        dms = [dm(alice, p) for p in partners]
        for ch in dms + [group]:
            for i in range(1, 4):
                assert (await ca.send_message(ch, f"old {i}"))["seq"] == i

        async def history(ch, token):
            r = await cluster.api.call("GET", f"/v1/channels/{ch}/messages?limit=100", token=token)
            assert r.status == 200, r
            return [m["seq"] for m in r.body["messages"]]

        async def all_expired():
            return all([await history(ch, alice["token"]) == [] for ch in dms])
        await eventually(all_expired, timeout=30)  # each DM by its own owner's sweep
        assert await history(group, alice["token"]) == [1, 2, 3]  # groups are kept
        for ch, p in zip(dms, partners):
            assert (await ca.send_message(ch, "after the sweep"))["seq"] == 4  # the head stays
            cp = await open_client(nursery, p["ws_url"], p["token"])
            reply = await cp.request({"type": "sync", "cursors": {ch: 1}})
            assert reply["cursors"] == {ch: 4} and reply["expired"] == {ch: 4}, reply
            assert [(f["channel_id"], f["seq"]) for f in cp.pending_messages()] == [(ch, 4)]
            assert await history(ch, p["token"]) == [4]
        # each shard expired its own DM's 3 messages (one that swept another's channel would
        # leave that channel's owner nothing to log): 3 per shard, 9 in all
        expired = {sid: sum(int(n) for n in re.findall(r"retention: (\d+) messages expired", cluster.log_text(sid)))
                   for sid in cluster.shard_ids}
        assert expired == {sid: 3 for sid in cluster.shard_ids}, expired
    finally:
        cluster.stop()
