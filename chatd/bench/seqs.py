"""Sets of message seqs kept as sorted, disjoint ``[lo, hi]`` ranges.

A device receives a channel's seqs in order, so its set is almost always one range and ``add`` of
the next seq is O(1); anything else (a gap, a late or repeated seq) takes the slow path. The range
lists travel between processes as they are and are compared with the interval helpers below.
"""

from __future__ import annotations

import bisect


class SeqSet:
    __slots__ = ("ranges",)

    def __init__(self, ranges=None):
        self.ranges: list[list[int]] = [list(r) for r in ranges] if ranges else []

    def add(self, s: int) -> bool:
        """Add ``s``; False if it was there already."""
        r = self.ranges
        if r:
            last = r[-1]
            if s == last[1] + 1:
                last[1] = s
                return True
            if s > last[1]:
                r.append([s, s])
                return True
        else:
            r.append([s, s])
            return True
        i = bisect.bisect_right(r, s, key=lambda x: x[0]) - 1
        if i >= 0 and r[i][0] <= s <= r[i][1]:
            return False
        # s is not covered: it lies after r[i] (if any) and before r[i + 1]
        left = i >= 0 and r[i][1] == s - 1
        right = r[i + 1][0] == s + 1
        if left and right:
            r[i][1] = r[i + 1][1]
            del r[i + 1]
        elif left:
            r[i][1] = s
        elif right:
            r[i + 1][0] = s
        else:
            r.insert(i + 1, [s, s])
        return True

    def __contains__(self, s: int) -> bool:
        r = self.ranges
        i = bisect.bisect_right(r, s, key=lambda x: x[0]) - 1
        return i >= 0 and r[i][1] >= s

    def __len__(self) -> int:
        return size(self.ranges)

    def top(self) -> int:
        """The highest seq below which nothing is missing (0 if seq 1 is missing)."""
        r = self.ranges
        return r[0][1] if r and r[0][0] == 1 else 0


def size(ranges) -> int:
    return sum(hi - lo + 1 for lo, hi in ranges)


def from_values(values) -> list[list[int]]:
    s = SeqSet()
    for v in sorted(values):
        s.add(v)
    return s.ranges


def union(a, b) -> list[list[int]]:
    out: list[list[int]] = []
    for lo, hi in sorted([*a, *b]):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


def intersection_size(a, b) -> int:
    i = j = n = 0
    while i < len(a) and j < len(b):
        lo = max(a[i][0], b[j][0])
        hi = min(a[i][1], b[j][1])
        if lo <= hi:
            n += hi - lo + 1
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return n
