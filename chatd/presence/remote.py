"""The presence client of a cluster shard or API server: the same face as
:class:`~chatd.presence.service.PresenceService`, backed by ``chatd presence`` servers.

Users map to presence servers by rendezvous hashing over the live presence servers (ZooKeeper
``<root>/presence``). Connect and heartbeat events are batched per server and flushed every
``FLUSH_S`` (heartbeats come every few seconds, the grace period is tens of seconds); logouts and
subscription changes go at once. Queries are requests over the link.

Rebuild policy: whenever the set of presence servers changes or a link to one comes up, this node
sends every server a snapshot of what it holds — each local (user, device) as a heartbeat, and its
presence subscriptions — so a server that took over the users of a dead one knows at once who is
connected (no connected user stays offline), and users nobody reports again simply expire (no
ghost stays online). Without any presence server, queries answer "offline" with the stored
``last_active_at`` and events are dropped (counted in the log).

What it is asked has passed the visibility check of the node (:mod:`chatd.presence.visibility`);
subscriptions carry their grants (the group a target is seen through) in this node's table.
"""

from __future__ import annotations

import logging

import trio

from ..discovery import hashing
from ..errors import ChatError
from ..protocol.link_frames import PHeartbeats, PLogout, PQuery, PSubscribe
from .service import status_dict
from .tracker import Subscriptions

log = logging.getLogger(__name__)

FLUSH_S = 0.2


class RemotePresence:
    def __init__(self, node_id: str, store, links, discovery, local_devices=lambda: []):
        self.node_id = node_id
        self.store = store
        self.links = links  # a LinkManager that dials every presence server
        self.discovery = discovery  # ZkDiscovery(kind="presence")
        self.local_devices = local_devices  # () -> [(user_id, device)] of the live local sessions
        self._hb: dict[str, set] = {}
        self._subs = Subscriptions()  # this node's sessions' subscriptions, refcounted
        self._wake = trio.Event()

    def _server(self, user_id: int) -> str | None:
        servers = self.discovery.view.shards
        return hashing.owner(f"p:{user_id}", servers) if servers else None

    # ---- events ------------------------------------------------------------------------------
    def heartbeat(self, user_id: int, device: str) -> None:
        server = self._server(user_id)
        if server is not None:
            self._hb.setdefault(server, set()).add((user_id, device))
            self._wake.set()

    def logout(self, user_id: int, device: str) -> None:
        server = self._server(user_id)
        if server is not None:
            self.links.send_nowait(server, PLogout(self.discovery.view.version, user_id, device))

    def subscribe(self, subscriber: int, targets, grants: dict | None = None) -> None:
        """``grants``: {target: group it is seen through} (:class:`~chatd.presence.tracker.Subscriptions`)."""
        self._send_subs(subscriber, self._subs.add(subscriber, targets, grants), True)

    @property
    def subscriptions(self) -> Subscriptions:
        return self._subs

    def unsubscribe(self, subscriber: int, targets) -> None:
        self._send_subs(subscriber, self._subs.remove(subscriber, targets), False)

    def _send_subs(self, subscriber: int, targets, on: bool, only_to: str | None = None) -> None:
        by_server: dict[str, list[int]] = {}
        for t in targets:
            server = self._server(t)
            if server is not None and (only_to is None or server == only_to):
                by_server.setdefault(server, []).append(t)
        for server, ts in by_server.items():
            if not self.links.send_nowait(server, PSubscribe(self.discovery.view.version, self.node_id, subscriber,
                                                             ts, on)):
                log.debug("presence subscription of %s to %s on %s dropped (no link yet); resent on link up",
                          subscriber, ts, server)

    # ---- reading ---------------------------------------------------------------------------
    async def statuses(self, user_ids) -> dict[int, dict]:
        by_server: dict[str | None, list[int]] = {}
        for uid in user_ids:
            by_server.setdefault(self._server(uid), []).append(uid)
        out: dict[int, dict] = {}
        for server, uids in by_server.items():
            if server is not None:
                try:
                    reply = await self.links.request(server, PQuery(uids), timeout_s=5.0)
                    if reply.users is not None:
                        out.update({int(k): v for k, v in reply.users.items()})
                        continue
                except ChatError as e:
                    log.warning("presence server %s: %s", server, e)
            stored = await self.store.get_last_active(uids)  # no presence server: nobody is known online
            out.update({u: status_dict(False, stored.get(u)) for u in uids})
        return out

    # ---- rebuild and flushing ----------------------------------------------------------------
    def resend_all(self, only_to: str | None = None) -> None:
        for uid, device in self.local_devices():
            server = self._server(uid)
            if server is not None and (only_to is None or server == only_to):
                self._hb.setdefault(server, set()).add((uid, device))
        for target, subs in self._subs.by_target.items():
            for subscriber in subs:
                self._send_subs(subscriber, [target], True, only_to)
        self._wake.set()

    def on_view_change(self, old, new) -> None:
        if new.shards != old.shards:
            log.debug("presence servers v%d: %s; resending the snapshot", new.version, sorted(new.shards))
            self.resend_all()

    def on_link_up(self, link) -> None:
        self.resend_all(only_to=link.peer_id)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await trio.sleep(FLUSH_S)  # batch what arrives meanwhile
            batches, self._hb = self._hb, {}
            for server, pairs in batches.items():
                frame = PHeartbeats(self.discovery.view.version, list(pairs))
                if not self.links.send_nowait(server, frame):
                    log.debug("presence heartbeats for %s dropped (no link yet); resent on link up", server)
