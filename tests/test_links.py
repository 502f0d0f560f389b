"""Inter-shard links over real loopback sockets: two real LinkManagers in one trio process.

A peer that dies with kill -9 can reset its connections (RST, when unread data was in its
buffers) instead of closing them: the survivor must see a link going down and redial, never
crash (seen in a cluster test: the API process died when a shard was killed).
"""

from __future__ import annotations

import socket
import struct

import trio

from chatd.cluster.links import LinkManager
from chatd.config import ClusterConfig
from chatd.discovery.view import ShardInfo, View
from chatd.protocol import link_frames as lf


def _cfg(**kw) -> ClusterConfig:
    return ClusterConfig(secret="links-test-secret", link_host="127.0.0.1", link_port=0, link_heartbeat_s=0.5, **kw)


class _Peer:
    """One side's callbacks: what it received, how many links came up; :meth:`until` waits for
    a condition on them (woken by each callback, no polling)."""

    def __init__(self):
        self.frames: list = []
        self.ups = 0
        self.serve = None  # optional on_frame(link, frame) behaviour (after recording)
        self._changed = trio.Event()

    async def on_frame(self, link, frame) -> None:
        self.frames.append(frame)
        if self.serve is not None:
            self.serve(link, frame)
        self.poke()

    def on_up(self, link) -> None:
        self.ups += 1
        self.poke()

    def poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, condition, timeout_s: float = 5.0) -> None:
        with trio.fail_after(timeout_s):
            while not condition():
                await self._changed.wait()

    def types(self) -> list[str]:
        return [lf.NAMES[type(f)] if type(f) in lf.NAMES else f.t for f in self.frames]


async def _pair(nursery, **cfg):
    peers = {"s1": _Peer(), "s2": _Peer()}
    a, b = LinkManager("s1", "shard", _cfg(**cfg)), LinkManager("s2", "shard", _cfg(**cfg))
    pa = await nursery.start(a.run, True, peers["s1"].on_frame, peers["s1"].on_up)
    pb = await nursery.start(b.run, True, peers["s2"].on_frame, peers["s2"].on_up)
    view = View(1, {"s1": ShardInfo("s1", "", f"127.0.0.1:{pa}"), "s2": ShardInfo("s2", "", f"127.0.0.1:{pb}")})
    a.set_peers(view)  # s1 dials s2 (ids that sort after its own)
    b.set_peers(view)
    await a.wait_link("s2", 5)
    await b.wait_link("s1", 5)
    return a, b, peers


def _reset(link) -> None:
    """Close the link's socket so that the kernel sends RST, as a killed process can."""
    link.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    link.close()


async def _relinked(peers, before):
    await peers["s1"].until(lambda: peers["s1"].ups > before["s1"], 10)
    await peers["s2"].until(lambda: peers["s2"].ups > before["s2"], 10)


async def test_a_reset_link_goes_down_and_is_redialled_on_both_sides(nursery):
    a, b, peers = await _pair(nursery)
    assert a.send_nowait("s2", lf.Invalidate("g:1"))
    await peers["s2"].until(lambda: peers["s2"].frames)
    for victim, side in ((b, "s1"), (a, "s2")):  # the acceptor resets, then the dialer resets
        before = {k: p.ups for k, p in peers.items()}
        _reset(victim.links[side])
        await _relinked(peers, before)
    # the managers kept running and the new link carries frames both ways
    assert a.send_nowait("s2", lf.Invalidate("g:2")) and b.send_nowait("s1", lf.Invalidate("g:3"))
    await peers["s2"].until(lambda: len(peers["s2"].frames) == 2)
    await peers["s1"].until(lambda: len(peers["s1"].frames) == 1)
    assert peers["s2"].frames == [lf.Invalidate("g:1"), lf.Invalidate("g:2")]
    assert peers["s1"].frames == [lf.Invalidate("g:3")]


async def test_a_reset_while_writing_does_not_crash_the_writer(nursery):
    """Frames queued toward a peer that resets: the write fails, the link goes down, nothing raises."""
    a, b, peers = await _pair(nursery)
    before = {k: p.ups for k, p in peers.items()}
    for i in range(2000):
        a.send_nowait("s2", lf.Invalidate(f"{i:04d}" + "x" * 4096))
    _reset(b.links["s1"])
    await _relinked(peers, before)
    assert a.send_nowait("s2", lf.Invalidate("after"))
    await peers["s2"].until(lambda: peers["s2"].frames and peers["s2"].frames[-1] == lf.Invalidate("after"))


async def test_request_nowait_gets_exactly_one_answer(nursery):
    """A request without a task (the sending shard's fast path): its callback gets the reply;
    the link closing, or no reply within the timeout, answers it ``unavailable`` -- once."""
    a, b, peers = await _pair(nursery)
    answers: dict[str, list] = {"served": [], "dropped": [], "closed": []}

    def answer(key):
        def got(reply):
            answers[key].append(reply)
            peers["s1"].poke()
        return got

    def echo(link, frame):  # s2 answers a query for user 7, ignores others
        if type(frame) is lf.PQuery and frame.user_ids == [7]:
            b.reply_nowait(link, lf.Reply(frame.rid, users={"7": {"status": "online"}}))
    peers["s2"].serve = echo
    assert a.request_nowait(a.links["s2"], lf.PQuery([7]), answer("served"), 5.0)
    assert a.request_nowait(a.links["s2"], lf.PQuery([8]), answer("dropped"), 0.3)
    await peers["s1"].until(lambda: answers["served"] and answers["dropped"])
    assert answers["served"][0].users == {"7": {"status": "online"}}
    assert answers["dropped"][0].err["code"] == "unavailable"  # no reply within its 0.3 s
    assert a.request_nowait(a.links["s2"], lf.PQuery([9]), answer("closed"), 30.0)
    _reset(a.links["s2"])
    await peers["s1"].until(lambda: answers["closed"])
    assert answers["closed"][0].err["code"] == "unavailable"  # at once, not after 30 s
    assert [len(v) for v in answers.values()] == [1, 1, 1] and not a._pending  # nothing left to answer again


async def test_frames_above_the_size_limit_are_not_sent(nursery):
    """The writer refuses what the peer would refuse (and drop the link for): our request is
    answered ``frame_too_large``, our reply is replaced by that error, a live frame is followed
    by a ``resync``; the link stays up and carries the next frames."""
    a, b, peers = await _pair(nursery, link_max_frame_bytes=2000)
    got = []

    def huge_answer(link, frame):
        if type(frame) is lf.PQuery:
            b.reply_nowait(link, lf.Reply(frame.rid, users={str(u): {"status": "x" * 50} for u in range(100)}))
    peers["s2"].serve = huge_answer

    def answered(reply):
        got.append(reply)
        peers["s1"].poke()
    link = a.links["s2"]
    assert a.request_nowait(link, lf.PQuery(list(range(10 ** 6, 10 ** 6 + 500))), answered, 30.0)  # > 2000 bytes
    await peers["s1"].until(lambda: got)
    assert got[0].err["code"] == "frame_too_large" and not peers["s2"].frames
    assert a.request_nowait(link, lf.PQuery([1]), answered, 30.0)  # small; its answer is not
    await peers["s1"].until(lambda: len(got) == 2)
    assert got[1].err["code"] == "frame_too_large" and got[1].users is None
    assert a.send_nowait("s2", lf.Invalidate("x" * 3000)) and a.send_nowait("s2", lf.Invalidate("g:small"))
    await peers["s2"].until(lambda: len(peers["s2"].frames) == 3)
    assert peers["s2"].types() == ["p_query", "invalidate", "resync"]
    assert peers["s2"].frames[1] == lf.Invalidate("g:small")
    assert link.refused == 2 and b.links["s1"].refused == 1 and a.links["s2"] is link  # the same link


class _FakeLink:
    peer_id = "fake"

    def __init__(self):
        self.sent = []

    async def send(self, frame):
        self.sent.append(frame)


async def test_unknown_and_malformed_frames_are_skipped():
    manager = LinkManager("s1", "shard", _cfg())
    handled = []

    async def on_frame(link, frame):
        handled.append(frame)
    manager._on_frame = on_frame
    link = _FakeLink()
    await manager._dispatch(link, lf.Unknown("lifecycle"))
    await manager._dispatch(link, lf.Malformed("deliver", None, "Object missing required field `view`"))
    assert handled == [] and link.sent == []
    await manager._dispatch(link, lf.Malformed("send", 42, "Expected `int`"))  # a request: answered
    assert link.sent == [lf.Reply(42, err={"code": "bad_frame", "message": "malformed send"})]
    replies = []
    manager._pending[5] = [None, replies.append, link, float("inf")]  # a request_nowait waiting
    await manager._dispatch(link, lf.Malformed("reply", 5, "Expected `object`"))
    assert replies == [lf.Reply(5, err={"code": "bad_frame", "message": "malformed reply"})] and not manager._pending
    await manager._dispatch(link, lf.Invalidate("g:1"))
    assert handled == [lf.Invalidate("g:1")]
