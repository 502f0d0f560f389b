"""The bench's lean WebSocket client (chatd/bench/ws.py) against two other implementations over
real loopback sockets: trio-websocket's server (what chatd serves with) and a server written on
wsproto directly, which lets the test choose the framing: payloads at every length-encoding edge
(0, 125, 126, 65535, 65536 bytes and more) both ways, fragmented messages with a ping between the
fragments, and the close handshake started by either side."""

from __future__ import annotations

import functools

import pytest
import trio
from trio_websocket import ConnectionClosed, serve_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Message, Ping, Pong, Request,
                            TextMessage)

from chatd.bench.ws import OP_BINARY, OP_TEXT, WebSocket, WSClosed

SIZES = (0, 1, 125, 126, 127, 65535, 65536, 70000)


def payload(n: int) -> bytes:
    return bytes((i * 7 + n) % 256 for i in range(n))


def text(n: int) -> bytes:
    return bytes(0x61 + (i + n) % 26 for i in range(n))


async def receive_one(ws: WebSocket) -> tuple[int, bytes]:
    """The next message (``receive`` returns every message that arrived together)."""
    pending = ws.__dict__.setdefault("_test_pending", [])
    with trio.fail_after(10):
        while not pending:
            pending.extend(await ws.receive())
    return pending.pop(0)


# ---- trio-websocket's server ---------------------------------------------------------------------

async def test_against_trio_websocket(nursery):
    seen: list = []
    closed: list = []

    async def handler(request):
        ws = await request.accept(subprotocol="chatd.v1.msgpack")
        try:
            while True:
                msg = await ws.get_message()
                seen.append(msg)
                if msg == "ping me":
                    await ws.ping(b"are you there")  # returns once the client's pong came back
                    await ws.send_message("ponged")
                elif msg == "close me":
                    await ws.aclose(4001, "server says bye")
                    return
                else:
                    await ws.send_message(msg)  # echo: str as text, bytes as binary
        except ConnectionClosed as e:
            closed.append((e.reason.code, e.reason.reason))

    server = await nursery.start(functools.partial(serve_websocket, handler, "127.0.0.1", 0, ssl_context=None,
                                                   max_message_size=1 << 20))
    url = f"ws://127.0.0.1:{server.port}/"
    ws = await WebSocket.connect(url, "chatd.v1.msgpack")
    assert ws.subprotocol == "chatd.v1.msgpack"
    for n in SIZES:
        await ws.send(payload(n), OP_BINARY)
        assert await receive_one(ws) == (OP_BINARY, payload(n))
        await ws.send(text(n), OP_TEXT)
        assert await receive_one(ws) == (OP_TEXT, text(n))
    await ws.send(b"ping me")
    assert await receive_one(ws) == (OP_TEXT, b"ponged")
    await ws.send(b"close me")
    with pytest.raises(WSClosed) as e:
        await receive_one(ws)
    assert (e.value.code, e.value.reason) == (4001, "server says bye")
    assert seen == [x for n in SIZES for x in (payload(n), text(n).decode())] + ["ping me", "close me"]
    # the client starts the close: the server sees its code and reason
    ws = await WebSocket.connect(url, "chatd.v1.msgpack")
    with trio.fail_after(10):
        await ws.close(1000, "client done")
    assert ws.closed
    with trio.fail_after(10):
        while not closed:
            await trio.sleep(0.01)
    assert closed == [(1000, "client done")]


# ---- wsproto, framing chosen by the test ----------------------------------------------------------

class WsprotoPeer:
    """One server connection on wsproto: events in, events out, nothing hidden."""

    def __init__(self, stream):
        self.stream = stream
        self.conn = WSConnection(ConnectionType.SERVER)
        self._events: list = []

    async def next(self):
        while not self._events:
            data = await self.stream.receive_some(65536)
            self.conn.receive_data(data or None)
            self._events.extend(self.conn.events())
        return self._events.pop(0)

    async def send(self, *events) -> None:
        await self.stream.send_all(b"".join(self.conn.send(e) for e in events))

    async def message(self):
        """The next whole data message (its fragments joined), answering pings."""
        parts = []
        while True:
            e = await self.next()
            if isinstance(e, Ping):
                await self.send(e.response())
            elif isinstance(e, Message):
                parts.append(e.data)
                if e.message_finished:
                    return type(e), (b"" if isinstance(e, BytesMessage) else "").join(parts)
            else:
                return e


async def wsproto_server(script, *, task_status=trio.TASK_STATUS_IGNORED):
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def handle(stream):
        peer = WsprotoPeer(stream)
        request = await peer.next()
        assert isinstance(request, Request)
        await peer.send(AcceptConnection(subprotocol=request.subprotocols[0] if request.subprotocols else None))
        await script(peer)

    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def test_framing_edges_against_wsproto(nursery):
    results: dict = {}

    async def script(peer: WsprotoPeer):
        # client -> server: every length encoding, both opcodes
        results["received"] = [await peer.message() for _ in range(2 * len(SIZES))]
        # server -> client: unfragmented at every edge
        for n in SIZES:
            await peer.send(BytesMessage(data=payload(n)))
        # fragmented text with a ping between the fragments (a fragment boundary inside "é")
        await peer.send(TextMessage(data="hél", message_finished=False), Ping(payload=b"mid-message"),
                        TextMessage(data="lo wor", message_finished=False), TextMessage(data="ld"))
        results["pong"] = await peer.next()
        # fragmented binary whose fragments sit on the edges: 125 + 126 + 65535 + 65536 bytes
        big = payload(125 + 126 + 65535 + 65536)
        cuts = [0, 125, 251, 251 + 65535, len(big)]
        await peer.send(*[BytesMessage(data=big[a:b], message_finished=(b == len(big)))
                          for a, b in zip(cuts, cuts[1:])])
        # the close handshake, started here
        await peer.send(CloseConnection(code=4002, reason="wsproto says bye"))
        results["close_reply"] = await peer.next()

    port = await nursery.start(wsproto_server, script)
    ws = await WebSocket.connect(f"ws://127.0.0.1:{port}/chat", "chatd.v1.json")
    assert ws.subprotocol == "chatd.v1.json"
    for n in SIZES:
        await ws.send(payload(n), OP_BINARY)
        await ws.send(text(n), OP_TEXT)
    for n in SIZES:
        assert await receive_one(ws) == (OP_BINARY, payload(n))
    assert await receive_one(ws) == (OP_TEXT, "héllo world".encode())
    assert await receive_one(ws) == (OP_BINARY, payload(125 + 126 + 65535 + 65536))
    with pytest.raises(WSClosed) as e:
        await receive_one(ws)
    assert (e.value.code, e.value.reason) == (4002, "wsproto says bye")
    assert results["received"] == [x for n in SIZES for x in ((BytesMessage, payload(n)), (TextMessage, text(n).decode()))]
    assert isinstance(results["pong"], Pong) and results["pong"].payload == b"mid-message"
    reply = results["close_reply"]
    assert isinstance(reply, CloseConnection) and reply.code == 4002


async def test_client_started_close_against_wsproto(nursery):
    got: list = []

    async def script(peer: WsprotoPeer):
        await peer.send(TextMessage(data="one"))
        e = await peer.message()  # the client's close, after any data it sent first
        got.append(e)
        await peer.send(e.response())  # the close handshake's reply
        got.append(await peer.stream.receive_some(1))  # then the client ends TCP: b""

    port = await nursery.start(wsproto_server, script)
    ws = await WebSocket.connect(f"ws://127.0.0.1:{port}/")
    assert ws.subprotocol is None
    with trio.fail_after(10):
        await ws.close(1001, "going away")  # discards "one", waits for the server's close
    with trio.fail_after(10):
        while len(got) < 2:
            await trio.sleep(0.01)
    assert isinstance(got[0], CloseConnection) and (got[0].code, got[0].reason) == (1001, "going away")
    assert got[1] == b""


async def test_messages_before_a_close_are_delivered(nursery):
    """Regression: a data message that arrived in the same read as the close frame was dropped
    (``receive`` raised ``WSClosed`` with the message still unreturned)."""
    written = trio.Event()
    replies: list = []

    async def script(peer: WsprotoPeer):
        await peer.send(TextMessage(data="last words"), CloseConnection(code=4003, reason="done"))  # one write
        written.set()
        replies.append(await peer.next())

    port = await nursery.start(wsproto_server, script)
    ws = await WebSocket.connect(f"ws://127.0.0.1:{port}/")
    with trio.fail_after(10):
        await written.wait()
        await trio.sleep(0.05)  # both frames are in our socket buffer before the first read
    assert await receive_one(ws) == (OP_TEXT, b"last words")
    with pytest.raises(WSClosed) as e:
        await receive_one(ws)
    assert e.value.code == 4003
    with trio.fail_after(10):
        while not replies:
            await trio.sleep(0.01)
    assert isinstance(replies[0], CloseConnection) and replies[0].code == 4003
