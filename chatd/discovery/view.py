"""The cluster view: which shards are live, under a version number. Pure data, no I/O.

Channel owners and user homes are functions of the view (rendezvous hashing), so every process
holding the same view computes the same answer without talking to anyone. In ZooKeeper mode the
version is the children version (``cversion``) of the shards znode: it increases on every join and
leave and is the same number for every watcher; load updates do not change it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from . import hashing

MEMO_MAX = 200_000  # answers kept per view (then forgotten all at once)


@dataclass(frozen=True)
class ShardInfo:
    shard_id: str
    ws_url: str
    link_addr: str = ""  # host:port of its inter-shard link listener ("" = in-process only)
    load: int = 0  # client connections

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "ShardInfo":
        d = json.loads(data)
        return cls(shard_id=str(d["shard_id"]), ws_url=str(d["ws_url"]), link_addr=str(d.get("link_addr", "")),
                   load=int(d.get("load", 0)))


@dataclass(frozen=True)
class View:
    version: int = 0
    shards: dict = field(default_factory=dict)  # shard_id -> ShardInfo
    # answers already computed under this view (a view never changes: a new view starts empty);
    # every send asks for its channel's owner and its members' homes (a blake2b per shard each)
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    # (memo keys: a channel id is a str, a user id an int, so they cannot collide; the hashed key
    # is built only on a miss: a group's fan-out asks for 100 homes per message)
    def owner_of(self, channel_id: str) -> str:
        found = self._memo.get(channel_id)
        return found if found is not None else self._owner(channel_id, f"c:{channel_id}")

    def home_of(self, user_id: int) -> str:
        found = self._memo.get(user_id)
        return found if found is not None else self._owner(user_id, f"u:{user_id}")

    def _owner(self, memo_key, key: str) -> str:
        found = hashing.owner(key, self.shards)
        if len(self._memo) >= MEMO_MAX:
            self._memo.clear()
        self._memo[memo_key] = found
        return found

    def by_home(self, user_ids) -> dict[str, list[int]]:
        """home shard -> its users among ``user_ids`` (in their order). Empty without shards."""
        by_home: dict[str, list[int]] = {}
        for uid in user_ids if self.shards else ():
            by_home.setdefault(self.home_of(uid), []).append(uid)
        return by_home

    def pick_for_login(self, user_id: int, overload_connections: int = 0) -> ShardInfo:
        """The user's home shard, or the least-loaded one when home is above the threshold."""
        if not self.shards:
            raise LookupError("no chat shard is live")
        home = self.shards[self.home_of(user_id)]
        if overload_connections and home.load > overload_connections:
            return min(self.shards.values(), key=lambda s: (s.load, s.shard_id))
        return home
