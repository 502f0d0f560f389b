"""The bench's scenarios and options, and the pure planning step: which users share which channel.

Nothing here does I/O: :func:`plan_channels` turns a scenario and a number of users into channel
plans (1:1 pairs or groups of user indices), and the dataclasses are what the coordinator hands to
its worker processes (they are pickled).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

MAX_GROUP_SIZE = 1000  # the server's default cap (limits.max_group_members)
TRANSPORTS = ("ws", "sse", "poll")


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    sends: bool  # devices send messages to their channel
    storm: bool  # devices disconnect and reconnect all the time
    channels: str  # "dm", "group" or "none"


SCENARIOS = {
    "dm": Scenario("dm", "1:1 pairs: every client sends to its partner (clients must be even)",
                   sends=True, storm=False, channels="dm"),
    "group": Scenario("group", "groups of --group-size members (<= 1000): every member sends to its group",
                      sends=True, storm=False, channels="group"),
    "storm": Scenario("storm", "1:1 pairs that keep sending while every client disconnects (abruptly or "
                      "cleanly) and reconnects with auth + cursors; each must get all it missed exactly once",
                      sends=True, storm=True, channels="dm"),
    "idle": Scenario("idle", "hold idle connections that only heartbeat; with a local server, report its "
                     "RSS per connection", sends=False, storm=False, channels="none"),
}


@dataclass(frozen=True)
class BenchOptions:
    scenario: str
    clients: int = 100
    devices: int = 1
    rate: float = 1000.0
    duration_s: float = 10.0
    size: int = 64
    ramp_up_s: float = 0.0
    seed: int = 1
    procs: int = 1
    fmt: str = "json"
    group_size: int = 10
    drain_s: float = 5.0
    reconnect_interval_s: float = 1.0
    offline_s: float = 0.3
    connect_concurrency: int = 64
    connect_timeout_s: float = 15.0
    max_inflight: int = 64
    cross_shard: bool = False  # dm/storm: pair users whose logins named different shards
    # the message lifecycle: (op, weight) of send / edit / delete / react (--mix); () = sends only
    mix: tuple = ()
    transport: str = "ws"  # "ws", "sse" or "poll" (docs/protocol.md section 7)

    @property
    def connections(self) -> int:
        return self.clients * self.devices

    def validate(self) -> None:
        """Raise ValueError naming the first option that cannot work."""
        sc = SCENARIOS[self.scenario]
        if self.clients < 1 or self.devices < 1:
            raise ValueError("--clients and --devices must be >= 1")
        if sc.channels == "dm" and (self.clients < 2 or self.clients % 2):
            raise ValueError(f"{self.scenario}: --clients must be even (1:1 pairs), got {self.clients}")
        if sc.channels == "group":
            if not 2 <= self.group_size <= MAX_GROUP_SIZE:
                raise ValueError(f"--group-size must be between 2 and {MAX_GROUP_SIZE}")
            if self.clients < 2:
                raise ValueError("group: --clients must be >= 2")
            if self.clients > self.group_size and self.clients % self.group_size:
                raise ValueError(f"group: --clients ({self.clients}) must be a multiple of --group-size "
                                 f"({self.group_size}) (or smaller: one group of all clients)")
        if self.duration_s <= 0:
            raise ValueError("--duration must be > 0")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"--transport must be one of {', '.join(TRANSPORTS)}")
        if self.transport != "ws" and self.fmt != "json":
            raise ValueError("--transport sse/poll carry JSON only (--format json)")
        if self.ramp_up_s < 0 or (sc.sends and self.ramp_up_s >= self.duration_s):
            raise ValueError("--ramp-up must be >= 0 and shorter than --duration")
        if sc.sends and self.rate <= 0:
            raise ValueError("--rate must be > 0")
        if self.size < 17:
            raise ValueError("--size must be >= 17 (the body carries a 16-digit send timestamp)")
        if self.size > 100_000:
            raise ValueError("--size must be <= 100000 (the server's body limit)")
        if self.procs < 1:
            raise ValueError("--procs must be >= 1")
        if self.cross_shard and sc.channels != "dm":
            raise ValueError("--cross-shard applies to 1:1 pairs (dm, storm)")
        if self.mix:
            ops = dict(self.mix)
            if set(ops) - set(MIX_OPS) or any(w < 0 for w in ops.values()) or not ops.get("send"):
                raise ValueError(f"--mix: weights of {', '.join(MIX_OPS)} (>= 0; send > 0), e.g. "
                                 "send=80,edit=5,delete=5,react=10")
            if self.scenario not in ("dm", "group") or self.fmt != "json":
                raise ValueError("--mix applies to dm and group, in JSON")
        if self.fmt not in ("json", "msgpack"):
            raise ValueError("--format must be json or msgpack")


MIX_OPS = ("send", "edit", "delete", "react")


def parse_mix(text: str) -> tuple:
    """``send=80,edit=5,delete=5,react=10`` -> (("send", 80), ...); ValueError if unreadable."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        op, _, w = part.partition("=")
        out.append((op.strip(), float(w)))
    return tuple(out)


def auto_procs(connections: int) -> int:
    """One generator process per 500 connections, at most one per CPU."""
    return max(1, min(os.cpu_count() or 1, math.ceil(connections / 500)))


@dataclass(frozen=True)
class ChannelPlan:
    kind: str  # "dm" | "group"
    members: tuple[int, ...]  # user indices


def plan_channels(scenario: str, n_users: int, group_size: int) -> list[ChannelPlan]:
    kind = SCENARIOS[scenario].channels
    if kind == "dm":
        return [ChannelPlan("dm", (i, i + 1)) for i in range(0, n_users - 1, 2)]
    if kind == "group":
        size = min(group_size, n_users)
        return [ChannelPlan("group", tuple(range(i, min(i + size, n_users)))) for i in range(0, n_users, size)]
    return []


@dataclass
class DeviceSpec:
    index: int  # global, 0..connections-1
    user_index: int
    user_id: int
    token: str
    ws_url: str
    tag: str  # client_msg_id prefix, unique to this device in this run
    channels: tuple[str, ...] = ()  # channels it reads (its auth cursors)
    send_channel: str | None = None
    shard: str = ""  # the shard its login sent it to


@dataclass
class WorkerSpec:
    worker: int
    options: BenchOptions
    devices: list[DeviceSpec] = field(default_factory=list)
    total_senders: int = 0

    @property
    def rate(self) -> float:
        """This worker's share of the total send rate."""
        senders = sum(1 for d in self.devices if d.send_channel)
        return self.options.rate * senders / self.total_senders if self.total_senders else 0.0
