"""The presence service: a :class:`~chatd.presence.tracker.PresenceTracker` run in trio.

Inputs are synchronous calls (``heartbeat``, ``logout``, ``subscribe``...) from sessions, or from
link frames in a ``chatd presence`` server. One task (:meth:`run`) sleeps until the next device
expiry or coalescing deadline, then publishes the due changes:

* to the user's **contacts** (users it shares a 1:1 channel with), the members of its groups of at
  most ``group_push_max`` members (larger groups fetch presence on demand), and its explicit
  ``subscribe_presence`` subscribers (registered only when they may see the user:
  :mod:`chatd.presence.visibility`) — through ``publish(frame, user_ids)``, which in ``chatd run``
  is the router's transient-event fan-out;
* and ``last_active_at`` to the store when a user goes offline (and when it comes online, as a floor).

Times inside are trio clock readings (so tests run on a mock clock); what leaves is wall-clock
time. Store errors while publishing are logged and do not stop the service; the status stays
correct in memory.
"""

from __future__ import annotations

import logging
import time

import trio

from ..errors import ChatError
from ..ids import dm_members
from .tracker import Change, PresenceTracker, Subscriptions

log = logging.getLogger(__name__)


def status_dict(online: bool, last_active_at: float | None) -> dict:
    return {"status": "online" if online else "offline", "last_active_at": last_active_at}


class PresenceService:
    def __init__(self, store, membership, publish, grace_s: float = 30.0, coalesce_s: float = 1.0,
                 group_push_max: int = 20):
        self.store = store
        self.membership = membership
        self.publish = publish
        self.tracker = PresenceTracker(grace_s, coalesce_s)
        self.group_push_max = group_push_max
        self.subscribers = Subscriptions()
        self._wake = trio.Event()
        self._offset = time.time() - trio.current_time()
        self.published = 0
        self.parked = False  # True while the loop waits with nothing to do (tests watch it)

    def wall(self, t: float) -> float:
        return t + self._offset

    # ---- events (synchronous, never block) -----------------------------------------------
    def heartbeat(self, user_id: int, device: str) -> None:
        # Woken only when a status changed: the loop's scans are O(users), and waking it for every
        # heartbeat made them O(users) per heartbeat (at 10,000 idle connections that was 93 % of
        # the shard's CPU, py-spy).
        if self.tracker.heartbeat(user_id, device, trio.current_time()):
            self._wake.set()

    def logout(self, user_id: int, device: str) -> None:
        if self.tracker.logout(user_id, device, trio.current_time()):
            self._wake.set()

    def subscribe(self, subscriber: int, targets, grants: dict | None = None) -> None:
        """``grants``: {target: group it is seen through} (:class:`~chatd.presence.tracker.Subscriptions`)."""
        self.subscribers.add(subscriber, targets, grants)

    @property
    def subscriptions(self) -> Subscriptions:
        return self.subscribers

    def unsubscribe(self, subscriber: int, targets) -> None:
        self.subscribers.remove(subscriber, targets)

    # ---- reading ---------------------------------------------------------------------------
    async def statuses(self, user_ids) -> dict[int, dict]:
        out, unknown = {}, []
        for uid in user_ids:
            st = self.tracker.status(uid)
            if st is None:
                unknown.append(uid)
            else:
                out[uid] = status_dict(st[0], self.wall(st[1]) if st[1] else None)
        if unknown:
            stored = await self.store.get_last_active(unknown)
            for uid in unknown:
                out[uid] = status_dict(False, stored.get(uid))
        return out

    # ---- the loop ----------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._offset = time.time() - trio.current_time()
        task_status.started()
        while True:
            now = trio.current_time()
            self.tracker.expire(now)
            for change in self.tracker.due_changes(now):
                await self._publish(change)
            deadlines = [d for d in (self.tracker.next_deadline(), self.tracker.next_publish_at()) if d is not None]
            self._wake = trio.Event()
            self.parked = True
            with trio.move_on_at(min(deadlines) if deadlines else now + 3600):
                await self._wake.wait()
            self.parked = False

    async def _publish(self, change: Change) -> None:
        at = self.wall(change.last_active_at)
        try:
            recipients = await self.audience(change.user_id)
            await self.store.set_last_active(change.user_id, at)
        except ChatError as e:
            log.warning("presence of user %s: %s", change.user_id, e)
            recipients = set(self.subscribers.subscribers_of(change.user_id))
        recipients.discard(change.user_id)
        self.published += 1
        if recipients:
            frame = {"type": "presence", "user_id": change.user_id, **status_dict(change.online, at)}
            self.publish(frame, sorted(recipients))

    async def audience(self, user_id: int) -> set[int]:
        """Who hears about this user's changes: contacts, small-group peers, explicit subscribers."""
        out = set(self.subscribers.subscribers_of(user_id))
        for ch in await self.store.channels_of(user_id):
            pair = dm_members(ch.id)
            if pair is not None:
                out.update(pair)
            elif self.group_push_max > 0:
                members = await self.membership.members(ch.id)
                if len(members) <= self.group_push_max:
                    out.update(members)
        return out
