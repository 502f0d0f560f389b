"""A minimal HTTP/1.1 POST client (h11 over trio streams) for push gateways.

One request per connection (``Connection: close``): a push is one small POST, gateways are few, and a
fresh connection per attempt means a retry never inherits a half-broken socket. ``https://`` URLs use
the system's default TLS context.

Error policy: :func:`post` returns any HTTP answer (the caller interprets the status) and raises
:class:`TransportError` when there is no usable answer: the name does not resolve, the connection is
refused or reset, the whole exchange exceeds ``timeout_s``, or the peer speaks broken HTTP. Nothing else
escapes (a bug aside).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

MAX_RESPONSE_BYTES = 64 * 1024  # gateway answers are tiny JSON documents; more is cut off
USER_AGENT = "chatd-push/1"


class TransportError(Exception):
    """No usable HTTP answer (see the module docstring)."""


@dataclass(frozen=True)
class HTTPResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


def split_url(url: str) -> tuple[bool, str, int, str]:
    """``(secure, host, port, target)``; ``ValueError`` for anything but an http(s) URL with a host."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    secure = u.scheme == "https"
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    return secure, u.hostname, u.port or (443 if secure else 80), target


async def post(url: str, body: bytes, headers: list[tuple[str, str]], timeout_s: float) -> HTTPResponse:
    """POST ``body`` to ``url``; the whole exchange (connect, send, answer) is bounded by ``timeout_s``."""
    secure, host, port, target = split_url(url)
    with trio.move_on_after(timeout_s) as scope:
        try:
            if secure:
                stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl.create_default_context())
            else:
                stream = await trio.open_tcp_stream(host, port)
        except OSError as e:
            raise TransportError(f"connect to {host}:{port} failed: {e}") from e
        try:
            return await _exchange(stream, host, port, target, body, headers)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as e:
            raise TransportError(f"{host}:{port}: {type(e).__name__}: {e}") from e
        finally:
            await trio.aclose_forcefully(stream)
    assert scope.cancelled_caught
    raise TransportError(f"{host}:{port}: no answer within {timeout_s:g} s")


async def _exchange(stream, host, port, target, body, headers) -> HTTPResponse:
    conn = h11.Connection(h11.CLIENT)
    default_port = 443 if isinstance(stream, trio.SSLStream) else 80
    all_headers = [("Host", host if port == default_port else f"{host}:{port}"), ("User-Agent", USER_AGENT),
                   ("Content-Length", str(len(body))), ("Connection", "close"), *headers]
    out = conn.send(h11.Request(method="POST", target=target, headers=all_headers))
    out += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    await stream.send_all(out)
    status, resp_headers, chunks, size = 0, {}, [], 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))  # b"" (EOF) makes h11 decide
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            resp_headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
        elif isinstance(event, h11.Data):
            if size < MAX_RESPONSE_BYTES:
                chunks.append(bytes(event.data)[:MAX_RESPONSE_BYTES - size])
                size += len(chunks[-1])
        elif isinstance(event, h11.EndOfMessage):
            return HTTPResponse(status, resp_headers, b"".join(chunks))
        elif isinstance(event, h11.ConnectionClosed):
            raise trio.BrokenResourceError("connection closed before a complete answer")
        # h11.InformationalResponse (100 Continue): keep reading
