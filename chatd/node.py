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
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import trio

from .auth import new_secret
from .config import Config
from .discovery.local import LocalDiscovery
from .discovery.view import ShardInfo
from .metrics import Metrics
from .presence.service import PresenceService
from .push import make_push_service
from .shard.hub import Hub
from .membership import Membership
from .shard.owner import ChannelOwners
from .ratelimit import TokenBucket
from .shard.router import VIEW_WAIT_S, Router
from .shard.server import ShardServer
from .store import open_store

log = logging.getLogger(__name__)


@dataclass
class RunInfo:
    api_url: str
    ws_url: str


class Node:
    """Everything one chatd process shares; passed explicitly, never global."""

    def __init__(self, config: Config, store, secret: str, discovery=None):
        self.config = config
        self.store = store
        self.secret = secret
        self.metrics = Metrics()
        self.hub = Hub()
        self.discovery = discovery if discovery is not None else LocalDiscovery()
        self.router = Router(self)
        self.membership = Membership(store)
        self.owners = ChannelOwners(store, self.membership, self.router, self.metrics)
        self.shard = ShardServer(self)
        pc = config.presence
        # In-process presence (chatd run); a cluster shard replaces it with the remote client.
        self.presence = PresenceService(store, self.membership, self.router.deliver_event, pc.grace_s,
                                        pc.coalesce_s, pc.group_push_max)
        self.nursery: trio.Nursery | None = None  # for background work of the node's services
        self.discovery.on_change(self.router.on_view_change)
        # Push notifications for members with no connected device (None with push.provider = "none").
        self.push = make_push_service(config, store, shards=lambda: list(self.discovery.view.shards),
                                      online=self._connected_here)
        if self.push is not None:
            self.discovery.on_change(self.push.on_view_change)
            for key in ("sent", "rejected", "failed", "gave_up", "dropped"):
                self.metrics.gauge(f"chatd_push_{key}", f"Push notifications: {key} (since start)",
                                   lambda key=key: self.push.stats[key])
        self._link_chains: dict = {}  # (link, channel) -> the last send's 'submitted' event
        # keys of tokens revoked lately (logout frames seen here): closes the window between a
        # session's store check and its attach (chatd/shard/session.py)
        self.revoked_here: OrderedDict[str, None] = OrderedDict()
        self.stop_event = trio.Event()
        self.metrics.gauge("chatd_ws_authenticated", "Authenticated client sessions", lambda: self.hub.count)
        store_metrics(self.metrics, store)
        discovery_metrics(self.metrics, self.discovery)
        self.metrics.labeled_gauge("chatd_link_queue_frames", "Frames waiting in each inter-shard link's send queue",
                                   "peer", lambda: link_queue_depths(self.router.links))

    def _connected_here(self, user_id: int) -> bool:
        """A device of ``user_id`` is connected (known for the users homed on this shard)."""
        view = self.discovery.view
        return bool(view.shards) and view.home_of(user_id) == self.config.server.shard_id \
            and bool(self.router.locations.get(user_id))

    def rate_bucket(self) -> TokenBucket:
        lim = self.config.limits
        return TokenBucket(lim.rate_frames_per_s, lim.rate_burst, trio.current_time())

    def request_stop(self) -> None:
        self.stop_event.set()

    def membership_changed(self, channel_id: str) -> None:
        """The API changed a channel's members: drop cached membership here (and, in cluster
        mode, on every shard)."""
        self.membership.invalidate(channel_id)
        links = self.router.links
        if links is not None:
            for peer in list(links.links):
                links.send_nowait(peer, {"t": "invalidate", "ch": channel_id})

    def connection_count(self) -> int:
        return self.hub.count

    def notify_members(self, event: dict, user_ids) -> None:
        """A transient event (``member_added`` / ``member_removed``) to every device of ``user_ids``."""
        self.router.deliver_event(event, user_ids)

    def device_logged_out(self, user_id: int, device_id: str, token_key: str, except_session=None) -> None:
        """A logout revoked ``token_key``: close the device's connections here and on every shard
        (link frame ``logout``; best effort: a peer whose link is down misses it, but its shard
        refuses the token at the next ``auth``)."""
        self._close_device(user_id, device_id, token_key, except_session)
        links = self.router.links
        if links is not None:
            for peer in list(links.links):
                links.send_nowait(peer, {"t": "logout", "u": user_id, "d": device_id, "k": token_key})

    def _close_device(self, user_id: int, device_id: str, token_key: str, except_session=None) -> None:
        self.revoked_here[token_key] = None
        if len(self.revoked_here) > REVOKED_REMEMBERED:
            self.revoked_here.popitem(last=False)
        for session in tuple(self.hub.sessions_of(user_id)):
            if session.device_id == device_id and session is not except_session:
                session.logged_out_elsewhere()

    # ---- cluster links -------------------------------------------------------------------
    async def on_link_frame(self, link, frame: dict) -> None:
        if frame.get("t") == "logout":
            try:
                self._close_device(int(frame["u"]), str(frame["d"]), str(frame["k"]))
            except (KeyError, TypeError, ValueError):
                log.warning("malformed logout frame from %s", link.peer_id)
        elif frame.get("t") == "send":
            # like a session: concurrent, but entering the store in the order the link carried
            # them, per channel (a send stuck on one channel holds no other channel's)
            ch = frame.get("ch")
            key = (link, ch if isinstance(ch, str) else None)
            previous = self._link_chains.get(key)
            if (previous is None or previous.is_set()) and self.router.remote_send_nowait(link, frame):
                return  # queued in the store already: no task, no event
            submitted = self._link_chains[key] = trio.Event()
            self.nursery.start_soon(self._remote_send, key, frame, previous, submitted)
        else:
            view = frame.get("view")
            if type(view) is int and view > self.discovery.view.version and frame.get("t") in VIEW_ROUTED:
                # Routed by a view newer than ours (its ZooKeeper watch fired first): catch up
                # (wait_view re-reads at once) before routing it further, or a user who just
                # became homed here would be looked up by the old view and the message missed.
                # Holding this link's reader keeps its frames in order; the wait is bounded.
                await self.discovery.wait_view(view, VIEW_WAIT_S)
            self.router.on_frame(link, frame)

    async def _remote_send(self, key, frame: dict, previous, submitted: trio.Event) -> None:
        try:
            await self.router.on_remote_send(key[0], frame, previous, submitted)
        finally:
            if self._link_chains.get(key) is submitted:
                del self._link_chains[key]

    def on_link_up(self, link) -> None:
        self.router.topology_changed()
        self.router.announce_all(only_to=link.peer_id)
        self.router.schedule_resync(1.0)


REVOKED_REMEMBERED = 10_000

# link frames routed by a view: the receiver must route them by at least that view
VIEW_ROUTED = frozenset({"deliver", "push", "device", "devices"})


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
            node.nursery = nursery
            await nursery.start(node.presence.run)
            if node.push is not None:
                await nursery.start(node.push.run)
            ws_port = await nursery.start(node.shard.serve)
            ws_url = public_ws_url(config, ws_port)
            node.discovery.register(ShardInfo(config.server.shard_id, ws_url), load=lambda: node.hub.count)
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
            await _flush_push(node)
            nursery.cancel_scope.cancel()
    log.info("stopped")


async def _flush_push(node, timeout_s: float = 2.0) -> None:
    """Stopping: what delivery queued for pushes reaches the outbox (a restart sends it)."""
    if node.push is not None:
        with trio.move_on_after(timeout_s):
            await node.push.flush()


# ---- cluster roles -------------------------------------------------------------------------------

async def serve_shard(config: Config, *, task_status=trio.TASK_STATUS_IGNORED, node_out: list | None = None) -> None:
    """``chatd shard``: one chat shard of a cluster. Ready (``task_status``) once it listens for
    WebSockets and links and its znode exists. Stop: unregister (logins go elsewhere), drain
    clients with 1001, finish queued writes."""
    from .api.admin import create_admin_app
    from .api.server import serve_api
    from .discovery.zk import ZkDiscovery
    from .cluster.links import LinkManager

    config.validate_cluster("shard")
    cc = config.cluster
    async with open_store(config) as store:
        node = Node(config, store, config.auth.secret,
                    ZkDiscovery(cc.zk_hosts, cc.zk_root, cc.zk_session_timeout_s, cc.load_refresh_s,
                                cc.overload_connections))
        if node_out is not None:
            node_out.append(node)
        links = LinkManager(config.server.shard_id, "shard", cc, on_frame=node.on_link_frame,
                            on_link_up=node.on_link_up, metrics=node.metrics)
        node.router.links = links
        presence_links, presence_view = _remote_presence(node, config, config.server.shard_id, "shard",
                                                         on_frame=node.on_link_frame)
        async with trio.open_nursery() as nursery:
            node.nursery = nursery
            await nursery.start(node.discovery.run)
            await nursery.start(links.run, True)
            if node.push is not None:
                await nursery.start(node.push.run)
            node.discovery.on_change(lambda old, new: links.set_peers(new))
            await _start_remote_presence(nursery, node.presence, presence_links, presence_view)
            ws_port = await nursery.start(node.shard.serve)
            ws_url = public_ws_url(config, ws_port)
            admin_stop = trio.Event()
            await nursery.start(serve_api, node, admin_stop, create_admin_app)
            await node.discovery.register(ShardInfo(config.server.shard_id, ws_url, links.public_addr()),
                                          load=lambda: node.hub.count)
            links.set_peers(node.discovery.view)
            log.info("shard %s ready: websocket %s, links %s", config.server.shard_id, ws_url, links.public_addr())
            task_status.started(RunInfo("", ws_url))
            await node.stop_event.wait()
            log.info("stopping: unregistering and draining %d sessions", len(node.shard.sessions))
            with trio.move_on_after(2):
                await node.discovery.unregister()
            node.shard.drain("shard shutting down; log in again to reconnect")
            admin_stop.set()
            with trio.move_on_after(config.server.shutdown_grace_s):
                await node.shard.wait_drained()
            await _flush_push(node)
            nursery.cancel_scope.cancel()
    log.info("stopped")


STORE_STATS_HELP = {"ops": "Writes committed by the store's group commits (batch size = ops / commits)",
                    "commit_seconds": "Seconds spent in the store's group commits (latency = seconds / commits)"}


def store_metrics(metrics, store) -> None:
    """The store's own statistics (``store.stats``, if it keeps any) as counters."""
    stats = getattr(store, "stats", None)
    if stats is None:
        return
    if "commits" in stats:
        metrics.gauge("chatd_store_commits", "Group commits done by the store", lambda: stats["commits"])
    for key in stats:
        metrics.counter_from(f"chatd_store_{key}_total", STORE_STATS_HELP.get(key, f"Store statistic: {key}"),
                             lambda key=key: stats[key])


def discovery_metrics(metrics, discovery, registers: bool = True) -> None:
    """What this process knows of the cluster: its view, and (a shard) whether it may write."""
    metrics.gauge("chatd_discovery_view_version", "Version of the shard view in use (ZooKeeper cversion)",
                  lambda: discovery.view.version)
    metrics.gauge("chatd_discovery_shards", "Live shards in the view in use", lambda: len(discovery.view.shards))
    if registers:
        metrics.gauge("chatd_discovery_writable", "1 while this shard is registered under a live ZooKeeper "
                      "session (0: suspended or lost, writes refused)", lambda: float(bool(discovery.writable)))


def link_queue_depths(links) -> dict:
    """``{peer: frames queued}`` of a LinkManager (its links' memory channels), {} without one."""
    if links is None:
        return {}
    return {peer: link._send.statistics().current_buffer_used for peer, link in list(links.links.items())}


class ApiNode:
    """What the stateless API role shares: no sessions, no owners; membership changes are
    broadcast to the shards over links."""

    def __init__(self, config: Config, store, discovery, links):
        self.config = config
        self.store = store
        self.secret = config.auth.secret
        self.metrics = Metrics()
        self.discovery = discovery
        self.links = links
        store_metrics(self.metrics, store)
        discovery_metrics(self.metrics, discovery, registers=False)
        self.metrics.labeled_gauge("chatd_link_queue_frames", "Frames waiting in each inter-shard link's send queue",
                                   "peer", lambda: link_queue_depths(links))
        self.membership = Membership(store, max_cached=0)  # other API servers change it too
        self.stop_event = trio.Event()

    def request_stop(self) -> None:
        self.stop_event.set()

    def membership_changed(self, channel_id: str) -> None:
        for peer in list(self.links.links):
            self.links.send_nowait(peer, {"t": "invalidate", "ch": channel_id})

    def connection_count(self) -> int:
        return sum(s.load for s in self.discovery.live())

    def notify_members(self, event: dict, user_ids) -> None:
        """Hand the event to each user's home shard (``deliver`` link frame), which fans it out."""
        for home, frame in self.discovery.view.deliver_frames(event, user_ids).items():
            self.links.send_nowait(home, frame)

    def device_logged_out(self, user_id: int, device_id: str, token_key: str, except_session=None) -> None:
        for peer in list(self.links.links):
            self.links.send_nowait(peer, {"t": "logout", "u": user_id, "d": device_id, "k": token_key})


async def serve_api_role(config: Config, *, task_status=trio.TASK_STATUS_IGNORED, node_out: list | None = None) -> None:
    """``chatd api``: the stateless HTTP API of a cluster; discovery from ZooKeeper."""
    import os
    import secrets

    from .api.server import serve_api
    from .discovery.zk import ZkDiscovery
    from .cluster.links import LinkManager

    config.validate_cluster("api")
    cc = config.cluster
    async with open_store(config) as store:
        discovery = ZkDiscovery(cc.zk_hosts, cc.zk_root, cc.zk_session_timeout_s, cc.load_refresh_s,
                                cc.overload_connections)

        async def ignore(link, frame):
            pass
        api_id = f"api-{os.getpid()}-{secrets.token_hex(3)}"
        links = LinkManager(api_id, "api", cc, on_frame=ignore)
        node = ApiNode(config, store, discovery, links)
        presence_links, presence_view = _remote_presence(node, config, api_id, "api", on_frame=ignore)
        if node_out is not None:
            node_out.append(node)
        async with trio.open_nursery() as nursery:
            await nursery.start(discovery.run)
            await nursery.start(links.run, False)
            discovery.on_change(lambda old, new: links.set_peers(new))
            links.set_peers(discovery.view)
            await _start_remote_presence(nursery, node.presence, presence_links, presence_view)
            stop = trio.Event()
            async with trio.open_nursery() as api_nursery:  # ends when hypercorn has shut down
                api_url = await api_nursery.start(serve_api, node, stop)
                log.info("api ready: %s (shards: %s)", api_url, ", ".join(sorted(discovery.view.shards)) or "none")
                task_status.started(RunInfo(api_url, ""))
                await node.stop_event.wait()
                stop.set()
            nursery.cancel_scope.cancel()


def _remote_presence(node, config: Config, node_id: str, role: str, on_frame):
    """Replace ``node.presence`` by the client of the cluster's presence servers."""
    from .discovery.zk import ZkDiscovery
    from .presence.remote import RemotePresence
    from .cluster.links import LinkManager

    cc = config.cluster
    view = ZkDiscovery(cc.zk_hosts, cc.zk_root, cc.zk_session_timeout_s, cc.load_refresh_s, kind="presence")
    holder: list = []
    links = LinkManager(node_id, role, cc, on_frame=on_frame, dial_all=True,
                        on_link_up=lambda link: holder[0].on_link_up(link))
    hub = getattr(node, "hub", None)
    local = (lambda: [(s.user_id, s.device_id) for s in hub.all_sessions()]) if hub is not None else (lambda: [])
    node.presence = RemotePresence(node_id, node.store, links, view, local_devices=local)
    holder.append(node.presence)
    view.on_change(lambda old, new: links.set_peers(new))
    view.on_change(node.presence.on_view_change)
    return links, view


async def _start_remote_presence(nursery, presence, links, view) -> None:
    await nursery.start(links.run, False)
    await nursery.start(view.run)
    links.set_peers(view.view)
    await nursery.start(presence.run)
