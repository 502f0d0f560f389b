"""Who may see whose presence (``presence.visibility``), decided on the node that serves the viewer.

``"contacts"`` (the default): a viewer sees its own presence and that of its **contacts**: the
users it shares a group with (of any size), and the users it has a 1:1 channel with that holds at
least one message (a 1:1 channel exists implicitly between any two users; only a stored one, listed
by ``store.channels_of``, counts). Anybody else — a stranger, or an id nobody has — answers exactly
like a user who is offline and was never seen, ``{"status": "offline", "last_active_at": null}``,
and a subscription to them is not registered (it gets no events). ``"everyone"``: every account
sees every user (no check, no cost).

Where: every path a client asks on (the WebSocket ``presence`` and ``subscribe_presence`` verbs,
``GET /v1/presence``, ``GET /v1/users/<id>/presence``) goes through :meth:`PresenceVisibility.visible`
on the shard or API server that serves the client, which has the store and the membership cache.
Presence services and the cluster's presence servers answer what an authenticated node asks
(``p_query``, ``p_sub``) and push status changes only to the audience they compute themselves
(1:1 contacts, members of groups up to ``presence.group_push_max``) and to the subscriptions this
check let through.

Cost: per query, the viewer's channel list (one ``store.channels_of``), cached per viewer (at most
``max_viewers`` viewers, least recently used evicted), and the member sets of the viewer's groups,
from the membership cache (a shard: memory; an API server, which caches no membership: one store
read per group, read only until every asked user is decided). A positive answer from a cached list
is confirmed by the group's current members, so a removal counts at once. A user the cached list
does not show reloads it when it is older than ``RELOAD_S`` or a membership changed on this node
since it was read: a new contact is seen at once on a shard, within ``RELOAD_S`` on an API server,
and a stranger's probes cost at most one channel list per viewer per ``RELOAD_S``. Nothing is added
per status change.

Revocation: a subscription seen through a group records that group
(:meth:`~chatd.presence.tracker.Subscriptions.grant`). When its membership changes
(:meth:`chatd.membership.Membership.invalidate`: on every shard of a cluster), the subscriber's
sessions check those subscriptions again (:meth:`PresenceVisibility.revisit`); one no longer visible
ends: it is unregistered and the session gets the answer a query now gives,
``{"type": "presence", "user_id": <id>, "status": "offline", "last_active_at": null}``.

Errors: a store error while answering a query is the query's error (as a presence read's); while
checking a subscription again, it ends the subscription (fails closed) and is logged.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import trio

from ..errors import ChatError
from ..ids import dm_members, is_group
from .service import status_dict

log = logging.getLogger(__name__)

RELOAD_S = 1.0  # a cached channel list that does not show an asked user is reloaded after this long
MAX_VIEWERS = 10_000  # cached channel lists per node
REVISITS = 5  # checks of one membership change's subscriptions while memberships keep changing


def hidden() -> dict:
    """What a user outside the viewer's contacts answers: the same as a user never seen."""
    return status_dict(False, None)


@dataclass(frozen=True)
class _Channels:
    partners: frozenset[int]  # users with a stored 1:1 channel with the viewer (the viewer included)
    groups: tuple[str, ...]
    loaded_at: float  # trio clock
    generation: int  # PresenceVisibility.generation when it was read


class PresenceVisibility:
    def __init__(self, store, membership, presence, mode: str = "contacts", sessions_of=None,
                 max_viewers: int = MAX_VIEWERS):
        """``presence``: the node's presence client (its ``subscriptions`` hold the grants);
        ``sessions_of``: ``user_id -> local sessions`` (a shard's hub), None where no client
        connects (an API server)."""
        self.everyone = mode == "everyone"
        self.store = store
        self.membership = membership
        self.presence = presence
        self.sessions_of = sessions_of
        self.max_viewers = max_viewers
        self.generation = 0  # membership changes seen on this node
        self._viewers: OrderedDict[int, _Channels] = OrderedDict()
        membership.on_invalidate.append(self._on_invalidate)

    # ---- reading -----------------------------------------------------------------------------
    async def visible(self, viewer: int, targets) -> dict[int, str | None]:
        """The targets ``viewer`` may see: ``{target: the group it is seen through, or None}``
        (None: the viewer itself, a 1:1 contact, or visibility "everyone")."""
        if self.everyone:
            return dict.fromkeys(targets)
        seen: dict[int, str | None] = {}
        rest = set(targets)
        if viewer in rest:
            rest.discard(viewer)
            seen[viewer] = None
        if not rest:
            return seen
        channels = self._viewers.get(viewer)
        if channels is None:
            channels = await self._load(viewer)
            await self._match(viewer, channels, rest, seen)
            return seen
        self._viewers.move_to_end(viewer)
        await self._match(viewer, channels, rest, seen)
        if rest and (channels.generation != self.generation or trio.current_time() - channels.loaded_at >= RELOAD_S):
            await self._match(viewer, await self._load(viewer), rest, seen)
        return seen

    async def statuses(self, viewer: int, user_ids, seen: dict | None = None) -> dict[int, dict]:
        """Presence of ``user_ids`` as ``viewer`` may see it (``seen``: :meth:`visible`'s answer
        if the caller has it)."""
        if seen is None:
            seen = await self.visible(viewer, user_ids)
        shown = [u for u in user_ids if u in seen]
        known = await self.presence.statuses(shown) if shown else {}
        return {u: (known.get(u) or hidden()) if u in seen else hidden() for u in user_ids}

    async def _load(self, viewer: int) -> _Channels:
        generation, now = self.generation, trio.current_time()
        partners, groups = set(), []
        for ch in await self.store.channels_of(viewer):
            pair = dm_members(ch.id)
            if pair is not None:
                partners.update(pair)
            elif is_group(ch.id):
                groups.append(ch.id)
        channels = _Channels(frozenset(partners), tuple(groups), now, generation)
        self._viewers[viewer] = channels
        self._viewers.move_to_end(viewer)
        while len(self._viewers) > self.max_viewers:
            self._viewers.popitem(last=False)
        return channels

    async def _match(self, viewer: int, channels: _Channels, rest: set, seen: dict) -> None:
        """Move from ``rest`` to ``seen`` what ``channels`` shows; groups are confirmed by their
        current members (the viewer must still be one)."""
        for t in [t for t in rest if t in channels.partners]:
            rest.discard(t)
            seen[t] = None
        for group in channels.groups:
            if not rest:
                return
            try:
                members = await self.membership.members(group)
            except ChatError as e:
                if e.code == "no_such_channel":
                    continue
                raise
            if viewer in members:
                hit = rest & members
                rest -= hit
                seen.update(dict.fromkeys(hit, group))

    # ---- revocation --------------------------------------------------------------------------
    def _on_invalidate(self, channel_id: str) -> None:
        self.generation += 1
        if self.everyone or self.sessions_of is None:
            return
        by_viewer: dict[int, list[int]] = {}
        for viewer, target in self.presence.subscriptions.take_granted(channel_id):
            by_viewer.setdefault(viewer, []).append(target)
        for viewer, targets in by_viewer.items():
            for session in self.sessions_of(viewer):
                session.presence_revisit(targets)

    async def revisit(self, viewer: int, subscribed: set, targets) -> list[int]:
        """Check again the subscriptions in ``subscribed`` (one session's) to ``targets``: those no
        longer visible leave ``subscribed``, are unregistered and returned; the others record the
        group they are seen through now. A membership change on this node while checking checks
        again (at most ``REVISITS`` times, then what is left ends too)."""
        ended: list[int] = []
        for _ in range(REVISITS):
            mine = [t for t in targets if t in subscribed]
            if not mine:
                return ended
            generation = self.generation
            try:
                seen = await self.visible(viewer, mine)
            except ChatError as e:
                log.warning("presence subscriptions of user %s ended: %s", viewer, e)
                seen = {}
            mine = [t for t in mine if t in subscribed]  # (unsubscribed meanwhile)
            gone = [t for t in mine if t not in seen]
            self.end(viewer, subscribed, gone)
            ended += gone
            for t in mine:
                if t in seen:
                    self.presence.subscriptions.grant(viewer, t, seen[t])
            if generation == self.generation:
                return ended
            targets = [t for t in mine if t in seen]
        gone = [t for t in targets if t in subscribed]
        self.end(viewer, subscribed, gone)
        return ended + gone

    def end(self, viewer: int, subscribed: set, targets: list[int]) -> None:
        if targets:
            subscribed.difference_update(targets)
            self.presence.unsubscribe(viewer, targets)


def visibility(node) -> PresenceVisibility:
    """The node's visibility check (a shard's or an API server's), made on first use: it registers
    with the node's membership cache then, before any presence subscription exists."""
    gate = getattr(node, "presence_visibility", None)
    if gate is None:
        hub = getattr(node, "hub", None)
        gate = PresenceVisibility(node.store, node.membership, node.presence, node.config.presence.visibility,
                                  sessions_of=hub.sessions_of if hub is not None else None)
        node.presence_visibility = gate
    return gate
