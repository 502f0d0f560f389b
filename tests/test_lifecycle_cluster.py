"""The message lifecycle through a kill -9 of the channel's owner shard (real ZooKeeper, three shard
processes and an API server; SQLite and real Cassandra): users on different shards send, edit,
react, unreact and delete, resending with the same ``client_msg_id`` until acked, while the owner
dies; every device (reconnecting with its cursors) receives each row once and in order, and ends
with the same folded view as the HTTP history, whose message rows alone are already current."""

from __future__ import annotations

import random

import pytest
import trio

from chatd.discovery.view import View
from chatd.lifecycle import ChannelView
from tests.cluster import Device, settle, zookeeper_available
from tests.faults import keep_connected, stored_messages
from tests.helpers import users_on_distinct_homes

pytestmark = pytest.mark.skipif(not zookeeper_available(),
                                reason="ZooKeeper not installed (apt-get install zookeeper); .ci/run installs it")

STEPS = 24  # per user


class FoldingDevice(Device):
    """A cluster test device that also folds what it receives (chatd/lifecycle.py)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.view = ChannelView(self.user_id)

    def absorb(self) -> int:
        frames = [f for f in self.client.inbox if f.get("type") == "message"]
        folded = dict(self.cursors)
        for f in frames:  # each row once, in order (the base class records anything else as an anomaly)
            if f["seq"] == folded.get(f["channel_id"], 0) + 1:
                folded[f["channel_id"]] = f["seq"]
                self.view.apply(f)
        return super().absorb()


async def test_lifecycle_converges_through_kill_9_of_the_owner(cluster, nursery):
    people = (await users_on_distinct_homes(cluster, "lc", 3, 3))[:3]
    owner = people[0]
    r = await cluster.api.call("POST", "/v1/groups", {"name": "lc", "members": [p["user"]["id"] for p in people[1:]]},
                               token=owner["token"])
    group = r.body["channel"]["id"]
    victim = View(0, {s: None for s in cluster.shard_ids}).owner_of(group)
    devices = [FoldingDevice(cluster, p, p["user"]["username"]) for p in people]
    for d in devices:
        d.follow(group)
        await d.connect(nursery)
    rng = random.Random(21)
    mine: dict[int, list[int]] = {d.user_id: [] for d in devices}  # seqs of each user's messages
    all_msgs: list[int] = []
    kill_now = trio.Event()
    answers: list[str] = []

    async def until_answered(d: Device, frame: dict) -> dict:
        """Resend with the same client_msg_id until acked or refused for a reason of the log."""
        frame = {"channel_id": group, "client_msg_id": f"{d.name}-{len(answers)}-{rng.random()}", **frame}
        while True:
            try:
                reply = await d.client.request(dict(frame))
            except Exception:  # connection gone: keep_connected replaces d.client
                reply = None
            if reply is not None and (reply["type"] == "ack" or reply.get("code") != "unavailable"):
                answers.append(reply.get("code", "ack"))
                return reply
            await trio.sleep(0.2)

    async def user(d: Device):
        for i in range(STEPS):
            op = rng.choice(["send", "send", "edit", "react", "react", "unreact", "delete"])
            if op != "send" and not all_msgs:
                op = "send"
            if op == "send":
                reply = await until_answered(d, {"type": "send", "body": f"{d.name} {i}"})
                assert reply["type"] == "ack", reply
                mine[d.user_id].append(reply["seq"])
                all_msgs.append(reply["seq"])
            elif op in ("edit", "delete") and mine[d.user_id]:
                target = rng.choice(mine[d.user_id])
                frame = {"type": op, "target_seq": target, **({"body": f"{d.name} edit {i}"} if op == "edit" else {})}
                reply = await until_answered(d, frame)
                assert reply["type"] == "ack" or reply["code"] == "message_deleted", reply
                if op == "delete" and reply["type"] == "ack":
                    mine[d.user_id].remove(target)
            elif op in ("react", "unreact"):
                reply = await until_answered(d, {"type": op, "target_seq": rng.choice(all_msgs),
                                                 "emoji": rng.choice(["👍", "🎉"])})
                assert reply["type"] == "ack" or reply["code"] == "message_deleted", reply
            if d.user_id == owner["user"]["id"] and i == 6:
                kill_now.set()

    async with trio.open_nursery() as n:
        for d in devices:
            n.start_soon(keep_connected, d, nursery)

        async def killer():
            await kill_now.wait()
            cluster.kill(victim)
        n.start_soon(killer)
        async with trio.open_nursery() as users:
            for d in devices:
                users.start_soon(user, d)
        assert cluster.procs[victim].poll() is not None  # it died under traffic
        log = await stored_messages(cluster, group, owner["token"])
        seqs = [m["seq"] for m in log]
        assert seqs == list(range(1, len(seqs) + 1))
        cmids = [m["client_msg_id"] for m in log]
        assert len(set(cmids)) == len(cmids)  # nothing stored twice through the resends
        await settle(devices, {group: len(seqs)}, timeout=40)
        n.cancel_scope.cancel()
    for d in devices:
        d.absorb()
        assert d.anomalies == [], d.anomalies
        assert d.received[group] == seqs, d.name
        history = ChannelView(d.user_id)
        rows_only = ChannelView(d.user_id)
        for f in await stored_messages(cluster, group, d.creds["token"]):
            history.apply(f)
            if "kind" not in f:
                rows_only.apply(f)
        assert d.view.snapshot() == history.snapshot() == rows_only.snapshot(), d.name
