"""A fix for trio-websocket (0.11 - 0.12, the range setup.py pins): a frame wsproto cannot parse
(a text frame that is not UTF-8: 1007; a protocol violation: 1002) is reported by wsproto as if the
peer had closed, and trio-websocket then drops the TCP connection without sending a close frame:
the client sees 1006 and cannot tell what it did wrong. Patched here: in that case the close frame
with wsproto's code goes out first (RFC 6455 7.1.7, "fail the WebSocket connection").

Why a patch, measured: no public hook sees the event (the handler table is built inside the
reader task), and the alternative (our own WebSocket server on wsproto) is ~400 lines.
tests/test_hardening.py fails without it. Applied once, at import of chatd.shard.server.
"""

from __future__ import annotations

from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

_original = WebSocketConnection._handle_close_connection_event
MAX_REASON_BYTES = 120  # a close frame's reason fits in 123 bytes


async def _handle_close_connection_event(self, event: CloseConnection) -> None:
    if self._wsproto.state == ConnectionState.OPEN:  # a real close from the peer is REMOTE_CLOSING
        reason = (event.reason or "").encode()[:MAX_REASON_BYTES].decode(errors="ignore")
        try:
            await self._send(CloseConnection(code=event.code, reason=reason))
        except ConnectionClosed:
            pass
    await _original(self, event)


def apply() -> None:
    if WebSocketConnection._handle_close_connection_event is not _handle_close_connection_event:
        WebSocketConnection._handle_close_connection_event = _handle_close_connection_event
