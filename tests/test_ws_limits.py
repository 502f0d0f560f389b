"""WebSocket resource caps (issue 20, findings 8 and 9): connections per user and per client
address (``too_many_connections``, close 4029), server pings and the idle timeout (close 4000),
and what one ``sync`` may cost (``sync_max_channels``, negative membership cached, no store reads
after ``sync_max_errors`` channel errors), counted in store calls."""

from __future__ import annotations

import json
import time

import trio
import wsproto
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

from chatd.config import Config
from tests.helpers import eventually, open_client


async def _error_then_close(client) -> tuple[dict, int]:
    error = await client._wait_for(lambda f: f["type"] == "error", 10)
    reason = await client.wait_closed(10)
    return error, reason.code


async def test_connections_per_user_are_capped(server_with, nursery):
    server = await server_with(max_connections_per_user=2)
    alice = await server.api.signup_login("alice")
    bob = await server.api.signup_login("bob")
    first = await open_client(nursery, alice["ws_url"], alice["token"])
    await open_client(nursery, alice["ws_url"], alice["token"])
    third = await open_client(nursery, alice["ws_url"])
    reply = await third.request({"type": "auth", "token": alice["token"]})
    assert reply["type"] == "error" and reply["code"] == "too_many_connections", reply
    assert (await third.wait_closed(10)).code == 4029
    await open_client(nursery, bob["ws_url"], bob["token"])  # other users are not affected
    await first.ws.aclose()  # one of alice's goes: she may open another
    await eventually(lambda: len(server.node.hub.sessions_of(alice["user"]["id"])) == 1)
    await open_client(nursery, alice["ws_url"], alice["token"])


async def test_connections_per_address_are_capped(server_with, nursery):
    server = await server_with(max_connections_per_address=2)
    alice = await server.api.signup_login("alice")
    first = await open_client(nursery, alice["ws_url"])  # not even authenticated: they count
    await open_client(nursery, alice["ws_url"], alice["token"])
    third = await open_client(nursery, alice["ws_url"])
    error, code = await _error_then_close(third)
    assert error["code"] == "too_many_connections" and code == 4029, error
    assert server.node.metrics.errors.get(code="too_many_connections") == 1
    await first.ws.aclose()
    await eventually(lambda: server.node.shard.by_address == {"127.0.0.1": 1})
    await open_client(nursery, alice["ws_url"], alice["token"])


async def _raw_authenticated(ws_url: str, token: str):
    """A WebSocket that authenticates and then answers nothing (no pong, no frame)."""
    host, port = ws_url.split("//")[1].rstrip("/").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=host, target="/")))
    events = []

    async def next_event():
        while not events:
            data = await stream.receive_some(65536)
            ws.receive_data(data or None)
            events.extend(ws.events())
        return events.pop(0)
    assert isinstance(await next_event(), AcceptConnection)
    await stream.send_all(ws.send(TextMessage(json.dumps({"type": "auth", "id": 1, "token": token}))))
    reply = await next_event()
    assert json.loads(reply.data)["type"] == "auth"
    return stream, next_event


async def test_a_silent_connection_is_pinged_then_closed_with_4000(server_with, nursery):
    server = await server_with(ping_interval_s=0.2, idle_timeout_s=0.6)
    alice = await server.api.signup_login("alice")
    stream, next_event = await _raw_authenticated(alice["ws_url"], alice["token"])
    start = time.monotonic()
    pings = 0
    with trio.fail_after(10):
        while True:
            event = await next_event()
            if isinstance(event, Ping):
                pings += 1  # never answered
            elif isinstance(event, CloseConnection):
                break
    elapsed = time.monotonic() - start
    assert event.code == 4000, event
    assert pings == 2  # at 0.2 and 0.4 s of silence; at 0.6 s the close
    assert 0.55 <= elapsed < 3, elapsed
    await stream.aclose()


async def test_the_auth_reply_names_the_heartbeat_interval_below_the_presence_grace(server_with, nursery):
    """What a client heartbeats at is the server's to say (limits.heartbeat_interval_s, 20 s by
    default: below presence's 30 s grace, so a device heartbeating at it never flaps offline)."""
    async def advertised(server, name) -> float:
        user = await server.api.signup_login(name)
        client = await open_client(nursery, user["ws_url"])
        reply = await client.request({"type": "auth", "token": user["token"]})
        assert reply["type"] == "auth", reply
        return reply["heartbeat_interval_s"]
    assert await advertised(await server_with(), "alice") == 20.0 == Config().limits.heartbeat_interval_s
    assert Config().limits.heartbeat_interval_s < Config().presence.grace_s
    assert await advertised(await server_with(heartbeat_interval_s=0.5), "bob") == 0.5


async def test_a_dead_client_is_closed_within_the_idle_bound_whatever_the_heartbeat_interval(server_with, nursery):
    """A longer heartbeat interval does not slow the detection of a dead client: that is the
    server's ping interval and idle timeout (close 4000 between idle_timeout_s and one ping
    interval more), even with a heartbeat interval far above both."""
    server = await server_with(ping_interval_s=0.2, idle_timeout_s=0.6, heartbeat_interval_s=30.0)
    alice = await server.api.signup_login("alice")
    stream, next_event = await _raw_authenticated(alice["ws_url"], alice["token"])
    start = time.monotonic()
    with trio.fail_after(10):
        while not isinstance(event := await next_event(), CloseConnection):
            pass  # pings never answered: a dead client
    assert event.code == 4000, event
    assert 0.55 <= time.monotonic() - start < 0.6 + 0.2 + 2.0  # the bound, plus a loaded machine's slack
    await stream.aclose()


async def test_a_client_that_answers_pings_stays_connected(server_with, nursery):
    server = await server_with(ping_interval_s=0.2, idle_timeout_s=0.4)
    alice = await server.api.signup_login("alice")
    client = await open_client(nursery, alice["ws_url"], alice["token"])  # trio-websocket answers pings
    await trio.sleep(1.5)  # several idle timeouts of nothing but pongs
    assert (await client.request({"type": "heartbeat"}))["type"] == "heartbeat"
    assert client.closed_reason is None


# ---- what one sync costs ------------------------------------------------------------------------
def count_store_calls(store, names=("members", "get_channel", "get_users", "head_seq", "read_messages")) -> dict:
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(store, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        setattr(store, name, counted)
    return calls


async def test_a_sync_of_thousands_of_unknown_channels_costs_a_bounded_number_of_store_reads(server, nursery):
    alice = await server.api.signup_login("alice")
    client = await open_client(nursery, alice["ws_url"], alice["token"])
    unknown = {f"g:{i:016x}": 0 for i in range(2000)}
    calls = count_store_calls(server.node.store)
    reply = await client.request({"type": "sync", "cursors": unknown}, timeout=30)
    assert reply["type"] == "sync" and reply["cursors"] == {} and len(reply["errors"]) == 2000
    limit = server.config.limits.sync_max_errors  # 100
    assert list(reply["errors"].values()) == ["no_such_channel"] * limit + ["skipped"] * (2000 - limit)
    assert calls["members"] == limit and calls["get_channel"] == limit, calls  # 2000 each before
    # asked again at once: the negative answers are cached, no store read at all
    reply = await client.request({"type": "sync", "cursors": unknown}, timeout=30)
    assert calls["members"] == limit and calls["get_channel"] == limit, calls


async def test_a_sync_names_at_most_sync_max_channels(server_with, nursery):
    server = await server_with(sync_max_channels=10)
    alice = await server.api.signup_login("alice")
    client = await open_client(nursery, alice["ws_url"], alice["token"])
    too_many = {f"g:{i:016x}": 0 for i in range(11)}
    reply = await client.request({"type": "sync", "cursors": too_many})
    assert reply["type"] == "error" and reply["code"] == "bad_field", reply
    reply = await client.request({"type": "sync", "cursors": dict(list(too_many.items())[:10])})
    assert reply["type"] == "sync", reply
    # in auth, too: authenticated, the sync refused
    other = await open_client(nursery, alice["ws_url"])
    rid = 77
    await other.send({"type": "auth", "id": rid, "token": alice["token"], "cursors": too_many})
    assert (await other.reply_to(rid))["type"] == "auth"
    error = await other.reply_to(rid)
    assert error["type"] == "error" and error["code"] == "bad_field", error
