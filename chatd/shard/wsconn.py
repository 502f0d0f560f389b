"""The server side of a client WebSocket connection: wsproto's handshake and framing, trio glue here.

Why not trio-websocket's server (the bench clients use its client side): memory and tasks per
idle connection (goal: <= 16 KiB per connection at 10,000). A
trio-websocket server connection keeps, for its whole life, a reader task of its own (plus the
handler task and a nursery around both), a memory channel for received messages, a send lock,
three events, a ping dict, the ``WSConnection`` wrapper with its h11 handshake state and the
request headers. Measured (``chatd bench idle --clients 2000 --duration 15 --ramp-up 10
--procs 2``, server RSS per connection): 36.8 KiB per idle authenticated connection
with trio-websocket's server, 24.1 KiB with this module and nothing else changed. Here a connection is one ``__slots__`` object that keeps only
wsproto's ``Connection`` (the frame parser) once the handshake is over, and no task: the
session's reader task reads the socket itself (:meth:`ServerConnection.get_message`), so a
connection costs the handler task only. The handshake, framing, UTF-8 checks and close-frame
parsing stay wsproto's (the well-kept library); this module is the I/O around it.

Behaviour (tests/test_hardening.py checks it with real clients):

* a frame wsproto cannot parse gets a close frame with wsproto's code before the TCP close (1007
  for a text frame that is not UTF-8, 1002 for a protocol violation), never a bare TCP close;
* a message above ``max_message_size`` (counted as trio-websocket did: characters of a text
  message, bytes of a binary one) gets close 1009;
* a peer's close frame is answered with the same code, then the TCP connection is closed;
* pings are answered with pongs; a request that is not a WebSocket upgrade gets HTTP 400 (wsproto's
  rejection); a handshake not finished within ``connect_timeout`` is dropped.

Errors: every failure of the socket or the peer surfaces as trio-websocket's
``ConnectionClosed`` (with a ``CloseReason``), as before, so the session's error policy is
unchanged. Writes: :meth:`write_nowait` (what the socket takes now, no yield) and
:meth:`send_raw` (an awaited write of the rest under the connection's send lock) never
interleave two writers' bytes; the lock exists only once an awaited write needed it.
"""

from __future__ import annotations

import trio
from trio_websocket import CloseReason, ConnectionClosed
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Ping, RejectConnection,
                            Request, TextMessage)
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

RECEIVE_BYTES = 65536
MAX_REASON_BYTES = 120  # a close frame's reason fits in 123 bytes
ABNORMAL = 1006
TOO_BIG = 1009


def _short(reason: str | None) -> str:
    return (reason or "").encode()[:MAX_REASON_BYTES].decode(errors="ignore")


class ServerConnection:
    """One accepted WebSocket connection (server side). Not safe for two concurrent readers."""

    __slots__ = ("stream", "_sock", "_proto", "_lock", "_close_reason", "max_message_size", "subprotocol")

    def __init__(self, stream: trio.SocketStream, proto, subprotocol: str | None, max_message_size: int):
        self.stream = stream
        self._sock = stream.socket._sock  # the stdlib socket under trio's (for write_nowait)
        self._proto = proto  # wsproto.connection.Connection
        self._lock: trio.Lock | None = None
        self._close_reason: CloseReason | None = None
        self.max_message_size = max_message_size
        self.subprotocol = subprotocol

    @property
    def closed(self) -> CloseReason | None:
        return self._close_reason

    @property
    def is_open(self) -> bool:
        return self._close_reason is None and self._proto.state is ConnectionState.OPEN

    # ---- writes ------------------------------------------------------------------------------
    def write_nowait(self, data: bytes) -> int:
        """Write what the socket takes *now*, without yielding; the bytes written (0 when an
        awaited write holds the send lock, the connection is not open, the buffer is full or the
        socket failed: :meth:`send_raw` then writes the rest and reports any failure)."""
        # (_close_reason is set by every path that moves wsproto's state off OPEN)
        if self._close_reason is not None or (self._lock is not None and self._lock.locked()):
            return 0
        try:
            return self._sock.send(data)
        except OSError:  # BlockingIOError included
            return 0

    async def send_raw(self, data: bytes) -> None:
        """Write pre-built frames, all of them, under the send lock; ConnectionClosed if closed."""
        if not self.is_open:
            raise ConnectionClosed(self._close_reason or CloseReason(ABNORMAL, None))
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
        """The next whole message. Answers pings and the peer's close; ConnectionClosed at the end."""
        parts: list = []
        size = 0
        proto = self._proto
        while True:
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
                # a Pong needs nothing: this server sends no pings
            if self._close_reason is not None:
                raise ConnectionClosed(self._close_reason)
            try:
                data = await self.stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:  # TCP closed before the WebSocket was
                await self.abort()
                raise ConnectionClosed(self._close_reason)
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


async def accept(stream: trio.SocketStream, choose, max_message_size: int) -> ServerConnection | None:
    """Read the HTTP upgrade request and answer it (the caller bounds the time). ``choose(proposed
    subprotocols)`` names the one to accept (or None). None when the peer left or sent something
    that is not a WebSocket upgrade (it got HTTP 400 then)."""
    handshake = H11Handshake(ConnectionType.SERVER)
    request = None
    try:
        while request is None:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                return None
            handshake.receive_data(data)
            for event in handshake.events():
                if isinstance(event, Request):
                    request = event
                    break
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
    # Only the frame parser is kept: the h11 handshake state and the request's headers go here.
    return ServerConnection(stream, handshake.connection, subprotocol, max_message_size)
