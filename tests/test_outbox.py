"""chatd/shard/outbox.py in memory: the writer state machine (the direct write of a live message,
the flusher's pass, the writer task), whole frames, the slow-consumer close, closes after what is
queued, the delivery cursors (duplicates dropped, gaps filled from the store, sync, resync) and
the error policy. A fake connection (how much the socket takes now, whether an awaited write
finishes), a fake store, the real flusher and metrics; ``autojump_clock`` where time matters."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import trio
import trio.testing

from chatd.bench.ws import FrameParser
from chatd.errors import ChatError
from chatd.metrics import Metrics
from chatd.shard.flusher import Flusher
from chatd.shard.outbox import SEND_GRACE_S, Outbox
from chatd.shard.timers import Timers
from chatd.shard.wsconn import CloseReason, ConnectionClosed
from chatd.store.base import Channel, Message

CH = "g:1"
USER = 7


class FakeConnection:
    """What the outbox uses of chatd/shard/wsconn.py's ServerConnection. The socket takes ``room``
    bytes without waiting; an awaited write finishes once ``reading`` is set (the client reads)."""

    def __init__(self, room: int = 1 << 30):
        self.room = room
        self.reading = trio.Event()
        self.reading.set()
        self.wire = bytearray()
        self.closed: CloseReason | None = None
        self.awaited_writes = 0

    def write_nowait(self, data: bytes) -> int:
        n = 0 if self.closed else min(self.room, len(data))
        self.room -= n
        self.wire += data[:n]
        return n

    async def send_raw(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionClosed(self.closed)
        self.awaited_writes += 1
        await self.reading.wait()
        self.wire += data

    async def abort(self) -> None:
        self.closed = CloseReason(1006)

    def frames(self) -> list[dict]:
        """What the client got: every frame whole (FrameParser raises on garbage), in order."""
        parser = FrameParser()
        out = [json.loads(payload) for _, payload in parser.feed(bytes(self.wire))]
        assert not parser._buf, "a frame was cut"
        return out


class FakeStore:
    def __init__(self, seqs=()):
        self.messages = {CH: [msg(s) for s in seqs]}
        self.fail: BaseException | None = None
        self.reads = 0

    async def read_messages(self, channel_id, after, before, limit):
        await trio.lowlevel.checkpoint()
        self.reads += 1
        if self.fail is not None:
            raise self.fail
        got = [m for m in self.messages.get(channel_id, []) if m.seq > after and (before is None or m.seq < before)]
        return got[:limit]

    async def head_seq(self, channel_id):
        await trio.lowlevel.checkpoint()
        return max((m.seq for m in self.messages.get(channel_id, [])), default=0)

    async def channels_of(self, user_id):
        await trio.lowlevel.checkpoint()
        return [Channel(ch, "group", ch, None, 0.0, max(m.seq for m in ms)) for ch, ms in self.messages.items() if ms]


class FakeMembership:
    def __init__(self):
        self.members_of = {CH}  # the channels USER is a member of
        self.checks = 0

    async def require_member(self, channel_id, user_id):
        await trio.lowlevel.checkpoint()
        self.checks += 1
        if channel_id not in self.members_of:
            raise ChatError("not_member", "not a member")


def msg(seq: int, channel_id: str = CH) -> Message:
    return Message(channel_id, seq, 1, f"c{seq}", f"body {seq}", 1000.0 + seq)


def seqs(frames) -> list[int]:
    return [f["seq"] for f in frames if f["type"] == "message"]


@pytest.fixture
async def flusher(nursery):
    f = Flusher(Metrics().messages_out)
    await nursery.start(f.run)
    return f


def make(flusher, ws=None, store=None, max_queued=100, sync_page=100, metrics=None, **kw):
    return Outbox(ws or FakeConnection(), "json", max_queued=max_queued, sync_page=sync_page, flusher=flusher,
                  store=store or FakeStore(), membership=FakeMembership(), metrics=metrics or Metrics(), **kw)


def tasks_in(nursery) -> int:
    return len(nursery.child_tasks)


class _Spawned(trio.abc.Instrument):
    def __init__(self):
        self.n = 0

    def task_spawned(self, task) -> None:
        self.n += 1


@contextmanager
def spawned():
    """Counts the tasks started inside (the writer tasks: nothing else starts any here)."""
    counter = _Spawned()
    trio.lowlevel.add_instrument(counter)
    try:
        yield counter
    finally:
        trio.lowlevel.remove_instrument(counter)


async def until_closed() -> None:
    """Wait for the outbox's close to cancel the connection's nursery (fail if it never does)."""
    with trio.fail_after(10):
        await trio.sleep_forever()


# ---- the three write paths ----------------------------------------------------------------------
async def test_a_live_message_with_nothing_queued_is_written_at_once(flusher):
    async with trio.open_nursery() as conn:
        a, b = make(flusher), make(flusher)
        a.start(conn)
        b.start(conn)
        m = msg(1)
        with spawned() as tasks:
            a.push(m)  # no await: written before anything else runs, no pass, no task
        assert tasks.n == 0
        assert a.ws.frames() == [{"type": "message", "channel_id": CH, "seq": 1, "sender_id": 1,
                                  "client_msg_id": "c1", "body": "body 1", "created_at": 1001.0}]
        assert flusher._dirty == [] and tasks_in(conn) == 0
        cached = m.__dict__["_frame_json"]  # framed once per format, shared by every connection
        b.push(m)
        assert bytes(b.ws.wire) == cached == bytes(a.ws.wire)
        assert flusher.messages_out.get() == 2
        conn.cancel_scope.cancel()


async def test_replies_go_in_the_flushers_pass_in_order_with_messages(flusher):
    async with trio.open_nursery() as conn:
        o = make(flusher)
        o.start(conn)
        with spawned() as tasks:
            o.push({"type": "heartbeat", "id": 1})
            o.push(msg(1))  # queued behind the reply: never overtakes it
            o.push({"type": "typing", "id": 2})
            assert o.ws.wire == b"" and flusher._dirty == [o]
            await trio.testing.wait_all_tasks_blocked()
        assert [(f["type"], f.get("id")) for f in o.ws.frames()] == [("heartbeat", 1), ("message", None), ("typing", 2)]
        assert tasks.n == 0  # the pass wrote it all: no writer task
        o.push(msg(2))  # idle again: the direct write
        assert seqs(o.ws.frames()) == [1, 2]
        conn.cancel_scope.cancel()


async def test_what_the_socket_does_not_take_goes_to_the_writer_task_whole_and_in_order(flusher):
    async with trio.open_nursery() as conn:
        ws = FakeConnection(room=10)
        ws.reading = trio.Event()  # the client does not read for now
        o = make(flusher, ws)
        o.start(conn)
        o.push(msg(1))
        assert len(ws.wire) == 10 and tasks_in(conn) == 1  # the rest: the writer task's
        o.push(msg(2))
        o.push({"type": "heartbeat", "id": 1})
        await trio.testing.wait_all_tasks_blocked()
        assert len(ws.wire) == 10 and flusher._dirty == []  # the writer has the queue: no pass
        ws.reading.set()
        await trio.testing.wait_all_tasks_blocked()
        frames = ws.frames()
        # a reply overtakes what the waiting writer has queued (message 2), never the frame being
        # written (message 1): whole frames, in order otherwise
        assert seqs(frames) == [1, 2] and [f["type"] for f in frames] == ["message", "heartbeat", "message"]
        assert tasks_in(conn) == 0  # the writer ended with the queue empty
        ws.room = 1 << 30  # the socket has room again
        o.push(msg(3))  # and the direct write is back
        assert seqs(ws.frames()) == [1, 2, 3] and tasks_in(conn) == 0
        conn.cancel_scope.cancel()


# ---- slow consumers, closes ---------------------------------------------------------------------
async def test_a_full_queue_closes_with_1013(flusher, autojump_clock):
    metrics = Metrics()
    ws = FakeConnection(room=0)
    ws.reading = trio.Event()
    async with trio.open_nursery() as conn:
        o = make(flusher, ws, max_queued=3, metrics=metrics)
        o.start(conn)
        for seq in range(1, 5):  # 1 is in the writer's hands; 2, 3, 4 fill the queue
            o.push(msg(seq))
        assert o.close_reason is None
        o.push(msg(5))
        assert o.close_reason == (1013, "slow consumer: send queue full; reconnect and sync")
        assert metrics.slow_consumers.get() == 1
        o.push(msg(6))  # dropped: no second count
        assert metrics.slow_consumers.get() == 1
    # the write in progress had its grace period, then the TCP connection was aborted
    assert trio.current_time() == pytest.approx(SEND_GRACE_S) and ws.closed == CloseReason(1006)


async def test_a_close_waits_for_the_write_in_progress(flusher, nursery, autojump_clock):
    ws = FakeConnection(room=5)
    ws.reading = trio.Event()

    async def client_reads_again_in_time():
        await trio.sleep(SEND_GRACE_S / 2)
        ws.reading.set()
    async with trio.open_nursery() as conn:
        o = make(flusher, ws)
        o.start(conn)
        o.push(msg(1))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(client_reads_again_in_time)
        o.close_soon(1001, "going away")  # cancels the connection's nursery: not the write
    assert trio.current_time() == pytest.approx(SEND_GRACE_S / 2)
    assert seqs(ws.frames()) == [1] and ws.closed is None  # the whole frame, no abort
    assert o.close_reason == (1001, "going away")
    o.stop()
    o.push(msg(2))
    assert seqs(ws.frames()) == [1]  # after the end: dropped


async def test_close_after_sends_what_was_queued_first(flusher):
    async with trio.open_nursery() as conn:
        o = make(flusher)
        o.start(conn)
        o.push({"type": "error", "code": "token_expired"})
        o.close_after(4001, "token expired; log in again")
        o.push({"type": "heartbeat", "id": 9})  # queued after the close: never sent
        await until_closed()
    assert [f["type"] for f in o.ws.frames()] == ["error"]
    assert o.close_reason == (4001, "token expired; log in again")


async def test_a_close_before_start_cancels_at_start(flusher):
    o = make(flusher)
    o.close_soon(1001, "shutting down")
    async with trio.open_nursery() as conn:
        o.start(conn)
        await until_closed()
    assert o.close_reason == (1001, "shutting down")


# ---- delivery cursors ---------------------------------------------------------------------------
async def test_duplicates_are_dropped_and_gaps_filled_from_the_store(flusher):
    store = FakeStore(range(1, 8))
    async with trio.open_nursery() as conn:
        o = make(flusher, store=store, sync_page=2)
        o.start(conn)
        o.push(msg(1))
        o.push(msg(5))  # 2..4 missed: read from the store (two pages), then 5
        o.push(msg(3))  # delivered meanwhile by the gap fill
        o.push(msg(5))
        await trio.testing.wait_all_tasks_blocked()
        assert seqs(o.ws.frames()) == [1, 2, 3, 4, 5] and store.reads == 2
        o.push(msg(6))  # contiguous again: the direct write
        o.push(msg(2))
        assert seqs(o.ws.frames()) == [1, 2, 3, 4, 5, 6] and store.reads == 2
        conn.cancel_scope.cancel()


async def test_sync_streams_what_the_client_lacks_then_answers(flusher):
    store = FakeStore(range(1, 6))
    async with trio.open_nursery() as conn:
        o = make(flusher, store=store, sync_page=2)
        o.user_id = USER
        o.start(conn)
        o.sync("s1", {CH: 2, "g:other": 0})
        o.push(msg(5))  # routed meanwhile: delivered by the sync already
        o.push(msg(6))
        await trio.testing.wait_all_tasks_blocked()
        frames = o.ws.frames()
        assert seqs(frames) == [3, 4, 5, 6]
        assert frames[3] == {"type": "sync", "id": "s1", "cursors": {CH: 5}, "heads": {CH: 5},
                             "errors": {"g:other": "not_member"}}
        conn.cancel_scope.cancel()


async def test_a_sync_from_before_what_was_delivered_streams_the_older_part_too(flusher):
    store = FakeStore(range(1, 6))
    async with trio.open_nursery() as conn:
        o = make(flusher, store=store)
        o.user_id = USER
        o.start(conn)
        o.push(msg(4))  # first seen live: the cursor starts at 4
        o.sync(1, {CH: 1})  # the client has only 1: 2, 3 (older than 4), then 5
        await trio.testing.wait_all_tasks_blocked()
        assert seqs(o.ws.frames()) == [4, 2, 3, 5]
        conn.cancel_scope.cancel()


async def test_resync_rereads_from_each_cursor_without_a_reply(flusher):
    store = FakeStore(range(1, 5))
    async with trio.open_nursery() as conn:
        o = make(flusher, store=store)
        o.start(conn)
        o.resync()  # no cursor yet: nothing to do
        assert flusher._dirty == []
        o.push(msg(1))
        o.push(msg(2))
        o.resync()  # 3 and 4 were missed (dropped link frames)
        await trio.testing.wait_all_tasks_blocked()
        assert [f["type"] for f in o.ws.frames()] == ["message"] * 4
        assert seqs(o.ws.frames()) == [1, 2, 3, 4]
        conn.cancel_scope.cancel()


# ---- errors -------------------------------------------------------------------------------------
async def test_a_store_failure_while_filling_a_gap_closes_with_1013(flusher):
    store = FakeStore(range(1, 4))
    store.fail = ChatError("unavailable", "store down")
    async with trio.open_nursery() as conn:
        o = make(flusher, store=store)
        o.start(conn)
        o.push(msg(1))
        o.push(msg(3))
        await until_closed()
    assert o.close_reason == (1013, "server could not read the store; reconnect and sync")
    assert seqs(o.ws.frames()) == [1]


@pytest.mark.parametrize("where", ["writer", "pass", "direct"])
async def test_a_bug_while_writing_answers_internal_and_closes_with_1011(flusher, where):
    metrics = Metrics()
    store = FakeStore(range(1, 4))
    unencodable = object()
    async with trio.open_nursery() as conn:
        o = make(flusher, store=store, metrics=metrics)
        o.start(conn)
        o.push(msg(1))
        if where == "writer":  # in the writer task (its gap fill)
            store.fail = RuntimeError("boom")
            o.push(msg(3))
        elif where == "pass":  # framing a reply (when it is pushed; the writer task answers)
            o.push({"type": "x", "v": unencodable})
        else:  # in push()'s direct write
            o.push(Message(CH, 2, 1, "c2", unencodable, 0.0))
        await until_closed()
    frames = o.ws.frames()
    assert frames[0]["seq"] == 1
    assert frames[1:] == [{"type": "error", "id": None, "code": "internal",
                           "message": "internal server error; please report it"}]
    assert o.close_reason == (1011, "internal server error")
    assert metrics.session_crashes.get() == 1 and metrics.errors.get(code="internal") == 1


# ---- the byte budget (issue 20, H3) --------------------------------------------------------------
@pytest.fixture
async def timers(nursery):
    t = Timers()
    await nursery.start(t.run)
    return t


def big_reply(i: int) -> dict:
    return {"type": "history", "id": i, "messages": [{"body": "x" * 10_000}]}


async def test_over_the_byte_budget_the_reader_waits_until_the_client_reads(flusher, timers, nursery, autojump_clock):
    ws = FakeConnection(room=0)
    ws.reading = trio.Event()
    async with trio.open_nursery() as conn:
        o = make(flusher, ws, max_bytes=25_000, slow_consumer_s=10.0, timers=timers)
        o.start(conn)
        o.push(big_reply(1))
        o.push(big_reply(2))
        assert o._over is None  # 2 x ~10 kB: under the budget
        o.push(big_reply(3))
        assert o._over is not None and o.pending_bytes() > 25_000
        room = trio.Event()

        async def reader():
            await o.wait_for_room()
            room.set()
        nursery.start_soon(reader)
        await trio.sleep(1)
        assert not room.is_set()  # nothing read from this client while its replies wait
        ws.reading.set()  # it reads again (within SEND_GRACE_S: a write blocked longer is aborted)
        await trio.testing.wait_all_tasks_blocked()
        assert room.is_set() and o._over is None and o.pending_bytes() == 0
        assert [f["id"] for f in ws.frames()] == [1, 2, 3]
        await trio.sleep(20)  # the timer was cancelled: no close
        assert o.close_reason is None
        conn.cancel_scope.cancel()


async def test_over_the_byte_budget_for_slow_consumer_s_closes_with_1013(flusher, timers, autojump_clock):
    """The writer is not blocked on the socket (that is cut after SEND_GRACE_S) but on a slow
    gap fill, while replies pile up: over the budget for slow_consumer_s is the 1013 close."""
    metrics = Metrics()
    store = FakeStore(range(1, 6))
    stuck = trio.Event()
    read = store.read_messages

    async def slow_read(*args, **kwargs):
        await stuck.wait()
        return await read(*args, **kwargs)
    store.read_messages = slow_read
    async with trio.open_nursery() as conn:
        o = make(flusher, store=store, max_bytes=25_000, slow_consumer_s=10.0, timers=timers, metrics=metrics)
        o.user_id = USER
        o.start(conn)
        o.push(msg(1))
        o.push(msg(5))  # a gap: the writer reads 2..4 from the (slow) store
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        for i in range(3):
            o.push(big_reply(i))
        with trio.fail_after(60):
            await trio.sleep_forever()
    assert o.close_reason == (1013, "slow consumer: too many bytes queued; reconnect and sync")
    assert trio.current_time() - start == pytest.approx(10.0) and metrics.slow_consumers.get() == 1
    assert seqs(o.ws.frames()) == [1]


async def test_queued_messages_count_their_shared_frame_and_the_live_direct_write_counts_nothing(flusher):
    ws = FakeConnection(room=0)
    ws.reading = trio.Event()
    async with trio.open_nursery() as conn:
        o = make(flusher, ws, max_bytes=1 << 20)
        o.start(conn)
        m1 = msg(1)
        o.push(m1)  # the direct write: nothing counted on the way; the socket took none of it
        assert o._queued == 0 and o.pending_bytes() == len(m1.__dict__["_frame_json"])  # (what waits in _out)
        m2 = msg(2)
        o.push(m2)  # queued behind it: its frame (built now, once, shared) is counted
        assert o._queued == len(m2.__dict__["_frame_json"])
        ws.reading.set()
        await trio.testing.wait_all_tasks_blocked()
        assert seqs(ws.frames()) == [1, 2] and o._queued == 0 and o.pending_bytes() == 0
        conn.cancel_scope.cancel()


# ---- membership (issue 20, H1) -------------------------------------------------------------------
async def test_a_resync_drops_the_cursor_of_a_channel_the_user_left_and_streams_nothing(flusher):
    store = FakeStore(range(1, 5))
    store.messages["g:2"] = [msg(s, "g:2") for s in range(1, 5)]
    async with trio.open_nursery() as conn:
        o = make(flusher, store=store)
        o.user_id = USER
        o._membership.members_of = {CH, "g:2"}
        o.start(conn)
        o.push(msg(1))
        o.push(msg(1, "g:2"))
        o._membership.members_of = {CH}  # removed from g:2
        o.resync()
        await trio.testing.wait_all_tasks_blocked()
        assert [(f["channel_id"], f["seq"]) for f in o.ws.frames()] == [(CH, 1), ("g:2", 1), (CH, 2), (CH, 3), (CH, 4)]
        assert "g:2" not in o._cursors
        o.resync()  # and nothing of g:2 is looked at again
        await trio.testing.wait_all_tasks_blocked()
        assert o._membership.checks == 3 and len(o.ws.frames()) == 5
        conn.cancel_scope.cancel()


async def test_member_removed_for_this_user_drops_the_cursor_at_once(flusher):
    async with trio.open_nursery() as conn:
        o = make(flusher)
        o.user_id = USER
        o.start(conn)
        o.push(msg(1))
        o.push({"type": "member_removed", "channel_id": CH, "user_id": USER + 1, "by": 1})  # someone else
        assert CH in o._cursors
        o.push({"type": "member_removed", "channel_id": CH, "user_id": USER, "by": 1})
        assert CH not in o._cursors  # before the frame is even written
        o.resync()  # nothing left to resync
        await trio.testing.wait_all_tasks_blocked()
        assert [f["type"] for f in o.ws.frames()] == ["message", "member_removed", "member_removed"]
        conn.cancel_scope.cancel()


async def test_a_gap_is_not_filled_for_a_non_member(flusher):
    store = FakeStore(range(1, 6))
    async with trio.open_nursery() as conn:
        o = make(flusher, store=store)
        o.user_id = USER
        o.start(conn)
        o.push(msg(1))
        o._membership.members_of = set()
        o.push(msg(5))  # a hole 2..4: not read for a user who is not a member
        await trio.testing.wait_all_tasks_blocked()
        assert seqs(o.ws.frames()) == [1] and store.reads == 0 and CH not in o._cursors
        conn.cancel_scope.cancel()


async def test_a_sync_stops_looking_after_sync_max_errors(flusher):
    store = FakeStore(range(1, 3))
    async with trio.open_nursery() as conn:
        o = make(flusher, store=store, sync_max_errors=3)
        o.user_id = USER
        o.start(conn)
        unknown = {f"g:{i:04x}": 0 for i in range(1000)}
        o.sync("s", {**unknown, CH: 0})
        await trio.testing.wait_all_tasks_blocked()
        reply = o.ws.frames()[-1]
        assert reply["type"] == "sync" and reply["cursors"] == {}
        assert list(reply["errors"].values()) == ["not_member"] * 3 + ["skipped"] * 998
        assert o._membership.checks == 3 and store.reads == 0
        conn.cancel_scope.cancel()
