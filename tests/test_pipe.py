"""The device session's pipe (chatd/shard/pipe.py) in memory, no sockets: the frames a session's
outbox writes come out as events -- any frame kind, also ones added later (issue 21's lifecycle
frames), unchanged; a marked frame carries the resume token including it; replies go to the
request waiting for them, the auth reply becomes ``ready``; the buffer bound holds writes back;
the close is the last event."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from chatd.shard import resume
from chatd.shard.pipe import Pipe, mark
from chatd.shard.wsconn import PING, ConnectionClosed, frame


def _frame(obj) -> bytes:
    return frame(json.dumps(obj, separators=(",", ":")))


def _events(pipe):
    return [(json.loads(d), t) for d, t in pipe.take(1 << 30)]


async def test_any_frame_kind_flows_and_marked_ones_carry_the_token():
    pipe = Pipe({"dm:1:2": 4}, capacity=1 << 20, max_requests=4)
    later_kind = {"type": "reaction", "channel_id": "dm:1:2", "seq": 6, "emoji": "+1"}  # not known here
    data = (_frame({"type": "typing", "channel_id": "dm:1:2", "user_id": 2}) + PING
            + mark("dm:1:2", 5) + _frame({"type": "message", "channel_id": "dm:1:2", "seq": 5})
            + mark("dm:1:2", 6) + _frame(later_kind))
    # written in pieces cut anywhere: the pipe reassembles frames
    for i in range(0, len(data), 7):
        assert pipe.write_nowait(data[i:i + 7]) == len(data[i:i + 7])
    got = _events(pipe)
    assert [e for e, _ in got] == [{"type": "typing", "channel_id": "dm:1:2", "user_id": 2},
                                   {"type": "message", "channel_id": "dm:1:2", "seq": 5}, later_kind]
    assert [t for _, t in got] == [None, resume.encode({"dm:1:2": 5}), resume.encode({"dm:1:2": 6})]


async def test_replies_go_to_their_requests_and_the_auth_reply_becomes_ready():
    pipe = Pipe({}, capacity=1 << 20, max_requests=4)
    pipe.auth_id = "start"
    pipe.ready = lambda reply: {"type": "ready", "user_id": reply["user_id"]}
    auth = pipe.expect("start")
    w1, w2 = pipe.expect(1), pipe.expect("1")  # 1 and "1" are different ids
    pipe.write_nowait(_frame({"type": "auth", "id": "start", "user_id": 7})
                      + _frame({"type": "ack", "id": "1", "seq": 2}) + _frame({"type": "ack", "id": 1, "seq": 1})
                      + _frame({"type": "sync", "id": "start", "cursors": {}})
                      + _frame({"type": "error", "id": 99, "code": "late"}))  # nobody waits: dropped
    assert auth.reply["type"] == "auth" and w1.reply["seq"] == 1 and w2.reply["seq"] == 2
    assert [e for e, _ in _events(pipe)] == [{"type": "ready", "user_id": 7}, {"type": "sync", "cursors": {}}]
    assert pipe.dropped_replies == 1


async def test_the_buffer_bound_holds_writes_until_the_reader_takes():
    pipe = Pipe({}, capacity=100, max_requests=4)
    big = _frame({"type": "typing", "pad": "x" * 200})
    assert pipe.write_nowait(big) == len(big)  # under the bound when written
    assert pipe.write_nowait(big) == 0  # now over it: the outbox keeps it (its budget applies)
    done = trio.Event()

    async def writer():
        await pipe.send_raw(big)
        done.set()
    async with trio.open_nursery() as n:
        n.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        assert len(pipe.take(1)) == 1  # the reader takes one event: room again
        await done.wait()
    assert len(pipe.take(1 << 20)) == 1


async def test_the_close_is_the_last_event_and_ends_requests():
    pipe = Pipe({}, capacity=1 << 20, max_requests=4)
    w = pipe.expect(1)
    pipe.write_nowait(_frame({"type": "typing"}))
    await pipe.aclose(4001, "token expired; log in again")
    assert w.event.is_set() and w.reply is None
    assert [e for e, _ in _events(pipe)] == [{"type": "typing"},
                                             {"type": "close", "code": 4001, "reason": "token expired; log in again"}]
    assert pipe.finished and pipe.write_nowait(b"x") == 0
    with pytest.raises(ConnectionClosed):  # the session's reader ends as on a closed WebSocket
        await pipe.get_message()
