"""Cluster mode with the real thing: Debian's ZooKeeper, shards and an API server as separate OS
processes, direct TCP links. Cross-shard 1:1 and groups, devices on several shards, stale-view
frames, link loss, ZooKeeper session loss, and kill -9 failover with exactly-once delivery."""

from __future__ import annotations

import signal
import uuid

import msgspec
import pytest
import trio
from kazoo.client import KazooClient

from chatd.discovery.view import ShardInfo, View
from chatd.protocol import link as lp
from tests.cluster import Cluster, Device, ZooKeeper, send_until_acked, settle, zookeeper_available
from tests.faults import keep_connected, stored_messages
from tests.helpers import (TEST_LINK_SECRET, dm, eventually, free_port, open_client,
                           users_on_distinct_homes)

pytestmark = pytest.mark.skipif(not zookeeper_available(),
                                reason="ZooKeeper not installed (apt-get install zookeeper); .ci/run installs it")


async def test_cross_shard_dm_group_and_devices(cluster, nursery):
    people = await users_on_distinct_homes(cluster, "x", 3, 6)
    homes = {p["shard_id"] for p in people}
    assert homes == {"s1", "s2", "s3"}
    alice, bob = people[0], next(p for p in people if p["shard_id"] != people[0]["shard_id"])
    r = await cluster.api.call("POST", "/v1/groups", {"name": "spread", "members": [p["user"]["id"] for p in people[1:]]},
                               token=alice["token"])
    group = r.body["channel"]["id"]
    ch = dm(alice, bob)
    devices = [Device(cluster, p, p["user"]["username"]) for p in people]
    # alice's second device lands on a shard that is not her home: it still works
    other = next(s for s in cluster.shard_ids if s != alice["shard_id"])
    alice2 = Device(cluster, await cluster.api.login(alice["user"]["username"]), "alice-2")
    for d in devices + [alice2]:
        d.follow(group)
        if d.user_id in (alice["user"]["id"], bob["user"]["id"]):
            d.follow(ch)
        await d.connect(nursery, cluster.ws_url(other) if d is alice2 else None)
    # sends from every shard, DM and group
    for i, d in enumerate(devices):
        ack = await d.client.send_message(group, f"g{i}")
        assert ack["type"] == "ack", ack
    a_dev = devices[0]
    b_dev = next(d for d in devices if d.user_id == bob["user"]["id"])
    for i in range(5):
        assert (await a_dev.client.send_message(ch, f"a{i}"))["type"] == "ack"
        assert (await b_dev.client.send_message(ch, f"b{i}"))["type"] == "ack"
    ack = await alice2.client.send_message(ch, "from the far shard")
    assert ack["seq"] == 11
    await settle(devices + [alice2], {group: len(devices), ch: 11})
    for d in devices + [alice2]:
        assert d.anomalies == []
        assert d.received[group] == list(range(1, len(devices) + 1))
        if ch in d.cursors:
            assert d.received[ch] == list(range(1, 12))
    # a read receipt from alice's far device reaches her other device and bob (coalesced receipts,
    # issue 21: to every device of the members, wherever they are connected)
    reply = await alice2.client.request({"type": "read", "channel_id": ch, "seq": 11})
    assert reply["seq"] == 11
    for d in (a_dev, b_dev):
        event = await d.client.next_event("receipts")
        assert event == {"type": "receipts", "channel_id": ch,
                         "cursors": {str(alice["user"]["id"]): {"delivered": 11, "read": 11}}}
    # what must NOT arrive has no event to wait for: nothing extra (exactly once)
    await trio.sleep(0.5)
    for d in devices + [alice2]:
        assert d.absorb() == 0


async def raw_link(cluster, zk_hosts, shard_id, secret=TEST_LINK_SECRET, peer_id="test-peer"):
    zkc = KazooClient(hosts=zk_hosts)
    await trio.to_thread.run_sync(zkc.start)
    try:
        data, _ = await trio.to_thread.run_sync(zkc.get, f"{cluster.root}/shards/{shard_id}")
    finally:
        await trio.to_thread.run_sync(zkc.stop)
    info = ShardInfo.from_json(data)
    host, _, port = info.link_addr.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    codec = lp.LinkCodec(1 << 22)

    async def read_frame():
        with trio.fail_after(10):
            while (f := codec.next_frame()) is None:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return None
                codec.receive_data(chunk)
            return f

    async def read():  # the frame as the map it is on the wire
        f = await read_frame()
        return None if f is None else msgspec.to_builtins(f, builtin_types=(bytes,))
    chal = await read_frame()
    nonce = lp.new_nonce()
    await stream.send_all(codec.encode(lp.hello(secret, peer_id, "shard", chal, nonce)))
    return stream, codec, read


@pytest.fixture
async def patient_cluster(zk, tmp_path):
    """Links that tolerate 6 s of silence: the test's raw link peer sends no heartbeats."""
    c = Cluster(zk, tmp_path, heartbeat_s=2.0)
    try:
        await c.start()
        yield c
    finally:
        c.stop()


async def test_stale_view_frames_are_refused_or_rerouted(patient_cluster, zk, nursery):
    cluster = patient_cluster
    a, b = await cluster.api.signup_login("stale1"), await cluster.api.signup_login("stale2")
    ch = dm(a, b)
    view = View(0, {s: None for s in cluster.shard_ids})
    owner = view.owner_of(ch)
    not_owner = next(s for s in cluster.shard_ids if s != owner)
    stream, codec, read = await raw_link(cluster, zk.hosts, not_owner)
    assert (await read())["t"] == "welcome"
    frame = {"t": "send", "rid": 1, "view": 1, "ch": ch, "u": a["user"]["id"], "cmid": "stale-1", "body": "old view"}
    await stream.send_all(codec.encode(frame))
    while (reply := await read())["t"] != "reply":
        pass
    assert reply["err"]["code"] == "stale_view" and reply["err"]["view"] >= 3
    # routed correctly, even under an old view number, it is applied once; a repeat is a duplicate
    stream2, codec2, read2 = await raw_link(cluster, zk.hosts, owner, peer_id="test-peer-2")
    assert (await read2())["t"] == "welcome"
    for rid in (2, 3):
        await stream2.send_all(codec2.encode({**frame, "rid": rid}))
        while (reply := await read2())["t"] != "reply":
            pass
        assert reply["ok"][1] == 1 and reply["dup"] is (rid == 3)
    r = await cluster.api.call("GET", f"/v1/channels/{ch}/messages", token=a["token"])
    assert [m["body"] for m in r.body["messages"]] == ["old view"]
    # a peer without the cluster secret is refused; so is an oversized frame
    bad, _, bad_read = await raw_link(cluster, zk.hosts, owner, secret="wrong", peer_id="intruder")
    assert await bad_read() is None
    stream3, codec3, read3 = await raw_link(cluster, zk.hosts, owner, peer_id="test-peer-3")
    assert (await read3())["t"] == "welcome"
    await stream3.send_all((1 << 30).to_bytes(4, "big") + b"x" * 10)
    while (f := await read3()) is not None:
        assert f["t"] in ("ping", "resync")
    for s in (stream, stream2, bad, stream3):
        await s.aclose()
    assert all(p.poll() is None for p in cluster.procs.values())


async def test_a_frame_routed_by_a_newer_view_waits_for_that_view(patient_cluster, zk, nursery):
    """A peer's ZooKeeper watch can fire before ours: a frame routed under a view we have not
    read yet is held until we have it (and we re-read at once), then routed by it."""
    cluster = patient_cluster
    a, b = await cluster.api.signup_login("newer1"), await cluster.api.signup_login("newer2")
    home = a["shard_id"]
    ca = await open_client_for(nursery, a)
    v = (await cluster.admin(home).call("GET", "/healthz")).body["view"]
    stream, codec, read = await raw_link(cluster, zk.hosts, home)
    assert (await read())["t"] == "welcome"
    event = {"type": "typing", "channel_id": dm(a, b), "user_id": b["user"]["id"]}
    await stream.send_all(codec.encode({"t": "deliver", "view": v + 1, "e": event, "u": [a["user"]["id"]]}))
    await trio.sleep(0.5)  # a frame held shows nothing: that nothing is delivered within 0.5 s is the check
    assert [f for f in ca.inbox if f.get("type") == "typing"] == []  # held: no view v+1 here yet
    # a shard joins (a placeholder znode, keeping a's home): the view moves to v+1, the frame goes on
    shards = {s: None for s in cluster.shard_ids}
    extra = next(f"zz{i}" for i in range(100) if View(0, {**shards, f"zz{i}": None}).home_of(a["user"]["id"]) == home)
    zkc = KazooClient(hosts=zk.hosts)
    await trio.to_thread.run_sync(zkc.start)
    try:
        info = ShardInfo(extra, "ws://127.0.0.1:9/", "")
        await trio.to_thread.run_sync(lambda: zkc.create(f"{cluster.root}/shards/{extra}", info.to_json(), ephemeral=True))
        assert await ca.next_event("typing", timeout=4) == event
    finally:
        await trio.to_thread.run_sync(zkc.stop)
    await stream.aclose()


@pytest.fixture
async def slow_expiry_cluster(zk, tmp_path):
    c = Cluster(zk, tmp_path, session_timeout_s=6.0, heartbeat_s=0.2)
    try:
        await c.start()
        yield c
    finally:
        c.stop()


async def test_link_loss_and_reconnect(slow_expiry_cluster, nursery):
    cluster = slow_expiry_cluster
    people = await users_on_distinct_homes(cluster, "ll", 3, 6)
    r = await cluster.api.call("POST", "/v1/groups", {"name": "links", "members": [p["user"]["id"] for p in people[1:]]},
                               token=people[0]["token"])
    group = r.body["channel"]["id"]
    devices = [Device(cluster, p, p["user"]["username"]) for p in people]
    for d in devices:
        d.follow(group)
        await d.connect(nursery)
    # freeze a shard that does not own the group (sends keep being acked by the owner meanwhile)
    owner = View(0, {s: None for s in cluster.shard_ids}).owner_of(group)
    frozen = next(s for s in cluster.shard_ids if s != owner)
    senders = [d for d in devices if d.creds["shard_id"] != frozen]
    await senders[0].client.send_message(group, "before")
    # freeze it until its peers declare its links dead (3 heartbeats), not its ZK session
    peers = [s for s in cluster.shard_ids if s != frozen]
    downs = {s: cluster.log_text(s).count(f"link down: {s} <-> {frozen}") for s in peers}
    ups = {s: cluster.log_text(s).count(f"link up: {s} <-> {frozen}") for s in peers}
    cluster.kill(frozen, signal.SIGSTOP)
    await eventually(lambda: all(cluster.log_text(s).count(f"link down: {s} <-> {frozen}") > downs[s] for s in peers),
                     timeout=5)
    sent = 1
    for i in range(4):
        ack = await senders[i % len(senders)].client.send_message(group, f"during {i}")
        if ack["type"] == "ack":
            sent += 1
    cluster.kill(frozen, signal.SIGCONT)
    for i in range(3):  # as a client does: an 'unavailable' is resent with the same client_msg_id
        ack = await send_until_acked(senders[i % len(senders)].client, group, f"after {i}")
        sent += 1
    r = await cluster.api.call("GET", f"/v1/channels/{group}/messages?limit=100&after=0", token=people[0]["token"])
    head = r.body["messages"][-1]["seq"]
    assert [m["seq"] for m in r.body["messages"]] == list(range(1, head + 1))
    await settle(devices, {group: head}, timeout=30)
    for d in devices:
        assert d.anomalies == [] and d.received[group] == list(range(1, head + 1)), d.name
    # the links to it came back
    await eventually(lambda: all(cluster.log_text(s).count(f"link up: {s} <-> {frozen}") > ups[s] for s in peers),
                     timeout=10)


async def test_zookeeper_session_loss_blocks_writes(tmp_path, nursery):
    zk = ZooKeeper(tmp_path / "own-zk")  # this test freezes ZooKeeper: its own server
    cluster = Cluster(zk, tmp_path, n=2, session_timeout_s=1.0)
    try:
        await cluster.start()
        a = await cluster.api.signup_login("zkloss1")
        b = await cluster.api.signup_login("zkloss2")
        ch = dm(a, b)
        da = Device(cluster, a, "a")
        await da.connect(nursery)
        assert (await da.client.send_message(ch, "ok before", "z1"))["seq"] == 1
        zk.pause()

        async def refused():  # once the shards notice, sends are refused, not silently stored
            reply = await da.client.send_message(ch, "during", f"z-{uuid.uuid4()}")
            return reply if reply["type"] == "error" else None
        assert (await eventually(refused))["code"] == "unavailable"
        zk.resume()
        await send_until_acked(da.client, ch, "after", timeout=30, cmid="z-after")  # re-registered: writes again
        r = await cluster.api.call("GET", f"/v1/channels/{ch}/messages?after=0", token=a["token"])
        seqs = [m["seq"] for m in r.body["messages"]]
        assert seqs == list(range(1, len(seqs) + 1))
        assert "refusing writes until registered again" in cluster.log_text("s1", "s2")
    finally:
        cluster.stop()
        zk.stop()


async def test_processes_stop_on_sigterm_with_zookeeper_gone(tmp_path):
    """Operators stop ZooKeeper first at times: SIGTERM must still stop shards and API servers
    (kazoo calls blocked on a dead ensemble are abandoned, not waited for)."""
    zk = ZooKeeper(tmp_path / "own-zk")
    cluster = Cluster(zk, tmp_path, n=2, session_timeout_s=4.0)
    try:
        await cluster.start()
        lost = {name: cluster.log_text(name).count("zookeeper connection state: SUSPENDED") for name in cluster.procs}
        zk.stop()
        # the clients notice and start reconnecting
        await eventually(lambda: all(cluster.log_text(name).count("zookeeper connection state: SUSPENDED") > n
                                     for name, n in lost.items()))
        for p in cluster.procs.values():
            p.terminate()
        await eventually(lambda: all(p.poll() is not None for p in cluster.procs.values()), timeout=30)
        assert all(p.returncode == 0 for p in cluster.procs.values()), \
            {name: p.returncode for name, p in cluster.procs.items()}
    finally:
        cluster.stop()
        zk.stop()


async def test_kill_9_failover_exactly_once(cluster, nursery):
    people = await users_on_distinct_homes(cluster, "fo", 3, 9)
    owner = people[0]
    r = await cluster.api.call("POST", "/v1/groups", {"name": "failover", "members": [p["user"]["id"] for p in people[1:]]},
                               token=owner["token"])
    group = r.body["channel"]["id"]
    pairs = [(people[i], people[i + 1]) for i in range(0, 8, 2)]
    devices = {p["user"]["id"]: Device(cluster, p, p["user"]["username"]) for p in people}
    tokens = {group: owner["token"]}
    for d in devices.values():
        d.follow(group)
    for a, b in pairs:
        devices[a["user"]["id"]].follow(dm(a, b))
        devices[b["user"]["id"]].follow(dm(a, b))
        tokens[dm(a, b)] = a["token"]
    for d in devices.values():
        await d.connect(nursery)
    assert {d.creds["shard_id"] for d in devices.values()} == {"s1", "s2", "s3"}

    acked: dict[str, tuple[str, int]] = {}  # client_msg_id -> (channel, seq) from the ack
    victim = "s2"
    kill_now = trio.Event()
    per_sender = 25

    async def sender(d: Device, targets: list[str]):
        for i in range(per_sender):
            ch = targets[i % len(targets)]
            cmid = f"{d.name}-{i}"
            while True:  # resend with the same client_msg_id until acked
                try:
                    reply = await d.client.send_message(ch, f"{d.name} {i}", cmid)
                except Exception:  # connection gone: keep_connected replaces d.client
                    reply = None
                if reply is not None and reply["type"] == "ack":
                    acked[cmid] = (ch, reply["seq"])
                    break
                if reply is not None:
                    assert reply["type"] == "error" and reply["code"] == "unavailable", reply
                await trio.sleep(0.2)  # a client's resend backoff (unavailable, or no connection yet)
            if d is devices[owner["user"]["id"]] and i == 8:
                kill_now.set()

    async with trio.open_nursery() as n:
        for d in devices.values():
            n.start_soon(keep_connected, d, nursery)

        async def killer():
            await kill_now.wait()
            cluster.kill(victim)
        n.start_soon(killer)
        async with trio.open_nursery() as senders:
            for a, b in pairs:
                senders.start_soon(sender, devices[a["user"]["id"]], [group, dm(a, b)])
            senders.start_soon(sender, devices[people[8]["user"]["id"]], [group])
        assert cluster.procs[victim].poll() is not None  # it really died under traffic
        # the store: gap-free per channel, no message twice, every ack names what was stored
        heads = {}
        for ch, token in tokens.items():
            stored = await stored_messages(cluster, ch, token)
            seqs = [m["seq"] for m in stored]
            assert seqs == list(range(1, len(seqs) + 1)), ch
            cmids = [m["client_msg_id"] for m in stored]
            assert len(set(cmids)) == len(cmids), ch
            for m in stored:
                assert acked.get(m["client_msg_id"], (ch, m["seq"])) == (ch, m["seq"])
            heads[ch] = len(seqs)
        assert len(acked) == 5 * per_sender
        assert sum(heads.values()) == len(acked)
        # every device ends with every message of its channels, exactly once, in order
        await settle(list(devices.values()), heads, timeout=40)
        n.cancel_scope.cancel()
    for d in devices.values():
        d.absorb()
        assert d.anomalies == [], d.anomalies
        for ch in d.cursors:
            assert d.received[ch] == list(range(1, heads[ch] + 1)), (d.name, ch)


async def test_fan_out_is_one_frame_per_destination_shard(cluster, nursery):
    """Group members homed on one other shard cost the owner one 'deliver' frame per message."""
    people = await users_on_distinct_homes(cluster, "fan", 3, 12)
    while min(sum(1 for p in people if p["shard_id"] == s) for s in cluster.shard_ids) < 2:
        people.append(await cluster.api.signup_login(f"fanuser{len(people)}"))  # ids are random on Cassandra
        assert len(people) < 60
    view = View(0, {s: None for s in cluster.shard_ids})
    for attempt in range(40):
        r = await cluster.api.call("POST", "/v1/groups", {"name": f"fan{attempt}",
                                                          "members": [p["user"]["id"] for p in people[1:]]},
                                   token=people[0]["token"])
        group = r.body["channel"]["id"]
        owner = view.owner_of(group)
        remote_homes = {p["shard_id"] for p in people} - {owner}
        counts = {h: sum(1 for p in people if p["shard_id"] == h) for h in remote_homes}
        if remote_homes and all(c >= 2 for c in counts.values()):
            break
    else:
        pytest.fail("no group with several members per remote home shard")
    clients = [await open_client_for(nursery, p) for p in people]

    async def delivers():
        text = (await cluster.admin(owner).call("GET", "/metrics")).body
        out = {}
        for line in text.splitlines():
            if line.startswith("chatd_link_frames_sent_total{") and 'type="deliver"' in line:
                peer = line.split('peer="')[1].split('"')[0]
                out[peer] = float(line.rsplit(" ", 1)[1])
        return out
    before = await delivers()
    n = 5
    for i in range(n):
        assert (await clients[0].send_message(group, f"fan {i}"))["type"] == "ack"
    for p, c in zip(people, clients):
        try:
            got = [m for m in await c.messages(n) if m["channel_id"] == group]
        except trio.TooSlowError:
            pytest.fail(f"{p['user']['username']} (home {p['shard_id']}, owner {owner}) got {c.inbox}")
        assert [m["body"] for m in got] == [f"fan {i}" for i in range(n)]
    after = await delivers()
    for home in remote_homes:  # exactly one frame per message per home shard, whatever its member count
        assert after.get(home, 0) - before.get(home, 0) == n, (home, counts[home], before, after)
    health = await cluster.admin(owner).call("GET", "/healthz")
    assert health.status == 200 and health.body["shard_id"] == owner and health.body["status"] == "ok"


async def open_client_for(nursery, creds):
    return await open_client(nursery, creds["ws_url"], creds["token"])


async def test_membership_changes_reach_every_shard(cluster, nursery):
    people = await users_on_distinct_homes(cluster, "mem", 3, 4)
    alice, bob = people[0], next(p for p in people if p["shard_id"] != people[0]["shard_id"])
    r = await cluster.api.call("POST", "/v1/groups", {"name": "m", "members": [bob["user"]["id"]]}, token=alice["token"])
    group = r.body["channel"]["id"]
    cb = await open_client_for(nursery, bob)
    assert (await cb.send_message(group, "I am in"))["type"] == "ack"  # the owner has cached the members now
    r = await cluster.api.call("DELETE", f"/v1/channels/{group}/members/{bob['user']['id']}", token=alice["token"])
    assert r.body["removed"] is True

    async def refused():  # the API's invalidation travels over links; it is not instantaneous
        reply = await cb.send_message(group, "still in?")
        return reply if reply["type"] == "error" else None
    assert (await eventually(refused, timeout=10))["code"] == "not_member"


async def test_a_removed_member_reads_nothing_after_a_shard_joins(cluster, nursery):
    """Issue 20, H1, as reported: owner removes a member and sends; then a shard joins (a view
    change: every session resyncs its cursors); the removed member must not receive it."""
    people = await users_on_distinct_homes(cluster, "rm", 2, 3)
    alice = people[0]
    bob = next(p for p in people if p["shard_id"] != alice["shard_id"])  # homed on another shard
    carol = next(p for p in people if p is not alice and p is not bob)
    r = await cluster.api.call("POST", "/v1/groups", {"name": "rm", "members": [bob["user"]["id"], carol["user"]["id"]]},
                               token=alice["token"])
    group = r.body["channel"]["id"]
    ca, cb, cc = [await open_client_for(nursery, p) for p in (alice, bob, carol)]
    assert (await ca.send_message(group, "before removal"))["type"] == "ack"
    assert (await cb.next_event("message"))["body"] == "before removal"  # bob's connection has a cursor
    assert (await cc.next_event("message"))["body"] == "before removal"
    r = await cluster.api.call("DELETE", f"/v1/channels/{group}/members/{bob['user']['id']}", token=alice["token"])
    assert r.body["removed"] is True
    removal = await cb.next_event("message")
    assert (removal["kind"], removal["user_id"]) == ("member_removed", bob["user"]["id"])
    assert (await cc.next_event("message"))["kind"] == "member_removed"  # carol sees the row too
    assert (await ca.send_message(group, "after removal"))["type"] == "ack"
    assert (await cc.next_event("message"))["body"] == "after removal"
    cluster.shard_ids.append("s4")
    cluster.ws_ports["s4"], cluster.http_ports["s4"] = free_port(), free_port()
    cluster.start_shard("s4")
    await cluster.wait_shards(set(cluster.shard_ids))
    # The shards resync every session 1 s after the view change and after each new link; there
    # is no event to wait for outside the shard: give them that time, twice over.
    await trio.sleep(3)
    assert (await cb.request({"type": "heartbeat"}))["type"] == "heartbeat"
    assert [m["body"] for m in cb.pending_messages() if m["channel_id"] == group] == []
    reply = await cb.request({"type": "sync", "cursors": {group: 0}})
    assert reply["errors"] == {group: "not_member"}, reply


async def test_a_frozen_owner_resumes_fenced(zk, tmp_path, nursery, store_toml):
    """SIGSTOP the owner of a channel while its own clients' sends are in flight in its store
    calls; another shard takes the channel over when the ZooKeeper session expires and acks more;
    then the old owner resumes and its in-flight writes land (or not) after the new owner's.
    The store must still hold each message once, seqs 1..H without a gap, and every ack must
    name what is stored: the store, not the frozen process, fences the old owner."""
    cluster = Cluster(zk, tmp_path, n=2, session_timeout_s=1.5, store_toml=store_toml)
    try:
        await cluster.start()
        a = await cluster.api.signup_login("fz1")
        b = await cluster.api.signup_login("fz2")
        ch = dm(a, b)
        owner = View(0, {s: None for s in cluster.shard_ids}).owner_of(ch)
        other = next(s for s in cluster.shard_ids if s != owner)
        da, db = Device(cluster, a, "a"), Device(cluster, b, "b")
        await da.connect(nursery, cluster.ws_url(other))  # routes to the owner over a link
        await db.connect(nursery, cluster.ws_url(owner))  # inside the owner's own write path
        assert (await da.client.send_message(ch, "hello", "a-0"))["type"] == "ack"
        acked: dict[str, int] = {}
        # a burst straight into the owner, frozen while it is being stored
        burst = {f"b-{i}": 1000 + i for i in range(20)}
        for cmid, rid in burst.items():
            await db.client.send({"type": "send", "id": rid, "channel_id": ch, "body": cmid, "client_msg_id": cmid})
        cluster.kill(owner, signal.SIGSTOP)
        try:
            # acked by the new owner once the frozen one's session expires (1.5 s) - on SQLite only
            # if the frozen process holds no write lock on the shared file, else after it thaws
            with trio.move_on_after(6):
                for i in range(1, 11):
                    acked[f"a-{i}"] = (await send_until_acked(da.client, ch, f"a-{i}", timeout=60,
                                                              cmid=f"a-{i}"))["seq"]
        finally:
            cluster.kill(owner, signal.SIGCONT)
        for i in range(1, 11):
            if f"a-{i}" not in acked:
                acked[f"a-{i}"] = (await send_until_acked(da.client, ch, f"a-{i}", timeout=40, cmid=f"a-{i}"))["seq"]
        # the burst: whatever the old owner answered, a client resends the rest until acked
        for cmid, rid in burst.items():
            try:
                reply = await db.client.reply_to(rid, timeout=15)
            except (trio.TooSlowError, ConnectionError):
                reply = None
            if reply is not None and reply["type"] == "ack":
                acked[cmid] = reply["seq"]

        async def reconnected() -> bool:
            try:
                await db.connect(nursery, relogin=True)
                return True
            except Exception:  # the API may hand out a shard that is re-registering
                return False
        await eventually(reconnected, timeout=60)
        for cmid in burst:
            seq = (await send_until_acked(db.client, ch, cmid, timeout=40, cmid=cmid))["seq"]
            assert acked.setdefault(cmid, seq) == seq, cmid  # a resend answers the first ack's seq
        r = await cluster.api.call("GET", f"/v1/channels/{ch}/messages?limit=500&after=0", token=a["token"])
        stored = r.body["messages"]
        assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
        cmids = [m["client_msg_id"] for m in stored]
        assert len(set(cmids)) == len(cmids) == 1 + len(acked)
        by_cmid = {m["client_msg_id"]: m["seq"] for m in stored}
        assert all(by_cmid[c] == s for c, s in acked.items())
    finally:
        cluster.stop()
