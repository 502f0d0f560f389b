"""The nursery tree of a chatd process, the context its services share, and their wiring.

``serve_run`` is ``chatd run``: store -> shard (WebSocket) -> API (HTTP), one process, one shard,
in-process discovery. It is the cluster's shape with one shard: the API asks discovery for a
shard, sends go to the channel's owner, fan-out goes through the router. ``serve_shard`` and
``serve_api_role`` are the cluster roles (ZooKeeper discovery, links between processes).

Wiring (:class:`Node`): every service gets the collaborators it uses as parameters, built in
dependency order -- hub, discovery and links first; the fan-out (:class:`~chatd.shard.fanout.FanOut`);
the channel owners, which hand committed messages to the fan-out's ``deliver_message``; the router
(owners, fan-out, links). Link frames reaching a shard are dispatched in one place,
:meth:`Node.on_link_frame` (one handler per frame type, the catalog in
:mod:`chatd.protocol.link_frames`).

Stop policy: :meth:`Node.request_stop` (SIGINT/SIGTERM, or a test) unregisters the shard, drains it
(sessions closed with 1001), stops the API, lets push finish queuing, then the store finishes
queued writes; everything is bounded by ``server.shutdown_grace_s`` (:func:`_stop_serving`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import trio

from .cluster.links import LinkManager
from .config import ClusterConfig, Config
from .datadir import load_secret, private_dir
from .errors import CODES, ChatError
from .discovery.base import Discovery
from .discovery.local import LocalDiscovery
from .discovery.view import ShardInfo
from .media.service import MediaService
from .membership import Membership
from .metrics import Metrics
from .presence.service import PresenceService
from .protocol import link_frames as lf
from .push import make_push_service
from .ratelimit import TokenBucket
from .retention import RetentionJob
from .revocation import RecentRevocations
from .shard.fanout import FanOut
from .shard.hub import Hub
from .shard.owner import ChannelOwners
from .shard.receipts import ReceiptCoalescer
from .shard.router import VIEW_WAIT_S, Router
from .shard.server import ShardServer
from .store import open_store
from .store.base import Store
from .tls import ServerTLS, warn_plaintext

log = logging.getLogger(__name__)


@dataclass
class RunInfo:
    api_url: str
    ws_url: str


class Node:
    """Everything one chat process shares; passed explicitly, never global.

    ``discovery``: LocalDiscovery (``chatd run``) unless given; ``links``: the cluster's links
    (None in process); ``hub`` and ``presence``: given when the presence client must be built
    before the node (a cluster shard's :class:`~chatd.presence.remote.RemotePresence` reads the
    hub), else the hub is new and presence is in process; ``metrics``: given when the links
    count into it, else new."""

    def __init__(self, config: Config, store: Store, secret: str, discovery: Discovery | None = None,
                 links: LinkManager | None = None, hub: Hub | None = None, presence=None,
                 metrics: Metrics | None = None):
        me = config.server.shard_id
        self.config = config
        # the certificate of the WebSocket and HTTP ports (None: no TLS); SIGHUP reloads it (chatd/cli.py)
        self.tls = ServerTLS.from_config(config.server)
        self.store = store
        self.secret = secret
        self.metrics = metrics if metrics is not None else Metrics()
        self.hub = hub if hub is not None else Hub()
        self.discovery = discovery if discovery is not None else LocalDiscovery()
        self.links = links
        self.membership = Membership(store)
        self.media = MediaService(config, store, self.membership)  # uploads (chatd/media)
        media_metrics(self.metrics, self.media)
        # Push notifications for members with no connected device (None with push.provider = "none").
        self.push = make_push_service(config, store, shards=lambda: list(self.discovery.view.shards),
                                      online=self._connected_here)
        self.fanout = FanOut(me, self.hub, self.discovery, links, self.push)
        self.owners = ChannelOwners(store, self.membership, self.fanout.deliver_message, self.metrics,
                                    limits=config.limits, on_redacted=self._release_media)
        self.router = Router(me, self.hub, self.discovery, self.owners, self.fanout, links,
                             config.limits.send_answer_s)
        self.shard = ShardServer(self)
        self.receipts = ReceiptCoalescer(self.fanout.deliver_event, self.shard.timers, config.limits.receipt_interval_s)
        pc = config.presence
        self.presence = presence if presence is not None else PresenceService(
            store, self.membership, self.fanout.deliver_event, pc.grace_s, pc.coalesce_s, pc.group_push_max)
        self.discovery.on_change(self.router.on_view_change)
        if self.push is not None:
            self.discovery.on_change(self.push.on_view_change)
            for key in ("sent", "rejected", "failed", "gave_up", "dropped"):
                self.metrics.gauge(f"chatd_push_{key}", f"Push notifications: {key} (since start)",
                                   lambda key=key: self.push.stats[key])
        # tokens and cut-offs revoked lately (logout frames seen here): closes the window between a
        # session's store check and its attach (chatd/shard/session.py)
        self.revoked_here = RecentRevocations()
        # retention: this shard expires the old messages of the channels it owns (chatd/retention.py)
        self.retention = RetentionJob(config.retention, store, self.discovery, me)
        self.metrics.gauge("chatd_retention_expired", "Messages deleted by retention (since start)",
                           lambda: self.retention.stats["expired"])
        self.stop_event = trio.Event()
        # the link frames a shard takes, and who handles each (handler(link, frame))
        self._frame_handlers = {
            lf.Send: self.router.on_send,
            lf.Deliver: self.fanout.on_deliver,
            lf.Push: self.fanout.on_push,
            lf.Device: self.fanout.on_device,
            lf.Devices: self.fanout.on_devices,
            lf.Invalidate: self._on_invalidate,
            lf.Logout: self._on_logout,
            lf.LogoutAll: self._on_logout_all,
            lf.Resync: self.router.on_resync,
        }
        self.metrics.gauge("chatd_ws_authenticated", "Authenticated client sessions", lambda: self.hub.count)
        store_metrics(self.metrics, store)
        discovery_metrics(self.metrics, self.discovery)
        self.metrics.labeled_gauge("chatd_link_queue_frames", "Frames waiting in each inter-shard link's send queue",
                                   "peer", lambda: link_queue_depths(links))

    async def _release_media(self, message) -> None:
        """A deleted message's uploads: their references dropped, the unreferenced deleted."""
        await self.media.release_message(message.channel_id, message.sender_id, message.client_msg_id,
                                          message.attachments)

    def _connected_here(self, user_id: int) -> bool:
        return self.fanout.connected_here(user_id)

    def rate_bucket(self) -> TokenBucket:
        lim = self.config.limits
        return TokenBucket(lim.rate_frames_per_s, lim.rate_burst, trio.current_time())

    def request_stop(self) -> None:
        self.stop_event.set()

    def membership_changed(self, channel_id: str) -> None:
        """The API changed a channel's members: drop cached membership here (and, in cluster
        mode, on every shard)."""
        self.membership.invalidate(channel_id)
        _broadcast(self.links, lf.Invalidate(channel_id))

    def connection_count(self) -> int:
        return self.hub.count

    def notify_members(self, event: dict, user_ids) -> None:
        """A transient event to every device of ``user_ids``."""
        self.fanout.deliver_event(event, user_ids)

    async def append_system_event(self, by: int, channel_id: str, spec, client_msg_id: str, force: bool = False):
        """A system row (chatd/membership.py), or with ``force`` an operator's ``delete``
        (chatd/api/routes/operator.py), through the channel's owner, like a send."""
        return await self.router.append_event(by, channel_id, client_msg_id, spec,
                                              timeout_s=self.config.limits.send_answer_s, force=force)

    def device_logged_out(self, user_id: int, device_id: str, token_key: str, except_session=None,
                          before: float = 0.0) -> None:
        """A logout revoked ``token_key`` (and with ``before`` every token of the device issued
        before it): close the device's connections here and on every shard (link frame ``logout``;
        best effort: a peer whose link is down misses it, but its shard refuses the token at the
        next ``auth``)."""
        self._close_device(user_id, device_id, token_key, except_session, before)
        _broadcast(self.links, lf.Logout(user_id, device_id, token_key, before))

    def tokens_revoked_before(self, user_id: int, device_id: str | None, before: float) -> None:
        """Every token of the user's device (None: of all its devices) issued before ``before``
        was revoked: close those connections here and on every shard (link frame ``logout_all``,
        best effort like ``logout``)."""
        self._close_before(user_id, device_id or "", before)
        _broadcast(self.links, lf.LogoutAll(user_id, before, device_id or ""))

    def _close_device(self, user_id: int, device_id: str, token_key: str, except_session=None,
                      before: float = 0.0) -> None:
        self.revoked_here.add_key(token_key)
        if before:
            self.revoked_here.add_cutoff(user_id, device_id, before)
        for session in tuple(self.hub.sessions_of(user_id)):
            if session.device_id == device_id and session is not except_session:
                session.logged_out_elsewhere()

    def _close_before(self, user_id: int, device_id: str, before: float) -> None:
        """``device_id`` "": every device of the user."""
        self.revoked_here.add_cutoff(user_id, device_id, before)
        for session in tuple(self.hub.sessions_of(user_id)):
            if (not device_id or session.device_id == device_id) and session.token_issued_at < before:
                session.logged_out_elsewhere()

    # ---- cluster links -------------------------------------------------------------------
    async def on_link_frame(self, link, frame: lf.Frame) -> None:
        """Every frame that reaches this shard over a link (shards, API servers, presence
        servers), to its handler (the table in ``__init__``); others are logged and skipped."""
        t = type(frame)
        handler = self._frame_handlers.get(t)
        if handler is None:
            log.warning("unexpected %s frame from %s: skipped", lf.NAMES.get(t), link.peer_id)
            return
        if t in VIEW_ROUTED and frame.view > self.discovery.view.version:
            # Routed by a view newer than ours (its ZooKeeper watch fired first): catch up
            # (wait_view re-reads at once) before routing it further, or a user who just
            # became homed here would be looked up by the old view and the message missed.
            # Holding this link's reader keeps its frames in order; the wait is bounded.
            await self.discovery.wait_view(frame.view, VIEW_WAIT_S)
        handler(link, frame)

    def _on_invalidate(self, link, frame: lf.Invalidate) -> None:
        self.membership.invalidate(frame.channel_id)

    def _on_logout(self, link, frame: lf.Logout) -> None:
        self._close_device(frame.user_id, frame.device_id, frame.token_key, before=frame.before)

    def _on_logout_all(self, link, frame: lf.LogoutAll) -> None:
        self._close_before(frame.user_id, frame.device_id, frame.before)


VIEW_ROUTED = lf.VIEW_ROUTED


def _broadcast(links: LinkManager | None, frame: lf.Frame) -> None:
    """``frame`` to every process linked with ours (best effort: a full queue drops it, counted)."""
    if links is not None:
        for peer in list(links.links):
            links.send_nowait(peer, frame)


def public_ws_url(config: Config, port: int) -> str:
    """What logins tell clients to connect to: ``server.public_ws_url`` if set, else the WebSocket
    port's own address (``wss://`` when it has TLS)."""
    if config.server.public_ws_url:
        return config.server.public_ws_url
    scheme = "wss" if config.server.tls_cert_file else "ws"
    return f"{scheme}://{config.server.ws_host}:{port}/"


async def serve_metrics(nursery, node, stop: trio.Event) -> None:
    """With ``server.metrics_host`` set: ``/metrics`` on ``metrics_host:metrics_port`` (plain HTTP;
    the role's own HTTP app then leaves it out) until ``stop``; its URL in ``node.metrics_url``.
    Without: nothing (``/metrics`` stays on the API port)."""
    from .api.admin import create_metrics_app
    from .api.server import serve_api

    cfg = node.config.server
    node.metrics_url = ""
    if cfg.metrics_host:
        host = f"[{cfg.metrics_host}]" if ":" in cfg.metrics_host else cfg.metrics_host
        node.metrics_url = await nursery.start(functools.partial(
            serve_api, node, stop, create_metrics_app, bind=f"{host}:{cfg.metrics_port}"))
        log.info("metrics on %s/metrics", node.metrics_url)


async def serve_run(config: Config, *, task_status=trio.TASK_STATUS_IGNORED, node_out: list | None = None) -> None:
    """``chatd run``: serve until :meth:`Node.request_stop` or cancellation."""
    from .api.server import serve_api

    private_dir(config.data_path)
    secret = load_secret(config.auth.secret, config.data_path)
    async with open_store(config) as store:
        node = Node(config, store, secret)
        warn_plaintext(config, api=True, ws=True)
        if node_out is not None:
            node_out.append(node)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_close_at_exit, node.media)
            await nursery.start(node.router.run)
            await nursery.start(node.presence.run)
            await nursery.start(node.media.run_collector)
            if node.push is not None:
                await nursery.start(node.push.run)
            ws_port = await nursery.start(node.shard.serve)
            ws_url = public_ws_url(config, ws_port)
            await node.discovery.register(ShardInfo(config.server.shard_id, ws_url), load=lambda: node.hub.count)
            await nursery.start(node.retention.run)
            api_stop = trio.Event()
            api_url = await nursery.start(functools.partial(serve_api, node, api_stop, tls=node.tls))
            await serve_metrics(nursery, node, api_stop)
            log.info("chatd run ready: api %s, websocket %s, data %s", api_url, ws_url, config.data_path)
            task_status.started(RunInfo(api_url, ws_url))
            await node.stop_event.wait()
            await _stop_serving(node, api_stop, "server shutting down; reconnect")
            nursery.cancel_scope.cancel()
    log.info("stopped")


async def _close_at_exit(media) -> None:
    """Close the media service (its idle workers, its backend's connections) when the node's
    nursery ends."""
    try:
        await trio.sleep_forever()
    finally:
        await media.aclose()


async def _stop_serving(node: Node, api_stop: trio.Event, drain_reason: str) -> None:
    """The stop sequence of a chat shard: unregister (logins and channels go elsewhere), drain
    the clients (1001, ``drain_reason``), stop its HTTP server (``api_stop``), wait for the
    sessions to end within ``server.shutdown_grace_s``, let push queue what delivery owes."""
    log.info("stopping: unregistering and draining %d sessions", len(node.shard.sessions))
    with trio.move_on_after(2):
        await node.discovery.unregister()
    node.shard.drain(drain_reason)
    api_stop.set()
    with trio.move_on_after(node.config.server.shutdown_grace_s):
        await node.shard.wait_drained()
    if node.push is not None:  # what delivery queued for pushes reaches the outbox (a restart sends it)
        with trio.move_on_after(2.0):
            await node.push.flush()


# ---- cluster roles -------------------------------------------------------------------------------

async def serve_shard(config: Config, *, task_status=trio.TASK_STATUS_IGNORED, node_out: list | None = None) -> None:
    """``chatd shard``: one chat shard of a cluster. Ready (``task_status``) once it listens for
    WebSockets and links and its znode exists. Stop: see :func:`_stop_serving`; then the store
    finishes queued writes."""
    from .api.admin import create_admin_app
    from .api.server import serve_api
    from .discovery.zk import zk_discovery

    config.validate_cluster("shard")
    cc = config.cluster
    me = config.server.shard_id
    async with open_store(config) as store:
        metrics = Metrics()
        links = LinkManager(me, "shard", cc, metrics=metrics)
        hub = Hub()
        presence, presence_links, presence_view = _remote_presence(cc, me, "shard", store, local_devices(hub))
        node = Node(config, store, config.auth.secret, zk_discovery(cc), links, hub, presence, metrics)
        warn_plaintext(config, ws=True)
        if node_out is not None:
            node_out.append(node)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_close_at_exit, node.media)
            await nursery.start(node.router.run)
            await nursery.start(node.discovery.run)
            await nursery.start(links.run, True, node.on_link_frame, node.router.on_link_up)
            if node.push is not None:
                await nursery.start(node.push.run)
            node.discovery.on_change(lambda old, new: links.set_peers(new))
            await _start_remote_presence(nursery, presence, presence_links, presence_view, node.on_link_frame)
            ws_port = await nursery.start(node.shard.serve)
            ws_url = public_ws_url(config, ws_port)
            admin_stop = trio.Event()
            await nursery.start(functools.partial(serve_api, node, admin_stop, create_admin_app, tls=node.tls))
            await serve_metrics(nursery, node, admin_stop)
            await node.discovery.register(ShardInfo(me, ws_url, links.public_addr()), load=lambda: node.hub.count)
            links.set_peers(node.discovery.view)
            await nursery.start(node.retention.run)
            log.info("shard %s ready: websocket %s, links %s", me, ws_url, links.public_addr())
            task_status.started(RunInfo("", ws_url))
            await node.stop_event.wait()
            await _stop_serving(node, admin_stop, "shard shutting down; log in again to reconnect")
            nursery.cancel_scope.cancel()
    log.info("stopped")


STORE_STATS_HELP = {"ops": "Writes committed by the store's group commits (batch size = ops / commits)",
                    "commit_seconds": "Seconds spent in the store's group commits (latency = seconds / commits)"}


def store_metrics(metrics: Metrics, store: Store) -> None:
    """The store's own statistics (``store.statistics()``; none for a backend that keeps none) as
    counters, read at scrape time."""
    stats = store.statistics()
    if "commits" in stats:
        metrics.gauge("chatd_store_commits", "Group commits done by the store", lambda: store.statistics()["commits"])
    for key in stats:
        metrics.counter_from(f"chatd_store_{key}_total", STORE_STATS_HELP.get(key, f"Store statistic: {key}"),
                             lambda key=key: store.statistics()[key])


MEDIA_STATS_HELP = {
    "uploads": "Media uploads stored", "upload_bytes": "Bytes of media uploads stored",
    "refused_too_large": "Uploads refused above media.max_bytes", "collected": "Orphan uploads deleted",
    "released": "Uploads deleted with the last message referencing them",
}
PROCESSOR_STATS_HELP = {
    "processed": "Files processed by a media worker", "failed": "Media worker failures (file kept as plain)",
    "killed": "Media workers killed at media.worker_timeout_s", "started": "Media worker processes started",
}


def media_metrics(metrics: Metrics, media: MediaService) -> None:
    """The media service's counters (chatd/media), read at scrape time."""
    for key, help_ in MEDIA_STATS_HELP.items():
        metrics.counter_from(f"chatd_media_{key}_total", help_, lambda key=key: media.stats[key])
    for key, help_ in PROCESSOR_STATS_HELP.items():
        metrics.counter_from(f"chatd_media_worker_{key}_total", help_, lambda key=key: media.processor.stats[key])


def discovery_metrics(metrics: Metrics, discovery: Discovery, registers: bool = True) -> None:
    """What this process knows of the cluster: its view, and (a shard) whether it may write."""
    metrics.gauge("chatd_discovery_view_version", "Version of the shard view in use (ZooKeeper cversion)",
                  lambda: discovery.view.version)
    metrics.gauge("chatd_discovery_shards", "Live shards in the view in use", lambda: len(discovery.view.shards))
    if registers:
        metrics.gauge("chatd_discovery_writable", "1 while this shard is registered under a live ZooKeeper "
                      "session (0: suspended or lost, writes refused)", lambda: float(bool(discovery.writable)))


def link_queue_depths(links: LinkManager | None) -> dict:
    """``{peer: frames queued}`` of a LinkManager (its links' memory channels), {} without one."""
    if links is None:
        return {}
    return {peer: link._send.statistics().current_buffer_used for peer, link in list(links.links.items())}


class ApiNode:
    """What the stateless API role shares: no sessions, no owners; membership changes are
    broadcast to the shards over links."""

    def __init__(self, config: Config, store: Store, discovery: Discovery, links: LinkManager, presence):
        self.config = config
        self.tls = ServerTLS.from_config(config.server)  # the API port's certificate (None: no TLS)
        self.store = store
        self.secret = config.auth.secret
        self.metrics = Metrics()
        self.discovery = discovery
        self.links = links
        self.presence = presence
        store_metrics(self.metrics, store)
        discovery_metrics(self.metrics, discovery, registers=False)
        self.metrics.labeled_gauge("chatd_link_queue_frames", "Frames waiting in each inter-shard link's send queue",
                                   "peer", lambda: link_queue_depths(links))
        self.membership = Membership(store, max_cached=0)  # other API servers change it too
        self.media = MediaService(config, store, self.membership)  # uploads (chatd/media)
        media_metrics(self.metrics, self.media)
        self.stop_event = trio.Event()

    def request_stop(self) -> None:
        self.stop_event.set()

    def membership_changed(self, channel_id: str) -> None:
        _broadcast(self.links, lf.Invalidate(channel_id))

    def connection_count(self) -> int:
        return sum(s.load for s in self.discovery.live())

    async def append_system_event(self, by: int, channel_id: str, spec, client_msg_id: str, force: bool = False):
        """A system row (chatd/membership.py), or with ``force`` an operator's ``delete``, sent to
        the channel's owner shard over its link (``send`` with ``ev``), routed again on ``stale_view``; ``unavailable`` when no owner
        answers within a few seconds."""
        from .protocol.link_frames import unpacked
        from .store.base import AppendResult
        with trio.move_on_after(3 * self.config.limits.send_answer_s):
            while True:
                view = self.discovery.view
                link = self.links.links.get(view.owner_of(channel_id)) if view.shards else None
                if link is None:
                    await self.discovery.wait_view(view.version + 1, 0.5)
                    continue
                reply = await self.links.request_on(link, lf.Send(view.version, channel_id, by, client_msg_id, "",
                                                                  ev=spec.as_dict(), force=force),
                                                    self.config.limits.send_answer_s)
                if reply.ok is not None:
                    return AppendResult(unpacked(reply.ok, reply.mx), reply.dup is True)
                err = reply.err or {}
                if err.get("code") not in ("stale_view", "unavailable"):
                    raise ChatError(err.get("code") if err.get("code") in CODES else "internal",
                                    str(err.get("message", "remote error")))
                await self.discovery.wait_view(view.version + 1, 0.5)
        raise ChatError("unavailable", f"the owner of {channel_id} did not answer")

    def notify_members(self, event: dict, user_ids) -> None:
        """Hand the event to each user's home shard (``deliver`` link frame), which fans it out."""
        view = self.discovery.view
        for home, uids in view.by_home(user_ids).items():
            self.links.send_nowait(home, lf.Deliver(view.version, uids, event=event))

    def device_logged_out(self, user_id: int, device_id: str, token_key: str, except_session=None,
                          before: float = 0.0) -> None:
        _broadcast(self.links, lf.Logout(user_id, device_id, token_key, before))

    def tokens_revoked_before(self, user_id: int, device_id: str | None, before: float) -> None:
        _broadcast(self.links, lf.LogoutAll(user_id, before, device_id or ""))


async def serve_api_role(config: Config, *, task_status=trio.TASK_STATUS_IGNORED, node_out: list | None = None) -> None:
    """``chatd api``: the stateless HTTP API of a cluster; discovery from ZooKeeper."""
    import os
    import secrets

    from .api.server import serve_api
    from .discovery.zk import zk_discovery

    config.validate_cluster("api")
    cc = config.cluster
    async with open_store(config) as store:
        discovery = zk_discovery(cc)
        api_id = f"api-{os.getpid()}-{secrets.token_hex(3)}"
        links = LinkManager(api_id, "api", cc)
        presence, presence_links, presence_view = _remote_presence(cc, api_id, "api", store, lambda: [])
        node = ApiNode(config, store, discovery, links, presence)
        warn_plaintext(config, api=True)
        if node_out is not None:
            node_out.append(node)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_close_at_exit, node.media)
            await nursery.start(discovery.run)
            await nursery.start(links.run, False)  # (shards send an API server nothing but replies)
            discovery.on_change(lambda old, new: links.set_peers(new))
            links.set_peers(discovery.view)
            await _start_remote_presence(nursery, presence, presence_links, presence_view)
            await nursery.start(node.media.run_collector)
            stop = trio.Event()
            async with trio.open_nursery() as api_nursery:  # ends when hypercorn has shut down
                api_url = await api_nursery.start(functools.partial(serve_api, node, stop, tls=node.tls))
                await serve_metrics(api_nursery, node, stop)
                log.info("api ready: %s (shards: %s)", api_url, ", ".join(sorted(discovery.view.shards)) or "none")
                task_status.started(RunInfo(api_url, ""))
                await node.stop_event.wait()
                stop.set()
            nursery.cancel_scope.cancel()


def local_devices(hub: Hub):
    """``() -> [(user_id, device_id)]`` of the sessions connected to ``hub``."""
    return lambda: [(s.user_id, s.device_id) for s in hub.all_sessions()]


def _remote_presence(cc: ClusterConfig, node_id: str, role: str, store: Store, local_devices):
    """The client of the cluster's presence servers: ``(presence, its links, the presence
    servers' discovery)``; :func:`_start_remote_presence` runs them."""
    from .discovery.zk import zk_discovery
    from .presence.remote import RemotePresence

    view = zk_discovery(cc, kind="presence")
    links = LinkManager(node_id, role, cc, dial_all=True)
    presence = RemotePresence(node_id, store, links, view, local_devices=local_devices)
    view.on_change(lambda old, new: links.set_peers(new))
    view.on_change(presence.on_view_change)
    return presence, links, view


async def _start_remote_presence(nursery, presence, links: LinkManager, view, on_frame=None) -> None:
    """Run the presence client; ``on_frame``: where the frames presence servers send go (a
    shard's :meth:`Node.on_link_frame`: presence events to deliver), None to ignore them."""
    await nursery.start(links.run, False, on_frame, presence.on_link_up)
    await nursery.start(view.run)
    links.set_peers(view.view)
    await nursery.start(presence.run)
