"""Rendezvous (highest random weight) hashing: pure, deterministic across processes.

Every key maps to the node with the highest ``hash(node, key)``; removing a node moves only the
keys it owned, adding one takes roughly 1/n of the keys from each survivor."""

from __future__ import annotations

import hashlib
from typing import Iterable


def weight(node: str, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{node}\x00{key}".encode(), digest_size=8).digest(), "big")


def rank(key: str, nodes: Iterable[str]) -> list[str]:
    """Nodes from most to least preferred for ``key``."""
    return sorted(nodes, key=lambda n: (weight(n, key), n), reverse=True)


def owner(key: str, nodes: Iterable[str]) -> str:
    best = None
    best_w = -1
    for n in nodes:
        w = weight(n, key)
        if w > best_w or (w == best_w and n > best):
            best, best_w = n, w
    if best is None:
        raise LookupError("no live nodes")
    return best
