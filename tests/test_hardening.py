"""Issue 12: what an outside client found. No client input crashes a session (a bug answers
``internal`` and closes 1011, counted); strings the store cannot keep are ``bad_field``; deep
nesting is ``bad_frame``; the close codes are the documented ones (1007, 1009, 1013, 4001);
``rate_limited`` names the dropped request; history ``more`` is exact; ``read`` works on a DM
with no message yet; logout revokes the token; tokens expire while connected; membership
changes are announced. Real server, real sockets, real store."""

from __future__ import annotations

import json

import msgpack
import pytest
import trio
from trio_websocket import open_websocket_url
from wsproto.frame_protocol import FrameProtocol, Opcode

from chatd.protocol import client as proto
from tests.helpers import assert_intact, open_client, setup_pair


def crashes(server) -> float:
    return server.node.metrics.session_crashes.get()


# ---- the codec ------------------------------------------------------------------------------------
@pytest.mark.parametrize("frame, code", [
    ('{"type":"send","id":1,"channel_id":"dm:1:2","client_msg_id":"a","body":"x\\ud83d"}', "bad_field"),
    ('{"type":"send","id":1,"channel_id":"dm:1:2","client_msg_id":"x\\ud83d","body":"x"}', "bad_field"),
    ('{"type":"send","id":1,"channel_id":"dm:1:2","client_msg_id":"a\\u0000b","body":"x"}', "bad_field"),
    ('{"type":"heartbeat","id":"\\udc00"}', "bad_field"),
    ('{"type":"auth","id":1,"token":"v1.\\ud83d.x"}', "bad_field"),
    ("[" * 1000 + "]" * 1000, "bad_frame"),
    ("[" * 100_000 + "]" * 100_000, "bad_frame"),
    ('{"type":"heartbeat","id":1,"x":' + "{\"a\":" * 20 + "1" + "}" * 20 + "}", "bad_frame"),
])
def test_codec_refuses_what_cannot_be_stored_or_nests_too_deep(frame, code):
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse(frame, proto.JSON, 10**7)
    assert info.value.code == code


def test_codec_depth_limit_is_exact():
    frame = '{"type":"heartbeat","id":1,"x":%s}'
    assert proto.parse(frame % ("[" * 7 + "]" * 7), proto.JSON, 10**6).id == 1  # 8 levels with the frame
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse(frame % ("[" * 8 + "]" * 8), proto.JSON, 10**6)
    assert info.value.code == "bad_frame" and "deeper than 8" in info.value.message


def test_codec_keeps_nul_in_bodies_and_reads_ids_of_dropped_frames():
    req = proto.parse('{"type":"send","id":1,"channel_id":"dm:1:2","client_msg_id":"a","body":"a\\u0000b"}',
                      proto.JSON, 10**6)
    assert req.body == "a\x00b"
    assert proto.peek_id('{"type":"heartbeat","id":"r-7"}', proto.JSON, 1000) == "r-7"
    assert proto.peek_id(msgpack.packb({"type": "x", "id": 9}), proto.MSGPACK, 1000) == 9
    for junk in ("{nope", '{"id":{"x":1}}', '{"id":"\\ud800"}', "[" * 5000):
        assert proto.peek_id(junk, proto.JSON, 10**6) is None


# ---- no input crashes a session -----------------------------------------------------------------------
async def test_lone_surrogates_and_deep_nesting_are_errors_not_crashes(server, nursery):
    alice, bob, ch, ca = await setup_pair(server, nursery)
    cases = [
        ('{"type":"send","id":1,"channel_id":"%s","client_msg_id":"s1","body":"half \\ud83d"}' % ch, 1, "bad_field"),
        ('{"type":"send","id":2,"channel_id":"%s","client_msg_id":"x\\ud83d","body":"ok"}' % ch, 2, "bad_field"),
        ('{"type":"auth","id":3,"token":"\\ud83d"}', 3, "bad_field"),
        ("[" * 1000 + "]" * 1000, None, "bad_frame"),
        ('{"type":"heartbeat","id":4,"x":' + "[" * 5000 + "]" * 5000 + "}", None, "bad_frame"),
    ]
    for data, rid, code in cases:
        await ca.send_raw(data)
        err = await ca.reply_to(rid)
        assert (err["type"], err["code"]) == ("error", code), (data[:80], err)
    assert (await ca.request({"type": "heartbeat"}))["type"] == "heartbeat"  # still open
    cm = await open_client(nursery, alice["ws_url"], alice["token"], fmt="msgpack")
    await cm.send_raw(b"\x91" * 2000 + b"\xc0")  # 2000 nested arrays
    assert (await cm.reply_to(None))["code"] == "bad_frame"
    assert (await cm.request({"type": "heartbeat"}))["type"] == "heartbeat"
    assert crashes(server) == 0
    await assert_intact(server, alice["token"], ch, ["keep me"])


@pytest.mark.parametrize("where", ["handler", "send", "writer"])
async def test_a_bug_answers_internal_closes_1011_and_is_counted(server, nursery, monkeypatch, where):
    from chatd.shard.outbox import Outbox
    alice, bob, ch, ca = await setup_pair(server, nursery)
    cb = await open_client(nursery, bob["ws_url"], bob["token"])

    async def broken(*args, **kwargs):  # a bug somewhere below the session
        raise RuntimeError("boom")
    target, name, frame = {
        "handler": (server.node.presence, "statuses", {"type": "presence", "user_ids": [1]}),
        "send": (server.node.router, "send", {"type": "send", "channel_id": ch, "client_msg_id": "b", "body": "x"}),
        "writer": (Outbox, "_run_sync", {"type": "sync", "cursors": {ch: 0}}),
    }[where]
    monkeypatch.setattr(target, name, broken)
    if where == "send":  # the send's task-free path too (a warm channel takes it)
        def broken_nowait(*args, **kwargs):
            raise RuntimeError("boom")
        monkeypatch.setattr(target, "send_nowait", broken_nowait)
    await ca.send({**frame, "id": "bug"})
    reply = await ca._wait_for(lambda f: f.get("type") == "error", 10)
    assert (reply["code"], reply["id"]) == ("internal", None if where == "writer" else "bug")
    reason = await ca.wait_closed()
    assert reason.code == 1011
    assert crashes(server) == 1
    metrics = await server.api.call("GET", "/metrics")
    assert "chatd_session_crashes_total 1" in metrics.body
    monkeypatch.undo()
    # the other connection and the stored data are unaffected
    assert (await cb.send_message(ch, "still here"))["seq"] == 2
    await assert_intact(server, alice["token"], ch, ["keep me", "still here"])


def raw_frame(opcode: Opcode, payload: bytes) -> bytes:
    """A masked client frame with any payload, valid or not."""
    return bytes(FrameProtocol(client=True, extensions=[])._serialize_frame(opcode, payload))


async def test_text_frame_that_is_not_utf8_closes_with_1007(server, nursery):
    alice, bob, ch, ca = await setup_pair(server, nursery)
    async with ca.ws._stream_lock:
        await ca.ws._stream.send_all(raw_frame(Opcode.TEXT, b'{"type":"heartbeat","id":1,"x":"\xff\xfe"}'))
    reason = await ca.wait_closed()
    assert reason.code == 1007
    assert crashes(server) == 0
    await assert_intact(server, alice["token"], ch, ["keep me"])


async def test_frame_cap_is_exactly_twice_the_limit(server_with, nursery):
    server = await server_with(max_frame_bytes=4096)
    alice, bob, ch, ca = await setup_pair(server, nursery)
    await ca.send_raw("x" * 8192)  # at the hard cap: answered
    assert (await ca.reply_to(None))["code"] == "frame_too_large"
    await ca.send_raw("x" * 8193)  # one byte above: refused by the WebSocket layer
    assert (await ca.wait_closed()).code == 1009


async def test_rate_limited_errors_name_the_request(server_with, nursery):
    server = await server_with(rate_frames_per_s=0.1, rate_burst=3, flood_close_after=1000)  # no refill meanwhile
    alice, bob, ch, ca = await setup_pair(server, nursery)  # the send took one token
    for i in range(6):
        await ca.send({"type": "heartbeat", "id": f"hb-{i}"})
    limited = [await ca.reply_to(f"hb-{i}") for i in range(6)]
    dropped = [f["id"] for f in limited if f["type"] == "error"]
    assert dropped and all(f["code"] == "rate_limited" for f in limited if f["type"] == "error")
    assert dropped == [f"hb-{i}" for i in range(6 - len(dropped), 6)]


async def test_slow_consumer_that_reads_again_gets_whole_frames_then_1013(server_with, nursery, monkeypatch):
    from chatd.shard import outbox
    monkeypatch.setattr(outbox, "SEND_GRACE_S", 10.0)  # bob reads again well inside it, however loaded CI is
    server = await server_with(send_queue_frames=4)
    alice, bob, ch, ca = await setup_pair(server, nursery)
    body = "b" * 60_000
    async with open_websocket_url(bob["ws_url"], message_queue_size=0, max_message_size=2**24) as slow:
        await slow.send_message(json.dumps({"type": "auth", "id": 1, "token": bob["token"]}))
        assert json.loads(await slow.get_message())["type"] == "auth"
        # bob stops reading; alice sends until the server cuts him off
        i = 0
        with trio.fail_after(60):
            while server.node.metrics.slow_consumers.get() < 1:
                assert (await ca.send_message(ch, body, f"s{i}"))["type"] == "ack"
                i += 1
        # bob reads again at once: every frame he gets is whole, then the close frame says 1013
        seqs = []
        with trio.fail_after(10):
            try:
                while True:
                    frame = json.loads(await slow.get_message())
                    if frame["type"] == "message":
                        seqs.append(frame["seq"])
            except Exception as e:  # noqa: BLE001 - ConnectionClosed is the expected end
                reason = getattr(e, "reason", None)
        assert reason is not None and reason.code == 1013, reason
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True


# ---- history, read --------------------------------------------------------------------------------
async def test_history_more_is_exact_on_ws_and_http(server, nursery):
    alice, bob, ch, ca = await setup_pair(server, nursery)  # seq 1
    for i in (2, 3):
        await ca.send_message(ch, f"m{i}")
    for frame, seqs, more in [
        ({"limit": 3}, [1, 2, 3], False),  # the whole channel: nothing older
        ({"limit": 2}, [2, 3], True),
        ({"before": 3, "limit": 2}, [1, 2], False),  # ends at the first message
        ({"after": 0, "limit": 3}, [1, 2, 3], False),  # ends at the last message
        ({"after": 0, "limit": 2}, [1, 2], True),
        ({"after": 1, "before": 3, "limit": 1}, [2], False),
    ]:
        h = await ca.request({"type": "history", "channel_id": ch, **frame})
        assert ([m["seq"] for m in h["messages"]], h["more"]) == (seqs, more), frame
        query = "&".join(f"{k}={v}" for k, v in frame.items())
        r = await server.api.call("GET", f"/v1/channels/{ch}/messages?{query}", token=alice["token"])
        assert ([m["seq"] for m in r.body["messages"]], r.body["more"]) == (seqs, more), frame
    # the page limit is the same on both: 500 answered, 501 refused
    assert "messages" in await ca.request({"type": "history", "channel_id": ch, "limit": 500})
    assert (await ca.request({"type": "history", "channel_id": ch, "limit": 501}))["code"] == "bad_field"
    r = await server.api.call("GET", f"/v1/channels/{ch}/messages?limit=501", token=alice["token"])
    assert r.status == 400


async def test_read_on_a_dm_with_no_message_yet(server, nursery):
    alice = await server.api.signup_login("alice")
    bob = await server.api.signup_login("bob")
    ch = f"dm:{alice['user']['id']}:{bob['user']['id']}"
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    reply = await ca.request({"type": "read", "channel_id": ch, "seq": 5})
    assert (reply["type"], reply["channel_id"], reply["seq"]) == ("read", ch, 0)
    assert (await ca.request({"type": "history", "channel_id": ch}))["messages"] == []
    await ca.send_message(ch, "first")
    assert (await ca.request({"type": "read", "channel_id": ch, "seq": 5}))["seq"] == 1


# ---- logout and expiry ----------------------------------------------------------------------------
async def test_logout_revokes_the_token_everywhere(server, nursery):
    alice, bob, ch, ca = await setup_pair(server, nursery)
    api = server.api
    # WS logout: the token is refused afterwards, over WS and HTTP
    assert (await ca.request({"type": "logout"}))["type"] == "logout"
    assert (await ca.wait_closed()).code == 1000
    c = await open_client(nursery, server.ws_url)
    err = await c.request({"type": "auth", "token": alice["token"]})
    assert (err["type"], err["code"]) == ("error", "invalid_token") and "revoked" in err["message"]
    r = await api.call("GET", "/v1/users/me", token=alice["token"])
    assert (r.status, r.body["error"]["code"]) == (401, "invalid_token")
    # a new login of the same device works
    again = await api.login("alice", alice["device_id"])
    assert again["device_id"] == alice["device_id"]
    assert (await api.call("GET", "/v1/users/me", token=again["token"])).status == 200

    # HTTP logout: the device's open WebSockets are closed with 4001, the other device stays
    same_device = [await open_client(nursery, again["ws_url"], again["token"]) for _ in range(2)]
    other = await api.login("alice")
    other_ws = await open_client(nursery, other["ws_url"], other["token"])
    r = await api.call("POST", "/v1/logout", token=again["token"])
    assert r.status == 200 and r.body["logged_out"] is True
    for d in same_device:
        assert (await d.wait_closed()).code == 4001
        assert d.inbox[-1]["code"] == "invalid_token"
    assert (await api.call("GET", "/v1/channels", token=again["token"])).status == 401
    assert (await api.call("POST", "/v1/logout", token=again["token"])).status == 401
    assert (await other_ws.send_message(ch, "other device"))["type"] == "ack"
    assert (await api.call("GET", "/v1/users/me", token=other["token"])).status == 200


async def test_token_expiring_while_connected_closes_with_4001(server_with, nursery):
    server = await server_with(auth={"token_ttl_s": 5.0})  # exp is whole seconds: 4-5 s from now
    alice = await server.api.signup_login("alice")
    c = await open_client(nursery, alice["ws_url"], alice["token"])
    reason = await c.wait_closed(timeout=15)
    assert reason.code == 4001
    assert c.inbox[-1]["code"] == "token_expired"


# ---- membership events ----------------------------------------------------------------------------
async def test_member_added_and_removed_are_announced(server, nursery):
    """Membership changes are rows of the log (issue 21): every member's device, and the user
    added or removed, gets the row; a change that changes nothing logs nothing."""
    api = server.api
    alice, bob, carol = [await api.signup_login(n) for n in ("alice", "bob", "carol")]
    ids = {p["user"]["username"]: p["user"]["id"] for p in (alice, bob, carol)}
    r = await api.call("POST", "/v1/groups", {"name": "g", "members": [ids["bob"]]}, token=alice["token"])
    gid = r.body["channel"]["id"]
    ca, cb, cc = [await open_client(nursery, p["ws_url"], p["token"]) for p in (alice, bob, carol)]
    r = await api.call("POST", f"/v1/channels/{gid}/members", {"user_id": ids["carol"]}, token=alice["token"])
    assert r.body["added"] is True
    for c in (ca, cb, cc):
        row = await c.next_event("message")
        assert (row["channel_id"], row["seq"], row["kind"], row["user_id"], row["sender_id"]) == \
            (gid, 1, "member_added", ids["carol"], ids["alice"])
    r = await api.call("DELETE", f"/v1/channels/{gid}/members/{ids['bob']}", token=bob["token"])
    assert r.body["removed"] is True
    for c in (ca, cb, cc):
        row = await c.next_event("message")
        assert (row["seq"], row["kind"], row["user_id"], row["sender_id"]) == (2, "member_left", ids["bob"], ids["bob"])
    # adding an existing member is no change: no row
    await api.call("POST", f"/v1/channels/{gid}/members", {"user_id": ids["carol"]}, token=alice["token"])
    assert (await ca.request({"type": "heartbeat"}))["type"] == "heartbeat"
    assert not ca.pending_messages()
