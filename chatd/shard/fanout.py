"""Where a committed message or a transient event goes: the fan-out of one shard.

* The owner hands a message (``deliver_message``, from :class:`~chatd.shard.owner.ChannelOwners`)
  or an event (``deliver_event``) to each member's **home** shard: one ``deliver`` frame per home
  shard, not per member; the members homed here are handled in the same step.
* The home knows on which shards its users have devices (``locations``) and sends one ``push``
  frame per device shard; the members with a device here are pushed to their sessions directly.
  A member with no device anywhere gets a push notification (``push.notify_offline``).
* A member whose home moved (this shard still gets the frame, routed under an older view) is
  forwarded **once** to its new home (``deliver`` with ``hops`` 1), which never forwards again.
* Device locations are announced to the home when a user's first session opens on a shard and
  when its last one closes (``device``), and re-announced to the new homes whenever the view
  changes or a link comes up (``devices``).

Delivery is synchronous and non-blocking (``Session.push`` / ``Link.send_nowait``), so a channel's
fan-out leaves the owner in seq order. Anything dropped on the way (no link, a full link queue)
is counted in ``dropped`` and recovered by the sessions: they fill holes from the store, and a
``resync`` makes each session re-read its channels' heads.
"""

from __future__ import annotations

import logging

from ..protocol.link_frames import Deliver, Device, Devices, Frame, Push, message_extra, packed, unpacked
from ..store.base import Message
from .hub import Hub

log = logging.getLogger(__name__)


class FanOut:
    def __init__(self, shard_id: str, hub: Hub, discovery, links=None, push=None):
        """``discovery``: the view (``.view``); ``links``: the cluster's ``LinkManager`` (None with
        one shard in process); ``push``: the push service (None without one)."""
        self.me = shard_id
        self.hub = hub
        self.discovery = discovery
        self.links = links
        self.push = push
        self.locations: dict[int, set[str]] = {}  # users homed here -> shards with their devices
        self.dropped = 0

    # ---- out -------------------------------------------------------------------------------
    def deliver_message(self, message: Message, member_ids) -> None:
        self._fan_out(message, None, member_ids, None)

    def deliver_event(self, frame: dict, member_ids, skip: str | None = None) -> None:
        """A transient event (typing, read receipt) to every device of ``member_ids`` but the device
        ``skip`` (a device id: the one that caused the event, wherever its connection lives)."""
        self._fan_out(None, frame, member_ids, skip)

    def _fan_out(self, message, event, member_ids, skip) -> None:
        view = self.discovery.view
        if not view.shards:  # stopping, or not started: nobody to route to (stored messages wait)
            self.dropped += 1
            return
        by_home: dict[str, list[int]] = {}
        for uid in member_ids:
            by_home.setdefault(view.home_of(uid), []).append(uid)
        m = None
        for home, uids in by_home.items():
            if home == self.me:
                self._home_deliver(message, event, uids, skip)
            else:
                if m is None and message is not None:
                    m = packed(message)
                self._to(home, Deliver(view.version, uids, m, event, skip,
                                       mx=None if message is None else message_extra(message)))

    def _home_deliver(self, message, event, uids, skip=None, hops: int = 0) -> None:
        by_shard: dict[str, list[int]] = {}
        moved: dict[str, list[int]] | None = None  # new home -> users homed here no longer
        offline: list[int] = []
        view = self.discovery.view
        for uid in uids:
            shards = self.locations.get(uid)
            if shards:
                for shard in shards:
                    by_shard.setdefault(shard, []).append(uid)
            elif hops == 0 and view.shards and view.home_of(uid) != self.me:
                if moved is None:
                    moved = {}
                moved.setdefault(view.home_of(uid), []).append(uid)
            elif message is not None and uid != message.sender_id and message.kind == "message":
                offline.append(uid)  # no device connected anywhere: a push notification instead
                # (new messages only: no push for an edit, a reaction or a system event)
        if offline and self.push is not None:
            self.push.notify_offline(message, offline)  # only enqueues (chatd/push/service.py)
        m = None
        for shard, us in by_shard.items():
            if shard == self.me:
                self.push_local(message if message is not None else event, us, skip)
            else:
                if m is None and message is not None:
                    m = packed(message)
                self._to(shard, Push(view.version, us, m, event, skip,
                                     mx=None if message is None else message_extra(message)))
        if moved is not None:  # forward once: the new home delivers, never forwards again
            if m is None and message is not None:
                m = packed(message)
            for home, us in moved.items():
                self._to(home, Deliver(view.version, us, m, event, skip, hops=1,
                                       mx=None if message is None else message_extra(message)))

    def push_local(self, item, user_ids, skip: str | None = None) -> None:
        for uid in user_ids:  # (push never adds or removes sessions: no copy of the set)
            for session in self.hub.sessions_of(uid):
                if skip is None or session.device_id != skip:
                    session.push(item)

    def _to(self, shard: str, frame: Frame) -> None:
        if self.links is None or not self.links.send_nowait(shard, frame):
            self.dropped += 1
            log.debug("frame %s to %s dropped (no link or queue full)", type(frame).__name__, shard)

    # ---- in (link frames; handler(link, frame), dispatched by chatd.node.Node.on_link_frame) ----
    def on_deliver(self, link, frame: Deliver) -> None:
        message = frame.message
        if message is not None:
            self._home_deliver(unpacked(message, frame.mx), None, frame.user_ids, frame.skip, frame.hops)
        elif frame.event is not None:
            self._home_deliver(None, frame.event, frame.user_ids, frame.skip, frame.hops)

    def on_push(self, link, frame: Push) -> None:
        message = frame.message
        item = unpacked(message, frame.mx) if message is not None else frame.event
        if item is not None:
            self.push_local(item, frame.user_ids, frame.skip)

    def on_device(self, link, frame: Device) -> None:
        self.set_location(frame.user_id, frame.shard, frame.on)

    def on_devices(self, link, frame: Devices) -> None:
        for uid in frame.user_ids:
            self.set_location(uid, frame.shard, True)

    # ---- device locations ----------------------------------------------------------------------
    def connected_here(self, user_id: int) -> bool:
        """A device of ``user_id`` is connected (known for the users homed on this shard)."""
        view = self.discovery.view
        return bool(view.shards) and view.home_of(user_id) == self.me and bool(self.locations.get(user_id))

    def announce(self, user_id: int, on: bool) -> None:
        """The user's first session opened here (``on``) or its last one closed: tell its home."""
        view = self.discovery.view
        if not view.shards:
            return
        home = view.home_of(user_id)
        if home == self.me:
            self.set_location(user_id, self.me, on)
        else:
            self._to(home, Device(view.version, user_id, self.me, on))

    def set_location(self, user_id: int, shard: str, on: bool) -> None:
        if on:
            self.locations.setdefault(user_id, set()).add(shard)
        else:
            shards = self.locations.get(user_id)
            if shards is not None:
                shards.discard(shard)
                if not shards:
                    del self.locations[user_id]

    def announce_all(self, only_to: str | None = None) -> None:
        """Tell every (or one) home shard which of its users have sessions here."""
        view = self.discovery.view
        if not view.shards:
            return
        by_home: dict[str, list[int]] = {}
        for session in self.hub.all_sessions():
            by_home.setdefault(view.home_of(session.user_id), []).append(session.user_id)
        for home, uids in by_home.items():
            if only_to is not None and home != only_to:
                continue
            if home == self.me:
                for uid in uids:
                    self.set_location(uid, self.me, True)
            else:
                self._to(home, Devices(view.version, self.me, sorted(set(uids))))

    def on_view_change(self, old, new) -> None:
        """Forget devices on shards that left and users no longer homed here; announce ours again."""
        if not new.shards:
            return
        for uid in list(self.locations):
            shards = {s for s in self.locations[uid] if s in new.shards}
            if shards and new.home_of(uid) == self.me:
                self.locations[uid] = shards
            else:
                del self.locations[uid]
        self.announce_all()
