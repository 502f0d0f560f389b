"""The nursery tree of a chatd process and the context its services share.

``serve_run`` is ``chatd run``: store -> shard (WebSocket) -> API (HTTP), one process, one shard,
in-process discovery. It is the cluster's shape with one shard: the API asks discovery for a
shard, sends go to the channel's owner, fan-out goes through the router.

Stop policy: :meth:`Node.request_stop` (SIGINT/SIGTERM, or a test) drains the shard (sessions
closed with 1001), stops the API, then the store finishes queued writes; everything is bounded by
``server.shutdown_grace_s``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import trio

from .auth import new_secret
from .config import Config
from .discovery.local import LocalDiscovery, ShardInfo
from .metrics import Metrics
from .shard.hub import Hub
from .shard.membership import Membership
from .shard.owner import ChannelOwners
from .shard.ratelimit import TokenBucket
from .shard.router import Router
from .shard.server import ShardServer
from .store import open_store

log = logging.getLogger(__name__)


@dataclass
class RunInfo:
    api_url: str
    ws_url: str


class Node:
    """Everything one chatd process shares; passed explicitly, never global."""

    def __init__(self, config: Config, store, secret: str):
        self.config = config
        self.store = store
        self.secret = secret
        self.metrics = Metrics()
        self.hub = Hub()
        self.router = Router(self.hub, self.metrics)
        self.membership = Membership(store)
        self.owners = ChannelOwners(store, self.membership, self.router, self.metrics)
        self.discovery = LocalDiscovery()
        self.shard = ShardServer(self)
        self.stop_event = trio.Event()
        self.metrics.gauge("chatd_ws_authenticated", "Authenticated client sessions", lambda: self.hub.count)
        if hasattr(store, "stats"):
            self.metrics.gauge("chatd_store_commits", "Group commits done by the store",
                               lambda: store.stats["commits"])

    def rate_bucket(self) -> TokenBucket:
        lim = self.config.limits
        return TokenBucket(lim.rate_frames_per_s, lim.rate_burst, trio.current_time())

    def request_stop(self) -> None:
        self.stop_event.set()


def load_secret(config: Config) -> str:
    """The configured token secret, or one generated on first start and kept in the data dir."""
    if config.auth.secret:
        return config.auth.secret
    path = config.data_path / "secret.key"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = new_secret()
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(secret)
    tmp.chmod(0o600)
    tmp.replace(path)
    return secret


def public_ws_url(config: Config, port: int) -> str:
    if config.server.public_ws_url:
        return config.server.public_ws_url
    return f"ws://{config.server.ws_host}:{port}/"


async def serve_run(config: Config, *, task_status=trio.TASK_STATUS_IGNORED, node_out: list | None = None) -> None:
    """``chatd run``: serve until :meth:`Node.request_stop` or cancellation."""
    from .api.server import serve_api

    config.data_path.mkdir(parents=True, exist_ok=True)
    secret = load_secret(config)
    async with open_store(config) as store:
        node = Node(config, store, secret)
        if node_out is not None:
            node_out.append(node)
        async with trio.open_nursery() as nursery:
            ws_port = await nursery.start(node.shard.serve)
            ws_url = public_ws_url(config, ws_port)
            node.discovery.register(ShardInfo(config.server.shard_id, ws_url, lambda: node.hub.count))
            api_stop = trio.Event()
            api_url = await nursery.start(serve_api, node, api_stop)
            log.info("chatd run ready: api %s, websocket %s, data %s", api_url, ws_url, config.data_path)
            task_status.started(RunInfo(api_url, ws_url))
            await node.stop_event.wait()
            log.info("stopping: draining %d sessions", len(node.shard.sessions))
            node.discovery.unregister(config.server.shard_id)
            node.shard.drain("server shutting down; reconnect")
            api_stop.set()
            with trio.move_on_after(config.server.shutdown_grace_s):
                await node.shard.wait_drained()
            nursery.cancel_scope.cancel()
    log.info("stopped")
