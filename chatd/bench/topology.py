"""Where a run's sends go in a cluster, and which processes' CPU counts: pure, no I/O but reading
pid files.

* :func:`cross_shard_order` reorders users so that 1:1 pairs (users 2k, 2k+1) straddle shards
  (``--cross-shard``): by the shard each user's first login was sent to.
* :func:`topology` says, per sending device (each sends the same schedule, so per send too), how
  often the partner's device is on another shard, how often the channel's owner is not the
  sender's shard, and how many frames cross the inter-shard links per send -- from the same
  rendezvous hashing the router uses (:mod:`chatd.discovery.hashing`) over the live shards the
  API's ``/healthz`` named at setup. It describes routing as docs say it works (owner fans out to
  each member's home, the home forwards to each device shard); a view change mid-run is not seen.
* :func:`cluster_pids` reads ``bin/chatd-local-cluster``'s ``run/*.pid`` files (ZooKeeper left out:
  it is not chatd) into ``{name: pid}``; :func:`role_of` names a process's role from its name.
"""

from __future__ import annotations

from pathlib import Path

from ..discovery import hashing


def cross_shard_order(shards: list[str]) -> list[int]:
    """A permutation of user indices such that as many consecutive pairs as possible have users on
    different shards (``shards[i]`` = user i's shard): repeatedly one user of the largest group and
    one of the next; users left in one group pair among themselves."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(shards):
        groups.setdefault(s, []).append(i)
    order: list[int] = []
    while True:
        live = sorted((g for g in groups.values() if g), key=len, reverse=True)
        if len(live) < 2:
            break
        order += [live[0].pop(), live[1].pop()]
    for g in groups.values():
        order += g
    return order


def topology(devices, channel_devices: dict[str, list[int]], shards: list[str]) -> dict | None:
    """The cluster section of the report; None unless the devices are on more than one shard."""
    if len({d.shard for d in devices}) < 2 or not shards:
        return None
    senders = [d for d in devices if d.send_channel]
    partner_elsewhere = owner_remote = frames = 0
    for d in senders:
        ch = d.send_channel
        members = [devices[i] for i in channel_devices[ch]]
        owner = hashing.owner(f"c:{ch}", shards)
        if any(m.shard != d.shard for m in members if m.user_id != d.user_id):
            partner_elsewhere += 1
        if owner != d.shard:
            owner_remote += 1
            frames += 2  # send + reply
        homes: dict[str, set[str]] = {}  # home shard -> shards of its users' devices
        for m in members:
            homes.setdefault(hashing.owner(f"u:{m.user_id}", shards), set()).add(m.shard)
        for home, device_shards in homes.items():
            frames += home != owner  # deliver: owner -> home
            frames += len(device_shards - {home})  # push: home -> device shard
    n = max(1, len(senders))
    by_shard: dict[str, int] = {}
    for d in devices:
        by_shard[d.shard] = by_shard.get(d.shard, 0) + 1
    return {"shards": list(shards), "devices_by_shard": dict(sorted(by_shard.items())),
            "sends_partner_on_other_shard": round(partner_elsewhere / n, 3),
            "sends_owner_remote": round(owner_remote / n, 3),
            "link_frames_per_send": round(frames / n, 2)}


def cluster_pids(cluster_dir: str) -> dict[str, int]:
    run = Path(cluster_dir) / "run"
    pids = {p.stem: int(p.read_text().strip()) for p in sorted(run.glob("*.pid")) if p.stem != "zookeeper"}
    if not pids:
        raise ValueError(f"no chatd pid files in {run} (is bin/chatd-local-cluster running there?)")
    return pids


def role_of(name: str) -> str:
    """``s1`` -> shard, ``p1`` -> presence, ``api`` -> api; anything else (``--server-pid``) -> server."""
    if name == "api":
        return "api"
    if name[:1] in ("s", "p") and name[1:].isdigit():
        return "shard" if name[0] == "s" else "presence"
    return "server"
