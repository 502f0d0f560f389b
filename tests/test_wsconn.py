"""chatd/shard/wsconn.py in memory: the server side of a WebSocket connection over
``trio.testing.memory_stream_pair()``, with wsproto's client side (or hand-made frames) at the other
end; the frame encoder against wsproto's. No sockets except where the socket fast path is the
point, no real sleeps (the handshake timeout runs on ``autojump_clock``)."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Ping, Pong, RejectConnection,
                            Request, TextMessage)
from wsproto.frame_protocol import FrameProtocol, Opcode

from chatd.shard import wsconn
from chatd.shard.wsconn import CloseReason, ConnectionClosed

PROTOCOLS = ("chatd.v1.msgpack", "chatd.v1.json")
STUCK_S = 10  # a reply that never comes fails the test (memory streams: it would wait forever)


def choose(proposed):
    return next((p for p in proposed if p in PROTOCOLS), None)


class Client:
    """wsproto's client side over one end of a stream."""

    def __init__(self, stream):
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._events: list = []

    async def send(self, event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def event(self):
        """The next event from the server; AssertionError if the stream ends first."""
        with trio.fail_after(STUCK_S):
            while not self._events:
                data = await self.stream.receive_some(65536)
                assert data, "the server closed the stream"
                self.ws.receive_data(data)
                self._events.extend(self.ws.events())
        return self._events.pop(0)

    async def at_eof(self) -> bool:
        """True once the server has closed the stream (whatever else arrives first is parsed)."""
        with trio.fail_after(STUCK_S):
            while data := await self.stream.receive_some(65536):
                self.ws.receive_data(data)
                self._events.extend(self.ws.events())
        return True


async def handshake(server_stream, client_stream, max_message_size=100, subprotocols=("x", "chatd.v1.json")):
    client = Client(client_stream)
    await client.send(Request(host="chat.example", target="/", subprotocols=list(subprotocols)))
    conn = await wsconn.accept(server_stream, choose, max_message_size, 10.0)
    assert conn is not None
    accepted = await client.event()
    assert isinstance(accepted, AcceptConnection)
    return client, conn, accepted


async def connected(max_message_size=100):
    client_stream, server_stream = trio.testing.memory_stream_pair()
    client, conn, _ = await handshake(server_stream, client_stream, max_message_size)
    return client, conn


def client_frame(opcode: Opcode, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame with any payload, valid or not."""
    return bytes(FrameProtocol(client=True, extensions=[])._serialize_frame(opcode, payload, fin))


async def assert_failed_with(client: Client, conn, code: int) -> None:
    """get_message raises with ``code``, the client got a close frame with it, then the end."""
    with pytest.raises(ConnectionClosed) as raised, trio.fail_after(STUCK_S):
        await conn.get_message()
    assert raised.value.reason.code == code
    assert conn.closed.code == code and not conn.is_open
    close = await client.event()
    assert isinstance(close, CloseConnection) and close.code == code
    assert await client.at_eof()


# ---- the handshake ------------------------------------------------------------------------------
async def test_the_handshake_accepts_the_first_of_our_subprotocols():
    client_stream, server_stream = trio.testing.memory_stream_pair()
    client, conn, accepted = await handshake(server_stream, client_stream)
    assert accepted.subprotocol == "chatd.v1.json" and conn.subprotocol == "chatd.v1.json"
    assert conn.is_open and conn.closed is None
    client_stream, server_stream = trio.testing.memory_stream_pair()
    client, conn, accepted = await handshake(server_stream, client_stream, subprotocols=())
    assert accepted.subprotocol is None and conn.subprotocol is None


async def test_a_request_that_is_not_an_upgrade_gets_400():
    client_stream, server_stream = trio.testing.memory_stream_pair()
    await client_stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await wsconn.accept(server_stream, choose, 100, 10.0) is None
    with trio.fail_after(STUCK_S):
        answer = await client_stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:40]
    client = WSConnection(ConnectionType.CLIENT)  # and a wsproto client reads it as a rejection
    client.send(Request(host="x", target="/"))
    client.receive_data(answer)
    assert isinstance(next(client.events()), RejectConnection)


async def test_a_peer_that_leaves_during_the_handshake():
    client_stream, server_stream = trio.testing.memory_stream_pair()
    await client_stream.send_all(b"GET / HTTP/1.1\r\n")
    await client_stream.aclose()
    assert await wsconn.accept(server_stream, choose, 100, 10.0) is None


@pytest.mark.parametrize("partial", [b"", b"GET / HTTP/1.1\r\nHost: x\r\n"])
async def test_a_handshake_not_finished_in_time_is_dropped_unanswered(autojump_clock, partial):
    client_stream, server_stream = trio.testing.memory_stream_pair()
    await client_stream.send_all(partial)
    start = trio.current_time()
    assert await wsconn.accept(server_stream, choose, 100, 10.0) is None
    assert trio.current_time() - start == pytest.approx(10.0)
    with trio.move_on_after(60) as waited:  # nothing was answered
        await client_stream.receive_some(65536)
    assert waited.cancelled_caught


# ---- messages -----------------------------------------------------------------------------------
async def test_text_binary_and_fragmented_messages():
    client, conn = await connected()
    await client.send(TextMessage(data="héllo"))
    assert await conn.get_message() == "héllo"
    await client.send(BytesMessage(data=b"\x00\xff"))
    assert await conn.get_message() == b"\x00\xff"
    await client.send(TextMessage(data="ab", message_finished=False))
    await client.send(TextMessage(data="cd"))
    assert await conn.get_message() == "abcd"
    await client.send(BytesMessage(data=b"12", message_finished=False))
    await client.send(BytesMessage(data=b"34"))
    assert await conn.get_message() == b"1234"


async def test_server_frames_reach_the_client():
    client, conn = await connected()
    assert conn.write_nowait(wsconn.frame("now")) == 0  # a memory stream takes nothing without awaiting
    await conn.send_raw(wsconn.frame("hé") + wsconn.frame(b"\x01\x02"))
    assert await client.event() == TextMessage(data="hé", frame_finished=True, message_finished=True)
    assert await client.event() == BytesMessage(data=b"\x01\x02", frame_finished=True, message_finished=True)


async def test_pings_are_answered_with_pongs():
    client, conn = await connected()
    await client.send(Ping(payload=b"are you there"))
    await client.send(TextMessage(data="after the ping"))
    assert await conn.get_message() == "after the ping"
    assert await client.event() == Pong(payload=b"are you there")


async def test_a_message_above_the_cap_closes_with_1009():
    client, conn = await connected(max_message_size=10)
    await client.send(TextMessage(data="é" * 10))  # 10 characters (20 bytes): at the cap
    assert await conn.get_message() == "é" * 10
    await client.send(BytesMessage(data=b"x" * 10))
    assert await conn.get_message() == b"x" * 10
    await client.send(TextMessage(data="x" * 6, message_finished=False))  # 11 over two fragments
    await client.send(TextMessage(data="y" * 5))
    await assert_failed_with(client, conn, 1009)


async def test_a_text_frame_that_is_not_utf8_closes_with_1007():
    client, conn = await connected()
    await client.stream.send_all(client_frame(Opcode.TEXT, b'{"x":"\xff\xfe"}'))
    await assert_failed_with(client, conn, 1007)


@pytest.mark.parametrize("bad", [
    bytes(FrameProtocol(client=False, extensions=[])._serialize_frame(Opcode.TEXT, b"unmasked")),
    client_frame(Opcode.CONTINUATION, b"a continuation of nothing"),
    client_frame(Opcode.PING, b"a fragmented ping", fin=False),
])
async def test_a_protocol_violation_closes_with_1002(bad):
    client, conn = await connected()
    await client.stream.send_all(bad)
    await assert_failed_with(client, conn, 1002)


# ---- closing ------------------------------------------------------------------------------------
async def test_the_peers_close_is_echoed_then_the_stream_closed():
    client, conn = await connected()
    await client.send(CloseConnection(code=4000, reason="bye"))
    with pytest.raises(ConnectionClosed) as raised:
        await conn.get_message()
    assert raised.value.reason == CloseReason(4000, "bye") == conn.closed
    assert await client.event() == CloseConnection(code=4000, reason="bye")
    assert await client.at_eof()
    with pytest.raises(ConnectionClosed) as raised:  # nothing is written after the close
        await conn.send_raw(wsconn.frame("late"))
    assert raised.value.reason == CloseReason(4000, "bye")
    assert conn.write_nowait(wsconn.frame("late")) == 0


async def test_a_stream_that_ends_without_a_close_frame_is_1006():
    client, conn = await connected()
    await client.stream.aclose()
    with pytest.raises(ConnectionClosed) as raised:
        await conn.get_message()
    assert raised.value.reason == CloseReason(1006, None) == conn.closed


async def test_our_close_handshake_waits_for_the_peers_close(autojump_clock):
    client, conn = await connected()
    reason = "é" * 100  # 200 bytes: cut to what a close frame holds, on a character boundary
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.aclose, 4001, reason)
        close = await client.event()
        assert (close.code, close.reason) == (4001, "é" * 60)
        await trio.sleep(5)
        assert nursery.child_tasks  # aclose waits for the peer's close frame
        await client.send(close.response())
    assert await client.at_eof()
    assert conn.closed == CloseReason(4001, reason) and not conn.is_open


async def test_abort_ends_the_stream_without_a_close_frame():
    client, conn = await connected()
    await conn.abort()
    assert await client.at_eof() and client._events == []
    assert conn.closed == CloseReason(1006, None)


# ---- a real socket: the write that does not yield -----------------------------------------------
async def test_write_nowait_writes_straight_to_a_socket():
    a, b = trio.socket.socketpair()
    server_stream, client_stream = trio.SocketStream(a), trio.SocketStream(b)
    client, conn, _ = await handshake(server_stream, client_stream)
    data = wsconn.frame("straight") + wsconn.frame(b"away")
    assert conn.write_nowait(data) == len(data)  # (a plain function: it cannot yield)
    assert await client.event() == TextMessage(data="straight", frame_finished=True, message_finished=True)
    assert await client.event() == BytesMessage(data=b"away", frame_finished=True, message_finished=True)
    await client_stream.aclose()
    await server_stream.aclose()


# ---- framing ------------------------------------------------------------------------------------
SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000]


@pytest.mark.parametrize("n", SIZES)
def test_frame_is_what_wsproto_builds(n):
    server = FrameProtocol(client=False, extensions=[])
    text = "é" * (n // 2) + "x" * (n % 2)  # n bytes of UTF-8
    assert wsconn.frame(text) == bytes(server.send_data(text, fin=True))
    assert wsconn.frame(b"\x07" * n) == bytes(server.send_data(b"\x07" * n, fin=True))


@pytest.mark.parametrize("n", SIZES)
def test_masked_client_frames_parse_as_sent(n):
    key = b"\x01\x80\x33\xfe"
    payload = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
    framed = wsconn.encode_frame(wsconn.OP_BINARY, payload, key)
    theirs = bytes(FrameProtocol(client=True, extensions=[])._serialize_frame(Opcode.BINARY, payload))
    head = 2 + (2 if 126 <= n < 65536 else 8 if n >= 65536 else 0)
    assert (framed[:head], framed[head:head + 4], len(framed)) == (theirs[:head], key, len(theirs))  # (their key is random)
    parser = FrameProtocol(client=False, extensions=[])
    parser.receive_bytes(framed)
    (got,) = list(parser.received_frames())
    assert (got.opcode, bytes(got.payload), got.frame_finished) == (Opcode.BINARY, payload, True)
    assert wsconn.mask(wsconn.mask(payload, key), key) == payload


def test_close_payload_cuts_the_reason_on_a_character_boundary():
    assert wsconn.close_payload(1000) == b"\x03\xe8"
    assert wsconn.close_payload(4001, "é" * 100) == b"\x0f\xa1" + ("é" * 60).encode()


# ---- the reader's own parse of the common frame (issue 24) --------------------------------------
def test_the_fast_parse_is_on_for_this_wsproto():
    """wsproto's internals that say "nothing buffered" are the ones get_message checks; where a
    wsproto release moved them, every frame goes through wsproto (slower, same behaviour)."""
    assert wsconn._FAST


_PIECES = [  # (name, bytes): client frames, common and not
    ("text", client_frame(Opcode.TEXT, b'{"type":"heartbeat","id":1}')),
    ("text-empty", client_frame(Opcode.TEXT, b"")),
    ("text-125", client_frame(Opcode.TEXT, b"a" * 125)),
    ("text-126", client_frame(Opcode.TEXT, b"b" * 126)),
    ("text-utf8", client_frame(Opcode.TEXT, "💬é".encode())),
    ("binary", client_frame(Opcode.BINARY, b"\x00\x01\xff")),
    ("binary-300", client_frame(Opcode.BINARY, bytes(range(256)) + b"x" * 44)),
    ("ping", client_frame(Opcode.PING, b"p")),
    ("pong", client_frame(Opcode.PONG, b"")),
    ("fragmented", client_frame(Opcode.TEXT, b"fr", fin=False) + client_frame(Opcode.CONTINUATION, b"ag")),
    ("ping-inside-fragments", client_frame(Opcode.TEXT, b"a", fin=False) + client_frame(Opcode.PING, b"")
     + client_frame(Opcode.CONTINUATION, b"b")),
]
_ENDINGS = [  # how the sequence ends: a close code expected from get_message
    ("close", client_frame(Opcode.CLOSE, b"\x03\xe8bye"), 1000),
    ("bad-utf8", client_frame(Opcode.TEXT, b"\xff\xfe"), 1007),
    ("too-big", client_frame(Opcode.TEXT, b"z" * 401), 1009),
    ("too-big-binary", client_frame(Opcode.BINARY, b"z" * 500), 1009),
    ("unmasked", bytes((0x81, 2)) + b"hi", 1002),
    ("rsv1", bytes((0xC1,)) + client_frame(Opcode.TEXT, b"r")[1:], 1002),
    ("non-minimal-length", bytes((0x81, 0x80 | 126, 0, 5)) + b"\x00\x00\x00\x00" + b"hello", 1002),
    ("eof", b"", 1006),
]


async def _messages_and_end(chunks, fast: bool, monkeypatch, eof: bool):
    monkeypatch.setattr(wsconn, "_FAST", fast)
    monkeypatch.setattr(wsconn, "_idle", wsconn._wsproto_is_idle if fast else (lambda proto: False))
    client, conn = await connected(max_message_size=400)
    for chunk in chunks:
        await client.stream.send_all(chunk)
    if eof:
        await client.stream.aclose()
    got = []
    with trio.fail_after(STUCK_S):
        while True:
            try:
                got.append(await conn.get_message())
            except ConnectionClosed as e:
                return got, e.reason.code


@pytest.mark.parametrize("ending", _ENDINGS, ids=[e[0] for e in _ENDINGS])
async def test_the_fast_parse_reads_what_wsproto_reads(ending, monkeypatch):
    """Every order of common and uncommon frames, cut at every kind of boundary, gives the same
    messages and the same end with the reader's own parse as with wsproto's alone."""
    import random
    rng = random.Random(ending[0])
    for _ in range(12):
        wire = b"".join(p for _, p in rng.choices(_PIECES, k=rng.randint(1, 8))) + ending[1]
        eof = ending[0] == "eof"
        if eof:  # the stream ends after a partial frame's first byte
            wire += b"\x81"
        cuts = sorted(rng.sample(range(1, len(wire)), min(len(wire) - 1, rng.randint(0, 4))))
        chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)])]
        fast = await _messages_and_end(chunks, True, monkeypatch, eof)
        slow = await _messages_and_end(chunks, False, monkeypatch, eof)
        assert fast == slow, (chunks, fast, slow)
        assert fast[1] == ending[2], fast
