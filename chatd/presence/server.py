"""``chatd presence``: a presence server of a cluster.

It registers in ZooKeeper (``<root>/presence/<id>``), accepts links from shards and API servers,
and runs a :class:`~chatd.presence.service.PresenceService` for the users that hash to it. Status
changes are published to each recipient's **home shard** (one ``deliver`` frame per home shard,
over the link that shard opened to us), which forwards them to the recipient's devices.

Ownership: events carry the sender's view version of the presence servers (``pv``); a server takes
them for users it owns, or when the sender's view is newer than its own (it is about to own them).
When its view changes, it forgets the users and subscriptions it no longer owns, so a server that
lost users to a newcomer never publishes stale news about them.

Link frames in: ``p_hb`` (batched connects/heartbeats), ``p_logout``, ``p_sub`` (subscription
changes, per source node), ``p_query`` (request: statuses). When the link from a node goes down,
the subscriptions it registered are dropped (it re-sends them when it reconnects); its users'
devices simply stop heartbeating and expire after the grace period.
"""

from __future__ import annotations

import logging

import trio

from ..config import Config
from ..discovery import hashing
from ..discovery.view import ShardInfo
from ..membership import Membership
from ..store import open_store
from .service import PresenceService

log = logging.getLogger(__name__)


class PresenceServer:
    def __init__(self, config: Config, store, shards_discovery, links_factory, presence_discovery=None):
        pc = config.presence
        self.config = config
        self.server_id = pc.server_id
        self.shards = shards_discovery
        self.peers = presence_discovery  # the presence servers' view: who owns which user now
        self.links = links_factory(self.on_frame, self.on_link_down)
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

    def publish(self, frame: dict, user_ids) -> None:
        for home, deliver in self.shards.view.deliver_frames(frame, user_ids).items():
            if not self.links.send_nowait(home, deliver):
                log.debug("presence event for %d users on %s dropped (no link)", len(deliver["u"]), home)

    async def on_frame(self, link, frame: dict) -> None:
        t = frame.get("t")
        svc = self.service
        try:
            pv = int(frame.get("pv", 0))
            if t == "p_hb":
                for uid, device in frame["hb"]:
                    if self.accepts(int(uid), pv):
                        svc.heartbeat(int(uid), str(device))
            elif t == "p_logout":
                if self.accepts(int(frame["u"]), pv):
                    svc.logout(int(frame["u"]), str(frame["d"]))
            elif t == "p_sub":
                targets = [int(u) for u in frame["u"] if self.accepts(int(u), pv) or not frame["on"]]
                self._subscribe(str(frame["from"]), int(frame["s"]), targets, bool(frame["on"]))
            elif t == "p_query":
                users = await svc.statuses([int(u) for u in frame["u"]][:self.config.presence.max_query])
                await self.links.reply(link, frame.get("rid"), users={str(k): v for k, v in users.items()})
            else:
                log.warning("unknown presence frame %r from %s", t, link.peer_id)
        except (KeyError, TypeError, ValueError) as e:
            log.warning("malformed %r frame from %s: %s", t, link.peer_id, e)

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
            # the survivor may never see a change for a user who left meanwhile.
            self.nursery.start_soon(self._push_current, subscriber, new)

    async def _push_current(self, subscriber: int, targets: list[int]) -> None:
        try:
            current = await self.service.statuses(targets)
        except Exception as e:  # noqa: BLE001 - a store hiccup: the next change will correct it
            log.warning("presence snapshot for subscriber %s failed: %s", subscriber, e)
            return
        for uid, st in current.items():
            self.publish({"type": "presence", "user_id": uid, **st}, [subscriber])

    def on_link_down(self, link) -> None:
        for (target, subscriber), sources in list(self._subs.items()):
            if link.peer_id in sources:
                self._subscribe(link.peer_id, subscriber, [target], False)


async def serve_presence(config: Config, *, task_status=trio.TASK_STATUS_IGNORED, node_out: list | None = None) -> None:
    """``chatd presence``: ready once it listens for links and its znode exists."""
    from ..discovery.zk import ZkDiscovery
    from ..cluster.links import LinkManager

    config.validate_cluster("presence")
    cc = config.cluster
    server_id = config.presence.server_id
    async with open_store(config) as store:
        shards = ZkDiscovery(cc.zk_hosts, cc.zk_root, cc.zk_session_timeout_s, cc.load_refresh_s, kind="shards")
        me = ZkDiscovery(cc.zk_hosts, cc.zk_root, cc.zk_session_timeout_s, cc.load_refresh_s, kind="presence")
        server = PresenceServer(config, store, shards, lambda on_frame, on_down: LinkManager(
            server_id, "presence", cc, on_frame=on_frame, on_link_down=on_down), presence_discovery=me)
        if node_out is not None:
            node_out.append(server)
        server.stop_event = trio.Event()
        server.request_stop = server.stop_event.set
        async with trio.open_nursery() as nursery:
            server.nursery = nursery
            await nursery.start(shards.run)
            me.on_change(server.on_peers_change)
            await nursery.start(me.run)
            await nursery.start(server.links.run, True)
            await nursery.start(server.service.run)
            await me.register(ShardInfo(server_id, "", server.links.public_addr()), load=lambda: 0)
            log.info("presence server %s ready: links %s", server_id, server.links.public_addr())
            task_status.started()
            await server.stop_event.wait()
            with trio.move_on_after(2):
                await me.unregister()
            nursery.cancel_scope.cancel()
