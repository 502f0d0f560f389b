"""``chatd presence``: a presence server of a cluster.

It registers in ZooKeeper (``<root>/presence/<id>``), accepts links from shards and API servers,
and runs a :class:`~chatd.presence.service.PresenceService` for the users that hash to it. Status
changes are published to each recipient's **home shard** (one ``deliver`` frame per home shard,
over the link that shard opened to us), which forwards them to the recipient's devices.

Ownership: events carry the sender's view version of the presence servers (``pv``); a server takes
them for users it owns, or when the sender's view is newer than its own (it is about to own them).
When its view changes, it forgets the users and subscriptions it no longer owns, so a server that
lost users to a newcomer never publishes stale news about them.

Link frames in (:mod:`chatd.protocol.link_frames`; one handler each, :meth:`PresenceServer.on_frame`):
``p_hb`` (batched connects/heartbeats), ``p_logout``, ``p_sub`` (subscription changes, per source
node), ``p_query`` (request: statuses); any other frame is logged and skipped. When the link from a node goes down,
the subscriptions it registered are dropped (it re-sends them when it reconnects); its users'
devices simply stop heartbeating and expire after the grace period.

Visibility (``presence.visibility``): a presence server answers ``p_query`` and registers ``p_sub``
for whatever an authenticated node asks; the shard or API server that serves the viewer has decided
beforehand who may see whom (:mod:`chatd.presence.visibility`: it has the store and the membership
cache, and ends subscriptions when a membership changes). Its own pushes go to the audience
:meth:`~chatd.presence.service.PresenceService.audience` reads from the store at each change.
"""

from __future__ import annotations

import functools
import logging

import trio

from ..cluster.links import LinkManager
from ..config import Config
from ..discovery import hashing
from ..discovery.base import Discovery
from ..discovery.view import ShardInfo
from ..membership import Membership
from ..protocol.link_frames import NAMES, Deliver, PHeartbeats, PLogout, PQuery, PSubscribe, Reply
from ..store import open_store
from .service import PresenceService

log = logging.getLogger(__name__)


class PresenceServer:
    def __init__(self, config: Config, store, shards_discovery: Discovery, links: LinkManager,
                 presence_discovery: Discovery | None = None):
        """``links``: accepts the links of shards and API servers (frames go to :meth:`on_frame`,
        closed links to :meth:`on_link_down`: give both to ``links.run``)."""
        pc = config.presence
        self.config = config
        self.server_id = pc.server_id
        self.shards = shards_discovery
        self.peers = presence_discovery  # the presence servers' view: who owns which user now
        self.links = links
        self._handlers = {PHeartbeats: self._on_heartbeats, PLogout: self._on_logout, PSubscribe: self._on_subscribe,
                          PQuery: self._on_query}
        self.service = PresenceService(store, Membership(store, max_cached=0), self.publish, pc.grace_s,
                                       pc.coalesce_s, pc.group_push_max)
        self._subs: dict[tuple[int, int], set[str]] = {}  # (target, subscriber) -> source nodes
        self.nursery: trio.Nursery | None = None

    def owns(self, user_id: int) -> bool:
        servers = self.peers.view.shards if self.peers is not None else {}
        return not servers or hashing.owner(f"p:{user_id}", servers) == self.server_id

    def accepts(self, user_id: int, sender_view: int) -> bool:
        """Take an event for a user we own, or one whose sender has a newer view than ours."""
        return self.owns(user_id) or (self.peers is not None and sender_view > self.peers.view.version)

    def on_peers_change(self, old, new) -> None:
        """Users that moved to another presence server are forgotten here: what we still knew of
        them is stale and must never reach subscribers after the new owner's news."""
        for uid in self.service.tracker.users():
            if not self.owns(uid):
                self.service.tracker.forget(uid)
        for (target, subscriber), sources in list(self._subs.items()):
            if not self.owns(target):
                del self._subs[(target, subscriber)]
                self.service.unsubscribe(subscriber, [target])

    def publish(self, event: dict, user_ids) -> None:
        """A status change to each recipient's home shard (one ``deliver`` per home), which fans it out."""
        view = self.shards.view
        for home, uids in view.by_home(user_ids).items():
            if not self.links.send_nowait(home, Deliver(view.version, uids, event=event)):
                log.debug("presence event for %d users on %s dropped (no link)", len(uids), home)

    async def on_frame(self, link, frame) -> None:
        handler = self._handlers.get(type(frame))
        if handler is None:
            log.warning("unexpected %s frame from %s: skipped", NAMES.get(type(frame)), link.peer_id)
            return
        await handler(link, frame)

    async def _on_heartbeats(self, link, frame: PHeartbeats) -> None:
        for uid, device in frame.heartbeats:
            if self.accepts(uid, frame.pv):
                self.service.heartbeat(uid, device)

    async def _on_logout(self, link, frame: PLogout) -> None:
        if self.accepts(frame.user_id, frame.pv):
            self.service.logout(frame.user_id, frame.device_id)

    async def _on_subscribe(self, link, frame: PSubscribe) -> None:
        targets = [u for u in frame.targets if not frame.on or self.accepts(u, frame.pv)]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("p_sub from %s (pv %d, ours %s): subscriber %s %s %s, taken %s", frame.source, frame.pv,
                      self.peers.view.version if self.peers is not None else "-", frame.subscriber,
                      "on" if frame.on else "off", frame.targets, targets)
        self._subscribe(frame.source, frame.subscriber, targets, frame.on)

    async def _on_query(self, link, frame: PQuery) -> None:
        users = await self.service.statuses(frame.user_ids[:self.config.presence.max_query])
        await self.links.reply(link, Reply(frame.rid, users={str(k): v for k, v in users.items()}))

    def _subscribe(self, source: str, subscriber: int, targets: list[int], on: bool) -> None:
        new = []
        for target in targets:
            key = (target, subscriber)
            sources = self._subs.get(key)
            if on:
                if sources is None:
                    sources = self._subs[key] = set()
                    self.service.subscribe(subscriber, [target])
                    new.append(target)
                sources.add(source)
            elif sources is not None:
                sources.discard(source)
                if not sources:
                    del self._subs[key]
                    self.service.unsubscribe(subscriber, [target])
        if new and self.nursery is not None:
            # A (re)subscription learns the current status at once: after a presence server died,
            # the survivor may never see a change for a user who left meanwhile. And once more
            # when what the rebuild told us has settled (a grace period and a coalescing window):
            # a stale snapshot heartbeat of a user who left during the rebuild makes them online
            # here and offline again within one window, which publishes no change, while the
            # subscriber's last word, from the dead server, was "online". (A repeated status is
            # harmless: presence events are state.)
            self.nursery.start_soon(self._push_current, subscriber, new)
            settle = self.config.presence.grace_s + self.config.presence.coalesce_s + 0.5
            self.nursery.start_soon(self._push_current, subscriber, new, settle)

    async def _push_current(self, subscriber: int, targets: list[int], after_s: float = 0.0) -> None:
        if after_s:
            await trio.sleep(after_s)
            targets = [t for t in targets if (t, subscriber) in self._subs and self.owns(t)]
            if not targets:
                return
        try:
            current = await self.service.statuses(targets)
        except Exception as e:  # noqa: BLE001 - a store hiccup: the next change will correct it
            log.warning("presence snapshot for subscriber %s failed: %s", subscriber, e)
            return
        for uid, st in current.items():
            log.debug("presence of %s to subscriber %s (snapshot after %.1f s): %s", uid, subscriber, after_s, st["status"])
            self.publish({"type": "presence", "user_id": uid, **st}, [subscriber])

    def on_link_down(self, link) -> None:
        for (target, subscriber), sources in list(self._subs.items()):
            if link.peer_id in sources:
                self._subscribe(link.peer_id, subscriber, [target], False)


async def serve_presence(config: Config, *, task_status=trio.TASK_STATUS_IGNORED, node_out: list | None = None) -> None:
    """``chatd presence``: ready once it listens for links and its znode exists."""
    from ..discovery.zk import zk_discovery

    config.validate_cluster("presence")
    cc = config.cluster
    server_id = config.presence.server_id
    async with open_store(config) as store:
        shards = zk_discovery(cc, kind="shards")
        me = zk_discovery(cc, kind="presence")
        server = PresenceServer(config, store, shards, LinkManager(server_id, "presence", cc), presence_discovery=me)
        if node_out is not None:
            node_out.append(server)
        server.stop_event = trio.Event()
        server.request_stop = server.stop_event.set
        async with trio.open_nursery() as nursery:
            server.nursery = nursery
            await nursery.start(shards.run)
            me.on_change(server.on_peers_change)
            await nursery.start(me.run)
            await nursery.start(functools.partial(server.links.run, True, server.on_frame,
                                                  on_link_down=server.on_link_down))
            await nursery.start(server.service.run)
            await me.register(ShardInfo(server_id, "", server.links.public_addr()), load=lambda: 0)
            log.info("presence server %s ready: links %s", server_id, server.links.public_addr())
            task_status.started()
            await server.stop_event.wait()
            with trio.move_on_after(2):
                await me.unregister()
            nursery.cancel_scope.cancel()
