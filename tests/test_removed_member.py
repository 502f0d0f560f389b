"""A member removed from a group reads nothing of it afterwards (issue 20, H1): not by live
fan-out, not by a server-side resync of the cursors the connection had, not by sync or history.
In-process here (``chatd run``); the cluster case, with a shard that joins after the removal,
is in tests/test_cluster.py."""

from __future__ import annotations

from tests.helpers import open_client


async def _group_with_removed_member(server, nursery):
    alice, bob, carol = [await server.api.signup_login(n) for n in ("alice", "bob", "carol")]
    r = await server.api.call("POST", "/v1/groups", {"name": "g", "members": [bob["user"]["id"], carol["user"]["id"]]},
                              token=alice["token"])
    assert r.status == 201, r
    group = r.body["channel"]["id"]
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    cb = await open_client(nursery, bob["ws_url"], bob["token"])
    cc = await open_client(nursery, carol["ws_url"], carol["token"])
    await ca.send_message(group, "before removal")
    assert (await cb.next_event("message"))["body"] == "before removal"  # bob's connection now has a cursor
    assert (await cc.next_event("message"))["body"] == "before removal"
    r = await server.api.call("DELETE", f"/v1/channels/{group}/members/{bob['user']['id']}", token=alice["token"])
    assert r.status in (200, 204), r
    # the removal is a row of the log (issue 21): bob's last frame of the group, carol's too
    for c in (cb, cc):
        assert (await c.next_event("message"))["kind"] == "member_removed"
    await ca.send_message(group, "after removal")
    assert (await cc.next_event("message"))["body"] == "after removal"
    return alice, bob, group, ca, cb


async def test_server_side_resync_sends_a_removed_member_nothing(server, nursery):
    alice, bob, group, ca, cb = await _group_with_removed_member(server, nursery)
    for session in list(server.node.hub.all_sessions()):  # what the router does on a view change
        session.resync()
    await cb.request({"type": "heartbeat"})  # answered after the resync's work on that connection
    assert [m["body"] for m in cb.pending_messages() if m["channel_id"] == group] == []
    # nor by asking: sync names the channel as an error, history is forbidden
    reply = await cb.request({"type": "sync", "cursors": {group: 0}})
    assert reply["errors"] == {group: "not_member"} and group not in reply["cursors"], reply
    r = await server.api.call("GET", f"/v1/channels/{group}/messages", token=bob["token"])
    assert r.status == 403, r
    reply = await cb.request({"type": "history", "channel_id": group})
    assert reply["type"] == "error" and reply["code"] == "not_member", reply
    assert "after removal" not in [m["body"] for m in cb.pending_messages()]


async def test_a_removed_member_stays_cut_off_through_many_resyncs_and_new_messages(server, nursery):
    alice, bob, group, ca, cb = await _group_with_removed_member(server, nursery)
    for i in range(3):
        for session in list(server.node.hub.all_sessions()):
            session.resync()
        await ca.send_message(group, f"later {i}")
    await cb.request({"type": "heartbeat"})
    assert [m["body"] for m in cb.pending_messages() if m["channel_id"] == group] == []
