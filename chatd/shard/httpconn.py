"""Plain HTTP/1.1 on the shard's client port (h11): what is not a WebSocket upgrade -- the SSE
stream, long polls, ``POST /v1/frames`` (chatd/shard/httproutes.py) -- and the request that
becomes one.

One :class:`HTTPConnection` per TCP connection: :meth:`HTTPConnection.next_request` reads one
request (its head at most ``MAX_HEAD_BYTES``, its body at most ``max_body_bytes``, all of it
within ``timeout_s``: slow or oversized requests are answered 408/413/431 or dropped), then the
route answers it whole (:meth:`respond`) or streams it (:meth:`start` / :meth:`write` /
:meth:`end`: chunked). Keep-alive: the next request on the same connection is read only once the
answer is complete; a request that asks to upgrade to WebSocket is handed back as it is
(:attr:`Request.upgrade`) with the bytes read past it, for chatd/shard/wsconn.py.

Errors: a peer that sends bad HTTP gets 400 and the connection is closed
(:class:`BadRequest` carries the status); a failed socket raises ``trio.BrokenResourceError`` /
``ClosedResourceError`` to the caller. Nothing here logs a request's target or headers (a token
may be in either: docs/security.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import h11
import msgspec
import trio

RECEIVE_BYTES = 65536
MAX_HEAD_BYTES = 32768  # a request line and headers (a resume token may ride in a header or the URL)
CORS = [(b"access-control-allow-origin", b"*"),  # tokens, not cookies: any origin may call with a token
        (b"access-control-expose-headers", b"retry-after")]
CORS_PREFLIGHT = [(b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                         (b"access-control-allow-headers", b"authorization, content-type, last-event-id"),
                         (b"access-control-max-age", b"600")]


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    method: str
    target: str
    path: str
    query: dict  # name -> its first value
    headers: dict  # lower-case name -> value (str; the last one wins)
    raw_headers: list  # h11's [(name, value)], for a WebSocket upgrade
    body: bytes = b""
    upgrade: bool = False
    trailing: bytes = b""  # bytes read past an upgrade request

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name, default)


class HTTPConnection:
    def __init__(self, stream: trio.abc.Stream, max_body_bytes: int):
        self.stream = stream
        self.max_body_bytes = max_body_bytes
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)

    async def _next_event(self):
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                raise BadRequest(e.error_status_hint, str(e)) from None
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(RECEIVE_BYTES)
            self.h11.receive_data(data)  # (b"": the peer closed; h11 says so as ConnectionClosed)

    async def next_request(self, timeout_s: float) -> Request | None:
        """The next request, or None when the peer closed or went quiet for ``timeout_s``.
        ``BadRequest`` for bad HTTP (the caller answers its status and closes)."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        with trio.move_on_after(timeout_s):
            event = await self._next_event()
            if isinstance(event, h11.ConnectionClosed):
                return None
            if not isinstance(event, h11.Request):
                raise BadRequest(400, "expected a request")
            req = _request(event)
            if req.upgrade:
                data, _closed = self.h11.trailing_data
                req.trailing = bytes(data)
                return req
            body = bytearray()
            while True:
                event = await self._next_event()
                if isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > self.max_body_bytes:
                        raise BadRequest(413, f"request body above {self.max_body_bytes} bytes")
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise BadRequest(400, "the request ended early")
            req.body = bytes(body)
            return req
        return None

    @property
    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def respond(self, status: int, body: bytes, content_type: bytes = b"application/json",
                      headers: list | None = None) -> None:
        hs = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
              (b"cache-control", b"no-store")] + CORS + (headers or [])
        await self._send(h11.Response(status_code=status, headers=hs))
        await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def respond_json(self, status: int, obj, headers: list | None = None) -> None:
        await self.respond(status, msgspec.json.encode(obj), headers=headers)

    async def start(self, status: int, headers: list) -> None:
        """The head of a streamed answer (chunked on HTTP/1.1)."""
        await self._send(h11.Response(status_code=status, headers=headers + CORS))

    async def write(self, data: bytes) -> None:
        await self._send(h11.Data(data=data))

    async def end(self) -> None:
        await self._send(h11.EndOfMessage())

    async def _send(self, event) -> None:
        await self.stream.send_all(self.h11.send(event))

    async def refuse(self, status: int, message: str) -> None:
        """Answer bad HTTP (when h11 still can) and let the caller close the connection."""
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                await self.respond_json(status, {"error": {"code": "bad_request", "message": message}},
                                        headers=[(b"connection", b"close")])
            except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass


def _request(event: h11.Request) -> Request:
    target = event.target.decode("latin-1")
    parts = urlsplit(target)
    query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    headers = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in event.headers}
    upgrade = "websocket" in headers.get("upgrade", "").lower()
    return Request(event.method.decode("latin-1"), target, parts.path, query, headers, list(event.headers),
                   upgrade=upgrade)
