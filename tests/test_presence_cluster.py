"""The presence role with the real thing: ZooKeeper, shards, presence servers and an API server as
OS processes. A presence server is killed with -9 and later replaced: after the grace period no
ghost is online and no connected user is offline. Presence is visible to contacts only, checked on
the shard and the API server that serve the viewer (chatd/presence/visibility.py)."""

from __future__ import annotations

import pytest
import trio

from chatd.discovery import hashing
from tests.cluster import Cluster, zookeeper_available
from tests.helpers import dm as dm_id
from tests.helpers import eventually, open_client

pytestmark = pytest.mark.skipif(not zookeeper_available(),
                                reason="ZooKeeper not installed (apt-get install zookeeper); .ci/run installs it")

GRACE_S = 2.0


@pytest.fixture
async def presence_cluster(zk, tmp_path):
    """Two shards, two presence servers (p1, p2) and an API server; no pushes to groups (changes
    reach co-members by their subscriptions only)."""
    c = Cluster(zk, tmp_path, n=2, session_timeout_s=1.5, presence=2,
                top='log_levels = ["chatd.presence=debug"]\n',  # what a failure's message shows
                extra=f"[presence]\ngrace_s = {GRACE_S}\ncoalesce_s = 0.2\ngroup_push_max = 0\n")
    try:
        await c.start()
        yield c
    finally:
        c.stop()


async def statuses(cluster, token, *uids):
    r = await cluster.api.call("GET", "/v1/presence?user_ids=" + ",".join(map(str, uids)), token=token)
    assert r.status == 200, r
    return {int(k): v["status"] for k, v in r.body["users"].items()}


def latest(client, uid):
    events = [f["status"] for f in client.inbox if f.get("type") == "presence" and f["user_id"] == uid]
    return events[-1] if events else None


@pytest.mark.xfail(strict=False, reason=(
    "known race, open: in the full suite a subscriber of a user who leaves while a presence server "
    "fails over gets no 'offline' event from the new owner (its HTTP status is right: offline); "
    "passes alone and in loops. Still run, so an xpass shows when it is fixed (closing note, wave 3)"))
async def test_presence_server_killed_and_replaced(presence_cluster, nursery):
    cluster = presence_cluster
    api = cluster.api
    watcher = await api.signup_login("watcher")
    # two users that hash to the same presence server, the one we will kill
    users = []
    i = 0
    while len(users) < 2:
        u = await api.signup_login(f"target{i}")
        i += 1
        if hashing.owner(f"p:{u['user']['id']}", ["p1", "p2"]) == "p1":
            users.append(u)
    x, y = users
    xid, yid = x["user"]["id"], y["user"]["id"]
    r = await api.call("POST", "/v1/groups", {"name": "watched", "members": [xid, yid]}, token=watcher["token"])
    assert r.status == 201, r  # the watcher is their co-member: it may see them
    cw = await open_client(nursery, watcher["ws_url"], watcher["token"])
    sub = await cw.request({"type": "subscribe_presence", "user_ids": [xid, yid]})
    assert sub["type"] == "subscribe_presence", sub

    async def both_online():
        return await statuses(cluster, watcher["token"], xid, yid) == {xid: "online", yid: "online"}

    async with trio.open_nursery() as conns:
        cx = await open_client(conns, x["ws_url"], x["token"])
        cy = await open_client(conns, y["ws_url"], y["token"])

        async def keep_alive(c):
            while True:
                await c.send({"type": "heartbeat", "id": "hb"})
                await trio.sleep(GRACE_S / 4)  # a client's heartbeat interval
        conns.start_soon(keep_alive, cy)
        x_alive = trio.CancelScope()

        async def x_heartbeats():
            with x_alive:
                await keep_alive(cx)
        conns.start_soon(x_heartbeats)
        await eventually(both_online)

        async def watcher_saw_online():
            return latest(cw, xid) == "online" and latest(cw, yid) == "online"
        await eventually(watcher_saw_online)

        cluster.kill("p1")  # their presence server dies
        # x goes away for good: stops heartbeating and disconnects
        x_alive.cancel()
        await cx.ws.aclose()

        async def settled():
            return await statuses(cluster, watcher["token"], xid, yid) == {xid: "offline", yid: "online"}
        await eventually(settled)
        # after the grace period it stays that way: no ghost online, the connected user not offline
        # ("stays" has no event: the wait past the grace period is the check)
        await trio.sleep(GRACE_S * 1.5)
        assert await settled()

        async def watcher_saw_offline():
            return latest(cw, xid) == "offline" and latest(cw, yid) == "online"
        try:
            await eventually(watcher_saw_offline)
        except trio.TooSlowError:
            raise AssertionError(presence_story(cluster, cw, xid, yid)) from None

        # a replacement server joins; users re-hash across p2 and p3 and the state is rebuilt
        cluster.start_presence("p3")
        await eventually(lambda: all(f"link up: {s} <-> p3" in cluster.log_text(s) for s in cluster.shard_ids),
                         timeout=30)
        await eventually(settled)
        await trio.sleep(GRACE_S * 1.5)  # and it holds past a grace period on the new servers
        assert await settled()
        assert latest(cw, yid) == "online" and latest(cw, xid) == "offline"
        conns.cancel_scope.cancel()


def presence_story(cluster, client, *uids) -> str:
    """What a failure shows: the client's presence events and every process's presence log lines."""
    lines = [f"watcher's presence events: {[f for f in client.inbox if f.get('type') == 'presence']}",
             f"users: {uids}"]
    for name in cluster.procs:
        lines += [f"{name}: {ln}" for ln in cluster.log_text(name).splitlines()
                  if "presence" in ln or "link" in ln or "view" in ln]
    return "\n".join(lines[-400:])


HIDDEN = {"status": "offline", "last_active_at": None}


def events_about(client, uid) -> list:
    return [(f["status"], f["last_active_at"]) for f in client.inbox
            if f.get("type") == "presence" and "id" not in f and f["user_id"] == uid]


async def test_only_contacts_see_presence_in_a_cluster(presence_cluster, nursery):
    cluster = presence_cluster
    api = cluster.api
    owner, member, other, stranger, pal = [await api.signup_login(n) for n in
                                           ("owner", "member", "other", "stranger", "pal")]
    oid, mid, pid = owner["user"]["id"], member["user"]["id"], pal["user"]["id"]
    nobody = 10**9
    r = await api.call("POST", "/v1/groups", {"name": "g", "members": [mid, other["user"]["id"]]},
                       token=owner["token"])
    g = r.body["channel"]["id"]
    cs = await open_client(nursery, stranger["ws_url"], stranger["token"])
    cp = await open_client(nursery, pal["ws_url"], pal["token"])
    assert (await cp.send_message(dm_id(pal, stranger), "hi"))["type"] == "ack"  # the stranger's contact
    await cp.request({"type": "logout"})
    cm = await open_client(nursery, member["ws_url"], member["token"])
    co = await open_client(nursery, other["ws_url"], other["token"])
    for c in (cm, co, cs):
        sub = await c.request({"type": "subscribe_presence", "user_ids": [oid, pid, nobody]})
        assert sub["users"][str(oid)] == HIDDEN, sub  # (never seen yet: the same for everybody)
    cw = await open_client(nursery, owner["ws_url"], owner["token"])

    async def member_saw(status):
        return status in [st for st, _ in events_about(cm, oid)]
    await eventually(lambda: member_saw("online"))
    pal = await api.login("pal")  # (the logout revoked its token)
    cp = await open_client(nursery, pal["ws_url"], pal["token"])
    await eventually(lambda: ("online" in [st for st, _ in events_about(cs, pid)]))  # the stranger's sentinel
    assert events_about(cs, oid) == []  # (not even the snapshot a registered subscription gets)
    q = await cs.request({"type": "presence", "user_ids": [oid, nobody]})
    assert q["users"] == {str(oid): HIDDEN, str(nobody): HIDDEN}
    assert (await statuses(cluster, member["token"], oid)) == {oid: "online"}
    r = await api.call("GET", f"/v1/presence?user_ids={oid},{nobody}", token=stranger["token"])
    assert r.body["users"] == {str(oid): HIDDEN, str(nobody): HIDDEN}
    r = await api.call("GET", f"/v1/users/{oid}/presence", token=stranger["token"])
    assert r.status == 200 and {k: v for k, v in r.body.items() if k != "user_id"} == HIDDEN

    # the member is removed: its shard ends its subscription (the API server's invalidate)
    # (a subscription in a cluster is first answered by the presence server's snapshot: "offline", never seen)
    before = len(events_about(cm, oid))
    assert events_about(cm, oid)[-1][0] == "online"
    r = await api.call("DELETE", f"/v1/channels/{g}/members/{mid}", token=owner["token"])
    assert r.status == 200 and r.body["removed"], r
    await eventually(lambda: len(events_about(cm, oid)) > before)
    assert events_about(cm, oid)[before:] == [("offline", None)]
    q = await cm.request({"type": "presence", "user_ids": [oid]})
    assert q["users"] == {str(oid): HIDDEN}
    r = await api.call("GET", f"/v1/presence?user_ids={oid}", token=member["token"])
    assert r.body["users"] == {str(oid): HIDDEN}
    # the owner leaves: the other member hears it with its last_active_at; the former member nothing more
    await cw.request({"type": "logout"})
    await eventually(lambda: any(st == "offline" and at for st, at in events_about(co, oid)))
    assert len(events_about(cm, oid)) == before + 1
    assert events_about(cs, oid) == []
    r = await api.call("GET", f"/v1/presence?user_ids={oid}", token=other["token"])
    assert r.body["users"][str(oid)]["status"] == "offline" and r.body["users"][str(oid)]["last_active_at"] > 0
