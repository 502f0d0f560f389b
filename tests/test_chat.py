"""End-to-end chat over real sockets against a real chatd: 1:1, groups, devices, sync, dedup,
ordering, restart. Each test would fail without the behaviour it names."""

from __future__ import annotations

import uuid

import trio

from tests.helpers import RunningServer, dm, make_config, open_client


async def users(server, *names):
    return [await server.api.signup_login(n) for n in names]


async def test_one_to_one_roundtrip(server, nursery):
    alice, bob = await users(server, "alice", "bob")
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    cb = await open_client(nursery, bob["ws_url"], bob["token"])
    ch = dm(alice, bob)
    ack = await ca.send_message(ch, "hi bob", "m-1")
    assert ack["type"] == "ack" and ack["seq"] == 1 and ack["duplicate"] is False and ack["client_msg_id"] == "m-1"
    got = await cb.next_event("message")
    assert (got["channel_id"], got["seq"], got["body"], got["sender_id"]) == (ch, 1, "hi bob", alice["user"]["id"])
    echo = await ca.next_event("message")  # the sending device gets its echo too
    assert echo["seq"] == 1 and echo["client_msg_id"] == "m-1"
    ack2 = await cb.send_message(ch, "hi alice")
    assert ack2["seq"] == 2
    assert (await ca.next_event("message"))["body"] == "hi alice"
    r = await server.api.call("GET", f"/v1/channels/{ch}/messages", token=alice["token"])
    assert [m["body"] for m in r.body["messages"]] == ["hi bob", "hi alice"]


async def test_msgpack_subprotocol(server, nursery):
    alice, bob = await users(server, "alice", "bob")
    ca = await open_client(nursery, alice["ws_url"], alice["token"], fmt="msgpack")
    cb = await open_client(nursery, bob["ws_url"], bob["token"], fmt="json")
    ack = await ca.send_message(dm(alice, bob), "binary hello")
    assert ack["seq"] == 1
    assert (await cb.next_event("message"))["body"] == "binary hello"
    assert (await ca.next_event("message"))["body"] == "binary hello"
    # a text frame on a msgpack connection is refused with a clear error, connection stays
    await ca.send_raw('{"type":"heartbeat","id":1}')
    err = await ca.reply_to(None)
    assert err["code"] == "bad_frame"
    assert (await ca.request({"type": "heartbeat"}))["type"] == "heartbeat"


async def test_group_of_100(server, nursery):
    members = [await server.api.signup_login(f"member{i:03d}") for i in range(100)]
    owner = members[0]
    r = await server.api.call("POST", "/v1/groups", {"name": "hundred", "members": [m["user"]["id"] for m in members[1:]]},
                              token=owner["token"])
    assert r.status == 201, r
    ch = r.body["channel"]["id"]
    assert len(r.body["channel"]["members"]) == 100
    clients = [await open_client(nursery, m["ws_url"], m["token"]) for m in members]
    for i in range(3):
        ack = await clients[i * 7].send_message(ch, f"hello {i}")
        assert ack["seq"] == i + 1
    for c in clients:
        got = await c.messages(3)
        assert [(m["seq"], m["body"]) for m in got] == [(1, "hello 0"), (2, "hello 1"), (3, "hello 2")]


async def test_group_of_1000_default_cap(server, nursery):
    """The default cap (limits.max_group_members) is 1,000, the owner included: a group of 1,000
    is made, a 1,001st member is refused, and a message reaches every connected member once, in
    order (100 of them connected; the other 900 are offline)."""
    limiter = trio.CapacityLimiter(8)
    online: list = [None] * 100  # these sign up and log in; the 900 others never log in: made in the store

    async def sign_up(i):
        async with limiter:
            online[i] = await server.api.signup_login(f"k{i:04d}")
    async with trio.open_nursery() as signups:
        for i in range(100):
            signups.start_soon(sign_up, i)
    offline = [await server.node.store.create_user(f"o{i:04d}", "unused-hash", f"o{i:04d}", 1.0) for i in range(901)]
    owner, extra = online[0], offline[900]
    ids = [m["user"]["id"] for m in online[1:]] + [u.id for u in offline[:900]]
    r = await server.api.call("POST", "/v1/groups", {"name": "thousand", "members": ids}, token=owner["token"])
    assert r.status == 201, r
    ch = r.body["channel"]["id"]
    assert len(r.body["channel"]["members"]) == 1000
    r = await server.api.call("POST", f"/v1/channels/{ch}/members", {"user_id": extra.id}, token=owner["token"])
    assert r.status == 409 and r.body["error"]["code"] == "group_full", r
    clients = [await open_client(nursery, m["ws_url"], m["token"]) for m in online]
    for i in range(3):
        ack = await clients[i].send_message(ch, f"hello {i}")
        assert ack["seq"] == i + 1
    for c in clients:
        got = await c.messages(3)
        assert [(m["seq"], m["body"]) for m in got] == [(1, "hello 0"), (2, "hello 1"), (3, "hello 2")]
        assert not c.pending_messages()  # once
    r = await server.api.call("GET", f"/v1/channels/{ch}/messages?limit=10", token=online[99]["token"])
    assert [m["body"] for m in r.body["messages"]] == ["hello 0", "hello 1", "hello 2"]
    assert await server.node.store.head_seq(ch) == 3


async def test_multi_device(server, nursery):
    alice, bob = await users(server, "alice", "bob")
    alice2 = await server.api.login("alice")
    assert alice2["device_id"] != alice["device_id"]
    a1 = await open_client(nursery, alice["ws_url"], alice["token"])
    a2 = await open_client(nursery, alice2["ws_url"], alice2["token"])
    b1 = await open_client(nursery, bob["ws_url"], bob["token"])
    ch = dm(alice, bob)
    await a1.send_message(ch, "from phone")
    for c in (a1, a2, b1):
        m = await c.next_event("message")
        assert m["body"] == "from phone" and m["seq"] == 1
    # exactly once per device
    await b1.send_message(ch, "second")
    for c in (a1, a2, b1):
        assert (await c.next_event("message"))["seq"] == 2
        assert c.pending_messages() == []
    # logging in again with a known device id keeps that device
    again = await server.api.login("alice", device_id=alice2["device_id"])
    assert again["device_id"] == alice2["device_id"]


async def test_offline_then_sync(server, nursery):
    alice, bob = await users(server, "alice", "bob")
    ch = dm(alice, bob)
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    for i in range(1, 21):
        assert (await ca.send_message(ch, f"m{i}"))["seq"] == i
    # bob comes online and syncs from 0 with auth
    cb = await open_client(nursery, bob["ws_url"], bob["token"], cursors={ch: 0})
    got = await cb.messages(20)
    assert [m["seq"] for m in got] == list(range(1, 21))
    reply = await cb.reply_to(cb.auth_id)
    assert reply["type"] == "sync" and reply["cursors"] == {ch: 20} and reply["heads"] == {ch: 20}
    # live messages continue with no gap and no duplicate
    await ca.send_message(ch, "m21")
    assert (await cb.next_event("message"))["seq"] == 21
    # a second device catching up from 15 with a sync frame gets 16..21 only
    bob2 = await server.api.login("bob")
    cb2 = await open_client(nursery, bob2["ws_url"], bob2["token"])
    sync = await cb2.request({"type": "sync", "cursors": {ch: 15}})
    assert sync["cursors"] == {ch: 21}
    assert [m["seq"] for m in cb2.pending_messages()] == [16, 17, 18, 19, 20, 21]
    # syncing a channel you are not in is reported, not served
    carol = (await users(server, "carol"))[0]
    other = dm(alice, carol)
    sync = await cb2.request({"type": "sync", "cursors": {other: 0}})
    assert sync["errors"] == {other: "not_member"}


async def test_resend_is_deduplicated(server, nursery):
    alice, bob = await users(server, "alice", "bob")
    ch = dm(alice, bob)
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    cb = await open_client(nursery, bob["ws_url"], bob["token"])
    first = await ca.send_message(ch, "once", "same-id")
    again = await ca.send_message(ch, "once", "same-id")
    assert first["seq"] == again["seq"] == 1
    assert first["duplicate"] is False and again["duplicate"] is True
    # even from a fresh connection after a "lost ack"
    ca2 = await open_client(nursery, alice["ws_url"], alice["token"])
    third = await ca2.send_message(ch, "once", "same-id")
    assert third["seq"] == 1 and third["duplicate"] is True
    # concurrent resends of one id collapse into one message
    cmid = str(uuid.uuid4())
    async with trio.open_nursery() as n:
        acks = []

        async def send():
            acks.append(await ca.send_message(ch, "burst", cmid))
        for _ in range(5):
            n.start_soon(send)
    assert {a["seq"] for a in acks} == {2} and sum(not a["duplicate"] for a in acks) == 1
    assert [m["seq"] for m in await cb.messages(2)] == [1, 2]
    # one delivery for the collapsed burst: the next message (fanned out after every resend was
    # answered, on the same path) is the next frame bob gets
    assert (await ca.send_message(ch, "after the burst"))["seq"] == 3
    assert [m["seq"] for m in await cb.messages(1)] == [3] and cb.pending_messages() == []
    r = await server.api.call("GET", f"/v1/channels/{ch}/messages", token=bob["token"])
    assert [m["seq"] for m in r.body["messages"]] == [1, 2, 3]


async def test_concurrent_senders_keep_one_order(server, nursery):
    people = [await server.api.signup_login(f"racer{i}") for i in range(6)]
    r = await server.api.call("POST", "/v1/groups", {"name": "race", "members": [p["user"]["id"] for p in people[1:]]},
                              token=people[0]["token"])
    ch = r.body["channel"]["id"]
    clients = [await open_client(nursery, p["ws_url"], p["token"]) for p in people]
    per_sender = 40
    acks: dict[int, list[int]] = {i: [] for i in range(5)}

    async def blast(i):
        c = clients[i]
        rids = []
        for k in range(per_sender):  # pipelined: all sent before any ack is awaited
            rid = f"s{i}-{k}"
            rids.append(rid)
            await c.send({"type": "send", "id": rid, "channel_id": ch, "client_msg_id": rid, "body": f"{i}:{k}"})
        for rid in rids:
            acks[i].append((await c.reply_to(rid))["seq"])

    async with trio.open_nursery() as n:
        for i in range(5):
            n.start_soon(blast, i)
    total = 5 * per_sender
    all_seqs = sorted(s for v in acks.values() for s in v)
    assert all_seqs == list(range(1, total + 1))  # every seq given exactly once
    for c in clients:
        got = await c.messages(total)
        assert [m["seq"] for m in got] == list(range(1, total + 1))
        # each sender's own messages keep their send order
        for i in range(5):
            mine = [int(m["body"].split(":")[1]) for m in got if m["body"].startswith(f"{i}:")]
            assert mine == list(range(per_sender))


async def test_restart_keeps_everything(server, nursery):
    alice, bob = await users(server, "alice", "bob")
    ch = dm(alice, bob)
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    for i in range(10):
        await ca.send_message(ch, f"before {i}", f"c{i}")
    r = await server.api.call("POST", "/v1/groups", {"name": "g", "members": [bob["user"]["id"]]}, token=alice["token"])
    group = r.body["channel"]["id"]
    await ca.request({"type": "read", "channel_id": ch, "seq": 4})
    await server.restart()
    await ca.wait_closed()
    # the old token still works (the secret is kept in the data dir), history is intact
    r = await server.api.call("GET", f"/v1/channels/{ch}/messages?limit=100", token=alice["token"])
    assert r.status == 200 and [m["body"] for m in r.body["messages"]] == [f"before {i}" for i in range(10)]
    r = await server.api.call("GET", "/v1/channels", token=bob["token"])
    by_id = {c["id"]: c for c in r.body["channels"]}
    assert by_id[ch]["last_seq"] == 10 and by_id[group]["kind"] == "group"
    r = await server.api.call("GET", "/v1/channels", token=alice["token"])
    assert {c["id"]: c["unread"] for c in r.body["channels"]}[ch] == 6
    relog = await server.api.login("alice")
    ca = await open_client(nursery, relog["ws_url"], alice["token"])
    # sequence continues, dedup survives the restart
    assert (await ca.send_message(ch, "after", "c-after"))["seq"] == 11
    again = await ca.send_message(ch, "before 3", "c3")
    assert again["seq"] == 4 and again["duplicate"] is True


async def test_auth_waits_for_the_shards_view(server, nursery, monkeypatch):
    """A shard reachable before it has read its view (a cluster shard is discoverable a moment
    before) must not attach sessions that no home shard knows of: auth waits for the view, and
    answers ``unavailable`` + close 1013 if none comes."""
    from chatd.shard import router as router_mod
    a = await server.api.signup_login("early1")
    disc = server.node.discovery
    (info,) = disc.view.shards.values()
    await disc.unregister()
    returned = []

    async def back():
        await trio.sleep(0.5)  # the shard without a view for 0.5 s is the point: auth must wait it out
        returned.append(True)
        await disc.register(info)
    nursery.start_soon(back)
    ca = await open_client(nursery, a["ws_url"], a["token"])
    assert returned, "auth answered while the shard had no view"
    assert (await ca.request({"type": "heartbeat"}))["type"] == "heartbeat"

    monkeypatch.setattr(router_mod, "VIEW_WAIT_S", 0.5)
    await disc.unregister()
    cb = await open_client(nursery, a["ws_url"])
    reply = await cb.request({"type": "auth", "token": a["token"]})
    assert reply["type"] == "error" and reply["code"] == "unavailable"
    assert (await cb.wait_closed()).code == 1013
    await disc.register(info)


async def test_send_on_a_warm_channel_spawns_no_task(server, nursery):
    """issue 13: once a channel's members and head are known here, a send is queued to the store
    from the reader and answered from the store's completion -- no task per send -- and every
    ack, delivery and order guarantee holds all the same (a burst, so sends overlap)."""
    alice, bob = await users(server, "alice", "bob")
    ch = dm(alice, bob)
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    cb = await open_client(nursery, bob["ws_url"], bob["token"])
    assert (await ca.send_message(ch, "warm-up"))["seq"] == 1  # loads members and the head
    spawned = []

    class Spawns(trio.abc.Instrument):
        def task_spawned(self, task):
            spawned.append(task.name)

    trio.lowlevel.add_instrument(inst := Spawns())
    try:
        acks = []

        async def send(i):
            acks.append(await ca.send_message(ch, f"m{i}", f"id-{i}"))
        async with trio.open_nursery() as n:
            for i in range(20):
                n.start_soon(send, i)
    finally:
        trio.lowlevel.remove_instrument(inst)
    assert [n for n in spawned if "_on_send" in n] == []
    assert sorted(a["seq"] for a in acks) == list(range(2, 22)) and not any(a["duplicate"] for a in acks)
    got = await cb.messages(21)
    assert [m["seq"] for m in got] == list(range(1, 22))


async def test_warm_send_on_a_stuck_store_is_answered_unavailable_then_dedups(nursery, tmp_path):
    """The task-free send path keeps the answer deadline: with the database's write lock held by
    another connection (the store's commit waits), a send on a warm channel is answered
    ``unavailable`` within ``limits.send_answer_s``; once the lock is released the write commits,
    its late ack is dropped, and the resend with the same client_msg_id gets the original seq."""
    import sqlite3

    cfg = make_config(tmp_path, send_answer_s=0.5)
    server = await RunningServer(nursery, cfg).start()
    alice, bob = await users(server, "alice", "bob")
    ch = dm(alice, bob)
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    assert (await ca.send_message(ch, "warm-up", "w"))["seq"] == 1
    db = sqlite3.connect(str(cfg.resolve(cfg.store.sqlite_path)), isolation_level=None)
    db.execute("BEGIN IMMEDIATE")  # the write lock
    try:
        t0 = trio.current_time()
        await ca.send({"type": "send", "id": "stuck", "channel_id": ch, "client_msg_id": "s", "body": "x"})
        reply = await ca._wait_for(lambda f: f.get("id") == "stuck", 10)
        assert reply["type"] == "error" and reply["code"] == "unavailable" and reply["retry_after_ms"] > 0
        assert trio.current_time() - t0 < 0.5 + 0.5
    finally:
        db.execute("ROLLBACK")
        db.close()
    again = await ca.send_message(ch, "x", "s")
    assert again["seq"] == 2 and again["duplicate"] is True
    await trio.sleep(0.3)  # a dropped ack shows nothing: that none arrives within 0.3 s is the check
    assert [f for f in ca.inbox if f.get("id") == "stuck"] == []  # the late ack was dropped
    await server.stop()
