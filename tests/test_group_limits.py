"""Groups and the channel list against abuse (issue 20, the Low findings): a per-user cap on groups
created per hour (``limits.groups_created_per_hour``), ``GET /v1/channels`` in pages, and no re-add
after a leave without the user's consent (the owner's add becomes an invitation the user accepts).
A real ``chatd run`` on loopback; the store side of each is in tests/test_store_contract.py (every
backend) and the cluster side (two API servers, both backends) in tests/test_group_limits_cluster.py."""

from __future__ import annotations

import time

from tests.helpers import open_client


async def make_group(api, token, members=(), name="g"):
    return await api.call("POST", "/v1/groups", {"name": name, "members": list(members)}, token=token)


async def test_group_creation_is_capped_per_user_per_hour(server_with):
    server = await server_with(groups_created_per_hour=3)
    api = server.api
    alice, bob = await api.signup_login("alice"), await api.signup_login("bob")
    for i in range(3):
        assert (await make_group(api, alice["token"], name=f"g{i}")).status == 201
    started = time.time()
    r = await make_group(api, alice["token"], name="one too many")
    assert r.status == 429, r
    assert r.body["error"]["code"] == "too_many_groups"
    retry_after = int(r.headers["Retry-After"])
    assert 3590 - (time.time() - started) <= retry_after <= 3601  # when the oldest turns an hour old
    mine = await api.call("GET", "/v1/channels", token=alice["token"])
    assert len(mine.body["channels"]) == 3  # the refused one made nothing
    assert (await make_group(api, bob["token"])).status == 201  # a cap per user


async def test_group_cap_zero_means_no_cap(server_with):
    server = await server_with(groups_created_per_hour=0)
    alice = await server.api.signup_login("alice")
    for i in range(25):  # above the default cap (20)
        assert (await make_group(server.api, alice["token"], name=f"g{i}")).status == 201


async def test_channel_list_pages_cover_every_channel_once(server_with):
    server = await server_with(groups_created_per_hour=0)
    api = server.api
    alice, bob = await api.signup_login("alice"), await api.signup_login("bob")
    made = {(await make_group(api, alice["token"], [bob["user"]["id"]], name=f"g{i}")).body["channel"]["id"]
            for i in range(7)}
    seen, cursor, pages = [], None, 0
    while True:
        path = "/v1/channels?limit=3" + (f"&cursor={cursor}" if cursor else "")
        r = await api.call("GET", path, token=bob["token"])
        assert r.status == 200, r
        pages += 1
        seen += [c["id"] for c in r.body["channels"]]
        assert len(r.body["channels"]) <= 3
        cursor = r.body["next"]
        if cursor is None:
            break
    assert seen == sorted(made) and pages == 3  # 3 + 3 + 1, in id order
    everything = await api.call("GET", "/v1/channels", token=bob["token"])  # the default page (100) holds all 7
    assert sorted(c["id"] for c in everything.body["channels"]) == sorted(made) and everything.body["next"] is None
    for bad in ("/v1/channels?limit=0", "/v1/channels?limit=501", "/v1/channels?cursor=%2F%2F",
                "/v1/channels?colour=red"):
        r = await api.call("GET", bad, token=bob["token"])
        assert r.status == 400 and r.body["error"]["code"] == "bad_request", (bad, r)


async def test_a_user_who_left_is_invited_back_not_added(server, nursery):
    api = server.api
    alice, bob, carol = [await api.signup_login(n) for n in ("alice", "bob", "carol")]
    gid = (await make_group(api, alice["token"], [bob["user"]["id"], carol["user"]["id"]])).body["channel"]["id"]
    bob_id = bob["user"]["id"]
    r = await api.call("DELETE", f"/v1/channels/{gid}/members/{bob_id}", token=bob["token"])  # bob leaves
    assert r.status == 200 and r.body["removed"] is True
    ws_bob = await open_client(nursery, bob["ws_url"], bob["token"])

    r = await api.call("POST", f"/v1/channels/{gid}/members", {"user_id": bob_id}, token=alice["token"])
    assert r.status == 202 and r.body == {"channel_id": gid, "user_id": bob_id, "added": False, "invited": True}, r
    members = await api.call("GET", f"/v1/channels/{gid}/members", token=alice["token"])
    assert bob_id not in members.body["members"]  # not back in: he has not said yes
    assert (await api.call("GET", f"/v1/channels/{gid}/messages", token=bob["token"])).status == 403
    invite = await ws_bob.next_event("group_invite")
    assert (invite["channel_id"], invite["by"], invite["name"]) == (gid, alice["user"]["id"], "g")
    listed = (await api.call("GET", "/v1/invitations", token=bob["token"])).body["invitations"]
    assert [(i["channel_id"], i["name"], i["invited_by"]) for i in listed] == [(gid, "g", alice["user"]["id"])]
    assert (await api.call("GET", "/v1/invitations", token=carol["token"])).body == {"invitations": []}

    r = await api.call("POST", f"/v1/channels/{gid}/join", token=bob["token"])  # bob accepts
    assert r.status == 200 and r.body["added"] is True, r
    assert bob_id in (await api.call("GET", f"/v1/channels/{gid}/members", token=alice["token"])).body["members"]
    assert (await api.call("GET", "/v1/invitations", token=bob["token"])).body == {"invitations": []}
    # joined again: the next leave is a leave again, and a join without a new invitation is refused
    assert (await api.call("DELETE", f"/v1/channels/{gid}/members/{bob_id}", token=bob["token"])).status == 200
    r = await api.call("POST", f"/v1/channels/{gid}/join", token=bob["token"])
    assert r.status == 403 and r.body["error"]["code"] == "not_invited", r


async def test_join_needs_an_invitation_and_a_removed_member_is_added_directly(server):
    api = server.api
    alice, bob, carol, dave = [await api.signup_login(n) for n in ("alice", "bob", "carol", "dave")]
    gid = (await make_group(api, alice["token"], [bob["user"]["id"]])).body["channel"]["id"]
    for who in (carol, dave):  # never a member, never invited: nobody joins a group by its id
        r = await api.call("POST", f"/v1/channels/{gid}/join", token=who["token"])
        assert r.status == 403 and r.body["error"]["code"] == "not_invited", r
    r = await api.call("POST", f"/v1/channels/{gid}/join", token=bob["token"])  # already in: nothing to do
    assert r.status == 200 and r.body["added"] is False
    bob_id = bob["user"]["id"]
    assert (await api.call("DELETE", f"/v1/channels/{gid}/members/{bob_id}", token=alice["token"])).status == 200
    r = await api.call("POST", f"/v1/channels/{gid}/members", {"user_id": bob_id}, token=alice["token"])
    assert r.status == 200 and r.body["added"] is True, r  # removed by the owner is not a leave of his own
