"""The answer deadline (chatd/shard/answers.py) on trio's mock clock: every request answered
exactly once, by its deadline at the latest, also while its work sits in a shielded section."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from chatd.shard.answers import AnswerClock


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def test_every_request_answered_once_by_its_deadline(autojump_clock, nursery):
    clock = AnswerClock(2.0, late=lambda: "late")
    nursery.start_soon(clock.run)
    answers: list[tuple[str, object, float]] = []

    async def request(name: str, work_s: float, shielded: bool = False) -> None:
        t = clock.ticket(lambda reply: answers.append((name, reply, trio.current_time())))
        with t.scope:
            with trio.CancelScope(shield=shielded):
                await trio.sleep(work_s)
            t.answer("ack")

    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        n.start_soon(request, "fast", 0.1)
        n.start_soon(request, "slow", 5.0)
        n.start_soon(request, "shielded", 7.0, True)  # a store write that goes on past the deadline
        await trio.sleep(1.0)
        n.start_soon(request, "later", 1.5)
    got = {name: (reply, round(at - t0, 3)) for name, reply, at in answers}
    assert got == {"fast": ("ack", 0.1), "later": ("ack", 2.5), "slow": ("late", 2.0), "shielded": ("late", 2.0)}
    assert len(answers) == 4  # the shielded write's own ack, at 7 s, was dropped
    assert trio.current_time() - t0 == pytest.approx(7.0)  # ... but the write itself was not cut short
