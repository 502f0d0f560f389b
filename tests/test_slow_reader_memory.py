"""A client that never reads cannot make the server hold more than a few MiB for it (issue 20,
H3): replies queued for a connection are bounded in bytes, not only in frames, and a connection
whose replies are not being read is not read from either (backpressure).

The attack as reported: one channel holding a 100,000-emoji message (~400 kB as JSON), a raw
socket with a small receive buffer, ~190 ``history`` frames of ``limit: 1`` (~70 bytes each),
never a read: the server's RSS grew by ~76 MiB per such connection. Now 4-7 MiB (the byte budget,
``limits.send_queue_bytes`` = 1 MiB, plus the replies of at most ``max_inflight_requests`` = 4
requests in flight, plus SQLite's page cache); the bound below leaves a margin."""

from __future__ import annotations

import json
import socket

import trio
import wsproto
from wsproto.events import AcceptConnection, Request, TextMessage

from tests.helpers import open_client


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


async def _raw_ws(ws_url: str):
    """A WebSocket that authenticates and then never reads: a tiny receive buffer, no reads."""
    host, port = ws_url.split("//")[1].rstrip("/").split(":")
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((host, int(port)))
    stream = trio.SocketStream(sock)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=host, target="/", subprotocols=["chatd.v1.json"])))
    while True:
        ws.receive_data(await stream.receive_some(65536))
        if any(isinstance(e, AcceptConnection) for e in ws.events()):
            return stream, ws


async def test_a_client_that_never_reads_costs_a_bounded_amount_of_memory(server, nursery):
    alice, bob = [await server.api.signup_login(n) for n in ("alice", "bob")]
    lo, hi = sorted((alice["user"]["id"], bob["user"]["id"]))
    channel = f"dm:{lo}:{hi}"
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    await ca.send_raw(json.dumps({"type": "send", "id": "big", "channel_id": channel, "client_msg_id": "big",
                                  "body": "😀" * 100_000}, ensure_ascii=False))
    assert (await ca.reply_to("big"))["type"] == "ack"

    stream, ws = await _raw_ws(bob["ws_url"])
    await stream.send_all(ws.send(TextMessage(json.dumps({"type": "auth", "id": "a", "token": bob["token"]}))))
    before = rss_bytes()
    frames = b"".join(ws.send(TextMessage(json.dumps({"type": "history", "id": i, "channel_id": channel,
                                                         "limit": 1})))
                      for i in range(190))
    peak = before
    with trio.move_on_after(5):  # the server may stop reading us: that is the point
        await stream.send_all(frames)
    for _ in range(20):  # sample while the server works through what it read
        await trio.sleep(0.1)
        peak = max(peak, rss_bytes())
    grown_mib = (peak - before) / 2**20
    assert grown_mib < 12, f"the server held {grown_mib:.0f} MiB for one connection that never reads"
    # and the server goes on serving others
    assert (await ca.request({"type": "heartbeat"}))["type"] == "heartbeat"
    await stream.aclose()
