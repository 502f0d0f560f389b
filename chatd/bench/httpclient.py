"""The bench's JSON client for its setup calls (sign-ups, logins, groups): httpx, one keep-alive
connection per :class:`HTTPClient`, used by one task at a time.

A request that fails before an answer (the server closed the kept-alive connection, or refused
it) is retried once on a fresh connection (the setup calls tolerate that: sign-up answers 409 to
a repeat, login just makes one more device). Non-2xx answers are returned, not raised; transport
failures raise ``OSError``; every request is bounded by ``timeout_s``.
"""

from __future__ import annotations

import json

import httpx
import trio


class HTTPClient:
    def __init__(self, base_url: str, timeout_s: float = 60.0):
        self.timeout_s = timeout_s
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout_s,
                                         limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                                         headers={"Accept": "application/json"})

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(self, method: str, path: str, body=None, token: str | None = None) -> tuple[int, object]:
        """``(status, decoded JSON body or text)``."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        content = None if body is None else json.dumps(body).encode()
        if content is not None:
            headers["Content-Type"] = "application/json"
        with trio.fail_after(self.timeout_s):
            for attempt in (1, 2):
                try:
                    r = await self._client.request(method, path, content=content, headers=headers)
                    break
                except (httpx.RemoteProtocolError, httpx.ConnectError) as e:  # no answer came
                    if attempt == 2:
                        raise OSError(f"{method} {path}: {type(e).__name__}: {e}") from None
                except httpx.TransportError as e:
                    raise OSError(f"{method} {path}: {type(e).__name__}: {e}") from None
        if "json" in r.headers.get("content-type", ""):
            return r.status_code, r.json()
        return r.status_code, r.text
