"""Where frames go. In ``chatd run`` every member's home is this shard, so routing is a lookup in
the local :class:`~chatd.shard.hub.Hub`; cluster mode replaces the remote half, not this face.

Delivery is synchronous and non-blocking: each target session gets the item queued with
``push`` (which cuts off a slow consumer instead of blocking), so a channel's fan-out happens in
one step and every session sees a channel's messages in seq order."""

from __future__ import annotations


class Router:
    def __init__(self, hub, metrics):
        self.hub = hub
        self.metrics = metrics

    def deliver_message(self, message, member_ids) -> None:
        for uid in member_ids:
            for session in tuple(self.hub.sessions_of(uid)):
                session.push(message)

    def deliver_event(self, frame: dict, member_ids, skip=None) -> None:
        """A transient event (typing, read receipt) to every session of ``member_ids`` but ``skip``."""
        for uid in member_ids:
            for session in tuple(self.hub.sessions_of(uid)):
                if session is not skip:
                    session.push(frame)
