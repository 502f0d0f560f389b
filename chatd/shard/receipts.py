"""Receipt events, coalesced: at most one ``receipts`` event per channel per interval from a shard.

Every ``received`` and ``read`` a shard serves is noted here (the member's new delivered and read
positions); the first note of a channel starts its interval (``limits.receipt_interval_s``), and
when it ends one event carries every member position that changed meanwhile, to every member of
the channel (their devices, wherever they are). So a group of 1,000 where everyone reads within an
interval costs each member one frame per shard that served reads, not 1,000 frames.

No I/O and no task: the timer is the shard's timer wheel (chatd/shard/timers.py); the event goes
out through the fan-out's ``deliver_event`` (non-blocking). Positions only rise; a note lower than
what is pending is folded into it.
"""

from __future__ import annotations


class ReceiptCoalescer:
    def __init__(self, deliver_event, timers, interval_s: float):
        self._deliver = deliver_event
        self._timers = timers
        self.interval_s = interval_s
        self._pending: dict[str, tuple[dict[int, list[int]], frozenset]] = {}  # channel -> (positions, members)
        self.sent = 0  # events sent (statistics)

    def note(self, channel_id: str, user_id: int, members, delivered: int, read: int = 0) -> None:
        entry = self._pending.get(channel_id)
        if entry is None:
            entry = self._pending[channel_id] = ({}, frozenset(members))
            if self._timers is None or self.interval_s <= 0:
                self._flush(channel_id)
                return
            self._timers.call_later(self.interval_s, lambda: self._flush(channel_id))
        else:
            entry = self._pending[channel_id] = (entry[0], frozenset(members))
        pos = entry[0].setdefault(user_id, [0, 0])
        pos[0] = max(pos[0], delivered, read)
        pos[1] = max(pos[1], read)

    def _flush(self, channel_id: str) -> None:
        entry = self._pending.pop(channel_id, None)
        if entry is None or not entry[0]:
            return
        positions, members = entry
        self.sent += 1
        self._deliver({"type": "receipts", "channel_id": channel_id,
                       "cursors": {str(u): {"delivered": d, "read": r} for u, (d, r) in positions.items()}},
                      members)


def receipt_counts(positions: dict[int, tuple[int, int]], seq: int, sender_id: int) -> dict:
    """For message ``seq`` by ``sender_id``: how many of the other members' devices hold it
    (``delivered``) and have read it (``read``), ``of`` how many. ``positions``: member ->
    (delivered_seq, read_seq). Counting cursors at or above ``seq``, with the cursors sorted once,
    is a bisection each (no per-message, per-member rows)."""
    import bisect
    others = [p for u, p in positions.items() if u != sender_id]
    delivered = sorted(d for d, _ in others)
    read = sorted(r for _, r in others)
    return {"delivered": len(delivered) - bisect.bisect_left(delivered, seq),
            "read": len(read) - bisect.bisect_left(read, seq), "of": len(others)}
