"""The fan-out and the router in memory: fake links that record frames, fake sessions.

A view of three shards; this process is ``s1``. Users are picked by where the view homes them.
"""

from __future__ import annotations

import trio
import trio.testing

from chatd.discovery.local import LocalDiscovery
from chatd.discovery.view import ShardInfo, View
from chatd.protocol import link_frames as lf
from chatd.shard.fanout import FanOut
from chatd.shard.hub import Hub
from chatd.shard.router import Router
from chatd.store.base import Message

SHARDS = ("s1", "s2", "s3")
VIEW = View(4, {s: ShardInfo(s, "") for s in SHARDS})


def homed(shard: str, n: int) -> list[int]:
    """``n`` user ids whose home is ``shard`` under VIEW."""
    return [u for u in range(1, 10_000) if VIEW.home_of(u) == shard][:n]


class FakeLinks:
    def __init__(self, peers=("s2", "s3")):
        self.links = {p: f"link-{p}" for p in peers}
        self.sent: list[tuple[str, lf.Frame]] = []
        self.requests: list = []

    def send_nowait(self, peer, frame) -> bool:
        self.sent.append((peer, frame))
        return True

    def request_nowait(self, link, frame, on_reply, timeout_s) -> bool:
        self.requests.append((link, frame, on_reply))
        return True


class FakeSession:
    def __init__(self, user_id: int, device_id: str):
        self.user_id, self.device_id = user_id, device_id
        self.got: list = []

    def push(self, item) -> None:
        self.got.append(item)


class FakePush:
    def __init__(self):
        self.offline: list = []

    def notify_offline(self, message, user_ids) -> None:
        self.offline.append((message.seq, list(user_ids)))


class FakeDiscovery:
    def __init__(self, view=VIEW):
        self.view = view
        self.writable = True
        self.can_lose_session = True

    async def wait_view(self, min_version, timeout_s):
        return self.view.version >= min_version


def _fanout(links=None, push=None, me="s1"):
    hub = Hub()
    return FanOut(me, hub, FakeDiscovery(), links if links is not None else FakeLinks(), push), hub


MSG = Message("g:00000000000000aa", 9, 0, "c-9", "hello", 1.5)


def test_one_deliver_frame_per_home_shard():
    links = FakeLinks()
    fanout, hub = _fanout(links)
    here, on2, on3 = homed("s1", 2), homed("s2", 3), homed("s3", 2)
    members = [on2[0], here[0], on3[0], on2[1], on3[1], on2[2], here[1]]
    sessions = [FakeSession(u, f"d{u}") for u in here]
    for s in sessions:
        hub.add(s)
        fanout.set_location(s.user_id, "s1", True)
    fanout.deliver_message(MSG, members)
    packed = lf.packed(MSG)
    assert links.sent == [("s2", lf.Deliver(4, on2, packed)), ("s3", lf.Deliver(4, on3, packed))]
    assert [s.got for s in sessions] == [[MSG], [MSG]]  # local members pushed directly, the same object


def test_the_home_sends_one_push_per_device_shard_and_notifies_the_offline():
    links, push = FakeLinks(), FakePush()
    fanout, hub = _fanout(links, push)
    users = homed("s1", 5)
    a, b, c, d, sender = users
    local = FakeSession(a, "phone")
    hub.add(local)
    fanout.set_location(a, "s1", True)
    fanout.set_location(a, "s3", True)  # a also has a device on s3
    fanout.set_location(b, "s2", True)
    fanout.set_location(c, "s3", True)
    message = Message(MSG.channel_id, 9, sender, "c", "hi", 1.0)
    fanout.deliver_message(message, users)
    pushes = sorted((peer, f.user_ids) for peer, f in links.sent)
    assert pushes == [("s2", [b]), ("s3", [a, c])] and all(type(f) is lf.Push for _, f in links.sent)
    assert local.got == [message]
    assert push.offline == [(9, [d])]  # no device anywhere (the sender is not notified)


def test_skip_is_honoured_locally_and_carried_in_the_frames():
    links = FakeLinks()
    fanout, hub = _fanout(links)
    (u,) = homed("s1", 1)
    (far,) = homed("s2", 1)
    phone, laptop = FakeSession(u, "phone"), FakeSession(u, "laptop")
    hub.add(phone)
    hub.add(laptop)
    fanout.set_location(u, "s1", True)
    fanout.set_location(u, "s3", True)
    event = {"type": "read", "channel_id": MSG.channel_id, "user_id": u, "seq": 3}
    fanout.deliver_event(event, [u, far], skip="phone")
    assert phone.got == [] and laptop.got == [event]
    assert sorted(links.sent, key=lambda x: x[0]) == [("s2", lf.Deliver(4, [far], event=event, skip="phone")),
                                                      ("s3", lf.Push(4, [u], event=event, skip="phone"))]


def test_a_deliver_for_a_user_whose_home_moved_is_forwarded_once():
    links, push = FakeLinks(), FakePush()
    fanout, hub = _fanout(links, push)
    moved = homed("s2", 2)  # routed to us under an older view; the view homes them on s2 now
    fanout.on_deliver("link-s3", lf.Deliver(3, moved, lf.packed(MSG)))
    assert links.sent == [("s2", lf.Deliver(4, moved, lf.packed(MSG), hops=1))]
    links.sent.clear()
    fanout.on_deliver("link-s3", lf.Deliver(3, moved, lf.packed(MSG), hops=1))  # forwarded already: never again
    assert links.sent == []


def test_pushes_from_links_reach_the_local_sessions():
    fanout, hub = _fanout()
    (u,) = homed("s2", 1)
    phone, laptop = FakeSession(u, "phone"), FakeSession(u, "laptop")
    hub.add(phone)
    hub.add(laptop)
    fanout.on_push("link-s2", lf.Push(4, [u], lf.packed(MSG), skip="laptop"))
    assert [type(m) for m in phone.got] == [Message] and laptop.got == []
    assert lf.packed(phone.got[0]) == lf.packed(MSG)


def test_announcements_go_to_the_home():
    links = FakeLinks()
    fanout, hub = _fanout(links)
    (far,) = homed("s2", 1)
    (here,) = homed("s1", 1)
    fanout.announce(far, True)
    fanout.announce(here, True)
    assert links.sent == [("s2", lf.Device(4, far, "s1", True))] and fanout.locations == {here: {"s1"}}
    hub.add(FakeSession(far, "d"))
    links.sent.clear()
    fanout.announce_all()
    assert links.sent == [("s2", lf.Devices(4, "s1", [far]))]


class FakeOwners:
    def __init__(self):
        self.nowait: list = []

    def send_nowait(self, user_id, channel_id, client_msg_id, body, done) -> bool:
        self.nowait.append((user_id, channel_id, client_msg_id))
        return True


def _router(links):
    hub = Hub()
    discovery = FakeDiscovery()
    fanout = FanOut("s1", hub, discovery, links)
    return Router("s1", hub, discovery, FakeOwners(), fanout, links, send_answer_s=2.0)


def _channel_owned_by(shard: str) -> str:
    return next(c for c in (f"g:{i:016x}" for i in range(10_000)) if VIEW.owner_of(c) == shard)


def test_router_send_nowait_to_a_remote_owner_queues_one_request_and_answers_from_the_reply():
    links = FakeLinks()
    router = _router(links)
    ch = _channel_owned_by("s2")
    done: list = []
    assert router.send_nowait(5, ch, "c1", "hi", lambda r, e: done.append((r, e)))
    ((link, frame, on_reply),) = links.requests
    assert link == "link-s2" and frame == lf.Send(4, ch, 5, "c1", "hi")
    stored = Message(ch, 3, 5, "c1", "hi", 2.0)
    on_reply(lf.Reply(1, ok=lf.packed(stored), dup=True))
    ((result, error),) = done
    assert error is None and result.duplicate is True and lf.packed(result.message) == lf.packed(stored)
    on_reply(lf.Reply(2, err={"code": "not_member", "message": "no"}))
    assert done[1][0] is None and done[1][1].code == "not_member"
    assert router.owners.nowait == []


async def test_router_send_nowait_for_a_local_channel_goes_to_the_owners(nursery):
    links = FakeLinks()
    router = _router(links)
    await nursery.start(router.run)
    router.attach(FakeSession(1, "d"))  # starts the stall watch: the task-free path needs it
    await trio.testing.wait_all_tasks_blocked()
    ch = _channel_owned_by("s1")
    assert router.send_nowait(1, ch, "c1", "hi", lambda r, e: None)
    assert router.owners.nowait == [(1, ch, "c1")] and links.requests == []


def test_the_router_fans_events_out_through_the_fanout():
    links = FakeLinks()
    router = _router(links)
    (far,) = homed("s3", 1)
    router.deliver_event({"type": "typing"}, [far])
    assert links.sent == [("s3", lf.Deliver(4, [far], event={"type": "typing"}))]


def test_local_discovery_register_and_unregister_are_the_protocols():
    """LocalDiscovery has the shape of ZkDiscovery: async register(info, load), async unregister()."""
    async def main():
        d = LocalDiscovery()
        await d.register(ShardInfo("s1", "ws://x"), load=lambda: 7)
        assert list(d.view.shards) == ["s1"] and d.pick_shard(1).load == 7
        await d.unregister()
        assert d.view.shards == {} and d.view.version == 2
    trio.run(main)
