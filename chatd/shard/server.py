"""``serve_shard``: the client-facing WebSocket server of one chat shard (trio-websocket).

Resources: one listening socket; one :class:`~chatd.shard.session.Session` (two tasks) per
connection, all in one handler nursery owned by this function. Started with ``nursery.start``:
it reports the bound port only once it accepts. Stopping: :meth:`ShardServer.drain` asks every
session to close with 1001 (clients reconnect through discovery), then cancellation ends the rest.
"""

from __future__ import annotations

import functools
import gc
import logging

import trio
from trio_websocket import ConnectionClosed, serve_websocket

from ..protocol.client import JSON, MSGPACK, SUBPROTOCOLS
from . import wsfix
from .session import CLOSE_GOING_AWAY, Session

wsfix.apply()  # a text frame that is not UTF-8 gets a 1007 close frame, not a bare TCP close

log = logging.getLogger(__name__)

GC_FREEZE_EVERY = 500  # accepted connections between two gc.freeze() calls


def choose_subprotocol(proposed) -> tuple[str | None, str]:
    """(subprotocol to accept, format). Prefer what the client listed first among ours."""
    for name in proposed:
        if name in SUBPROTOCOLS:
            return name, SUBPROTOCOLS[name]
    return None, JSON


class ShardServer:
    def __init__(self, node):
        self.node = node
        self.sessions: set[Session] = set()
        self.port: int | None = None
        self.accepting = True
        self._drained = trio.Event()
        self._accepted = 0

    async def _handle(self, request) -> None:
        """One connection. Nothing a client does may end the server: a failure here ends only
        this connection (logged); a bug is logged with its traceback."""
        try:
            await self._serve_connection(request)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.debug("connection ended during set-up: %r", e)
        except Exception:  # noqa: BLE001 - a bug in one session must not take the shard down
            log.exception("session crashed; connection dropped")

    async def _serve_connection(self, request) -> None:
        subprotocol, fmt = choose_subprotocol(request.proposed_subprotocols)
        ws = await request.accept(subprotocol=subprotocol)  # the client may be gone already
        session = Session(self.node, ws, fmt)
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
        limits = cfg.limits
        async with trio.open_nursery() as nursery:
            server = await nursery.start(functools.partial(
                serve_websocket, self._handle, cfg.server.ws_host, cfg.server.ws_port, None,
                handler_nursery=nursery,
                # Frames above max_frame_bytes get a 'frame_too_large' error and the connection goes on;
                # only frames above twice that are refused by the WebSocket layer (close 1009), exactly:
                # 2 * max_frame_bytes bytes is answered, one byte more closes.
                max_message_size=2 * limits.max_frame_bytes,
                message_queue_size=4, connect_timeout=10, disconnect_timeout=5))
            self.port = server.port
            log.info("shard %s accepting WebSocket clients on %s:%d", cfg.server.shard_id,
                     cfg.server.ws_host, self.port)
            gc.freeze()  # everything built at start-up lives as long as the process
            task_status.started(self.port)
