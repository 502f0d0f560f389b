"""Logout and membership events in a real cluster (ZooKeeper, shards and an API server as OS
processes): a logout through the API server or on one shard revokes the token on every shard and
API server and closes the device's connections wherever they are; the ``member_added`` row reaches members
connected to any shard. The ``cluster`` fixture (tests/cluster.py): ZooKeeper, 3 shards, an API
server, on SQLite and on Cassandra."""

from __future__ import annotations

import pytest

from chatd.ids import dm_channel_id
from tests.cluster import zookeeper_available
from tests.helpers import PASSWORD, open_client

pytestmark = pytest.mark.skipif(not zookeeper_available(),
                                reason="ZooKeeper not installed (apt-get install zookeeper); .ci/run installs it")


async def test_logout_reaches_every_shard_and_api_server(cluster, nursery):
    api = cluster.api
    s1, s2 = cluster.ws_url("s1"), cluster.ws_url("s2")
    alice, bob = await api.signup_login("alice"), await api.signup_login("bob")
    ch = dm_channel_id(alice["user"]["id"], bob["user"]["id"])  # ids are random on Cassandra: lower first
    phone = [await open_client(nursery, url, alice["token"]) for url in (s1, s2)]
    laptop_login = await api.login("alice")
    laptop = await open_client(nursery, s1, laptop_login["token"])

    # HTTP logout on the API server: the device's sockets on both shards close with 4001
    r = await api.call("POST", "/v1/logout", token=alice["token"])
    assert r.status == 200
    for c in phone:
        assert (await c.wait_closed()).code == 4001
    for url in (s1, s2):
        c = await open_client(nursery, url)
        assert (await c.request({"type": "auth", "token": alice["token"]}))["code"] == "invalid_token"
    assert (await api.call("GET", "/v1/users/me", token=alice["token"])).status == 401
    assert (await laptop.send_message(ch, "the laptop still works"))["type"] == "ack"

    # WS logout on s1: the same device's socket on s2 is closed too
    laptop_s2 = await open_client(nursery, s2, laptop_login["token"])
    assert (await laptop.request({"type": "logout"}))["type"] == "logout"
    assert (await laptop.wait_closed()).code == 1000
    assert (await laptop_s2.wait_closed()).code == 4001
    assert (await api.call("GET", "/v1/channels", token=laptop_login["token"])).status == 401


async def test_logout_all_and_a_password_change_reach_every_shard(cluster, nursery):
    """``all`` through the API server: every device's sockets on two shards close with 4001 and
    their tokens are refused on every shard and the API server; a device logged out by id and a
    password change likewise (the password change's new token works everywhere)."""
    api = cluster.api
    s2, s3 = cluster.ws_url("s2"), cluster.ws_url("s3")
    phone = await api.signup_login("carol")
    laptop = await api.login("carol")
    sockets = [await open_client(nursery, url, t["token"]) for url in (s2, s3) for t in (phone, laptop)]
    r = await api.call("POST", "/v1/logout", {"all": True}, token=phone["token"])
    assert r.status == 200 and r.body["all"] is True
    for c in sockets:
        assert (await c.wait_closed()).code == 4001
    for t in (phone, laptop):
        for url in (s2, s3):
            c = await open_client(nursery, url)
            assert (await c.request({"type": "auth", "token": t["token"]}))["code"] == "invalid_token"
        assert (await api.call("GET", "/v1/users/me", token=t["token"])).status == 401

    # one device by id: its socket on s3 closes, the other device's on s2 stays
    phone, laptop = await api.login("carol", phone["device_id"]), await api.login("carol", laptop["device_id"])
    phone_s3, laptop_s2 = await open_client(nursery, s3, phone["token"]), await open_client(nursery, s2, laptop["token"])
    r = await api.call("DELETE", f"/v1/devices/{phone['device_id']}", token=laptop["token"])
    assert r.status == 200
    assert (await phone_s3.wait_closed()).code == 4001
    c = await open_client(nursery, s2)
    assert (await c.request({"type": "auth", "token": phone["token"]}))["code"] == "invalid_token"
    assert (await laptop_s2.request({"type": "presence", "user_ids": [1]}))["type"] == "presence"

    # a password change: the caller's socket closes too; its new token works on every shard
    r = await api.call("POST", "/v1/users/me/password", {"old_password": PASSWORD, "new_password": "carols-new-pw"},
                       token=laptop["token"])
    assert r.status == 200
    assert (await laptop_s2.wait_closed()).code == 4001
    for url in (s2, s3):
        c = await open_client(nursery, url)
        assert (await c.request({"type": "auth", "token": laptop["token"]}))["code"] == "invalid_token"
        assert (await (await open_client(nursery, url)).request({"type": "auth", "token": r.body["token"]}))["type"] \
            == "auth"


async def test_member_added_reaches_members_on_every_shard(cluster, nursery):
    api = cluster.api
    people = [await api.signup_login(n) for n in ("owner", "member", "newcomer")]
    ids = [p["user"]["id"] for p in people]
    r = await api.call("POST", "/v1/groups", {"name": "g", "members": [ids[1]]}, token=people[0]["token"])
    gid = r.body["channel"]["id"]
    clients = [await open_client(nursery, cluster.ws_url(sid), p["token"])
               for sid, p in zip(("s1", "s2", "s1"), people)]
    r = await api.call("POST", f"/v1/channels/{gid}/members", {"user_id": ids[2]}, token=people[0]["token"])
    assert r.body["added"] is True
    for c in clients:  # a row of the log (issue 21), sequenced by the owner shard from the API server
        row = await c.next_event("message", timeout=15)
        assert (row["channel_id"], row["kind"], row["user_id"], row["sender_id"]) == (gid, "member_added", ids[2], ids[0])
