"""Has this process just been stalled (SIGSTOP, a paused VM, heavy swapping)?

A shard that was stopped for longer than its ZooKeeper session may no longer own its channels,
and learns so only when kazoo's thread reports the lost session, a moment after the process
runs again. The send's task-free path (``Router.send_nowait``) queues a write in the very step
that reads the client's frame, so right after a stall it must not be taken: those sends go the
task path, which checks ``discovery.writable`` later.

Resources: one task per process (started as the first session attaches), waking every ``TICK_S``.
A tick that wakes more than ``STALL_S`` late marks a stall; checks answer True for ``GRACE_S``
after it, and also while the tick itself is overdue (a stall not yet seen by the task).
"""

from __future__ import annotations

import trio

TICK_S = 0.1
STALL_S = 0.5
GRACE_S = 2.0


class StallWatch:
    def __init__(self):
        self._last: float | None = None  # when the tick last ran (None: not started)
        self._until = float("-inf")

    def start(self, nursery: trio.Nursery | None) -> None:
        """Start watching (idempotent; the router starts it as the first session attaches)."""
        if self._last is None and nursery is not None:
            self._last = trio.current_time()
            nursery.start_soon(self._run)

    def recently_stalled(self) -> bool:
        """True right after a stall, and while not watching (no information: be careful)."""
        if self._last is None:
            return True
        now = trio.current_time()
        return now < self._until or now - self._last > STALL_S

    async def _run(self) -> None:
        while True:
            await trio.sleep(TICK_S)
            now = trio.current_time()
            if now - self._last > TICK_S + STALL_S:
                self._until = now + GRACE_S
            self._last = now
