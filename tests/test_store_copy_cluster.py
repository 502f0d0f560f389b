"""From one machine to a cluster: a store that a real ``chatd run`` filled (SQLite) is copied with
``chatd store copy`` into a real Cassandra keyspace, a 3-shard cluster (real ZooKeeper, shard and API
processes) starts on it, and a device that comes back with the cursors it had before the move syncs
exactly what it lacks: nothing it had, nothing twice, no gap; the same users log in with their old
passwords, and the channels go on with the next seq."""

from __future__ import annotations

import signal
import subprocess
import sys

import trio

from chatd.store.cassandra_schema import drop_keyspace
from tests.cassandra_server import fresh_keyspace
from tests.cluster import Cluster
from tests.helpers import ChatdRun, dm, open_client


async def test_chatd_run_store_copied_to_cassandra_serves_a_3_shard_cluster(tmp_path, zk, cassandra_server, nursery):
    (tmp_path / "run").mkdir()
    run = ChatdRun(tmp_path / "run")
    await run.start()
    try:
        alice = await run.api.signup_login("alice", device_id="alice-phone")
        bob = await run.api.signup_login("bob", device_id="bob-phone")
        carol = await run.api.signup_login("carol", device_id="carol-phone")
        r = await run.api.call("POST", "/v1/groups", {"name": "team", "members": [bob["user"]["id"],
                                                                                 carol["user"]["id"]]},
                               token=alice["token"])
        assert r.status == 201, r
        group, ab = r.body["channel"]["id"], dm(alice, bob)
        ca = await open_client(nursery, alice["ws_url"], alice["token"])
        cc = await open_client(nursery, carol["ws_url"], carol["token"])
        for i in range(1, 13):
            assert (await ca.send_message(ab, f"dm {i}", f"dm-{i}"))["seq"] == i
            sender = ca if i % 2 else cc
            assert (await sender.send_message(group, f"group {i}", f"g-{i}"))["seq"] == i
        await ca.ws.aclose()
        await cc.ws.aclose()
    finally:
        run.proc.send_signal(signal.SIGTERM)
        assert await run.wait_exit() == 0

    ks = fresh_keyspace()
    target = tmp_path / "cluster-store.toml"
    target.write_text(f'data_dir = "{tmp_path / "unused"}"\n' + cassandra_server.toml(ks))
    (tmp_path / "cluster").mkdir()
    cluster = Cluster(zk, tmp_path / "cluster", store_toml=cassandra_server.toml(ks))
    try:
        proc = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "chatd.cli", "store", "copy", "--from", str(run.config), "--to", str(target),
             "--checkpoint", str(tmp_path / "copy.json"), "--verify"], capture_output=True, text=True, timeout=170))
        assert proc.returncode == 0, proc.stderr
        assert "verify: ok: 2 channels, 24 messages" in proc.stdout, proc.stdout

        await cluster.start()
        # bob's phone saw dm 1..4 and group 1..7 before the move; it logs in again (same password,
        # same device) on whichever shard discovery picks
        creds = await cluster.api.login("bob", device_id="bob-phone")
        client = await open_client(nursery, creds["ws_url"], creds["token"])
        reply = await client.request({"type": "sync", "cursors": {ab: 4, group: 7}})
        assert reply["type"] == "sync", reply
        assert reply["cursors"] == {ab: 12, group: 12} and reply["heads"] == {ab: 12, group: 12}
        got = [(f["channel_id"], f["seq"], f["body"]) for f in client.pending_messages()]
        assert sorted(got) == sorted([(ab, s, f"dm {s}") for s in range(5, 13)] +
                                     [(group, s, f"group {s}") for s in range(8, 13)])
        assert len(got) == len(set(got)), "a message was delivered twice"
        for ch in (ab, group):
            seqs = [s for c, s, _ in got if c == ch]
            assert seqs == sorted(seqs), f"{ch} out of order: {seqs}"
        client.inbox[:] = [f for f in client.inbox if f.get("type") != "message"]

        # the cluster goes on from the copied heads; a resend of a pre-move message is recognised
        alice2 = await cluster.api.login("alice", device_id="alice-phone")
        ca2 = await open_client(nursery, alice2["ws_url"], alice2["token"])
        assert (await ca2.send_message(group, "after the move", "g-13"))["seq"] == 13
        again = await ca2.send_message(ab, "dm 3", "dm-3")
        assert again["type"] == "ack" and again["seq"] == 3, again
        live = await client.messages(1)
        assert [(m["channel_id"], m["seq"], m["body"]) for m in live] == [(group, 13, "after the move")]
    finally:
        cluster.stop()
        await drop_keyspace(cassandra_server.config(ks))
