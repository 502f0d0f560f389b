"""A bench device's send books, shared by every transport (the WebSocket device in
chatd/bench/client.py, the SSE and long-poll ones in chatd/bench/http_transport.py).

:class:`SendBooks` holds what waits to be written (``outbox``, in order), what was written and
waits for its answer (``inflight``, by request id), and the request ids of the device; it counts
every write in the device's stats (``sent`` for a first write, ``resent`` for a write again). No
I/O: the transport writes the payloads :meth:`SendBooks.take` gives it. When a connection ends,
:meth:`SendBooks.requeue` puts every un-answered send back at the front of the outbox, in its
original order, to be written again with the same ``client_msg_id`` (the server's dedup makes
that safe); nothing is dropped here, ever.
"""

from __future__ import annotations

import time
from collections import deque

import trio


class Outgoing:
    __slots__ = ("n", "mono_ns", "wall_ns", "written", "op")

    def __init__(self, n: int, mono_ns: int, wall_ns: int, op=None):
        self.n = n
        self.mono_ns = mono_ns
        self.wall_ns = wall_ns
        self.written = False
        self.op = op  # --mix: None (a send) or the lifecycle frame's fields (its kind, its target)


class SendBooks:
    """The outbox, the in-flight sends and the request ids of one device (see the module)."""

    def __init__(self, stats):
        self.stats = stats
        self.outbox: deque[Outgoing] = deque()
        self.inflight: dict[int, Outgoing] = {}
        self.rid = 0  # the last request id given (sends, and the transport's own requests)
        self.wake: trio.Event | None = None  # set while the writer waits for work

    def next_id(self) -> int:
        self.rid += 1
        return self.rid

    def _wake(self) -> None:
        if self.wake is not None:
            self.wake.set()

    def queue(self, item: Outgoing) -> None:
        """``item`` is due: to the back of the outbox."""
        self.outbox.append(item)
        self._wake()

    def retry(self, item: Outgoing) -> None:
        """``item`` was answered 'try again': to the front of the outbox."""
        self.outbox.appendleft(item)
        self._wake()

    def answered(self, rid) -> Outgoing | None:
        """The send that request ``rid`` was, now answered (None: not one of ours, or answered already)."""
        item = self.inflight.pop(rid, None)
        if item is not None:
            self._wake()
        return item

    def wrote_now(self, item: Outgoing) -> int:
        """``item``, never written, is written at once by the caller: its request id."""
        self.rid += 1
        self.inflight[self.rid] = item
        item.written = True
        self.stats.sent += 1
        self.stats.at("sent", time.monotonic_ns())
        return self.rid

    async def wait(self, max_inflight: int | None = None) -> None:
        """Until the outbox holds something (and fewer than ``max_inflight`` sends are in flight)."""
        while not self.outbox or (max_inflight is not None and len(self.inflight) >= max_inflight):
            self.wake = trio.Event()
            await self.wake.wait()

    def take(self, n: int, payload) -> list:
        """Up to ``n`` sends from the front of the outbox, now in flight: ``payload(rid, item)`` of each."""
        stats, outbox, inflight = self.stats, self.outbox, self.inflight
        out = []
        fresh = 0
        while outbox and len(out) < n:
            item = outbox.popleft()
            self.rid += 1
            inflight[self.rid] = item
            out.append(payload(self.rid, item))
            if item.written:
                stats.resent += 1
            else:
                item.written = True
                fresh += 1
        stats.sent += fresh
        stats.at("sent", time.monotonic_ns(), fresh)
        return out

    def requeue(self) -> None:
        """The connection ended: every send not answered goes back to the front, in its original order."""
        self.wake = None
        if self.inflight:
            for rid in sorted(self.inflight, reverse=True):
                self.outbox.appendleft(self.inflight[rid])
            self.inflight.clear()
