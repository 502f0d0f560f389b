"""A lean WebSocket client for the load generator: a frame parser and a thin trio connection.
wsproto/trio-websocket are correct but cost several times more CPU per frame; a load generator
that shares the machine with the server must spend as little as it can.

What it does: the opening handshake (with ``Sec-WebSocket-Accept`` checked), client frames masked
with a fresh random key (built by chatd/shard/wsconn.py's :func:`~chatd.shard.wsconn.encode_frame`,
the one frame encoder: XOR done on big integers, not byte by byte), several frames written with
one ``send_all``, unfragmented and fragmented server frames (:class:`FrameParser`: the client's
own parser, a few times cheaper per frame than wsproto's, which the server parses with), ping →
pong, close handshake. What it does not: extensions (permessage-deflate is never offered) and TLS
client certificates.

Errors: :class:`WSClosed` when the peer closed (with its close code, 1006 if the TCP connection just
ended), :class:`HandshakeError` when the upgrade was refused; ``trio`` and ``OSError`` errors pass
through. One reader at a time; sends are serialized by a lock, so several tasks may send.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct
from urllib.parse import urlsplit

import trio

from ..shard.wsconn import (OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT,  # noqa: F401 - this client's API
                            close_payload, encode_frame, mask)

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class WSError(Exception):
    pass


class HandshakeError(WSError):
    pass


class WSClosed(WSError):
    def __init__(self, code: int = 1006, reason: str = ""):
        super().__init__(f"connection closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


# ---- parsing ---------------------------------------------------------------------------------

class FrameParser:
    """Bytes in, complete messages out: ``feed(data) -> [(opcode, payload), ...]``. Control frames
    come out as they arrive, data messages once their last fragment is in."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self._buf = bytearray()
        self._frag_op: int | None = None
        self._frags: list[bytes] = []
        self._frag_len = 0
        self._max = max_message_bytes

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        out = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            n = b1 & 0x7F
            hdr = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                hdr = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 10], "big")
                hdr = 10
            if n > self._max:
                raise WSError(f"frame of {n} bytes is above the limit")
            key = None
            if b1 & 0x80:
                if end - pos < hdr + 4:
                    break
                key = bytes(buf[pos + hdr:pos + hdr + 4])
                hdr += 4
            if end - pos < hdr + n:
                break
            payload = bytes(buf[pos + hdr:pos + hdr + n])
            pos += hdr + n
            if key is not None:
                payload = mask(payload, key)
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            if opcode >= 0x8:
                out.append((opcode, payload))
            elif opcode == OP_CONT:
                if self._frag_op is None:
                    raise WSError("continuation frame without a start")
                self._frags.append(payload)
                self._frag_len += n
                if self._frag_len > self._max:
                    raise WSError("message above the limit")
                if fin:
                    out.append((self._frag_op, b"".join(self._frags)))
                    self._frag_op, self._frags, self._frag_len = None, [], 0
            elif fin:
                out.append((opcode, payload))
            else:
                self._frag_op, self._frags, self._frag_len = opcode, [payload], n
        if pos:
            del buf[:pos]
        return out


def handshake_request(host: str, port: int, path: str, subprotocol: str | None) -> tuple[bytes, bytes]:
    key = base64.b64encode(os.urandom(16))
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key.decode()}", "Sec-WebSocket-Version: 13"]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), key


def check_handshake_response(head: bytes, key: bytes) -> str | None:
    """Validate the server's 101 reply; return the accepted subprotocol."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or parts[1] != "101":
        raise HandshakeError(f"upgrade refused: {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    expected = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
    if headers.get("sec-websocket-accept") != expected:
        raise HandshakeError("bad Sec-WebSocket-Accept")
    return headers.get("sec-websocket-protocol")


# ---- transports ------------------------------------------------------------------------------

class _SocketTransport:
    """Plain TCP straight on a non-blocking stdlib socket: one syscall per read or write, no wrapper
    layers; waits go through trio's I/O manager (so cancellation works as usual)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    @classmethod
    async def connect(cls, host: str, port: int) -> "_SocketTransport":
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        last: OSError | None = None
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    sock.connect(addr)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err)) from None
                return cls(sock)
            except OSError as e:
                sock.close()
                last = e
            except BaseException:
                sock.close()
                raise
        raise last or OSError(f"cannot resolve {host}")

    async def recv(self) -> bytes:
        sock = self.sock
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                return sock.recv(262144)
            except BlockingIOError:
                continue

    def send_nowait(self, data) -> int:
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0

    async def send_all(self, data) -> None:
        sock = self.sock
        view = memoryview(data)
        waited = False
        while view:
            try:
                n = sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                waited = True
                continue
            view = view[n:]
        if not waited:
            await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
        await trio.lowlevel.checkpoint()


class _StreamTransport:
    """Any trio stream (TLS for wss://): nothing is written without awaiting."""

    def __init__(self, stream):
        self.stream = stream

    async def recv(self) -> bytes:
        return await self.stream.receive_some(262144)

    def send_nowait(self, data) -> int:
        return 0

    async def send_all(self, data) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


# ---- connection --------------------------------------------------------------------------------

class WebSocket:
    """One client connection. Writes: :meth:`send_nowait` (never blocks: what the socket does not
    take at once waits in a backlog that :meth:`run_flusher` writes), or the async :meth:`send` /
    :meth:`send_frames`; both keep the order of calls. Reads: :meth:`receive`, one task at a time."""

    def __init__(self, transport, leftover: bytes, subprotocol: str | None):
        self.transport = transport
        self.subprotocol = subprotocol
        self.parser = FrameParser()
        self._leftover = leftover
        self._send_lock = trio.StrictFIFOLock()
        self._backlog = bytearray()
        self._backlog_event = trio.Event()
        self._broken: BaseException | None = None
        self._close_sent = False  # RFC 6455 5.5.1: one close frame per side, ours maybe a reply
        self._queued: list[tuple[int, bytes]] = []  # parsed frames not handled yet (from a close on)
        self.closed = False

    @classmethod
    async def connect(cls, url: str, subprotocol: str | None = None) -> "WebSocket":
        u = urlsplit(url)
        secure = u.scheme == "wss"
        port = u.port or (443 if secure else 80)
        host = u.hostname or "localhost"
        if secure:
            transport = _StreamTransport(await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=ssl.create_default_context()))
        else:
            transport = await _SocketTransport.connect(host, port)
        try:
            request, key = handshake_request(host, port, (u.path or "/") + (f"?{u.query}" if u.query else ""),
                                             subprotocol)
            await transport.send_all(request)
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = await transport.recv()
                if not chunk:
                    raise HandshakeError("connection closed during the handshake")
                buf += chunk
                if len(buf) > 65536:
                    raise HandshakeError("handshake response too large")
            head, _, rest = buf.partition(b"\r\n\r\n")
            accepted = check_handshake_response(head, key)
        except BaseException:
            with trio.CancelScope(shield=True):
                await transport.aclose()
            raise
        return cls(transport, rest, accepted)

    # ---- writing -------------------------------------------------------------------------------
    def send_nowait(self, data: bytes) -> None:
        """Write encoded frames now, as far as the socket takes them; never blocks."""
        if self._backlog or self._send_lock.locked() or self._broken is not None:
            self._backlog += data
            self._backlog_event.set()
            return
        try:
            n = self.transport.send_nowait(data)
        except OSError as e:
            self._broken = e
            n = 0
        if n < len(data):
            self._backlog += data[n:] if n else data
            self._backlog_event.set()

    async def run_flusher(self) -> None:
        """Write what :meth:`send_nowait` could not; raises :class:`WSClosed` when the socket broke."""
        while True:
            await self._backlog_event.wait()
            self._backlog_event = trio.Event()
            async with self._send_lock:
                await self._flush()

    async def _flush(self) -> None:
        if self._broken is not None:
            raise WSClosed(1006, f"send failed: {self._broken}")
        while self._backlog:
            data = bytes(self._backlog)
            self._backlog.clear()
            await self._send_all(data)

    async def _send_all(self, data) -> None:
        try:
            await self.transport.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self._broken = e
            raise WSClosed(1006, f"send failed: {e}") from None

    async def send_frames(self, frames: list[bytes]) -> None:
        """Write already-encoded frames (see :func:`encode_frame`) with one write."""
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        async with self._send_lock:
            await self._flush()
            await self._send_all(data)

    async def send(self, payload: bytes, opcode: int = OP_TEXT) -> None:
        await self.send_frames([encode_frame(opcode, payload)])

    # ---- reading -------------------------------------------------------------------------------
    async def receive(self) -> list[tuple[int, bytes]]:
        """The next data messages (at least one); answers pings; raises :class:`WSClosed` (after
        the data messages that came before the close frame were returned)."""
        while True:
            if self._queued:
                msgs, self._queued = self._queued, []
            else:
                if self._leftover:
                    data, self._leftover = self._leftover, b""
                else:
                    try:
                        data = await self.transport.recv()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                        self.closed = True
                        raise WSClosed(1006, str(e)) from None
                    if not data:
                        self.closed = True
                        raise WSClosed(1006, "connection ended")
                msgs = self.parser.feed(data)
            out = []
            for i, (op, payload) in enumerate(msgs):
                if op == OP_TEXT or op == OP_BINARY:
                    out.append((op, payload))
                elif op == OP_PING:
                    await self.send(payload, OP_PONG)
                elif op == OP_CLOSE:
                    if out:  # what came before the close first; the close on the next call
                        self._queued = msgs[i:]
                        return out
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                    reason = payload[2:].decode("utf-8", "replace")
                    if not self._close_sent:  # their close starts the handshake: reply
                        self._close_sent = True
                        with trio.move_on_after(1):
                            try:
                                await self.send(close_payload(code if code != 1005 else 1000), OP_CLOSE)
                            except WSClosed:
                                pass
                    await self.abort()
                    raise WSClosed(code, reason)
            if out:
                return out

    # ---- closing -------------------------------------------------------------------------------
    async def close(self, code: int = 1000, reason: str = "", wait_s: float = 1.0) -> None:
        """Close handshake: send a close frame, wait up to ``wait_s`` for the peer's (discarding any
        data that comes first), then end the TCP connection. Only when no other task is receiving."""
        if not self.closed:
            with trio.move_on_after(wait_s):
                try:
                    self._close_sent = True
                    await self.send(close_payload(code, reason), OP_CLOSE)
                    while True:
                        await self.receive()
                except WSClosed:
                    pass
        await self.abort()

    async def abort(self) -> None:
        """End the TCP connection at once (no close handshake)."""
        self.closed = True
        await self.transport.aclose()
