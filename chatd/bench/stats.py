"""What one worker process measures; merged by the coordinator (see :mod:`chatd.bench.report`).

Counters are plain attributes (incremented from the hot path), timelines are per-second lists
counted from the run's start (``t0``, monotonic), histograms hold microseconds.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from .histogram import Histogram
from .seqs import from_values

COUNTERS = ("sent", "resent", "acked", "ack_duplicates", "send_failed", "delivered", "delivered_by_sync",
            "duplicated", "out_of_order", "connects", "reconnects", "connection_failures", "drops",
            "heartbeats")
HISTOGRAMS = ("send_ack", "send_deliver", "heartbeat", "connect")
TIMELINES = ("sent", "acked", "delivered", "cpu_util")
NS = 1_000_000_000


class Stats:
    def __init__(self):
        for name in COUNTERS:
            setattr(self, name, 0)
        self.errors: Counter = Counter()
        self.closes: Counter = Counter()
        self.hist = {name: Histogram() for name in HISTOGRAMS}
        self.h_ack = self.hist["send_ack"]
        self.h_deliver = self.hist["send_deliver"]
        self.t0_ns: int | None = None
        self.timeline: dict[str, list] = {name: [] for name in TIMELINES}
        self.acked_seqs: dict[str, list[int]] = defaultdict(list)
        self.connected = 0

    def at(self, series: str, now_ns: int, n=1) -> None:
        """Add ``n`` to ``series`` in the second of the run that ``now_ns`` (monotonic) falls in."""
        t0 = self.t0_ns
        if t0 is None or now_ns < t0:
            return
        i = (now_ns - t0) // NS
        tl = self.timeline[series]
        if i >= len(tl):
            tl.extend([0] * (i + 1 - len(tl)))
        tl[i] += n

    def counters(self) -> dict:
        return {name: getattr(self, name) for name in COUNTERS}

    def to_dict(self) -> dict:
        return {"counters": self.counters(), "errors": dict(self.errors), "closes": dict(self.closes),
                "hist": {k: h.to_dict() for k, h in self.hist.items()}, "timeline": self.timeline,
                "acked": {c: from_values(seqs) for c, seqs in self.acked_seqs.items()}}
