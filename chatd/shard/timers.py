"""One timer task for every connection of a server: auth timeouts and token expiries.

Why: a sleeping task per connection and per timer (the auth timeout, the token's expiry) cost
a task, a coroutine frame and a cancel scope each for the connection's whole life (the goal is
<= 16 KiB per idle connection). Here a timer is a small handle in one heap, and one task
sleeps until the earliest deadline (trio's clock) and calls the due callbacks.

Callbacks are plain functions: they run in that task, must not block, and an exception in one
is logged and does not stop the others. :meth:`Timers.cancel` drops the callback (and with it
what it refers to, e.g. a closed session) at once; cancelled entries are purged from the heap
once they are more than half of it, so a long expiry of a connection that is gone costs
nothing for long.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math

import trio

log = logging.getLogger(__name__)


class Timer:
    __slots__ = ("deadline", "fn")

    def __init__(self, deadline: float, fn):
        self.deadline = deadline
        self.fn = fn  # None once cancelled or fired


class Timers:
    def __init__(self):
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._cancelled = 0
        self._scope: trio.CancelScope | None = None

    def call_at(self, deadline: float, fn) -> Timer:
        """Call ``fn()`` at ``deadline`` (trio's clock), from the timer task."""
        t = Timer(deadline, fn)
        heapq.heappush(self._heap, (deadline, next(self._seq), t))
        if self._scope is not None and deadline < self._scope.deadline:
            self._scope.deadline = deadline
        return t

    def call_later(self, delay_s: float, fn) -> Timer:
        return self.call_at(trio.current_time() + max(0.0, delay_s), fn)

    def cancel(self, t: Timer | None) -> None:
        if t is not None and t.fn is not None:
            t.fn = None
            self._cancelled += 1
            if self._cancelled > 1000 and self._cancelled * 2 > len(self._heap):
                self._heap = [e for e in self._heap if e[2].fn is not None]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def __len__(self) -> int:
        return len(self._heap) - self._cancelled

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Fire timers as they come due; never returns."""
        task_status.started()
        while True:
            with trio.move_on_at(self._heap[0][0] if self._heap else math.inf) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            now = trio.current_time()
            while self._heap and self._heap[0][0] <= now:  # (a callback's cancel may rebuild it)
                t = heapq.heappop(self._heap)[2]
                fn, t.fn = t.fn, None
                if fn is None:
                    self._cancelled -= 1
                    continue
                try:
                    fn()
                except Exception:  # noqa: BLE001 - one bad callback must not stop the others
                    log.exception("timer callback failed")
