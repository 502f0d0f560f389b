"""The face every discovery has: :class:`Discovery`, satisfied by
:class:`~chatd.discovery.local.LocalDiscovery` (``chatd run``: the shards of this process) and
:class:`~chatd.discovery.zk.ZkDiscovery` (a cluster: ZooKeeper).

A discovery holds the current :class:`~chatd.discovery.view.View` (replaced, never mutated) and
tells ``on_change`` listeners ``(old, new)`` synchronously when it changes; ``writable`` is the
shard's write barrier (True only while this process is registered and may own channels).
"""

from __future__ import annotations

from typing import Callable, Protocol

from .view import ShardInfo, View


class Discovery(Protocol):
    view: View
    writable: bool
    # Whether ``writable`` can turn False behind a stalled process (a ZooKeeper session expires
    # while the event loop was late); the router guards its task-free paths after a stall only then.
    can_lose_session: bool

    def on_change(self, fn: Callable[[View, View], None]) -> None:
        """Call ``fn(old, new)`` on every view change (in the trio thread; must not block)."""

    async def wait_view(self, min_version: int, timeout_s: float) -> bool:
        """Until the view is at least ``min_version`` (at most ``timeout_s``); whether it is."""

    async def register(self, info: ShardInfo, load: Callable[[], int]) -> None:
        """Join the view as ``info``; returns once our own view includes it. ``load()`` is read
        for the published load figure (client connections)."""

    async def unregister(self) -> None:
        """Leave the view (logins and channels go elsewhere); a ZooKeeper discovery's
        ``writable`` turns False (the local one has no session to lose: always True)."""

    def live(self) -> list[ShardInfo]:
        """The servers of the current view."""

    def pick_shard(self, user_id: int) -> ShardInfo:
        """Where a login of ``user_id`` goes (its home, unless that is overloaded)."""
