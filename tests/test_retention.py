"""Retention end to end, on both store backends (SQLite; a real Cassandra): the owner's sweep deletes
the messages older than the policy of their channel's kind, a device whose cursor is below the
horizon syncs from the horizon and is told so (``expired`` in the sync reply), history starts at the
horizon, and the channel goes on with the next seq."""

from __future__ import annotations

import pytest

from chatd.config import Config
from tests.cassandra_server import fresh_keyspace
from tests.helpers import RunningServer, dm, make_config, open_client


@pytest.fixture(params=["sqlite", "cassandra"])
async def retention_server(request, tmp_path, nursery):
    cfg: Config = make_config(tmp_path)
    # DMs kept one day, groups forever; the sweep is driven by the test (sweep(now=...))
    cfg.update({"retention": {"dm_messages_days": 1.0, "sweep_interval_s": 86400.0}}, source="test")
    ks = None
    if request.param == "cassandra":
        from chatd.store.cassandra_schema import migrate
        server = request.getfixturevalue("cassandra_server")
        ks = fresh_keyspace()
        c = server.config(ks)
        cfg.update({"store": {"backend": "cassandra"}, "cassandra": {
            "contact_points": c.contact_points, "port": c.port, "local_dc": c.local_dc, "keyspace": ks,
            "replication": c.replication}}, source="test")
        await migrate(cfg.cassandra, 4)  # small buckets: the expired ones are whole partitions
    cfg.validate()
    server = await RunningServer(nursery, cfg).start()
    yield server
    await server.stop()
    if ks is not None:
        from chatd.store.cassandra_schema import drop_keyspace
        await drop_keyspace(cfg.cassandra)


async def test_sync_below_the_horizon_starts_there_with_a_flag(retention_server, nursery):
    server = retention_server
    alice = await server.api.signup_login("alice")
    bob = await server.api.signup_login("bob")
    r = await server.api.call("POST", "/v1/groups", {"name": "g", "members": [bob["user"]["id"]]},
                              token=alice["token"])
    group, ab = r.body["channel"]["id"], dm(alice, bob)
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    for i in range(1, 11):
        assert (await ca.send_message(ab, f"dm {i}"))["seq"] == i
        assert (await ca.send_message(group, f"g {i}"))["seq"] == i
    store = server.node.store
    sixth = (await store.read_messages(ab, after=5, limit=1))[0]
    # a day after the 6th DM was written: DMs 1..6 are older than the policy; groups are kept
    deleted = await server.node.retention.sweep(now=sixth.created_at + 86400 + 1e-3)
    assert deleted == 6

    cb = await open_client(nursery, bob["ws_url"], bob["token"])
    reply = await cb.request({"type": "sync", "cursors": {ab: 2, group: 8}})
    assert reply["cursors"] == {ab: 10, group: 10}
    assert reply["expired"] == {ab: 7}
    got = [(f["channel_id"], f["seq"]) for f in cb.pending_messages()]
    assert sorted(got) == sorted([(ab, s) for s in range(7, 11)] + [(group, 9), (group, 10)])
    # a cursor at or above the horizon - 1 is not told anything
    cb2 = await open_client(nursery, bob["ws_url"], bob["token"])
    reply = await cb2.request({"type": "sync", "cursors": {ab: 6}})
    assert "expired" not in reply and [f["seq"] for f in cb2.pending_messages()] == [7, 8, 9, 10]

    r = await server.api.call("GET", f"/v1/channels/{ab}/messages?limit=100", token=bob["token"])
    assert [m["seq"] for m in r.body["messages"]] == [7, 8, 9, 10]
    r = await server.api.call("GET", f"/v1/channels/{group}/messages?limit=100", token=bob["token"])
    assert [m["seq"] for m in r.body["messages"]] == list(range(1, 11))
    assert (await ca.send_message(ab, "after the sweep"))["seq"] == 11

    # everything the cursor lacks expired: told the horizon (head + 1), nothing sent
    last = (await store.read_messages(ab, after=10, limit=1))[0]
    assert await server.node.retention.sweep(now=last.created_at + 86400 + 1e-3) == 5
    cb3 = await open_client(nursery, bob["ws_url"], bob["token"])
    reply = await cb3.request({"type": "sync", "cursors": {ab: 3}})
    assert reply["cursors"] == {ab: 11} and reply["expired"] == {ab: 12} and cb3.pending_messages() == []
