"""A small keep-alive HTTP/1.1 JSON client (h11 over trio streams) for the bench's setup calls.

One :class:`HTTPClient` is one connection, used by one task at a time; it reconnects when the server
closes it. A request that fails before any response byte arrived is retried once on a fresh
connection (the setup calls tolerate that: signup answers 409 to a repeat, login just makes one more
device). Non-2xx answers are returned, not raised; transport failures raise ``OSError``/trio errors.
"""

from __future__ import annotations

import json
import ssl
from urllib.parse import urlsplit

import h11
import trio


class HTTPClient:
    def __init__(self, base_url: str, timeout_s: float = 60.0):
        u = urlsplit(base_url)
        self.secure = u.scheme == "https"
        self.host = u.hostname or "localhost"
        self.port = u.port or (443 if self.secure else 80)
        self.prefix = u.path.rstrip("/")
        self.timeout_s = timeout_s
        self._stream = None
        self._conn: h11.Connection | None = None

    async def _connect(self) -> None:
        if self.secure:
            self._stream = await trio.open_ssl_over_tcp_stream(self.host, self.port,
                                                               ssl_context=ssl.create_default_context())
        else:
            self._stream = await trio.open_tcp_stream(self.host, self.port)
        self._conn = h11.Connection(h11.CLIENT)

    async def aclose(self) -> None:
        if self._stream is not None:
            await trio.aclose_forcefully(self._stream)
        self._stream = self._conn = None

    async def request(self, method: str, path: str, body=None, token: str | None = None) -> tuple[int, object]:
        """``(status, decoded JSON body or text)``."""
        with trio.fail_after(self.timeout_s):
            for attempt in (1, 2):
                if self._stream is None:
                    await self._connect()
                try:
                    return await self._request(method, path, body, token)
                except _Retryable:
                    await self.aclose()
                    if attempt == 2:
                        raise OSError(f"{method} {path}: connection closed before a response") from None
        raise AssertionError("unreachable")

    async def _request(self, method, path, body, token):
        conn = self._conn
        data = b"" if body is None else json.dumps(body).encode()
        headers = [("Host", f"{self.host}:{self.port}"), ("Accept", "application/json"),
                   ("Content-Length", str(len(data)))]
        if body is not None:
            headers.append(("Content-Type", "application/json"))
        if token:
            headers.append(("Authorization", f"Bearer {token}"))
        out = conn.send(h11.Request(method=method, target=self.prefix + path, headers=headers))
        if data:
            out += conn.send(h11.Data(data=data))
        out += conn.send(h11.EndOfMessage())
        got_response = False
        try:
            await self._stream.send_all(out)
            status, ctype, chunks = 0, "", []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    chunk = await self._stream.receive_some(65536)
                    conn.receive_data(chunk)
                    continue
                if isinstance(event, h11.Response):
                    got_response = True
                    status = event.status_code
                    for k, v in event.headers:
                        if k == b"content-type":
                            ctype = v.decode()
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.RemoteProtocolError):
            if not got_response:
                raise _Retryable() from None
            raise
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            await self.aclose()
        payload = b"".join(chunks)
        if "json" in ctype:
            return status, json.loads(payload)
        return status, payload.decode("utf-8", "replace")


class _Retryable(Exception):
    pass
