"""In-process discovery for ``chatd run``: the cluster's shape with the shards of this process.

The :class:`~chatd.discovery.base.Discovery` face, as the ZooKeeper discovery has it: a current
:class:`~chatd.discovery.view.View`, change callbacks, ``pick_shard`` for logins, ``writable`` for
the shard's write barrier (always True: there is no session to lose), ``register`` /
``unregister`` (one registration per instance)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import trio

from .view import ShardInfo, View


class LocalDiscovery:
    def __init__(self, overload_connections: int = 0):
        self.view = View()
        self.overload_connections = overload_connections
        self._listeners: list[Callable[[View, View], None]] = []
        self._loads: dict[str, Callable[[], int]] = {}
        self.writable = True  # no session to lose
        self.can_lose_session = False
        self._view_event: trio.Event | None = None
        self._registered: str | None = None

    def on_change(self, fn: Callable[[View, View], None]) -> None:
        self._listeners.append(fn)

    def _set(self, shards: dict) -> None:
        old, self.view = self.view, View(self.view.version + 1, shards)
        for fn in list(self._listeners):
            fn(old, self.view)
        if self._view_event is not None:
            self._view_event.set()
            self._view_event = None

    async def wait_view(self, min_version: int, timeout_s: float) -> bool:
        with trio.move_on_after(timeout_s):
            while self.view.version < min_version:
                if self._view_event is None:
                    self._view_event = trio.Event()
                await self._view_event.wait()
            return True
        return False

    async def register(self, info: ShardInfo, load: Callable[[], int] = lambda: 0) -> None:
        """Join the view as ``info`` (at once: there is nobody to ask)."""
        self._registered = info.shard_id
        self._loads[info.shard_id] = load
        self._set({**self.view.shards, info.shard_id: info})

    async def unregister(self) -> None:
        """Leave the view (the shard :meth:`register` registered; nothing if none)."""
        shard_id, self._registered = self._registered, None
        if shard_id is None:
            return
        self._loads.pop(shard_id, None)
        self._set({k: v for k, v in self.view.shards.items() if k != shard_id})

    def live(self) -> list[ShardInfo]:
        return list(self.view.shards.values())

    def pick_shard(self, user_id: int) -> ShardInfo:
        shards = {k: dataclasses.replace(v, load=self._loads.get(k, lambda: 0)())
                  for k, v in self.view.shards.items()}
        return View(self.view.version, shards).pick_for_login(user_id, self.overload_connections)
