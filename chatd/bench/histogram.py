"""A log-linear latency histogram in the style of HdrHistogram: fixed relative precision, O(1)
``record``, mergeable across processes (``to_dict`` / ``from_dict`` / ``merge``).

Values are non-negative integers (the bench records microseconds). Values below ``SUB`` (256) are
kept exactly; above, each power-of-two range is split into ``HALF`` (128) linear sub-buckets, so a
reported value is at most 1/128 (< 0.8 %) above the true one. Percentiles report the highest value
that is equivalent to the bucket (as HdrHistogram does), clamped to the largest value recorded.
"""

from __future__ import annotations

import math

SUB_BITS = 8
SUB = 1 << SUB_BITS
HALF = SUB >> 1
MAX_VALUE = (1 << 63) - 1
N_BUCKETS = (63 - SUB_BITS + 2) * HALF


def bucket_index(v: int) -> int:
    if v < SUB:
        return v
    e = v.bit_length() - SUB_BITS
    return (e << (SUB_BITS - 1)) + (v >> e)


def bucket_range(i: int) -> tuple[int, int]:
    """The lowest and highest value that fall in bucket ``i``."""
    if i < SUB:
        return i, i
    e = i // HALF - 1
    m = i - e * HALF
    return m << e, ((m + 1) << e) - 1


class Histogram:
    __slots__ = ("counts", "total", "min", "max", "sum")

    def __init__(self):
        self.counts = [0] * N_BUCKETS
        self.total = 0
        self.min = MAX_VALUE
        self.max = 0
        self.sum = 0

    def record(self, v: int) -> None:
        if v < 0:
            v = 0
        elif v > MAX_VALUE:
            v = MAX_VALUE
        if v < SUB:
            self.counts[v] += 1
        else:
            e = v.bit_length() - SUB_BITS
            self.counts[(e << (SUB_BITS - 1)) + (v >> e)] += 1
        self.total += 1
        self.sum += v
        if v > self.max:
            self.max = v
        if v < self.min:
            self.min = v

    def merge(self, other: "Histogram") -> None:
        if not other.total:
            return
        counts = self.counts
        for i, c in enumerate(other.counts):
            if c:
                counts[i] += c
        self.total += other.total
        self.sum += other.sum
        self.max = max(self.max, other.max)
        self.min = min(self.min, other.min)

    def percentile(self, q: float) -> int:
        """The value at or below which ``q`` percent of the recorded values are (0 when empty)."""
        if not self.total:
            return 0
        if q >= 100:
            return self.max
        rank = max(1, math.ceil(q / 100.0 * self.total))
        seen = 0
        for i, c in enumerate(self.counts):
            if c:
                seen += c
                if seen >= rank:
                    return max(self.min, min(bucket_range(i)[1], self.max))
        return self.max

    def mean(self) -> float:
        return self.sum / self.total if self.total else 0.0

    def curve(self) -> list[tuple[float, int]]:
        """(cumulative fraction, value) at every non-empty bucket, for percentile plots."""
        out = []
        seen = 0
        for i, c in enumerate(self.counts):
            if c:
                seen += c
                out.append((seen / self.total, max(self.min, min(bucket_range(i)[1], self.max))))
        return out

    def to_dict(self) -> dict:
        return {"counts": {i: c for i, c in enumerate(self.counts) if c}, "total": self.total,
                "min": self.min, "max": self.max, "sum": self.sum}

    @classmethod
    def from_dict(cls, d: dict) -> "Histogram":
        h = cls()
        for i, c in d["counts"].items():
            h.counts[int(i)] = c
        h.total, h.min, h.max, h.sum = d["total"], d["min"], d["max"], d["sum"]
        return h

    def summary_ms(self, scale_to_ms: float = 1e-3) -> dict:
        """p50/p90/p99/p99.9/max/mean in milliseconds (values recorded in microseconds)."""
        def ms(v):
            return round(v * scale_to_ms, 3)
        return {"count": self.total, "p50": ms(self.percentile(50)), "p90": ms(self.percentile(90)),
                "p99": ms(self.percentile(99)), "p99_9": ms(self.percentile(99.9)),
                "max": ms(self.max), "mean": ms(self.mean()),
                "min": ms(self.min if self.total else 0)}
