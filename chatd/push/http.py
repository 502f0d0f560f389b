"""POSTs to push gateways, with httpx (on trio through anyio).

A :class:`GatewayClient` is one pooled ``httpx.AsyncClient`` per provider: keep-alive connections
to the gateway are reused across pushes (at most ``MAX_CONNECTIONS`` open); ``https://`` URLs are
verified against the system's CA store (``ssl.create_default_context()``); proxies come from the
environment (``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY``). HTTP/1.1.

Error policy: :meth:`GatewayClient.post` returns any HTTP answer (the caller interprets the status)
and raises :class:`TransportError` when there is no usable answer: the name does not resolve, the
connection is refused or reset, the whole exchange (connect, send, answer) exceeds ``timeout_s``,
or the peer speaks broken HTTP. Nothing else escapes (a bug aside). Answers are cut at
``MAX_RESPONSE_BYTES``. :meth:`GatewayClient.aclose` closes the pool (the push service does, on
its way out).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import trio

MAX_RESPONSE_BYTES = 64 * 1024  # gateway answers are tiny JSON documents; more is cut off
MAX_CONNECTIONS = 32
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


class GatewayClient:
    def __init__(self, max_connections: int = MAX_CONNECTIONS):
        self._limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._client: httpx.AsyncClient | None = None  # made at first use (needs no event loop until then)

    def _get(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(verify=ssl.create_default_context(), limits=self._limits,
                                             headers={"User-Agent": USER_AGENT}, follow_redirects=False)
        return self._client

    async def post(self, url: str, body: bytes, headers: list[tuple[str, str]], timeout_s: float) -> HTTPResponse:
        """POST ``body`` to ``url``; the whole exchange is bounded by ``timeout_s``."""
        _, host, port, _ = split_url(url)
        client = self._get()
        with trio.move_on_after(timeout_s) as scope:
            try:
                async with client.stream("POST", url, content=body, headers=headers, timeout=timeout_s) as resp:
                    chunks, size = [], 0
                    async for chunk in resp.aiter_bytes():
                        chunks.append(chunk[:MAX_RESPONSE_BYTES - size])
                        size += len(chunks[-1])
                        if size >= MAX_RESPONSE_BYTES:
                            break
                    return HTTPResponse(resp.status_code, {k.lower(): v for k, v in resp.headers.items()},
                                        b"".join(chunks))
            except (httpx.TransportError, httpx.DecodingError, OSError) as e:
                raise TransportError(f"{host}:{port}: {_describe(e)}") from e
        assert scope.cancelled_caught
        raise TransportError(f"{host}:{port}: no answer within {timeout_s:g} s")

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def _describe(e: BaseException) -> str:
    """``Type: message`` of ``e`` and of its causes (httpx's own messages are often empty)."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen and len(parts) < 4:
        seen.add(id(e))
        parts.append(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        e = e.__cause__ or e.__context__
    return " <- ".join(parts)
