"""In-process discovery for ``chatd run``: the cluster's shape with one (or more) local shards.

Shards register a :class:`ShardInfo`; ``pick_shard`` gives a user its home shard by rendezvous
hashing, or the least-loaded shard when home is above ``overload_connections``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import hashing


@dataclass
class ShardInfo:
    shard_id: str
    ws_url: str
    load: Callable[[], int] = lambda: 0


class LocalDiscovery:
    def __init__(self, overload_connections: int = 0):
        self._shards: dict[str, ShardInfo] = {}
        self.overload_connections = overload_connections

    def register(self, info: ShardInfo) -> None:
        self._shards[info.shard_id] = info

    def unregister(self, shard_id: str) -> None:
        self._shards.pop(shard_id, None)

    def live(self) -> list[ShardInfo]:
        return list(self._shards.values())

    def home_of(self, user_id: int) -> ShardInfo:
        if not self._shards:
            raise LookupError("no chat shard is registered")
        return self._shards[hashing.owner(f"u:{user_id}", self._shards)]

    def pick_shard(self, user_id: int) -> ShardInfo:
        home = self.home_of(user_id)
        if self.overload_connections and home.load() > self.overload_connections:
            return min(self._shards.values(), key=lambda s: s.load())
        return home
