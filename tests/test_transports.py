"""The three transports as one protocol (docs/protocol.md, section 7): the same scenario gives
the same event sequence over WebSocket, SSE and long polling; SSE resumes exactly through drops
at any byte (a hypothesis test over drop points, client side and server side); long polls wake
at once, catch up from a stale cursor, answer a lost answer again and settle two concurrent
polls; presence and the per-user cap hold for HTTP devices. Real server, real sockets."""

from __future__ import annotations

import uuid

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.lifecycle import ChannelView
from chatd.shard import resume
from tests.helpers import RunningServer, dm, eventually, make_config, open_client
from tests.transports import CuttingProxy, FramesClient, PollClient, SSEClient, http_base, http_json, open_transport, parse_sse

TRANSPORTS = ("ws", "sse", "poll")


def _norm(frames, alice_id):
    return [(f["seq"], "alice" if f["sender_id"] == alice_id else "bob", f["body"]) for f in frames]


async def _scenario(server, kind: str):
    """bob on ``kind``: receive, send, go offline, come back from where he was."""
    alice = await server.api.signup_login(f"alice-{kind}")
    bob = await server.api.signup_login(f"bob-{kind}")
    ch = dm(alice, bob)
    async with trio.open_nursery() as outer:
        ca = await open_client(outer, alice["ws_url"], alice["token"])
        async with trio.open_nursery() as n:
            cb = await open_transport(n, kind, bob["ws_url"], bob["token"])
            for i in range(3):
                assert (await ca.send_message(ch, f"m{i}"))["type"] == "ack"
            got = await cb.messages(3)
            ack = await cb.send_message(ch, "from bob", "bob-1")
            assert ack["type"] == "ack" and ack["seq"] == 4, ack
            again = await cb.send_message(ch, "from bob", "bob-1")  # idempotent by client_msg_id
            assert again["seq"] == 4 and again["duplicate"] is True, again
            got += await cb.messages(1)
            resume = {"ws": {ch: 4}, "sse": getattr(cb, "last_id", None), "poll": getattr(cb, "cursor", None)}[kind]
            n.cancel_scope.cancel()  # bob goes offline
        for i in range(2):
            await ca.send_message(ch, f"offline {i}")
        async with trio.open_nursery() as n:
            if kind == "ws":
                cb = await open_client(n, bob["ws_url"], bob["token"], cursors=resume)
            elif kind == "sse":
                cb = SSEClient(http_base(bob["ws_url"]), bob["token"])
                await cb.connect(last_event_id=resume)
                n.start_soon(cb.pump)
            else:
                cb = PollClient(http_base(bob["ws_url"]), bob["token"])
                cb.cursor = resume
                while len([f for f in cb.inbox if f["type"] == "message"]) < 2:
                    cb.take(await cb.poll_once(wait_s=10))
            got += await cb.messages(2)
            # nothing more: after the sync reply (ws), the catch-up's sync event (sse), an empty poll
            if kind == "ws":
                assert not cb.pending_messages()
            elif kind == "sse":
                await cb.next_event("sync")
                assert not [f for f in cb.inbox if f["type"] == "message"]
            else:
                assert (await cb.poll_once(wait_s=0))["events"] == []
            n.cancel_scope.cancel()
        outer.cancel_scope.cancel()
    return _norm(got, alice["user"]["id"])


async def test_the_same_scenario_gives_the_same_events_on_every_transport(server):
    results = {kind: await _scenario(server, kind) for kind in TRANSPORTS}
    expected = [(1, "alice", "m0"), (2, "alice", "m1"), (3, "alice", "m2"), (4, "bob", "from bob"),
                (5, "alice", "offline 0"), (6, "alice", "offline 1")]
    assert results == {kind: expected for kind in TRANSPORTS}


# ---- SSE resume through drops ------------------------------------------------------------------
async def _stream_through(base_url, direct_base, token, start_id, want: int, server_drops: list, shard):
    """Read an SSE stream through a cutting proxy, reconnecting with Last-Event-ID after every
    drop (a proxy cut at a byte offset; a server-side end after k events) until ``want``
    messages arrived; the messages as received."""
    client = SSEClient(base_url, token)
    client.last_id = start_id
    got = []
    with trio.fail_after(60):
        while len(got) < want:
            try:
                await client.connect(last_event_id=client.last_id)
            except Exception:  # noqa: BLE001 - cut inside the answer's head: just reconnect
                continue
            drop_after = server_drops.pop(0) if server_drops else None
            seen = 0
            buf = b""

            while True:
                try:
                    c = await client.stream.chunk()
                except Exception:  # noqa: BLE001 - cut mid-body (h11: incomplete body)
                    c = None
                if c is None:
                    break
                buf += c
                events, buf = parse_sse(buf)
                for ev_id, frame in events:
                    if ev_id is not None:
                        client.last_id = ev_id
                    if frame["type"] == "ready":
                        client.session = frame["session"]
                    if frame["type"] == "message":
                        got.append(frame)
                    seen += 1
                    if drop_after is not None and seen == drop_after:
                        hs = shard.http.by_sid.get(client.session)
                        if hs is not None:
                            hs.end(1013, "test: the server drops the stream")
                if len(got) >= want:
                    break
            await client.stream.aclose()
        # and nothing after them: a last resume's catch-up (straight to the shard: no proxy cuts
        # left over) is empty up to its sync event
        client.base = direct_base
        await client.connect(last_event_id=client.last_id)
        buf, extra = b"", []
        while not any(f["type"] == "sync" for f in extra):
            buf += await client.stream.chunk()
            events, buf = parse_sse(buf)
            extra += [f for _, f in events]
        await client.stream.aclose()
        got += [f for f in extra if f["type"] == "message"]
    return got


async def test_sse_resumes_exactly_through_drops_at_any_point(server):
    """Drops at random byte offsets (client side: the connection is cut mid-event) and at random
    events (server side: the session ends): reconnecting with Last-Event-ID gives exactly the
    missed messages, once, in order -- while messages keep being sent. Hypothesis chooses the
    drop points; every example runs against the one server of this test (hypothesis drives the
    examples from a worker thread, each one back in this trio run)."""
    @settings(max_examples=30, deadline=None, database=None)
    @given(n=st.integers(1, 25), cuts=st.lists(st.integers(1, 6000), max_size=4),
           server_drops=st.lists(st.integers(1, 12), max_size=3))
    def examples(n, cuts, server_drops):
        trio.from_thread.run(_resume_example, server, n, cuts, server_drops)

    await trio.to_thread.run_sync(examples)


async def _resume_example(server, n, cuts, server_drops):
    tag = uuid.uuid4().hex[:8]
    alice = await server.api.signup_login(f"a{tag}")
    bob = await server.api.signup_login(f"b{tag}")
    ch = dm(alice, bob)
    base = http_base(bob["ws_url"])
    async with trio.open_nursery() as nursery:
        ca = await open_client(nursery, alice["ws_url"], alice["token"])
        await ca.send_message(ch, "before")  # seq 1: bob starts after it
        ready = SSEClient(base, bob["token"])
        await ready.connect()
        await ready.pump(stop_after=1)  # the 'ready' event: its id is the start point (seq 1)
        start_id = ready.last_id
        upstream = ("127.0.0.1", server.node.shard.port)
        proxy = await nursery.start(CuttingProxy(upstream, cuts).serve)

        async def send_all():
            for i in range(n):
                await ca.send_message(ch, f"m{i}")
        nursery.start_soon(send_all)
        got = await _stream_through(f"http://127.0.0.1:{proxy.port}", base, bob["token"], start_id, n,
                                    list(server_drops), server.node.shard)
        assert [(m["seq"], m["body"]) for m in got] == [(i + 2, f"m{i}") for i in range(n)]
        nursery.cancel_scope.cancel()


# ---- long polling ---------------------------------------------------------------------------------
async def _pair(server, tag):
    alice = await server.api.signup_login(f"alice-{tag}")
    bob = await server.api.signup_login(f"bob-{tag}")
    return alice, bob, dm(alice, bob)


async def test_a_waiting_poll_returns_when_a_message_arrives(server, nursery):
    alice, bob, ch = await _pair(server, "wake")
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    pb = PollClient(http_base(bob["ws_url"]), bob["token"])
    pb.take(await pb.poll_once(wait_s=0))  # ready: the session exists, from now
    answered = trio.Event()
    box = {}

    async def waiting_poll():
        box["answer"] = await pb.poll_once(wait_s=25)
        box["at"] = trio.current_time()
        answered.set()
    nursery.start_soon(waiting_poll)
    await trio.testing.wait_all_tasks_blocked(0.05)
    assert not answered.is_set()
    ack = await ca.send_message(ch, "wake up")
    acked_at = trio.current_time()
    with trio.fail_after(5):
        await answered.wait()
    # the poll would otherwise have waited 25 s; it answered as soon as the message was stored
    assert box["at"] - acked_at < 1.0
    assert [e["seq"] for e in box["answer"]["events"] if e["type"] == "message"] == [ack["seq"]]


async def test_a_stale_cursor_gets_the_backlog_and_a_lost_answer_comes_again(server, nursery):
    alice, bob, ch = await _pair(server, "stale")
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    pb = PollClient(http_base(bob["ws_url"]), bob["token"])
    pb.take(await pb.poll_once(wait_s=0))
    first_cursor = pb.cursor
    for i in range(3):
        await ca.send_message(ch, f"m{i}")
    a1 = await pb.poll_once(wait_s=5)
    a1_msgs = [e["seq"] for e in a1["events"] if e["type"] == "message"]
    while len(a1_msgs) < 3:  # (the three may come in more than one answer)
        pb.take(a1)
        a1 = await pb.poll_once(wait_s=5)
        a1_msgs += [e["seq"] for e in a1["events"] if e["type"] == "message"]
    # a1 is "lost": polling again with the previous cursor answers it again, identically
    again = await pb.poll_once(wait_s=0)
    assert again == a1
    pb.take(a1)
    assert a1_msgs == [1, 2, 3]
    # a stale cursor (the session is dropped, or another shard): a new session from its resume
    # token gets exactly what came after it, at once
    token_part = first_cursor.split("~")[0]
    fresh = await pb.poll_once(cursor=token_part, wait_s=25)
    assert fresh["session"] != a1["session"]
    assert fresh["events"][0]["type"] == "ready"
    events = fresh["events"]
    while not any(e["type"] == "sync" for e in events):  # the catch-up ends with its sync event
        fresh = await pb.poll_once(cursor=fresh["cursor"], wait_s=25)
        events += fresh["events"]
    assert [e["seq"] for e in events if e["type"] == "message"] == [1, 2, 3]


async def test_two_concurrent_polls_of_one_session_the_newest_wins(server, nursery):
    alice, bob, ch = await _pair(server, "twice")
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    pb = PollClient(http_base(bob["ws_url"]), bob["token"])
    pb.take(await pb.poll_once(wait_s=0))
    results = {}
    first_done = trio.Event()

    async def poll(name, done=None):
        results[name] = await pb.poll_once(wait_s=20)
        if done is not None:
            done.set()
    nursery.start_soon(poll, "older", first_done)
    await trio.testing.wait_all_tasks_blocked(0.05)
    async with trio.open_nursery() as n:
        n.start_soon(poll, "newer")
        with trio.fail_after(5):
            await first_done.wait()  # answered at once, empty, cursor unchanged
        assert results["older"]["events"] == [] and results["older"]["cursor"] == pb.cursor
        ack = await ca.send_message(ch, "only once")
    assert [e["seq"] for e in results["newer"]["events"] if e["type"] == "message"] == [ack["seq"]]


async def test_http_transports_answer_bad_input_with_clear_errors(server):
    alice, bob, ch = await _pair(server, "bad")
    base = http_base(alice["ws_url"])
    tok = alice["token"]
    assert (await http_json(base + "/v1/poll"))[0] == 401
    status, body = await http_json(base + "/v1/stream?token=nonsense")
    assert status == 401 and body["error"]["code"] == "invalid_token"
    status, body = await http_json(base + "/v1/poll?cursor=garbage&wait_s=0", token=tok)
    assert status == 400 and body["error"]["code"] == "bad_cursor"
    status, body = await http_json(base + "/v1/poll?wait_s=99", token=tok)
    assert status == 400 and body["error"]["code"] == "bad_request"
    status, body = await http_json(base + "/v1/frames", "POST", tok, b"{not json")
    assert status == 400 and body["error"]["code"] == "bad_frame"
    status, body = await http_json(base + "/v1/frames", "POST", tok, [])
    assert status == 400 and body["error"]["code"] == "bad_request"
    status, body = await http_json(base + "/v1/frames?session=nope", "POST", tok, [{"type": "heartbeat", "id": 1}])
    assert status == 404
    status, body = await http_json(base + "/v1/frames", "POST", tok, [
        {"type": "send", "id": 1, "channel_id": ch, "client_msg_id": "x", "body": "ok"},
        {"type": "send", "id": 1, "channel_id": ch, "client_msg_id": "y", "body": "dup id"},
        {"type": "nope", "id": 2}, 7, {"type": "send", "id": 3, "channel_id": "bad", "client_msg_id": "z", "body": ""},
        {"type": "auth", "id": 4, "token": tok}])
    assert status == 200
    codes = [r["type"] if r["type"] != "error" else r["code"] for r in body["replies"]]
    assert codes == ["ack", "bad_field", "unknown_type", "bad_frame", "bad_field", "already_authenticated"]
    status, _ = await http_json(base + "/v1/nothing-here", token=tok)
    assert status == 404
    # what was stored is exactly the one good send
    r = await server.api.call("GET", f"/v1/channels/{ch}/messages?limit=50", token=tok)
    assert [m["body"] for m in r.body["messages"]] == ["ok"]


async def test_an_sse_device_is_online_while_it_streams_and_counts_as_a_connection(server_with, nursery):
    server = await server_with(max_connections_per_user=2, heartbeat_interval_s=0.2)
    alice, bob, ch = await _pair(server, "online")
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    await ca.send_message(ch, "hello")  # a 1:1 with a message: they see each other's presence
    async with trio.open_nursery() as n:
        sb = await open_transport(n, "sse", bob["ws_url"], bob["token"])
        pb = await open_transport(n, "poll", bob["ws_url"], bob["token"])
        r = await ca.request({"type": "presence", "user_ids": [bob["user"]["id"]]})
        assert r["users"][str(bob["user"]["id"])]["status"] == "online"
        # a third connection of bob's on this shard is over max_connections_per_user (2)
        status, body = await http_json(http_base(bob["ws_url"]) + "/v1/stream", token=bob["token"])
        assert status == 429 and body["error"]["code"] == "too_many_connections"
        del sb, pb
        n.cancel_scope.cancel()


async def test_a_channel_named_at_0_gets_a_message_sent_while_the_session_starts(server, nursery):
    """Regression: a resume token dropped channels at 0, so a 1:1 channel with no message yet was
    not synced; a message stored while the session started (after the user's channels were read,
    before the session could receive live messages) was then never delivered, and the next one
    arrived first (the bench's storm found it as a duplicate after the reconnect). Here that
    moment is made to happen: the first message is sent from inside the store read."""
    alice, bob, ch = await _pair(server, "zero")
    node = server.node
    original = node.store.channels_of
    sent = []

    async def channels_of_then_a_send(user_id):
        channels = await original(user_id)
        if user_id == bob["user"]["id"] and not sent:
            sent.append(await node.router.send(alice["user"]["id"], ch, "while-starting", "first", timeout_s=5))
        return channels
    node.store.channels_of = channels_of_then_a_send
    try:
        pb = PollClient(http_base(bob["ws_url"]), bob["token"])
        pb.take(await pb.poll_once(cursor=resume.encode({ch: 0}), wait_s=5))
    finally:
        node.store.channels_of = original
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    await ca.send_message(ch, "second")
    with trio.move_on_after(10):  # (the old code never delivered "first")
        while len([f for f in pb.inbox if f["type"] == "message"]) < 2:
            pb.take(await pb.poll_once(wait_s=2))
    assert [f["body"] for f in pb.inbox if f["type"] == "message"] == ["first", "second"]


async def test_http_connections_count_against_the_per_address_cap(server_with, nursery):
    server = await server_with(max_connections_per_address=2)
    alice, bob, ch = await _pair(server, "addr")
    async with trio.open_nursery() as n:
        await open_transport(n, "sse", alice["ws_url"], alice["token"])
        await open_transport(n, "sse", bob["ws_url"], bob["token"])
        status, body = await http_json(http_base(alice["ws_url"]) + "/v1/poll?wait_s=0", token=alice["token"])
        assert status == 429 and body["error"]["code"] == "too_many_connections"
        n.cancel_scope.cancel()
    # the streams' connections are closed: the address has room again (the server's side of a
    # closed connection ends in its own time: looked at again until then)
    async def room():
        return (await http_json(http_base(alice["ws_url"]) + "/v1/poll?wait_s=0", token=alice["token"]))[0] == 200
    await eventually(room, timeout=10)


async def test_a_polling_device_is_online_while_it_polls_and_offline_after(tmp_path, nursery):
    """Presence for HTTP devices: online while its polls keep coming (the server heartbeats for
    it), offline once they stop for longer than the keeper's window plus presence's grace."""
    cfg = make_config(tmp_path, heartbeat_interval_s=0.2, http_session_idle_s=0.6)
    cfg.update({"presence": {"grace_s": 0.5, "coalesce_s": 0.1}}, source="test")
    cfg.validate()
    server = await RunningServer(nursery, cfg).start()
    alice, bob, ch = await _pair(server, "pollpresence")
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    await ca.send_message(ch, "hello")

    async def status():
        r = await ca.request({"type": "presence", "user_ids": [bob["user"]["id"]]})
        return r["users"][str(bob["user"]["id"])]["status"]
    async with trio.open_nursery() as n:
        pb = PollClient(http_base(bob["ws_url"]), bob["token"], wait_s=0.3)
        await n.start(pb.run)
        assert await eventually(lambda: status()) == "online"
        await trio.sleep(1.5)  # polls keep coming all along (each waits 0.3 s): still online
        assert await status() == "online"
        n.cancel_scope.cancel()
    await eventually(lambda: _is(status, "offline"), timeout=10)


async def _is(get, value):
    return await get() == value


# ---- the message lifecycle over every transport -----------------------------------------------------
_LOG_EVENTS = ("message", "receipts")


def _shape(frame, names, chans):
    """A frame as a client acts on it, with what differs from run to run (user and channel ids,
    times, client_msg_ids) replaced by names."""
    def walk(key, v):
        if isinstance(v, dict):
            return {k: walk(k, x) for k, x in sorted(v.items()) if k != "client_msg_id"}
        if isinstance(v, list):
            return [walk(key, x) for x in v]
        if key in ("created_at", "edited_at", "at"):
            return "T"
        if key in ("sender_id", "user_id", "by"):
            return names[v]
        return chans[v] if key == "channel_id" else v
    out = walk(None, frame)
    if frame["type"] == "receipts":
        out["cursors"] = {names[int(u)]: c for u, c in out["cursors"].items()}
    return out


async def _log_events(client, n: int) -> list[dict]:
    """The next ``n`` log rows and receipts events, in the order they arrived."""
    return [await client._wait_for(lambda f: "id" not in f and f["type"] in _LOG_EVENTS, 20) for _ in range(n)]


def _resume_point(kind, client, got, keep_session=False):
    if kind == "ws":  # the device's own cursors: the highest seq it holds per channel
        cursors = {}
        for f in got:
            if f["type"] == "message":
                cursors[f["channel_id"]] = max(cursors.get(f["channel_id"], 0), f["seq"])
        return cursors
    # poll: the cursor's resume token, as after the session ended (http_session_idle_s) -- a
    # session that lives on keeps what comes meanwhile as it came live: an edit's text, then its
    # delete, where a catch-up from the log has the edit redacted
    if kind == "sse":
        return client.last_id
    return client.cursor if keep_session else client.cursor.split("~")[0]


async def _back_from(nursery, kind, creds, point):
    """The device back from ``point``; the client and the log events of its catch-up, read up to
    the catch-up's end (ws: the sync reply; sse: the sync event; poll: the sync event of a new
    session, or an empty answer of one that lived on)."""
    if kind == "ws":
        c = await open_client(nursery, creds["ws_url"], creds["token"], cursors=point)
        assert (await c.reply_to(c.auth_id))["type"] == "sync"
    elif kind == "sse":
        c = SSEClient(http_base(creds["ws_url"]), creds["token"])
        await c.connect(last_event_id=point)
        nursery.start_soon(c.pump)
        await c.next_event("sync")
    else:
        c = PollClient(http_base(creds["ws_url"]), creds["token"])
        c.cursor = point
        while not any(f["type"] == "sync" for f in c.inbox):  # a new session: its catch-up
            body = await c.poll_once(wait_s=1)
            c.take(body)
            if not body["events"] and not any(f["type"] == "ready" for f in c.inbox):
                break  # the session lived on: what it kept meanwhile is all taken
        assert (await c.poll_once(wait_s=0))["events"] == []
        nursery.start_soon(c.run)  # and on polling
    got = [f for f in c.inbox if "id" not in f and f["type"] in _LOG_EVENTS]
    c.inbox[:] = [f for f in c.inbox if not any(f is x for x in got)]
    return c, got


async def _lifecycle_scenario(server, kind: str, keep_session: bool = False):
    """bob on ``kind`` in a 1:1 with alice and a group: an edit, a reaction, a reply and receipts
    while he is online; an edit, his unreact (from another device), a delete (redacting the edits
    and reactions) and carol added to the group while he is offline (his catch-up brings them);
    then an edit of his, live, and a reconnect after it that repeats nothing. ``keep_session``
    (poll): back with the whole cursor, within http_session_idle_s, not from its resume token."""
    tag = f"lc-{kind}" + ("-kept" if keep_session else "")
    alice = await server.api.signup_login(f"alice-{tag}")
    bob = await server.api.signup_login(f"bob-{tag}")
    carol = await server.api.signup_login(f"carol-{tag}")
    ch = dm(alice, bob)
    r = await server.api.call("POST", "/v1/groups", {"name": "team", "members": [bob["user"]["id"]]},
                              token=alice["token"])
    assert r.status == 201, r
    g = r.body["channel"]["id"]
    names = {alice["user"]["id"]: "alice", bob["user"]["id"]: "bob", carol["user"]["id"]: "carol"}
    chans = {ch: "dm", g: "group"}

    def do(client, verb, channel, **fields):
        return client.request({"type": verb, "channel_id": channel, "client_msg_id": str(uuid.uuid4()), **fields})

    async def ok(reply_coro):
        reply = await reply_coro
        assert reply["type"] in ("ack", "read", "received"), reply
        return reply
    async with trio.open_nursery() as outer:
        ca = await open_client(outer, alice["ws_url"], alice["token"])
        ids = []  # sse: the id of every event that had one
        async with trio.open_nursery() as n:
            cb = await open_transport(n, kind, bob["ws_url"], bob["token"])
            await ok(ca.send_message(ch, "helo"))                               # dm 1
            await ok(do(ca, "edit", ch, target_seq=1, body="hello"))            # dm 2
            await ok(do(cb, "react", ch, target_seq=1, emoji="👍"))             # dm 3
            await ok(do(cb, "send", ch, body="yes", reply_to=1))                # dm 4
            await ok(ca.send_message(g, "hi team"))
            got = await _log_events(cb, 5)
            await ok(cb.request({"type": "received", "channel_id": ch, "seq": 4}))
            await ok(cb.request({"type": "read", "channel_id": ch, "seq": 3}))
            got += await _log_events(cb, 1)                                       # coalesced: one event
            point = _resume_point(kind, cb, got, keep_session)
            ids += getattr(cb, "ids", [])
            n.cancel_scope.cancel()  # bob goes offline
        other = FramesClient(http_base(bob["ws_url"]), bob["token"])  # another device of bob's
        await ok(do(ca, "edit", ch, target_seq=1, body="hello again"))         # dm 5
        await ok(do(other, "unreact", ch, target_seq=1, emoji="👍"))            # dm 6
        await ok(do(ca, "delete", ch, target_seq=1))                           # dm 7: redacts 2, 3, 5, 6
        r = await server.api.call("POST", f"/v1/channels/{g}/members", {"user_id": carol["user"]["id"]},
                                  token=alice["token"])
        assert r.status == 200 and r.body["added"], r
        async with trio.open_nursery() as n:
            cb, caught_up = await _back_from(n, kind, bob, point)
            got += caught_up
            await ok(do(cb, "edit", ch, target_seq=4, body="yes!"))               # dm 8, live
            got += await _log_events(cb, 1)
            point = _resume_point(kind, cb, got, keep_session)
            ids += getattr(cb, "ids", [])
            n.cancel_scope.cancel()
        async with trio.open_nursery() as n:  # a reconnect after the edit: nothing repeated
            _, again = await _back_from(n, kind, bob, point)
            assert again == [], again
            n.cancel_scope.cancel()
        outer.cancel_scope.cancel()
    if kind == "sse":  # every log row came with an id (its resume token), each one new
        rows = [f for f in got if f["type"] == "message"]
        with_id = [f for _, f in ids if f["type"] == "message"]
        assert with_id == rows
        tokens = [i for i, f in ids if f["type"] == "message"]
        assert len(set(tokens)) == len(tokens)
    return [_shape(f, names, chans) for f in got]


async def test_the_message_lifecycle_gives_the_same_events_on_every_transport(server):
    """Edits, reactions, a reply, a delete, a system row and receipts -- partly while the device
    is offline, so they come by its catch-up -- arrive identically over ws, sse and poll."""
    results = {}
    for kind in TRANSPORTS:
        with trio.fail_after(60):
            results[kind] = await _lifecycle_scenario(server, kind)
    assert results["sse"] == results["ws"] and results["poll"] == results["ws"]
    got = results["ws"]
    assert [(f["type"], f.get("channel_id"), f.get("seq"), f.get("kind"), f.get("body"), f.get("redacted"))
            for f in got] == [
        ("message", "dm", 1, None, "helo", None), ("message", "dm", 2, "edit", "hello", None),
        ("message", "dm", 3, "react", "", None), ("message", "dm", 4, None, "yes", None),
        ("message", "group", 1, None, "hi team", None),
        ("receipts", "dm", None, None, None, None),
        # offline: the catch-up from the log has the edit and the reaction of the deleted message redacted
        ("message", "dm", 5, "edit", "", True), ("message", "dm", 6, "unreact", "", True),
        ("message", "dm", 7, "delete", "", None), ("message", "group", 2, "member_added", "", None),
        ("message", "dm", 8, "edit", "yes!", None)]
    assert (got[2]["emoji"], got[2]["count"], got[2]["sender_id"]) == ("👍", 1, "bob")
    assert got[3]["reply"] == {"seq": 1, "sender_id": "alice", "excerpt": "hello"} and got[3]["reply_to"] == 1
    assert got[5]["cursors"] == {"bob": {"delivered": 4, "read": 3}}  # received and read: one event
    assert (got[8]["target_seq"], got[8]["sender_id"]) == (1, "alice")
    assert (got[9]["user_id"], got[9]["sender_id"]) == ("carol", "alice")


async def test_a_poll_session_that_lives_on_gives_the_rows_as_they_came_live(server):
    """A poller back within http_session_idle_s continues its session, which kept the rows of its
    time away as they came live: the edit's text and the reaction, then their delete (a catch-up
    from the log has those two redacted). The same rows otherwise, folded to the same state."""
    kept = await _lifecycle_scenario(server, "poll", keep_session=True)
    synced = await _lifecycle_scenario(server, "ws")
    assert (kept[6]["body"], kept[7]["emoji"]) == ("hello again", "👍") and "redacted" not in kept[6]
    assert [f for i, f in enumerate(kept) if i not in (6, 7)] == [f for i, f in enumerate(synced) if i not in (6, 7)]
    views = []
    for frames in (kept, synced):
        view = ChannelView("bob")
        for f in frames:
            if f["type"] == "message" and f["channel_id"] == "dm":
                view.apply(f)
        views.append(view.snapshot())
    assert views[0] == views[1]
