"""The shared timer wheel of a shard's sessions (chatd/shard/timers.py)."""

from __future__ import annotations

import trio

from chatd.shard.timers import Timers


async def test_timers_fire_in_order_cancelled_ones_never(nursery, autojump_clock):
    timers = Timers()
    await nursery.start(timers.run)
    fired = []
    t0 = trio.current_time()
    timers.call_later(3, lambda: fired.append(("c", trio.current_time() - t0)))
    timers.call_later(1, lambda: fired.append(("a", trio.current_time() - t0)))
    gone = timers.call_later(2, lambda: fired.append(("never", 0)))
    timers.call_later(2.5, lambda: 1 / 0)  # a failing callback is logged; the others still fire
    timers.cancel(gone)
    timers.cancel(gone)  # twice is harmless
    await trio.sleep(1.5)
    timers.call_later(0.5, lambda: fired.append(("b", trio.current_time() - t0)))  # earlier than the one waited for
    await trio.sleep(5)
    assert fired == [("a", 1), ("b", 2), ("c", 3)]
    assert len(timers) == 0


async def test_cancelled_timers_do_not_pile_up(nursery, autojump_clock):
    """A connection that goes keeps no entry alive until its token's expiry (days away)."""
    timers = Timers()
    await nursery.start(timers.run)
    keep = timers.call_later(10 * 86400, lambda: None)
    for _ in range(5000):
        timers.cancel(timers.call_later(86400, lambda: None))
    assert len(timers) == 1
    assert len(timers._heap) <= 2002  # purged whenever cancelled entries are more than half
    timers.cancel(keep)
