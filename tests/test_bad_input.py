"""Bad input over the WebSocket: every case gets a stable error code (or a proper close code
where going on makes no sense), the server keeps serving, and stored data stays intact."""

from __future__ import annotations

import json

import msgpack
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, open_websocket_url

from chatd.auth import issue_token
from tests.helpers import assert_intact, eventually, open_client, setup_pair


async def test_malformed_frames_get_errors_and_connection_goes_on(server, nursery):
    alice, bob, ch, ca = await setup_pair(server, nursery)
    cases = [
        ("{not json", None, "bad_frame"),
        ("[1, 2, 3]", None, "bad_frame"),
        ('"just a string"', None, "bad_frame"),
        (b"\x93\x01\x02", None, "bad_frame"),  # binary frame on a JSON connection
        (json.dumps({"id": 1}), 1, "bad_field"),  # no type
        (json.dumps({"type": 7, "id": 2}), 2, "bad_field"),
        (json.dumps({"type": "launch_missiles", "id": 3}), 3, "unknown_type"),
        (json.dumps({"type": "send", "id": 4, "channel_id": ch, "body": "x"}), 4, "bad_field"),  # no client_msg_id
        (json.dumps({"type": "send", "id": 5, "channel_id": ch, "client_msg_id": "a", "body": 42}), 5, "bad_field"),
        (json.dumps({"type": "send", "id": 6, "channel_id": "general", "client_msg_id": "a", "body": "x"}), 6, "bad_field"),
        (json.dumps({"type": "send", "id": 7, "channel_id": ch, "client_msg_id": "", "body": "x"}), 7, "bad_field"),
        (json.dumps({"type": "send", "id": 8, "channel_id": ch, "client_msg_id": "x" * 129, "body": "x"}), 8, "bad_field"),
        (json.dumps({"type": "read", "id": 9, "channel_id": ch, "seq": "5"}), 9, "bad_field"),
        (json.dumps({"type": "read", "id": 10, "channel_id": ch, "seq": True}), 10, "bad_field"),
        (json.dumps({"type": "read", "id": 11, "channel_id": ch, "seq": -1}), 11, "bad_field"),
        (json.dumps({"type": "read", "id": 12, "channel_id": ch, "seq": 2**70}), 12, "bad_field"),
        (json.dumps({"type": "history", "id": 13, "channel_id": ch, "limit": 0}), 13, "bad_field"),
        (json.dumps({"type": "sync", "id": 14, "cursors": [1]}), 14, "bad_field"),
        (json.dumps({"type": "sync", "id": 15, "cursors": {"nope": 1}}), 15, "bad_field"),
        (json.dumps({"type": "heartbeat"}), None, "bad_field"),  # every request needs an id
        (json.dumps({"type": "heartbeat", "id": {"x": 1}}), None, "bad_field"),
        (json.dumps({"type": "heartbeat", "id": "i" * 65}), None, "bad_field"),
    ]
    for data, rid, code in cases:
        await ca.send_raw(data)
        err = await ca.reply_to(rid) if rid is not None else await ca._wait_for(lambda f: f["type"] == "error", 5)
        assert err["type"] == "error" and err["code"] == code, (data, err)
        assert err["message"]
    assert (await ca.request({"type": "heartbeat"}))["type"] == "heartbeat"
    await assert_intact(server, alice["token"], ch, ["keep me"])


async def test_malformed_msgpack(server, nursery):
    alice, bob, ch, ca = await setup_pair(server, nursery, fmt="msgpack")
    for data in (b"\xc1", b"\x93\x01", msgpack.packb([1, 2]), msgpack.packb({1: 2}), b"\x81\xa4type"):
        await ca.send_raw(data)
        err = await ca._wait_for(lambda f: f["type"] == "error", 5)
        assert err["code"] in ("bad_frame", "bad_field"), err
    await ca.send_raw(msgpack.packb({"type": "send", "id": 1, "channel_id": ch, "client_msg_id": "z", "body": b"bytes"}))
    assert (await ca.reply_to(1))["code"] == "bad_field"
    assert (await ca.send_message(ch, "still fine"))["seq"] == 2
    await assert_intact(server, alice["token"], ch, ["keep me", "still fine"])


async def test_body_limit_exact(server, nursery):
    alice, bob, ch, ca = await setup_pair(server, nursery)
    err = await ca.send_message(ch, "x" * 100_001)
    assert err["type"] == "error" and err["code"] == "body_too_long"
    ok = await ca.send_message(ch, "y" * 100_000)
    assert ok["type"] == "ack" and ok["seq"] == 2
    await assert_intact(server, alice["token"], ch, ["keep me", "y" * 100_000])


async def test_oversized_frames(server_with, nursery):
    server = await server_with(max_frame_bytes=4096)
    alice, bob, ch, ca = await setup_pair(server, nursery)
    big = json.dumps({"type": "send", "id": 1, "channel_id": ch, "client_msg_id": "big", "body": "z" * 5000})
    await ca.send_raw(big)
    err = await ca.reply_to(None)
    assert err["code"] == "frame_too_large"
    assert (await ca.request({"type": "heartbeat"}))["type"] == "heartbeat"
    # far above the limit the WebSocket layer refuses it: close 1009 (message too big)
    await ca.send_raw("x" * 20_000)
    reason = await ca.wait_closed()
    assert reason.code == 1009
    await assert_intact(server, alice["token"], ch, ["keep me"])


async def test_frames_before_auth_and_bad_tokens(server, nursery):
    alice, bob, ch, _ = await setup_pair(server, nursery)
    c = await open_client(nursery, server.ws_url)
    err = await c.request({"type": "send", "channel_id": ch, "client_msg_id": "early", "body": "x"})
    assert err["code"] == "not_authenticated"
    secret = server.node.secret
    uid = alice["user"]["id"]
    forged_sig = alice["token"][:-3] + ("AAA" if not alice["token"].endswith("AAA") else "BBB")
    other_secret, _ = issue_token("some-other-secret", uid, "dev", 3600)
    expired, _ = issue_token(secret, uid, "dev", -10)
    payload_swap = alice["token"].split(".")
    payload_swap[1] = issue_token(secret, bob["user"]["id"], "dev", 3600)[0].split(".")[1]
    for token, code in [(forged_sig, "invalid_token"), (other_secret, "invalid_token"), ("garbage", "invalid_token"),
                        (expired, "token_expired")]:
        assert (await c.request({"type": "auth", "token": token}))["code"] == code
    # a correct token still works on the same connection afterwards
    assert (await c.request({"type": "auth", "token": alice["token"]}))["type"] == "auth"
    assert (await c.request({"type": "auth", "token": alice["token"]}))["code"] == "already_authenticated"
    # a connection that keeps presenting bad tokens is closed
    c2 = await open_client(nursery, server.ws_url)
    for _ in range(5):
        await c2.send({"type": "auth", "id": "x", "token": ".".join(payload_swap)})
    reason = await c2.wait_closed()
    assert reason.code == 1008
    assert [f["code"] for f in c2.inbox] == ["invalid_token"] * 5  # each got its answer before the close
    await assert_intact(server, alice["token"], ch, ["keep me"])


async def test_auth_timeout_closes(server_with, nursery):
    server = await server_with(auth_timeout_s=0.5)
    c = await open_client(nursery, server.ws_url)
    reason = await c.wait_closed()
    assert reason.code == 1008 and "authentication" in reason.reason


async def test_non_members_are_refused(server, nursery):
    alice, bob, ch, ca = await setup_pair(server, nursery)
    carol = await server.api.signup_login("carol")
    cc = await open_client(nursery, carol["ws_url"], carol["token"])
    r = await server.api.call("POST", "/v1/groups", {"name": "ab", "members": [bob["user"]["id"]]}, token=alice["token"])
    group = r.body["channel"]["id"]
    await ca.send_message(group, "group secret")
    for frame in ({"type": "send", "channel_id": ch, "client_msg_id": "c1", "body": "let me in"},
                  {"type": "send", "channel_id": group, "client_msg_id": "c2", "body": "let me in"},
                  {"type": "history", "channel_id": ch},
                  {"type": "history", "channel_id": group},
                  {"type": "typing", "channel_id": group},
                  {"type": "read", "channel_id": group, "seq": 1}):
        err = await cc.request(frame)
        assert err["type"] == "error" and err["code"] == "not_member", (frame, err)
    err = await cc.request({"type": "send", "channel_id": "g:0123456789abcdef", "client_msg_id": "c3", "body": "x"})
    assert err["code"] == "no_such_channel"
    err = await cc.send_message(f"dm:{carol['user']['id']}:999999", "hello nobody")
    assert err["code"] == "no_such_user"
    # a removed member loses access at once
    r = await server.api.call("DELETE", f"/v1/channels/{group}/members/{bob['user']['id']}", token=alice["token"])
    assert r.body["removed"] is True
    cb = await open_client(nursery, bob["ws_url"], bob["token"])
    assert (await cb.send_message(group, "still here?"))["code"] == "not_member"
    await assert_intact(server, alice["token"], ch, ["keep me"])
    await assert_intact(server, alice["token"], group, ["group secret", ""])  # (and bob's removal row)


async def test_flood_is_rate_limited_then_closed(server_with, nursery):
    server = await server_with(rate_frames_per_s=5.0, rate_burst=10, flood_close_after=30)
    alice, bob, ch, ca = await setup_pair(server, nursery)
    with pytest.raises(ConnectionClosed):
        for i in range(200):
            await ca.send({"type": "heartbeat", "id": i})
    reason = await ca.wait_closed()
    assert reason.code == 1008 and "flood" in reason.reason
    limited = [f for f in ca.inbox if f.get("code") == "rate_limited"]
    assert limited and all(f["retry_after_ms"] > 0 for f in limited)
    await assert_intact(server, alice["token"], ch, ["keep me"])


async def test_slow_consumer_is_cut_off_and_resyncs(server_with, nursery):
    server = await server_with(send_queue_frames=4)
    alice, bob, ch, ca = await setup_pair(server, nursery)
    n = 120
    body = "b" * 3000
    async with open_websocket_url(bob["ws_url"], message_queue_size=1) as slow:
        await slow.send_message(json.dumps({"type": "auth", "id": 1, "token": bob["token"]}))
        assert json.loads(await slow.get_message())["type"] == "auth"
        # bob stops reading; alice keeps sending
        for i in range(n):
            ack = await ca.send_message(ch, body, f"s{i}")
            assert ack["type"] == "ack", ack
        await eventually(lambda: server.node.metrics.slow_consumers.get() >= 1)  # a counter: no event
    assert server.node.hub.sessions_of(bob["user"]["id"]) == () or all(
        s.close_reason for s in server.node.hub.sessions_of(bob["user"]["id"]))
    # coming back with its cursor, bob gets everything, in order, once
    cb = await open_client(nursery, bob["ws_url"], bob["token"], cursors={ch: 0})
    got = await cb.messages(n + 1)
    assert [m["seq"] for m in got] == list(range(1, n + 2))
    sync = await cb.reply_to(cb.auth_id)
    assert sync["cursors"] == {ch: n + 1}


async def test_client_that_resets_during_the_handshake(server, nursery):
    """Found by `chatd bench idle`: a TCP reset before the 101 reply used to end the process."""
    import socket
    import struct
    from urllib.parse import urlparse
    alice, bob, ch, ca = await setup_pair(server, nursery)
    url = urlparse(server.ws_url)
    request = (f"GET / HTTP/1.1\r\nHost: {url.hostname}:{url.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()

    def reset_handshakes():
        for _ in range(20):
            c = socket.create_connection((url.hostname, url.port))
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            c.sendall(request)
            c.close()
    await trio.to_thread.run_sync(reset_handshakes)
    await trio.testing.wait_all_tasks_blocked()  # every reset connection accepted and handled
    assert (await ca.send_message(ch, "still serving"))["seq"] == 2
    await assert_intact(server, alice["token"], ch, ["keep me", "still serving"])


def _raw_exchange(url: str, send: bytes, timeout_s: float) -> bytes:
    """Connect to the WebSocket port with a plain TCP socket, send ``send``, read until the server
    closes (or ``timeout_s``): what the server answered."""
    import socket
    from urllib.parse import urlparse
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout_s) as c:
        if send:
            c.sendall(send)
        got = b""
        while True:
            data = c.recv(65536)  # socket.timeout (a test failure) if the server never closes
            if not data:
                return got
            got += data


async def test_a_request_that_is_not_a_websocket_upgrade_gets_400(server, nursery):
    """The shard's own WebSocket server (chatd/shard/wsconn.py): plain HTTP on the WebSocket
    port is answered 400 and closed; the server goes on serving."""
    alice, bob, ch, ca = await setup_pair(server, nursery)
    answer = await trio.to_thread.run_sync(_raw_exchange, server.ws_url, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 10.0)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
    assert (await ca.send_message(ch, "still serving"))["seq"] == 2
    await assert_intact(server, alice["token"], ch, ["keep me", "still serving"])


async def test_a_connection_that_never_finishes_its_handshake_is_dropped(server, nursery, monkeypatch):
    """A TCP connection that sends nothing (or half a request) is closed once the handshake
    timeout (server.CONNECT_TIMEOUT_S, 10 s; 0.5 s here) runs out, without an answer."""
    from chatd.shard import server as shard_server
    monkeypatch.setattr(shard_server, "CONNECT_TIMEOUT_S", 0.5)
    alice, bob, ch, ca = await setup_pair(server, nursery)
    for partial in (b"", b"GET / HTTP/1.1\r\nHost: x\r\n"):
        assert await trio.to_thread.run_sync(_raw_exchange, server.ws_url, partial, 10.0) == b""
    assert (await ca.send_message(ch, "still serving"))["seq"] == 2
