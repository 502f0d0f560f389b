"""The web client's static files (``chatd/web/``, shipped in the package) on the API app.

``GET /`` is ``index.html``; ``GET /web/<path>`` the scripts and styles next to it. Files are read
from the package directory only (``send_from_directory`` refuses paths that leave it: 404), never
cached stale (``no-cache``: the browser revalidates by ETag), and served with a Content-Security-Policy
that allows nothing but this origin, connections (WebSocket, and the shards' HTTP transports) and
(images, audio, video) the ``blob:`` URLs the client makes of media it fetched with its token — the client loads no CDN, font or script from
elsewhere, and an injected ``<script>`` cannot run.
"""

from __future__ import annotations

from pathlib import Path

from quart import send_from_directory

from .spec import hide

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
# connect-src: the shards' WebSocket and, where it is blocked, their SSE / poll / frames URLs
# (docs/protocol.md section 7) -- other hosts than this API's in a cluster, so by scheme.
CSP = ("default-src 'self'; connect-src 'self' ws: wss: http: https:; img-src 'self' data: blob:; media-src 'self' blob:; "
       "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def add_web_client(app) -> None:
    """Register ``GET /`` and ``GET /web/<path>`` on ``app``."""

    async def static(name: str):
        response = await send_from_directory(WEB_DIR, name)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.get("/")
    @hide  # static files: not part of the JSON API's OpenAPI description
    async def web_index():
        return await static("index.html")

    @app.get("/web/<path:name>")
    @hide
    async def web_file(name: str):
        return await static(name)
