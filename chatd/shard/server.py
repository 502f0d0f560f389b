"""The client-facing WebSocket server of one chat shard (wsproto, chatd/shard/wsconn.py).

Resources: one listening socket; one task per connection (the TLS handshake when the port has
TLS and the WebSocket handshake, together bounded by ``CONNECT_TIMEOUT_S``, then the
:class:`~chatd.shard.session.Session`'s reader), all in one handler nursery owned by
:meth:`ShardServer.serve`, with the two tasks shared by all sessions: the flusher
(chatd/shard/flusher.py) and the timer wheel (chatd/shard/timers.py). Started with ``nursery.start``:
it reports the bound port only once it accepts. Stopping: :meth:`ShardServer.drain` asks every
session to close with 1001 (clients reconnect through discovery), then cancellation ends the rest.

Connections per client address: at most ``limits.max_connections_per_address`` WebSockets at
once (0: no cap; loopback counts like any address); one more gets a ``too_many_connections``
error frame and close 4029 right after its handshake (a handshake is bounded by
``CONNECT_TIMEOUT_S``).
"""

from __future__ import annotations

import functools
import gc
import logging

import trio

from ..protocol import client as proto
from ..protocol.client import JSON, SUBPROTOCOLS
from . import httproutes, wsconn
from .flusher import Flusher
from .httpconn import BadRequest, HTTPConnection
from .httpsession import HTTPSessions
from .session import CLOSE_GOING_AWAY, CLOSE_TOO_MANY_CONNECTIONS, Session
from .timers import Timers
from .wsconn import ConnectionClosed

log = logging.getLogger(__name__)

GC_FREEZE_EVERY = 500  # accepted connections between two gc.freeze() calls
CONNECT_TIMEOUT_S = 10.0  # a WebSocket handshake not finished by then is dropped


def peer_address(stream) -> str | None:
    """The client's IP address (under a TLS stream: its transport's); None for other streams."""
    stream = getattr(stream, "transport_stream", stream)
    if not isinstance(stream, trio.SocketStream):
        return None
    try:
        return stream.socket.getpeername()[0]
    except OSError:
        return None


def choose_subprotocol(proposed) -> str | None:
    """The subprotocol to accept: the first the client listed among ours (None: JSON)."""
    for name in proposed:
        if name in SUBPROTOCOLS:
            return name
    return None


class ShardServer:
    def __init__(self, node):
        self.node = node
        self.sessions: set[Session] = set()
        self.port: int | None = None
        self.accepting = True
        self._drained = trio.Event()
        self._accepted = 0
        self.flusher = Flusher(node.metrics.messages_out)  # one writer pass for all sessions (chatd/shard/flusher.py)
        self.timers = Timers()  # every session's auth timeout / token expiry (chatd/shard/timers.py)
        # TLS on this port (node.tls: chatd/tls.py; its context follows reloads), None: plain ws://
        self._tls_context = node.tls.context(("http/1.1",)) if node.tls is not None else None
        self.by_address: dict[str, int] = {}  # client address -> its connections here (WebSocket or HTTP)
        self.http = HTTPSessions(self)  # SSE / long-poll / POST /v1/frames device sessions
        self._nursery: trio.Nursery | None = None  # the handler nursery (HTTP sessions run in it too)

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One connection. Nothing a client does may end the server: a failure here ends only
        this connection (logged); a bug is logged with its traceback. The TCP connection is
        closed when this returns, whatever happened."""
        try:
            async with stream:
                conn, timeout_s = stream, CONNECT_TIMEOUT_S
                if self._tls_context is not None:
                    conn, timeout_s = await self._tls_handshake(stream)
                    if conn is None:
                        return
                await self._serve_connection(conn, timeout_s)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.debug("connection ended during set-up: %r", e)
        except Exception:  # noqa: BLE001 - a bug in one session must not take the shard down
            log.exception("session crashed; connection dropped")

    async def _tls_handshake(self, sock: trio.SocketStream):
        """``(TLS stream, seconds left for the WebSocket handshake)``, or ``(None, 0)`` when the
        TLS handshake did not finish within ``CONNECT_TIMEOUT_S`` (the one deadline of the whole
        set-up). A failed handshake (a client that does not trust the certificate, not TLS at
        all) raises ``trio.BrokenResourceError``. ``https_compatible``: closing never waits to
        send a close_notify to a peer that does not read (the WebSocket close frame, inside TLS,
        is the end of the data)."""
        deadline = trio.current_time() + CONNECT_TIMEOUT_S
        stream = trio.SSLStream(sock, self._tls_context, server_side=True, https_compatible=True)
        with trio.move_on_at(deadline):
            await stream.do_handshake()
            return stream, deadline - trio.current_time()
        return None, 0.0

    async def _serve_connection(self, conn, timeout_s: float) -> None:
        """Read the first HTTP request (within ``timeout_s``): a WebSocket upgrade becomes a
        session, anything else is answered by chatd/shard/httproutes.py (keep-alive). The
        client's address holds one of its ``max_connections_per_address`` meanwhile (one more is
        refused: a WebSocket with ``too_many_connections`` and close 4029, HTTP with 429)."""
        limits = self.node.config.limits
        deadline = trio.current_time() + timeout_s
        http = HTTPConnection(conn, 2 * limits.max_frame_bytes)
        try:
            req = await http.next_request(timeout_s)
        except BadRequest as e:
            return await http.refuse(e.status, str(e))
        if req is None:
            return
        address = peer_address(conn)
        cap = limits.max_connections_per_address
        n = self.by_address.get(address, 0) if address is not None else 0
        over = address is not None and cap and n >= cap
        if address is not None and not over:
            self.by_address[address] = n + 1
        try:
            if req.upgrade:
                # Frames above max_frame_bytes get a 'frame_too_large' error and the connection goes on;
                # only frames above twice that are refused with close 1009, exactly: 2 * max_frame_bytes
                # bytes is answered, one byte more closes.
                with trio.move_on_at(deadline):
                    ws = await wsconn.accept_request(conn, req.raw_headers, req.target, req.trailing,
                                                     choose_subprotocol, 2 * limits.max_frame_bytes)
                    if ws is None:
                        return
                if over:
                    return await self._refuse(ws, cap)
                return await self._serve_session(ws)
            if over:
                self.node.metrics.errors.inc(code="too_many_connections")
                return await http.respond_json(429, {"error": {
                    "code": "too_many_connections",
                    "message": f"{cap} connections from this address already; close one first"}},
                    headers=[(b"retry-after", b"1"), (b"connection", b"close")])
            await httproutes.serve(self, http, req)
        finally:
            if address is not None and not over:
                n = self.by_address[address] - 1
                if n:
                    self.by_address[address] = n
                else:
                    del self.by_address[address]

    async def _refuse(self, ws: wsconn.ServerConnection, cap: int) -> None:
        """Over the per-address cap: an error frame and close 4029, nothing read (at most 2 s)."""
        self.node.metrics.errors.inc(code="too_many_connections")
        fmt = SUBPROTOCOLS.get(ws.subprotocol, JSON)
        error = proto.error_frame("too_many_connections", f"{cap} connections from this address already; "
                                  "close one first")
        with trio.move_on_after(2):
            try:
                await ws.send_raw(wsconn.frame(proto.dumps(error, fmt)))
            except ConnectionClosed:
                pass
            await ws.aclose(CLOSE_TOO_MANY_CONNECTIONS, "too many connections from this address")

    async def _serve_session(self, ws: wsconn.ServerConnection) -> None:
        await self.run_session(Session(self.node, ws, SUBPROTOCOLS.get(ws.subprotocol, JSON), self.flusher,
                                       self.timers))

    def start_http_session(self, run, hs) -> None:
        """Run an HTTP device session (chatd/shard/httpsession.py) in the handler nursery."""
        self._nursery.start_soon(run, hs)

    async def run_session(self, session: Session) -> None:
        """Serve ``session`` (over a WebSocket or an HTTP device's pipe) until it ends."""
        self._accepted += 1
        if self._accepted % GC_FREEZE_EVERY == 0:
            # Long-lived connection state would otherwise be re-scanned by every full collection:
            # with ~10,000 connections those took over a second each (benchmarks/README.md).
            gc.freeze()
        if not self.accepting:
            session.close_soon(CLOSE_GOING_AWAY, "server shutting down; reconnect elsewhere")
        self.sessions.add(session)
        self.node.metrics.connections.set(len(self.sessions))
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            self.node.metrics.connections.set(len(self.sessions))
            if not self.accepting and not self.sessions:
                self._drained.set()

    def drain(self, reason: str = "server shutting down; reconnect") -> None:
        self.accepting = False
        for s in list(self.sessions):
            s.close_soon(CLOSE_GOING_AWAY, reason)
        if not self.sessions:
            self._drained.set()

    async def wait_drained(self) -> None:
        await self._drained.wait()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.node.config
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.flusher.run)
            await nursery.start(self.timers.run)
            listeners = await nursery.start(functools.partial(
                trio.serve_tcp, self._handle, cfg.server.ws_port, host=cfg.server.ws_host,
                handler_nursery=nursery))
            self.port = listeners[0].socket.getsockname()[1]
            log.info("shard %s accepting WebSocket clients on %s:%d%s", cfg.server.shard_id,
                     cfg.server.ws_host, self.port, " (TLS)" if self._tls_context is not None else "")
            gc.freeze()  # everything built at start-up lives as long as the process
            task_status.started(self.port)
