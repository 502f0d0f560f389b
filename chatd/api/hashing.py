"""Password hashing (scrypt) off the event loop, in pools of worker threads with bounded queues.

Logins and sign-ups hash in pools of their own (``auth.login_hashing_threads``,
``auth.signup_hashing_threads``), so a flood of sign-ups queues behind its own threads and never
delays a login. A request that finds more than ``auth.hashing_queue_max`` others already waiting
for its pool's threads is refused at once with ``unavailable`` (503) and a ``Retry-After`` (the
time the queue ahead needs, from the pool's measured hashing time): the queue, and the latency of
every request in it, stays bounded.
"""

from __future__ import annotations

import math
import time
from typing import Callable, TypeVar

import trio

from .common import RetryLater

T = TypeVar("T")


class HashingPool:
    def __init__(self, name: str, threads: int, queue_max: int, first_estimate_s: float = 0.1):
        self.name = name
        self.threads = threads
        self.queue_max = queue_max
        self._limiter = trio.CapacityLimiter(threads)
        self._mean_s = first_estimate_s

    @property
    def waiting(self) -> int:
        return self._limiter.statistics().tasks_waiting

    async def run(self, fn: Callable[..., T], *args) -> T:
        if self.waiting >= self.queue_max:
            wait = (self.waiting + self.threads) / self.threads * self._mean_s
            raise RetryLater("unavailable", f"too many {self.name}s are waiting for password hashing; retry",
                             retry_after_s=wait)
        async with self._limiter:
            started = time.perf_counter()
            result = await trio.to_thread.run_sync(fn, *args)
            self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - started)
            return result


def retry_after_header(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}
