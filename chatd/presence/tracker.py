"""Presence rules as a pure state machine: no I/O, no trio, the clock is an argument.

* A user is **online** while at least one of its devices has heartbeated (or connected) within
  ``grace_s``. A dropped connection does not make it offline: its device simply stops
  heartbeating, and the user turns offline ``grace_s`` after the last heartbeat of its last device
  (so a tunnel or a reconnect within the grace period changes nothing for anybody).
* An explicit **logout** removes that device at once; logging out the last device turns the user
  offline at once.
* ``last_active_at`` is the time of the user's latest heartbeat.
* Changes are **coalesced** per user: :meth:`due_changes` reports a user at most once per
  ``coalesce_s``, and only if its status differs from the last one reported — a flapping device
  cannot storm subscribers.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _User:
    devices: dict = field(default_factory=dict)  # device key -> last heartbeat time
    online: bool = False
    last_active_at: float = 0.0
    published: bool | None = None  # last status reported to subscribers (None: never)
    published_at: float = float("-inf")


@dataclass(frozen=True)
class Change:
    user_id: int
    online: bool
    last_active_at: float


class PresenceTracker:
    def __init__(self, grace_s: float = 30.0, coalesce_s: float = 1.0):
        self.grace_s = grace_s
        self.coalesce_s = coalesce_s
        self._users: dict[int, _User] = {}
        self._dirty: set[int] = set()

    # ---- events ------------------------------------------------------------------------------
    def heartbeat(self, user_id: int, device: str, now: float) -> bool:
        """A device connected or heartbeated. True when the user's status changed (a ticker must
        look again); a refresh only moves a deadline later, so it needs nobody woken."""
        u = self._users.setdefault(user_id, _User())
        u.devices[device] = now
        u.last_active_at = max(u.last_active_at, now)
        if not u.online:
            u.online = True
            self._dirty.add(user_id)
            return True
        return False

    def logout(self, user_id: int, device: str, now: float) -> bool:
        """True when the user's status changed (its last device logged out)."""
        u = self._users.get(user_id)
        if u is None:
            return False
        u.devices.pop(device, None)
        if not u.devices and u.online:
            u.online = False
            self._dirty.add(user_id)
            return True
        return False

    def expire(self, now: float) -> None:
        """Forget devices silent for longer than the grace period; users left without one go offline."""
        # ``t + grace_s <= now`` is the very expression :meth:`next_deadline` sleeps until: written
        # as ``t <= now - grace_s`` float rounding can leave a device unexpired at its own deadline,
        # and the service loop would spin on a deadline already past.
        for uid, u in list(self._users.items()):
            for dev in [d for d, t in u.devices.items() if t + self.grace_s <= now]:
                del u.devices[dev]
            if not u.devices and u.online:
                u.online = False
                self._dirty.add(uid)
            if not u.devices and not u.online and u.published in (False, None) and uid not in self._dirty:
                del self._users[uid]  # nothing left to remember (last_active_at is in the store)

    def forget_devices(self, predicate) -> None:
        """Drop devices for which ``predicate(user_id, device)`` is true, without a status change
        (used when rebuilding state: the rebuilt snapshot re-adds the live ones)."""
        for uid, u in self._users.items():
            for dev in [d for d in u.devices if predicate(uid, d)]:
                del u.devices[dev]

    def forget(self, user_id: int) -> None:
        """Drop everything about a user (it moved to another presence server); nothing is published."""
        self._users.pop(user_id, None)
        self._dirty.discard(user_id)

    # ---- reading -------------------------------------------------------------------------------
    def status(self, user_id: int) -> tuple[bool, float] | None:
        """(online, last_active_at) if this tracker knows the user, else None."""
        u = self._users.get(user_id)
        return None if u is None else (u.online, u.last_active_at)

    def next_deadline(self) -> float | None:
        """When the earliest device would expire (for a sleeping ticker)."""
        times = [t for u in self._users.values() for t in u.devices.values()]
        return min(times) + self.grace_s if times else None

    def due_changes(self, now: float) -> list[Change]:
        """Status changes to publish now (coalesced); the rest stay pending."""
        out = []
        for uid in list(self._dirty):
            u = self._users.get(uid)
            if u is None:
                self._dirty.discard(uid)
                continue
            if u.published == u.online:  # flapped back before it was reported
                self._dirty.discard(uid)
                continue
            if now < u.published_at + self.coalesce_s:  # same expression as next_publish_at
                continue
            self._dirty.discard(uid)
            u.published, u.published_at = u.online, now
            out.append(Change(uid, u.online, u.last_active_at))
        return out

    def next_publish_at(self) -> float | None:
        times = [self._users[uid].published_at + self.coalesce_s for uid in self._dirty if uid in self._users]
        return min(times) if times else None

    def users(self) -> list[int]:
        return list(self._users)


class Subscriptions:
    """target user -> {subscriber: refcount}. ``add``/``remove`` return the targets whose
    subscription by ``subscriber`` started / ended with this call.

    A live subscription may also record its **grant**: the group through which the subscriber may
    see the target (``presence.visibility = "contacts"``, :mod:`chatd.presence.visibility`), so that
    a membership change of that group finds the subscriptions to check again (:meth:`take_granted`).
    A grant ends with its subscription; the table holds one per live (subscriber, target)."""

    def __init__(self):
        self.by_target: dict[int, dict[int, int]] = {}
        self._grant: dict[tuple[int, int], str] = {}  # (subscriber, target) -> group
        self._by_grant: dict[str, set[tuple[int, int]]] = {}

    def add(self, subscriber: int, targets, grants: dict | None = None) -> list[int]:
        """``grants``: {target: group} for the targets seen through a group (others: none)."""
        started = []
        for t in targets:
            subs = self.by_target.setdefault(t, {})
            subs[subscriber] = subs.get(subscriber, 0) + 1
            if subs[subscriber] == 1:
                started.append(t)
            if grants and t in grants:
                self.grant(subscriber, t, grants[t])
        return started

    def remove(self, subscriber: int, targets) -> list[int]:
        ended = []
        for t in targets:
            subs = self.by_target.get(t)
            if subs and subscriber in subs:
                subs[subscriber] -= 1
                if subs[subscriber] <= 0:
                    del subs[subscriber]
                    ended.append(t)
                    self._drop_grant((subscriber, t))
                if not subs:
                    del self.by_target[t]
        return ended

    def subscribers_of(self, target: int):
        return self.by_target.get(target, {}).keys()

    def grant(self, subscriber: int, target: int, group: str | None) -> None:
        """Record (or, with None, clear) the group through which a live subscription is seen."""
        key = (subscriber, target)
        if self._grant.get(key) == group:
            return
        self._drop_grant(key)
        if group is not None and subscriber in self.by_target.get(target, ()):
            self._grant[key] = group
            self._by_grant.setdefault(group, set()).add(key)

    def take_granted(self, group: str) -> list[tuple[int, int]]:
        """The (subscriber, target) pairs granted through ``group``; their grants are cleared
        (whoever checks them again records the new one with :meth:`grant`)."""
        keys = self._by_grant.pop(group, ())
        for key in keys:
            del self._grant[key]
        return list(keys)

    def _drop_grant(self, key: tuple[int, int]) -> None:
        group = self._grant.pop(key, None)
        if group is not None:
            keys = self._by_grant[group]
            keys.discard(key)
            if not keys:
                del self._by_grant[group]
