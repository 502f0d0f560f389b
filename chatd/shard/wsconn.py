"""The server side of a client WebSocket connection: wsproto's handshake and parsing, trio glue
and the framing of what the server sends here.

Why not trio-websocket's server (the bench clients use its client side): memory and tasks per
idle connection (goal: <= 16 KiB per connection at 10,000). A trio-websocket server connection
keeps, for its whole life, a reader task of its own (plus the handler task and a nursery around
both), a memory channel for received messages, a send lock, three events, a ping dict, the
``WSConnection`` wrapper with its h11 handshake state and the request headers. Measured (``chatd
bench idle --clients 2000 --duration 15 --ramp-up 10 --procs 2``, server RSS per connection):
36.8 KiB per idle authenticated connection with trio-websocket's server, 24.1 KiB with this
module and nothing else changed. Here a connection is one ``__slots__`` object that keeps only
wsproto's ``Connection`` (the frame parser) once the handshake is over, and no task: the
session's reader task reads the stream itself (:meth:`ServerConnection.get_message`), so a
connection costs the handler task only. The handshake, parsing, UTF-8 checks and close frames
stay wsproto's (the well-kept library); this module is the I/O around it.

Framing: :func:`frame` builds the server's data frames (unmasked, so a message's frame is the
same for every connection and is built once per format: chatd/shard/outbox.py), and
:func:`encode_frame` the masked client frames of the load generator (chatd/bench/ws.py): one
encoder, byte for byte what wsproto builds (tests/test_wsconn.py compares them), at a fraction
of its cost per frame (a 130-byte message frame: 1.9 µs with wsproto 1.3's ``FrameProtocol``,
0.16 µs here; masked: 4.4 µs against 0.9 µs; the shared 2-core development box).

Behaviour (tests/test_wsconn.py drives it over memory streams, tests/test_hardening.py with
real clients):

* a frame wsproto cannot parse gets a close frame with wsproto's code before the stream is
  closed (1007 for a text frame that is not UTF-8, 1002 for a protocol violation), never a bare
  TCP close;
* a message above ``max_message_size`` (counted as trio-websocket did: characters of a text
  message, bytes of a binary one) gets close 1009;
* a peer's close frame is answered with the same code, then the stream is closed;
* pings are answered with pongs; the server's own pings are :data:`PING` (a pre-built frame the
  session queues; the pong needs nothing); :attr:`ServerConnection.heard` is set whenever bytes
  arrive (the session's idle timeout clears and reads it); a request that is not a WebSocket upgrade gets HTTP 400
  (wsproto's rejection); a handshake not finished within ``timeout_s`` is dropped.

Errors: every failure of the stream or the peer surfaces as :class:`ConnectionClosed` (with a
:class:`CloseReason`: 1006 when the stream just ended or failed). Writes: :meth:`write_nowait`
(what the stream takes now, no yield) and :meth:`send_raw` (an awaited write of the rest under
the connection's send lock) never interleave two writers' bytes; the lock exists only once an
awaited write needed it. Only a :class:`trio.SocketStream` takes bytes without yielding (the
stdlib socket under it, written directly: trio has no public non-blocking send); on any other
stream (TLS, memory streams in tests) :meth:`write_nowait` takes nothing and every byte goes
through :meth:`send_raw`.
"""

from __future__ import annotations

import os
import random
import struct
from typing import Callable, NamedTuple

import trio
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Ping, RejectConnection,
                            Request, TextMessage)
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

RECEIVE_BYTES = 65536
MAX_REASON_BYTES = 120  # a close frame's reason fits in 123 bytes
ABNORMAL = 1006
TOO_BIG = 1009
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
PING = bytes((0x80 | OP_PING, 0))  # the server's ping: final, unmasked, no payload


class CloseReason(NamedTuple):
    """How a connection ended: the close code (1006: no close frame) and its reason."""
    code: int
    reason: str | None = None


class ConnectionClosed(Exception):
    """The connection is closed or failed; :attr:`reason` is its :class:`CloseReason`."""

    def __init__(self, reason: CloseReason | None):
        super().__init__(reason)
        self.reason = reason or CloseReason(ABNORMAL)


# ---- framing -------------------------------------------------------------------------------------
_rng = random.Random(os.urandom(16))
_pack_16 = struct.Struct("!BBH").pack
_pack_64 = struct.Struct("!BBQ").pack


def frame(payload: str | bytes) -> bytes:
    """One final, unmasked server frame: text for ``str``, binary for ``bytes``."""
    if type(payload) is str:
        payload = payload.encode()
        b0 = 0x81
    else:
        b0 = 0x82
    n = len(payload)  # (the header inline here and in encode_frame: a call per frame costs 5 %)
    if n < 126:
        return bytes((b0, n)) + payload
    if n < 65536:
        return _pack_16(b0, 126, n) + payload
    return _pack_64(b0, 127, n) + payload


def mask(payload: bytes, key: bytes) -> bytes:
    """``payload`` XOR the 4-byte ``key`` repeated (done on big integers, not byte by byte)."""
    n = len(payload)
    if not n:
        return payload
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(k, "little")).to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes, key: bytes | None = None) -> bytes:
    """One final client frame, masked with ``key`` (4 bytes; a fresh random one if None)."""
    if key is None:
        key = _rng.getrandbits(32).to_bytes(4, "little")
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = _pack_16(0x80 | opcode, 0x80 | 126, n)
    else:
        head = _pack_64(0x80 | opcode, 0x80 | 127, n)
    return head + key + mask(payload, key)


def close_payload(code: int, reason: str = "") -> bytes:
    """The payload of a close frame: the code, then the reason cut to fit (valid UTF-8)."""
    return struct.pack("!H", code) + _short(reason).encode()


def _short(reason: str | None) -> str:
    return (reason or "").encode()[:MAX_REASON_BYTES].decode(errors="ignore")


def _takes_nothing(data: bytes) -> int:
    return 0


def send_now_of(stream: trio.abc.Stream) -> Callable[[bytes], int]:
    """How to write, without yielding, what ``stream`` takes now: the ``send`` of the stdlib
    socket under a :class:`trio.SocketStream` (non-blocking: it takes what fits or raises
    ``BlockingIOError``); for any other stream a function that takes nothing."""
    if isinstance(stream, trio.SocketStream):
        return stream.socket._sock.send
    return _takes_nothing


def _wsproto_is_idle(proto) -> bool:
    """wsproto's parser holds nothing: no buffered byte, no frame or fragmented message begun,
    no event not yet taken (wsproto 1.2-1.3 internals; :data:`_FAST` is off where they differ)."""
    fp = proto._proto
    fd = fp._frame_decoder
    return not proto._events and fd.header is None and not len(fd.buffer) and fp._message_decoder.opcode is None


def _internals_known() -> bool:
    from wsproto.connection import Connection
    try:
        return _wsproto_is_idle(Connection(ConnectionType.SERVER))
    except AttributeError:
        return False


_FAST = _internals_known()  # tests/test_wsconn.py asserts it is on for the pinned wsproto
_idle = _wsproto_is_idle if _FAST else (lambda proto: False)


def _take_frame(buf: bytes, max_size: int):
    """(message, bytes used) for a whole common client frame at the start of ``buf`` (see
    :meth:`ServerConnection.get_message`); None for anything else (wsproto parses that)."""
    n = len(buf)
    if n < 6:
        return None
    b0, b1 = buf[0], buf[1]
    if (b0 != 0x81 and b0 != 0x82) or b1 < 0x80:  # not FIN + no RSV + text/binary, or unmasked
        return None
    size = b1 & 0x7F
    if size < 126:
        start = 6
    elif size == 126 and n >= 8:
        size = (buf[2] << 8) | buf[3]
        if size < 126:  # not the minimal length encoding: wsproto refuses it
            return None
        start = 8
    else:
        return None
    end = start + size
    if n < end:
        return None
    payload = mask(buf[start:end], buf[start - 4:start])
    if b0 == 0x82:
        return (payload, end) if size <= max_size else None
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        return None  # wsproto closes with 1007
    return (text, end) if len(text) <= max_size else None


class ServerConnection:
    """One accepted WebSocket connection (server side) over any trio stream. Not safe for two
    concurrent readers."""

    __slots__ = ("stream", "_send_now", "_proto", "_lock", "_close_reason", "max_message_size", "subprotocol",
                 "heard", "_raw")

    def __init__(self, stream: trio.abc.Stream, proto, subprotocol: str | None, max_message_size: int):
        self.stream = stream
        self._send_now = send_now_of(stream)  # for write_nowait
        self._proto = proto  # wsproto.connection.Connection
        self._lock: trio.Lock | None = None
        self._close_reason: CloseReason | None = None
        self.max_message_size = max_message_size
        self.subprotocol = subprotocol
        self.heard = True  # bytes arrived since the session's idle check last cleared it
        self._raw = b""  # bytes read and not yet parsed, while wsproto holds none (see get_message)

    @property
    def closed(self) -> CloseReason | None:
        return self._close_reason

    @property
    def is_open(self) -> bool:
        return self._close_reason is None and self._proto.state is ConnectionState.OPEN

    # ---- writes ------------------------------------------------------------------------------
    def write_nowait(self, data: bytes) -> int:
        """Write what the stream takes *now*, without yielding; the bytes written (0 when an
        awaited write holds the send lock, the connection is not open, the buffer is full, the
        socket failed or the stream is not a socket: :meth:`send_raw` then writes the rest and
        reports any failure)."""
        # (_close_reason is set by every path that moves wsproto's state off OPEN)
        if self._close_reason is not None or (self._lock is not None and self._lock.locked()):
            return 0
        try:
            return self._send_now(data)
        except OSError:  # BlockingIOError included
            return 0

    async def send_raw(self, data: bytes) -> None:
        """Write pre-built frames, all of them, under the send lock; ConnectionClosed if closed."""
        if not self.is_open:
            raise ConnectionClosed(self._close_reason)
        await self._write(data)

    async def _write(self, data: bytes) -> None:
        if self._lock is None:
            self._lock = trio.Lock()
        async with self._lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.abort()
                raise ConnectionClosed(self._close_reason) from None

    async def _send_event(self, event) -> None:
        await self._write(self._proto.send(event))

    async def abort(self) -> None:
        """Give up on the connection without a close handshake (the peer sees 1006)."""
        if self._close_reason is None:
            self._close_reason = CloseReason(ABNORMAL, None)
        await self.stream.aclose()

    # ---- reads -------------------------------------------------------------------------------
    async def get_message(self) -> str | bytes:
        """The next whole message. Answers pings and the peer's close; ConnectionClosed at the end.

        The common frame (final, masked, text or binary, under 64 KiB, valid UTF-8 for text,
        within ``max_message_size``) is parsed here (:func:`_take_frame`) while wsproto holds no
        bytes and no partial frame or message; the first frame that is anything else hands every
        byte from there on to wsproto, until it holds nothing again. So the order of frames is
        kept, and every check and error (close codes included) of an uncommon frame stays
        wsproto's. The frames of one read are parsed one per call, without another read."""
        parts: list = []
        size = 0
        proto = self._proto
        while True:
            raw = self._raw
            if raw:
                got = _take_frame(raw, self.max_message_size) if _idle(proto) else None
                if got is not None:
                    self._raw = raw[got[1]:]
                    return got[0]
                self._raw = b""  # wsproto's from here on
                proto.receive_data(raw)
            for event in proto.events():
                if isinstance(event, (TextMessage, BytesMessage)):
                    parts.append(event.data)
                    size += len(event.data)
                    if size > self.max_message_size:
                        await self._fail(TOO_BIG, f"Exceeded maximum message size: {self.max_message_size} bytes")
                    if event.message_finished:
                        return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)
                elif isinstance(event, CloseConnection):
                    await self._on_close(event)
                elif isinstance(event, Ping):
                    await self._send_event(event.response())
                # a Pong needs nothing (receiving it set `heard`)
            if self._close_reason is not None:
                raise ConnectionClosed(self._close_reason)
            try:
                data = await self.stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:  # TCP closed before the WebSocket was
                await self.abort()
                raise ConnectionClosed(self._close_reason)
            self.heard = True
            if _FAST and _idle(proto):
                self._raw = data
            else:
                proto.receive_data(data)

    async def _on_close(self, event: CloseConnection) -> None:
        if self._proto.state is ConnectionState.REMOTE_CLOSING:  # the peer closes: answer, hang up
            self._close_reason = CloseReason(event.code, event.reason or None)
            try:
                await self._send_event(event.response())
            except ConnectionClosed:
                pass
            await self.stream.aclose()
            raise ConnectionClosed(self._close_reason)
        if self._proto.state is ConnectionState.OPEN:  # wsproto could not parse a frame: say why
            await self._fail(event.code, event.reason)
        self._close_reason = self._close_reason or CloseReason(event.code, event.reason or None)
        await self.stream.aclose()  # the answer to our own close (CLOSED)
        raise ConnectionClosed(self._close_reason)

    async def _fail(self, code: int, reason: str | None) -> None:
        """Fail the WebSocket connection (RFC 6455 7.1.7): our close frame, then the TCP close."""
        self._close_reason = CloseReason(code, reason)
        try:
            await self._send_event(CloseConnection(code=code, reason=_short(reason)))
        except ConnectionClosed:
            pass
        await self.stream.aclose()
        raise ConnectionClosed(self._close_reason)

    # ---- closing -----------------------------------------------------------------------------
    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Our close handshake: the close frame, then wait for the peer's (the caller bounds the
        wait) while dropping what else arrives; the TCP connection is closed in any case."""
        try:
            if self._close_reason is None and self._proto.state is ConnectionState.OPEN:
                self._close_reason = CloseReason(code, reason)
                await self._send_event(CloseConnection(code=code, reason=_short(reason)))
                proto = self._proto
                if self._raw:  # read, not parsed: the peer's close frame may be in it
                    proto.receive_data(self._raw)
                    self._raw = b""
                    for _ in proto.events():
                        pass
                while proto.state is ConnectionState.LOCAL_CLOSING:
                    data = await self.stream.receive_some(RECEIVE_BYTES)
                    if not data:
                        break
                    proto.receive_data(data)
                    for _ in proto.events():
                        pass  # CloseConnection moves the state to CLOSED
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if self._close_reason is None:
                self._close_reason = CloseReason(code, reason)
            await self.stream.aclose()


async def accept(stream: trio.abc.Stream, choose, max_message_size: int, timeout_s: float) -> ServerConnection | None:
    """Read the HTTP upgrade request and answer it. ``choose(proposed subprotocols)`` names the
    one to accept (or None). None when the peer left, sent something that is not a WebSocket
    upgrade (it got HTTP 400 then) or did not finish within ``timeout_s`` (it got nothing); the
    caller closes the stream."""
    with trio.move_on_after(timeout_s):
        return await _accept(stream, choose, max_message_size)
    return None


async def _accept(stream: trio.abc.Stream, choose, max_message_size: int) -> ServerConnection | None:
    handshake = H11Handshake(ConnectionType.SERVER)

    async def read_request() -> Request | None:
        while True:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                return None
            handshake.receive_data(data)
            for event in handshake.events():
                if isinstance(event, Request):
                    return event
    return await _upgrade(stream, handshake, read_request, choose, max_message_size)


async def accept_request(stream: trio.abc.Stream, headers, target, trailing: bytes, choose,
                         max_message_size: int) -> ServerConnection | None:
    """:func:`accept` for an upgrade request already read (chatd/shard/httpconn.py parsed it:
    the shard port serves plain HTTP too); ``trailing``: bytes the client sent after it. None when
    the request is not a valid upgrade (it got HTTP 400) or the peer left."""
    handshake = H11Handshake(ConnectionType.SERVER)

    async def parsed_request() -> Request | None:
        handshake.initiate_upgrade_connection(headers, target)
        return next((e for e in handshake.events() if isinstance(e, Request)), None)
    return await _upgrade(stream, handshake, parsed_request, choose, max_message_size, trailing)


async def _upgrade(stream: trio.abc.Stream, handshake: H11Handshake, request_of, choose, max_message_size: int,
                   trailing: bytes = b"") -> ServerConnection | None:
    """The handshake of both entries: ``request_of()`` (awaited) reads or parses the client's
    upgrade request (None: the peer left, or no request); it is answered with the subprotocol
    ``choose`` names, or with HTTP 400 when it is no valid upgrade (None then, as when the peer
    left during the answer). Only wsproto's frame parser is kept in the connection: the h11
    handshake state and the request's headers end here. ``trailing``: bytes already read past
    the request, fed to the parser."""
    try:
        request = await request_of()
        if request is None:
            return None
        subprotocol = choose(request.subprotocols)
        await stream.send_all(handshake.send(AcceptConnection(subprotocol=subprotocol)))
    except RemoteProtocolError as e:
        hint = e.event_hint if isinstance(e.event_hint, RejectConnection) else RejectConnection()
        try:
            await stream.send_all(handshake.send(hint))
        except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
            pass
        return None
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return None
    conn = ServerConnection(stream, handshake.connection, subprotocol, max_message_size)
    if trailing:
        conn._proto.receive_data(trailing)
    return conn
