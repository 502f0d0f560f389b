"""ChannelOwners in memory: a fake store whose appends complete when the test says, in any order.

The store assigns seqs in the order the appends reach it (as a real one does) and the trio tasks
awaiting them resume in whatever order the test completes them; what is fanned out (``deliver``)
must still leave in seq order, once per message.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio
import trio.testing

from chatd.errors import ChatError
from chatd.membership import Membership
from chatd.metrics import Metrics
from chatd.shard.owner import ChannelOwners
from chatd.store.base import AppendResult, Message

CH = "g:00000000000000aa"
MEMBERS = [1, 2, 3]


class GatedStore:
    """The parts of a store ChannelOwners uses; each append waits for :meth:`complete`."""

    def __init__(self, head: int = 0, next_seq: int | None = None, nowait: bool = False):
        self.head = head  # what head_seq answers
        self._seq = (next_seq if next_seq is not None else head + 1) - 1  # the seq the store gives next, - 1
        self.nowait = nowait  # submit_append takes writes (else it answers False, as Store's default)
        self.appends: list[tuple] = []  # (seq, sender, client_msg_id), in the order they reached the store
        self._finish: dict[int, object] = {}  # seq -> how to complete it

    async def members(self, channel_id):
        return MEMBERS

    async def get_channel(self, channel_id):
        return object()

    async def head_seq(self, channel_id):
        return self.head

    def _take(self, channel_id, sender_id, client_msg_id, body, created_at) -> AppendResult:
        self._seq += 1
        self.appends.append((self._seq, sender_id, client_msg_id))
        return AppendResult(Message(channel_id, self._seq, sender_id, client_msg_id, body, created_at), False)

    async def append_message(self, channel_id, sender_id, client_msg_id, body, created_at, dm_pair=None):
        result = self._take(channel_id, sender_id, client_msg_id, body, created_at)
        done = trio.Event()
        self._finish[result.message.seq] = done
        await done.wait()
        return result

    def submit_append(self, channel_id, sender_id, client_msg_id, body, created_at, dm_pair, callback) -> bool:
        if not self.nowait:
            return False
        result = self._take(channel_id, sender_id, client_msg_id, body, created_at)
        self._finish[result.message.seq] = lambda: callback(result, None)
        return True

    def complete(self, seq: int) -> None:
        finish = self._finish.pop(seq)
        finish.set() if isinstance(finish, trio.Event) else finish()

    def complete_all(self) -> None:
        for seq in sorted(self._finish):
            self.complete(seq)


@asynccontextmanager
async def running(store):
    """A nursery for the sends; whatever happens, no append is left waiting (they are shielded:
    a failed assertion would otherwise leave the test hanging)."""
    async with trio.open_nursery() as nursery:
        try:
            yield nursery
        finally:
            store.complete_all()


def _owners(store):
    delivered: list[tuple[int, frozenset]] = []
    owners = ChannelOwners(store, Membership(store), lambda m, members: delivered.append((m.seq, members)),
                           Metrics())
    return owners, delivered


async def _sends(nursery, owners, *client_msg_ids, sender: int = 1) -> list:
    """Start one send per id, each reaching the store before the next starts; their results."""
    results: list = []

    async def one(cmid):
        results.append(await owners.send(sender, CH, cmid, f"body {cmid}"))
    for cmid in client_msg_ids:
        nursery.start_soon(one, cmid)
        await trio.testing.wait_all_tasks_blocked()
    return results


async def test_out_of_order_commits_fan_out_in_seq_order():
    store = GatedStore()
    owners, delivered = _owners(store)
    async with running(store) as nursery:
        results = await _sends(nursery, owners, "a", "b", "c")
        assert [a[0] for a in store.appends] == [1, 2, 3] and delivered == []
        store.complete(3)
        await trio.testing.wait_all_tasks_blocked()
        assert delivered == []  # 3 waits for 1 and 2
        store.complete(1)
        await trio.testing.wait_all_tasks_blocked()
        assert [seq for seq, _ in delivered] == [1]
        store.complete(2)
        await trio.testing.wait_all_tasks_blocked()
        assert delivered == [(1, frozenset(MEMBERS)), (2, frozenset(MEMBERS)), (3, frozenset(MEMBERS))]
        assert sorted(r.message.seq for r in results) == [1, 2, 3]  # every sender got its ack


async def test_concurrent_resends_collapse_into_one_store_call():
    store = GatedStore()
    owners, delivered = _owners(store)
    async with running(store) as nursery:
        results = await _sends(nursery, owners, "same", "same", "same")
        assert store.appends == [(1, 1, "same")]  # one store call for the three
        store.complete(1)
        await trio.testing.wait_all_tasks_blocked()
        assert [(r.message.seq, r.duplicate) for r in results] == [(1, False), (1, True), (1, True)]
        assert delivered == [(1, frozenset(MEMBERS))]  # and one fan-out
        assert owners.metrics.duplicates.get() == 2


async def test_a_hole_is_flushed_once_nothing_is_in_flight():
    """Another writer advanced the channel (seqs 1-4 never come here): the messages after the
    hole go out, in order and once, as soon as no send of the channel is in flight."""
    store = GatedStore(head=0, next_seq=5)
    owners, delivered = _owners(store)
    async with running(store) as nursery:
        await _sends(nursery, owners, "a", "b")
        store.complete(6)
        await trio.testing.wait_all_tasks_blocked()
        assert delivered == []  # 5 is still in flight: it may fill the line
        store.complete(5)
        await trio.testing.wait_all_tasks_blocked()
        assert [seq for seq, _ in delivered] == [5, 6]
        await _sends(nursery, owners, "c")
        store.complete(7)
        await trio.testing.wait_all_tasks_blocked()
        assert [seq for seq, _ in delivered] == [5, 6, 7]  # the line continues after the flush


async def test_send_nowait_queues_in_the_callers_step_and_fans_out_in_order():
    store = GatedStore(nowait=True)
    owners, delivered = _owners(store)
    async with running(store) as nursery:
        # not before the channel's state and members are loaded (the first send loads them)
        assert not owners.send_nowait(1, CH, "x", "b", lambda r, e: None) and store.appends == []
        await _sends(nursery, owners, "first")
        store.complete(1)
        await trio.testing.wait_all_tasks_blocked()
        done: list = []
        assert owners.send_nowait(1, CH, "a", "b", lambda r, e: done.append(("a", r.message.seq, e)))
        assert owners.send_nowait(2, CH, "b", "b", lambda r, e: done.append(("b", r.message.seq, e)))
        assert [a[0] for a in store.appends] == [1, 2, 3]  # queued in the caller's step: no task, no checkpoint
        # the same message again while it is in flight, and a non-member: the task path decides
        assert not owners.send_nowait(1, CH, "a", "b", lambda r, e: None)
        assert not owners.send_nowait(99, CH, "z", "b", lambda r, e: None)
        store.complete(3)
        assert done == [("b", 3, None)] and [seq for seq, _ in delivered] == [1]  # acked, not yet fanned out
        store.complete(2)
        assert done == [("b", 3, None), ("a", 2, None)]
        assert [seq for seq, _ in delivered] == [1, 2, 3]
        assert len(store.appends) == 3


async def test_send_nowait_declines_when_the_store_cannot_queue():
    store = GatedStore(nowait=False)  # Store.submit_append's default: cannot queue without waiting
    owners, delivered = _owners(store)
    async with running(store) as nursery:
        await _sends(nursery, owners, "first")
        store.complete(1)
        await trio.testing.wait_all_tasks_blocked()
        called: list = []
        assert not owners.send_nowait(1, CH, "a", "b", lambda r, e: called.append(r))
        assert called == [] and len(store.appends) == 1


async def test_a_failed_append_is_reported_and_fans_out_nothing():
    class FailingStore(GatedStore):
        async def append_message(self, *args, **kw):
            raise ChatError("unavailable", "the store failed; retry")
    owners, delivered = _owners(FailingStore())
    try:
        await owners.send(1, CH, "a", "b")
    except ChatError as e:
        assert e.code == "unavailable"
    else:
        raise AssertionError("the failure was not reported")
    assert delivered == []
