"""The answer deadline of a connection's requests (``limits.send_answer_s`` for sends).

Every send gets exactly one answer: whatever answers first — the ack, an error, or the deadline —
wins, and the losers are dropped. At the deadline the request is answered ``unavailable`` and its
work is cancelled; a store write already under way is shielded and goes on (so its fan-out is
not skipped): its late ack is dropped and the client's resend gets it as a duplicate.

Why one task per connection rather than a timer per request: a nursery with a timer task per send
cost 138 µs against 17 µs for a ticket in this queue (measured with trio 0.35 on the shared 2-core
development box); at 1,400 sends/s that is a fifth of a core against 2 %. (A plain
``move_on_after`` cannot answer while a shielded store write runs.) All tickets of a clock have
the same budget, so they expire in the order they were taken: a deque, not a heap.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import trio


class Ticket:
    __slots__ = ("deadline", "_scope", "_answer", "answered", "_late")

    def __init__(self, deadline: float, answer: Callable[[object], None]):
        self.deadline = deadline
        self._scope: trio.CancelScope | None = None  # made when a task's work asks for it
        self._answer = answer
        self.answered = False
        self._late = False  # the deadline passed unanswered

    @property
    def scope(self) -> trio.CancelScope:
        """The request's work, cancelled at the deadline (made on first use: a task-free send,
        answered by a callback, never needs one: Ticket.__init__ with its scope was 18 % of a DM profile, issue 24)."""
        if self._scope is None:
            self._scope = trio.CancelScope()
            if self._late:
                self._scope.cancel()
        return self._scope

    def cancel(self) -> None:
        """The deadline: cancel the request's work (now, or as its scope is made)."""
        self._late = True
        if self._scope is not None:
            self._scope.cancel()

    def answer(self, reply) -> None:
        """The first answer is sent; any later one is dropped."""
        if not self.answered:
            self.answered = True
            self._answer(reply)


class AnswerClock:
    def __init__(self, budget_s: float, late: Callable[[], object]):
        self.budget_s = budget_s
        self._late = late  # the answer given at the deadline
        self._tickets: deque[Ticket] = deque()
        self._wakeup = trio.Event()

    def ticket(self, answer: Callable[[object], None]) -> Ticket:
        t = Ticket(trio.current_time() + self.budget_s, answer)
        self._tickets.append(t)
        self._wakeup.set()
        return t

    async def run(self) -> None:
        """Answer the tickets still unanswered at their deadline; never returns."""
        tickets = self._tickets
        while True:
            if not tickets:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            head = tickets[0]
            if not head.answered:
                await trio.sleep_until(head.deadline)
            tickets.popleft()
            if not head.answered:
                head.answer(self._late())
                head.cancel()
