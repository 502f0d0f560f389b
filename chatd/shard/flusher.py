"""One writer task for every connection of a server: what the connections queued goes out in one pass.

Why not a writer task per connection: a task per connection costs memory for the connection's
whole life, and a wake-up per flush cost 38 % of the GIL samples of a DM profile
(benchmarks/README.md). Here :meth:`Outbox.push <chatd.shard.outbox.Outbox.push>` writes a live
message straight to the socket when nothing is queued before it (the fan-out: no pass, no
task), and otherwise queues its item and marks the outbox dirty; this task, woken once for all
the outboxes made dirty since its last pass (e.g. a group message's 100 members), has each
write what the socket takes at once (:meth:`Outbox.flush_now
<chatd.shard.outbox.Outbox.flush_now>`). Anything that must wait (a socket that is full, a gap
to fill from the store, a sync job, a close) is handed to a writer task of that connection
only, which ends when its queue is empty again.

Errors: ``flush_now`` handles its own failures (a bug closes that connection with 1011); this
loop never dies of one connection.
"""

from __future__ import annotations

import logging

import trio

log = logging.getLogger(__name__)


class Flusher:
    __slots__ = ("_dirty", "_task", "_parked", "messages_out")

    def __init__(self, messages_out):
        self.messages_out = messages_out  # the metrics Counter the outboxes bump (its ``pending``)
        self._dirty: list = []
        self._task = None
        self._parked = False

    def mark(self, outbox) -> None:
        """``outbox.flush_now()`` runs in the next pass (the caller marks each outbox once)."""
        self._dirty.append(outbox)
        if self._parked:
            self._parked = False
            trio.lowlevel.reschedule(self._task)

    def _abort(self, _raise_cancel):
        self._parked = False
        return trio.lowlevel.Abort.SUCCEEDED

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._task = trio.lowlevel.current_task()
        task_status.started()
        while True:
            if not self._dirty:
                self._parked = True
                await trio.lowlevel.wait_task_rescheduled(self._abort)
            else:  # marked during the last pass: let the others run first
                await trio.lowlevel.checkpoint()
            dirty, self._dirty = self._dirty, []
            for outbox in dirty:
                try:
                    outbox.flush_now()
                except Exception:  # noqa: BLE001 - a bug: that connection's writes stop, not the server's
                    log.exception("flusher: a connection's write failed")
