"""Inter-shard links over real loopback sockets: two real LinkManagers in one trio process.

A peer that dies with kill -9 can reset its connections (RST, when unread data was in its
buffers) instead of closing them: the survivor must see a link going down and redial, never
crash (seen in a cluster test: the API process died when a shard was killed).
"""

from __future__ import annotations

import socket
import struct

import trio

from chatd.config import ClusterConfig
from chatd.discovery.view import ShardInfo, View
from chatd.cluster.links import LinkManager


def _cfg() -> ClusterConfig:
    return ClusterConfig(secret="links-test-secret", link_host="127.0.0.1", link_port=0, link_heartbeat_s=0.5)


async def _pair(nursery):
    got: dict[str, list] = {"s1": [], "s2": []}
    ups: dict[str, int] = {"s1": 0, "s2": 0}

    def manager(me: str) -> LinkManager:
        async def on_frame(link, frame):
            got[me].append(frame)

        def up(link):
            ups[me] += 1
        return LinkManager(me, "shard", _cfg(), on_frame, on_link_up=up)

    a, b = manager("s1"), manager("s2")
    pa = await nursery.start(a.run, True)
    pb = await nursery.start(b.run, True)
    view = View(1, {"s1": ShardInfo("s1", "", f"127.0.0.1:{pa}"), "s2": ShardInfo("s2", "", f"127.0.0.1:{pb}")})
    a.set_peers(view)  # s1 dials s2 (ids that sort after its own)
    b.set_peers(view)
    await a.wait_link("s2", 5)
    await b.wait_link("s1", 5)
    return a, b, got, ups


def _reset(link) -> None:
    """Close the link's socket so that the kernel sends RST, as a killed process can."""
    link.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    link.close()


async def _relinked(a, b, ups, before):
    with trio.fail_after(10):
        while ups["s1"] <= before["s1"] or ups["s2"] <= before["s2"] or "s2" not in a.links or "s1" not in b.links:
            await trio.sleep(0.02)


async def test_a_reset_link_goes_down_and_is_redialled_on_both_sides(nursery):
    a, b, got, ups = await _pair(nursery)
    assert a.send_nowait("s2", {"t": "hello-1"})
    with trio.fail_after(5):
        while not got["s2"]:
            await trio.sleep(0.01)
    for victim, side in ((b, "s1"), (a, "s2")):  # the acceptor resets, then the dialer resets
        before = dict(ups)
        _reset(victim.links[side])
        await _relinked(a, b, ups, before)
    # the managers kept running and the new link carries frames both ways
    assert a.send_nowait("s2", {"t": "hello-2"}) and b.send_nowait("s1", {"t": "hello-3"})
    with trio.fail_after(5):
        while [f["t"] for f in got["s2"]] != ["hello-1", "hello-2"] or [f["t"] for f in got["s1"]] != ["hello-3"]:
            await trio.sleep(0.01)


async def test_a_reset_while_writing_does_not_crash_the_writer(nursery):
    """Frames queued toward a peer that resets: the write fails, the link goes down, nothing raises."""
    a, b, got, ups = await _pair(nursery)
    before = dict(ups)
    for i in range(2000):
        a.send_nowait("s2", {"t": "bulk", "pad": b"x" * 4096, "i": i})
    _reset(b.links["s1"])
    await _relinked(a, b, ups, before)
    assert a.send_nowait("s2", {"t": "after"})
    with trio.fail_after(5):
        while not got["s2"] or got["s2"][-1]["t"] != "after":
            await trio.sleep(0.01)


async def test_request_nowait_gets_exactly_one_answer(nursery):
    """A request without a task (issue 13: the sending shard's fast path): its callback gets the
    reply; the link closing, or no reply within the timeout, answers it ``unavailable`` -- once."""
    a, b, got, ups = await _pair(nursery)
    answers: dict[str, list] = {"served": [], "dropped": [], "closed": []}

    b._on_frame = _serve_echo(b)  # s2 replies to 'echo', ignores 'mute'
    assert a.request_nowait(a.links["s2"], {"t": "echo", "x": 7}, answers["served"].append, 5.0)
    assert a.request_nowait(a.links["s2"], {"t": "mute"}, answers["dropped"].append, 0.3)
    with trio.fail_after(5):
        while not (answers["served"] and answers["dropped"]):
            await trio.sleep(0.01)
    assert answers["served"][0]["ok"] == 7
    assert answers["dropped"][0]["err"]["code"] == "unavailable"  # no reply within its 0.3 s
    assert a.request_nowait(a.links["s2"], {"t": "mute"}, answers["closed"].append, 30.0)
    _reset(a.links["s2"])
    with trio.fail_after(5):
        while not answers["closed"]:
            await trio.sleep(0.01)
    assert answers["closed"][0]["err"]["code"] == "unavailable"  # at once, not after 30 s
    await trio.sleep(0.6)  # the expiry sweep runs again: nothing is answered twice
    assert [len(v) for v in answers.values()] == [1, 1, 1] and not a._pending


def _serve_echo(manager):
    async def on_frame(link, frame):
        if frame["t"] == "echo":
            manager.reply_nowait(link, frame["rid"], ok=frame["x"])
    return on_frame
