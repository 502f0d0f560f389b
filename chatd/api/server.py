"""``serve_api``: the HTTP API on hypercorn's trio worker. Reports its bound URL through
``task_status`` once it accepts (``https://`` with TLS); returns after ``stop`` is set and
hypercorn's graceful shutdown (bounded by ``graceful_timeout``) is over.

TLS (``tls``: the node's :class:`~chatd.tls.ServerTLS`, None for plain HTTP): hypercorn's own
TLS listener, with the holder's reloadable context in place of one hypercorn would load once;
a TLS handshake not finished within ``TLS_HANDSHAKE_TIMEOUT_S`` is dropped."""

from __future__ import annotations

import functools
import logging

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve

from ..tls import ServerTLS
from .app import create_app
from .host import ApiHost

TLS_HANDSHAKE_TIMEOUT_S = 10.0


async def serve_api(node: ApiHost, stop: trio.Event, app_factory=create_app, tls: ServerTLS | None = None, *,
                    bind: str = "", task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app_factory(node)`` on ``bind`` ("host:port"; default ``server.api_host:api_port``)."""
    cfg = node.config.server
    hc = HyperConfig()
    hc.bind = [bind or f"{cfg.api_host}:{cfg.api_port}"]
    if tls is not None:
        hc.certfile, hc.keyfile = tls.cert_file, tls.key_file  # (only so that hypercorn binds TLS sockets)
        hc.ssl_handshake_timeout = TLS_HANDSHAKE_TIMEOUT_S
        context = tls.context(hc.alpn_protocols)
        hc.create_ssl_context = lambda: context
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = 2.0
    hc.loglevel = node.config.log_level.upper()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, app_factory(node), hc, shutdown_trigger=stop.wait))
        task_status.started(binds[0].rstrip("/"))
