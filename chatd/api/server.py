"""``serve_api``: the HTTP API on hypercorn's trio worker. Reports its bound URL through
``task_status`` once it accepts; returns after ``stop`` is set and hypercorn's graceful shutdown
(bounded by ``graceful_timeout``) is over."""

from __future__ import annotations

import functools
import logging

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve

from .app import create_app
from .host import ApiHost


async def serve_api(node: ApiHost, stop: trio.Event, app_factory=create_app, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    cfg = node.config.server
    hc = HyperConfig()
    hc.bind = [f"{cfg.api_host}:{cfg.api_port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = 2.0
    hc.loglevel = node.config.log_level.upper()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, app_factory(node), hc, shutdown_trigger=stop.wait))
        task_status.started(binds[0].rstrip("/"))
