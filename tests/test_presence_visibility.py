"""Presence is visible only to contacts and co-members (``presence.visibility = "contacts"``, the
default; issue 20, finding 6): a stranger, and anybody asking about an id nobody has, gets
``offline`` with ``last_active_at: null`` on every path (WebSocket ``subscribe_presence`` with no
live changes, WebSocket ``presence``, ``GET /v1/presence``, ``GET /v1/users/<id>/presence``);
``"everyone"`` is the old behaviour. The rules run against the real ``PresenceVisibility`` on a real
SQLite store; the wire behaviour against a real ``chatd run`` (the cluster path is in
tests/test_presence_cluster.py)."""

from __future__ import annotations

import pytest
import trio

from chatd.config import Config, ConfigError
from chatd.membership import Membership
from chatd.presence.tracker import Subscriptions
from chatd.presence.visibility import RELOAD_S, PresenceVisibility
from chatd.store.sqlite import open_sqlite
from tests.helpers import RunningServer, dm, make_config, open_client

HIDDEN = {"status": "offline", "last_active_at": None}
NOBODY = 10**9  # an id nobody has


# ---- the rules ----------------------------------------------------------------------------------

class FakePresence:
    """The presence client's face that the check uses: statuses, subscriptions, unsubscribe."""

    def __init__(self):
        self.subscriptions = Subscriptions()

    async def statuses(self, user_ids):
        return {u: {"status": "online", "last_active_at": 1.0} for u in user_ids}

    def unsubscribe(self, subscriber, targets):
        self.subscriptions.remove(subscriber, targets)


@pytest.fixture
async def rules(tmp_path):
    async with open_sqlite(str(tmp_path / "v.db")) as store:
        ids = [(await store.create_user(f"u{i}", "h", "", 0.0)).id for i in range(6)]
        membership = Membership(store)
        gate = PresenceVisibility(store, membership, FakePresence(), "contacts", sessions_of=lambda uid: ())
        yield gate, store, membership, ids


async def test_contacts_are_co_members_and_partners_of_a_stored_dm(rules, autojump_clock):
    gate, store, membership, (a, b, c, d, e, f) = rules
    await store.create_group("g:00000000000000aa", "big", a, [b], 0.0, 100)
    await store.append_message(f"dm:{a}:{c}", a, "m1", "hi", 0.0, dm_pair=(a, c))
    # d: nothing shared; e: only the implicit 1:1 channel (no message); NOBODY: no such user
    seen = await gate.visible(a, [a, b, c, d, e, NOBODY])
    assert seen == {a: None, b: "g:00000000000000aa", c: None}
    assert await gate.visible(b, [a, c]) == {a: "g:00000000000000aa"}
    assert await gate.visible(c, [a, b]) == {a: None}
    answer = await gate.statuses(d, [a, NOBODY, d])
    assert answer == {a: HIDDEN, NOBODY: HIDDEN, d: {"status": "online", "last_active_at": 1.0}}


async def test_removal_counts_at_once_and_a_new_contact_is_reloaded(rules, autojump_clock):
    gate, store, membership, (a, b, c, d, e, f) = rules
    g = "g:00000000000000bb"
    await store.create_group(g, "g", a, [b], 0.0, 100)
    assert b in await gate.visible(a, [b])  # a's channel list is cached now
    await store.remove_member(g, b)
    membership.invalidate(g)
    assert await gate.visible(a, [b]) == {} and await gate.visible(b, [a]) == {}
    # a new 1:1 contact, with no membership change on this node: seen once the cached list is RELOAD_S old
    await store.append_message(f"dm:{a}:{d}", d, "m1", "hi", 0.0, dm_pair=(a, d))
    assert await gate.visible(a, [d]) == {}
    await trio.sleep(RELOAD_S)
    assert await gate.visible(a, [d]) == {d: None}
    # a group change on this node reloads at once
    await store.add_member(g, e, 100, 0.0)
    membership.invalidate(g)
    assert await gate.visible(a, [e]) == {e: g}


async def test_cached_channel_lists_are_bounded(rules, autojump_clock):
    gate, store, membership, ids = rules
    gate.max_viewers = 3
    for uid in ids:
        await gate.visible(uid, [NOBODY])
    assert list(gate._viewers) == ids[-3:]


def test_subscription_grants_end_with_their_subscription():
    subs = Subscriptions()
    subs.add(1, [2, 3], {2: "g:1", 3: "g:1"})
    subs.add(1, [2])  # a second session of user 1: refcount 2
    subs.add(4, [2], {2: "g:2"})
    subs.remove(1, [2])
    assert sorted(subs.take_granted("g:1")) == [(1, 2), (1, 3)]
    assert subs.take_granted("g:1") == []
    subs.grant(1, 2, "g:3")
    subs.remove(1, [2])  # its last subscription: the grant goes with it
    subs.remove(4, [2])
    assert subs.take_granted("g:3") == [] and subs.take_granted("g:2") == []
    assert subs._grant == {} and subs._by_grant == {}
    subs.grant(9, 9, "g:4")  # no subscription: nothing recorded
    assert subs._grant == {}


def test_the_switch_is_checked():
    assert Config.from_mapping({}).presence.visibility == "contacts"
    assert Config.from_mapping({"presence": {"visibility": "everyone"}}).presence.visibility == "everyone"
    Config.from_mapping({"presence": {"visibility": "everyone"}}).validate()
    with pytest.raises(ConfigError, match="presence.visibility"):
        Config.from_mapping({"presence": {"visibility": "friends"}}).validate()


# ---- over the wire -------------------------------------------------------------------------------

async def start(nursery, tmp_path, **presence):
    cfg = make_config(tmp_path)
    cfg.update({"presence": {"coalesce_s": 0.0, **presence}}, source="test")
    cfg.validate()
    return await RunningServer(nursery, cfg).start()


async def everywhere(srv, client, token, uid) -> list:
    """What a viewer gets for ``uid`` on the four paths that answer a status."""
    api = srv.api
    sub = await client.request({"type": "subscribe_presence", "user_ids": [uid]})
    q = await client.request({"type": "presence", "user_ids": [uid]})
    batch = await api.call("GET", f"/v1/presence?user_ids={uid}", token=token)
    assert batch.status == 200, batch
    out = [sub["users"][str(uid)], q["users"][str(uid)], batch.body["users"][str(uid)]]
    one = await api.call("GET", f"/v1/users/{uid}/presence", token=token)
    if one.status == 200:
        out.append({k: v for k, v in one.body.items() if k != "user_id"})
    else:
        assert one.status == 404 and one.body["error"]["code"] == "no_such_user" and uid == NOBODY, one
    return out


def presence_events(client, uid) -> list:
    """The ``presence`` events about ``uid`` that reached ``client`` (none is taken off its inbox here)."""
    return [(f["status"], f["last_active_at"]) for f in client.inbox
            if f.get("type") == "presence" and "id" not in f and f["user_id"] == uid]


async def hears(client, uid, status, timeout=10):
    """Until ``client`` got a ``presence`` event saying ``uid`` is ``status``; its last_active_at."""
    with trio.fail_after(timeout):
        while True:
            for st, at in presence_events(client, uid):
                if st == status:
                    return at
            await client.wait_frame()


async def test_a_stranger_sees_the_same_as_for_nobody_and_no_live_changes(nursery, tmp_path):
    srv = await start(nursery, tmp_path)
    api = srv.api
    try:
        alice, bob, carol = [await api.signup_login(n) for n in ("alice", "bob", "carol")]
        aid, cid = alice["user"]["id"], carol["user"]["id"]
        # carol is bob's contact (a 1:1 channel with a message): her changes are bob's sentinel
        cc = await open_client(nursery, carol["ws_url"], carol["token"])
        assert (await cc.send_message(dm(bob, carol), "hi bob"))["type"] == "ack"
        await cc.request({"type": "logout"})
        cb = await open_client(nursery, bob["ws_url"], bob["token"])
        # alice was online once: she has a last_active_at that strangers must not learn
        ca = await open_client(nursery, alice["ws_url"], alice["token"])
        await ca.request({"type": "logout"})
        assert await everywhere(srv, cb, bob["token"], aid) == [HIDDEN] * 4
        assert await everywhere(srv, cb, bob["token"], NOBODY) == [HIDDEN] * 3
        # alice comes online, then carol: bob hears carol, never alice (a logout revoked their tokens)
        alice, carol = await api.login("alice"), await api.login("carol")
        ca = await open_client(nursery, alice["ws_url"], alice["token"])
        await ca.request({"type": "heartbeat"})
        cc = await open_client(nursery, carol["ws_url"], carol["token"])
        await hears(cb, cid, "online")
        assert await everywhere(srv, cb, bob["token"], aid) == [HIDDEN] * 4  # online, but not for bob
        await ca.request({"type": "logout"})
        await cc.request({"type": "logout"})
        assert await hears(cb, cid, "offline") > 0
        assert presence_events(cb, aid) == []
        # the batch answers strangers and unknown ids alike, beside a contact's real status
        r = await api.call("GET", f"/v1/presence?user_ids={aid},{NOBODY},{cid}", token=bob["token"])
        assert r.body["users"][str(aid)] == r.body["users"][str(NOBODY)] == HIDDEN
        assert r.body["users"][str(cid)]["status"] == "offline" and r.body["users"][str(cid)]["last_active_at"] > 0
    finally:
        await srv.stop()


async def test_co_members_and_dm_partners_see_the_real_status(nursery, tmp_path):
    srv = await start(nursery, tmp_path, group_push_max=0)  # (no pushes to groups: subscriptions only)
    api = srv.api
    try:
        alice, gm, partner, lurker = [await api.signup_login(n) for n in ("alice", "member", "partner", "lurker")]
        aid = alice["user"]["id"]
        r = await api.call("POST", "/v1/groups", {"name": "g", "members": [gm["user"]["id"]]}, token=alice["token"])
        assert r.status == 201
        cp = await open_client(nursery, partner["ws_url"], partner["token"])
        assert (await cp.send_message(dm(alice, partner), "hello"))["type"] == "ack"
        r = await api.call("GET", f"/v1/dm/{aid}", token=lurker["token"])  # the 1:1 channel, no message
        assert r.status == 200, r
        cg = await open_client(nursery, gm["ws_url"], gm["token"])
        cl = await open_client(nursery, lurker["ws_url"], lurker["token"])
        ca = await open_client(nursery, alice["ws_url"], alice["token"])
        await ca.request({"type": "heartbeat"})
        for c, who in ((cg, gm), (cp, partner)):
            for st in await everywhere(srv, c, who["token"], aid):
                assert st["status"] == "online" and st["last_active_at"] > 0
        assert await everywhere(srv, cl, lurker["token"], aid) == [HIDDEN] * 4
        # the lurker subscribed too (everywhere() does): the gm's and the partner's events are its sentinel
        await ca.request({"type": "logout"})
        assert await hears(cg, aid, "offline") > 0  # the co-member, by its subscription
        assert await hears(cp, aid, "offline") > 0  # the partner, by the 1:1 push
        r = await api.call("GET", f"/v1/users/{aid}/presence", token=gm["token"])
        assert r.body["status"] == "offline" and r.body["last_active_at"] > 0
        assert presence_events(cl, aid) == []
    finally:
        await srv.stop()


async def test_a_removed_member_stops_seeing(nursery, tmp_path):
    srv = await start(nursery, tmp_path, group_push_max=0)  # (no pushes to groups: subscriptions only)
    api = srv.api
    try:
        alice, bob, carol = [await api.signup_login(n) for n in ("alice", "bob", "carol")]
        aid, bid, cid = (u["user"]["id"] for u in (alice, bob, carol))
        r = await api.call("POST", "/v1/groups", {"name": "g", "members": [bid, cid]}, token=alice["token"])
        g = r.body["channel"]["id"]
        cb = await open_client(nursery, bob["ws_url"], bob["token"])
        cc = await open_client(nursery, carol["ws_url"], carol["token"])
        sub = await cb.request({"type": "subscribe_presence", "user_ids": [aid]})
        assert sub["users"][str(aid)] == HIDDEN  # (never seen yet)
        sub = await cc.request({"type": "subscribe_presence", "user_ids": [aid, bid]})  # carol watches both
        assert sub["users"][str(bid)]["status"] == "online"
        ca = await open_client(nursery, alice["ws_url"], alice["token"])
        await ca.request({"type": "heartbeat"})
        assert await hears(cb, aid, "online") > 0
        await hears(cc, aid, "online")
        r = await api.call("DELETE", f"/v1/channels/{g}/members/{bid}", token=alice["token"])
        assert r.status == 200 and r.body["removed"], r
        # both ends of bob's ties through the group end: his subscription to alice, carol's to him
        assert await hears(cb, aid, "offline") is None
        assert await hears(cc, bid, "offline") is None
        assert presence_events(cb, aid) == [("online", presence_events(cb, aid)[0][1]), ("offline", None)]
        subscriptions = srv.node.presence.subscriptions
        assert bid not in subscriptions.subscribers_of(aid) and cid not in subscriptions.subscribers_of(bid)
        assert cid in subscriptions.subscribers_of(aid)
        assert await everywhere(srv, cb, bob["token"], aid) == [HIDDEN] * 4
        # alice goes: carol (still a member) hears it, bob does not
        await ca.request({"type": "logout"})
        assert await hears(cc, aid, "offline") > 0
        assert [st for st, _ in presence_events(cb, aid)] == ["online", "offline"]
        # added to another group of alice's: seen again at once (the change reloads his channel list)
        alice = await api.login("alice")  # (her logout revoked the token)
        r = await api.call("POST", "/v1/groups", {"name": "other", "members": [cid]}, token=alice["token"])
        r = await api.call("POST", f"/v1/channels/{r.body['channel']['id']}/members", {"user_id": bid},
                           token=alice["token"])
        assert r.status == 200 and r.body["added"], r
        q = await cb.request({"type": "presence", "user_ids": [aid]})
        assert q["users"][str(aid)]["status"] == "offline" and q["users"][str(aid)]["last_active_at"] > 0
    finally:
        await srv.stop()
async def test_visibility_everyone_is_the_old_behaviour(nursery, tmp_path):
    srv = await start(nursery, tmp_path, visibility="everyone")
    api = srv.api
    try:
        alice, bob = await api.signup_login("alice"), await api.signup_login("bob")
        aid = alice["user"]["id"]
        cb = await open_client(nursery, bob["ws_url"], bob["token"])
        sub = await cb.request({"type": "subscribe_presence", "user_ids": [aid]})
        assert sub["users"][str(aid)] == HIDDEN  # never seen yet
        ca = await open_client(nursery, alice["ws_url"], alice["token"])
        assert await hears(cb, aid, "online") > 0
        await ca.request({"type": "logout"})
        assert await hears(cb, aid, "offline") > 0
        for st in await everywhere(srv, cb, bob["token"], aid):
            assert st["status"] == "offline" and st["last_active_at"] > 0
    finally:
        await srv.stop()
