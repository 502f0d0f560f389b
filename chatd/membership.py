"""Who may read and write a channel, cached per shard.

A 1:1 channel's members follow from its id (both users must exist); a group's come from the store.
The cache is bounded twice, least recently loaded evicted first: at most ``max_cached`` channels
and at most ``max_cached_members`` member entries in all (groups hold up to 1,000 members: 100,000
cached groups of 1,000 would be ~4 GB; 2,000,000 entries are ~70 MB). It is invalidated by whoever
changes membership (the API calls :meth:`invalidate`). Errors: ``no_such_channel``, ``no_such_user``,
``not_member``.

Negative answers (``no_such_channel``, ``no_such_user``) are cached too, for ``MISSING_TTL_S``
and at most ``MAX_MISSING`` channels (oldest dropped first), so that asking about many unknown
channels (a ``sync`` naming thousands) costs the store one read each per TTL, not one per ask.
Group ids are random (nobody can name a group before it is made) and a 1:1 channel is asked
about only by its own two users, so a cached "does not exist" cannot be planted for others; an
:meth:`invalidate` drops it at once."""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict

from .errors import ChatError
from .lifecycle import MEMBER_ADDED, RENAMED, EventSpec
from .ids import dm_members, is_group

log = logging.getLogger(__name__)

MISSING_TTL_S = 5.0
MAX_MISSING = 10_000


class Membership:
    def __init__(self, store, max_cached: int = 100_000, max_cached_members: int = 2_000_000):
        self._store = store
        self._cache: OrderedDict[str, frozenset[int]] = OrderedDict()
        self._max = max_cached
        self._max_members = max_cached_members
        self._weight = 0  # member entries in the cache
        self._generation: dict[str, int] = {}
        self.on_invalidate: list = []  # callables(channel_id), told after each invalidation
        self._missing: OrderedDict[str, tuple[float, str, str]] = OrderedDict()  # channel -> (expiry, code, message)

    async def members(self, channel_id: str) -> frozenset[int]:
        cached = self._cache.get(channel_id)
        if cached is not None:
            return cached
        missing = self._missing.get(channel_id)
        if missing is not None:
            if missing[0] > time.monotonic():
                raise ChatError(missing[1], missing[2])
            del self._missing[channel_id]
        gen = self._generation.get(channel_id, 0)
        try:
            members = await self._load(channel_id)
        except ChatError as e:
            if e.code in ("no_such_channel", "no_such_user") and self._generation.get(channel_id, 0) == gen:
                self._missing[channel_id] = (time.monotonic() + MISSING_TTL_S, e.code, e.message)
                if len(self._missing) > MAX_MISSING:
                    self._missing.popitem(last=False)
            raise
        if self._generation.get(channel_id, 0) == gen:  # not invalidated while we loaded
            self._put(channel_id, members)
        return members

    def _put(self, channel_id: str, members: frozenset[int]) -> None:
        old = self._cache.pop(channel_id, None)
        if old is not None:
            self._weight -= len(old)
        self._cache[channel_id] = members
        self._weight += len(members)
        while self._cache and (len(self._cache) > self._max or self._weight > self._max_members):
            _, evicted = self._cache.popitem(last=False)
            self._weight -= len(evicted)

    async def _load(self, channel_id: str) -> frozenset[int]:
        pair = dm_members(channel_id)
        if pair is not None:
            users = await self._store.get_users(list(pair))
            if len(users) < 2:
                raise ChatError("no_such_user", "the other user of this 1:1 channel does not exist")
            members = frozenset(pair)
        elif is_group(channel_id):
            members = frozenset(await self._store.members(channel_id))
            if not members and await self._store.get_channel(channel_id) is None:
                raise ChatError("no_such_channel", f"channel {channel_id} does not exist")
        else:
            raise ChatError("no_such_channel", f"channel {channel_id} does not exist")
        return members

    def cached(self, channel_id: str) -> frozenset[int] | None:
        """The members if they are in the cache (no I/O); None otherwise."""
        return self._cache.get(channel_id)

    async def require_member(self, channel_id: str, user_id: int) -> frozenset[int]:
        pair = dm_members(channel_id)
        if pair is not None and user_id not in pair:
            raise ChatError("not_member", "you are not a member of this channel")
        members = await self.members(channel_id)
        if user_id not in members:
            raise ChatError("not_member", "you are not a member of this channel")
        return members

    def statistics(self) -> dict[str, int]:
        """``channels`` and ``members`` (entries) in the cache."""
        return {"channels": len(self._cache), "members": self._weight}

    def invalidate(self, channel_id: str) -> None:
        old = self._cache.pop(channel_id, None)
        if old is not None:
            self._weight -= len(old)
        self._missing.pop(channel_id, None)
        self._generation[channel_id] = self._generation.get(channel_id, 0) + 1
        for listener in self.on_invalidate:
            listener(channel_id)


async def announce_member_change(node, kind: str, channel_id: str, user_id: int, by: int, name: str = "") -> int:
    """After a stored membership change: a sequenced system row (``member_added``,
    ``member_removed``, ``member_left``; ``renamed`` with ``name``; chatd/lifecycle.py) takes the channel's next seq through
    its owner, so a device that was offline learns it by ``sync``; the one added gets it live at
    once (the group appears), the one removed gets it as the channel's last frame. Returns its
    seq; 0 if the owner could not be reached (logged: the change itself is stored, and
    ``GET /v1/channels`` shows it)."""
    spec = EventSpec(kind, user_id=user_id, notify=0 if kind == MEMBER_ADDED else user_id) if kind != RENAMED else \
        EventSpec(kind, body=name)
    try:
        result = await node.append_system_event(by, channel_id, spec, "sys:" + secrets.token_hex(12))
    except ChatError as e:
        log.warning("%s of user %s in %s stored, but its log row was not: %s", kind, user_id, channel_id, e)
        return 0
    return result.message.seq
