"""Sessions (issue 20, finding 7): a logout revokes every older token of its device; ``POST
/v1/logout`` with ``all``, ``GET`` / ``DELETE /v1/devices``, and a password change revoke every
token issued before them, over HTTP and WebSocket, with the sockets closed (4001). In one
process; tests/test_logout_cluster.py does it across shards and an API server."""

from __future__ import annotations

import base64
import json

from chatd import auth
from chatd.revocation import RecentRevocations, token_key
from chatd.store.base import Device
from tests.helpers import PASSWORD, open_client


async def refused(server, nursery, token: str) -> bool:
    """The token is refused over HTTP and WebSocket alike."""
    http = (await server.api.call("GET", "/v1/users/me", token=token)).status
    c = await open_client(nursery, server.ws_url)
    ws = (await c.request({"type": "auth", "token": token}))
    assert (http == 401) == (ws.get("code") == "invalid_token"), (http, ws)
    return http == 401


async def test_a_logout_revokes_the_older_tokens_of_its_device(server, nursery):
    """The finding: an older token of the same device still worked after the device logged out
    with a newer one."""
    api = server.api
    first = await api.signup_login("alice")
    second = await api.login("alice", device_id=first["device_id"])  # the same device, a newer token
    assert second["device_id"] == first["device_id"]
    other = await api.login("alice")  # another device
    old_socket = await open_client(nursery, server.ws_url, first["token"])
    r = await api.call("POST", "/v1/logout", token=second["token"])
    assert r.status == 200
    assert await refused(server, nursery, second["token"])
    assert await refused(server, nursery, first["token"])  # the older one too
    assert (await old_socket.wait_closed()).code == 4001
    assert r.body == {"user_id": first["user"]["id"], "device_id": first["device_id"], "logged_out": True,
                      "all": False}
    assert not await refused(server, nursery, other["token"])
    again = await api.login("alice", device_id=first["device_id"])  # logging in again works at once
    assert not await refused(server, nursery, again["token"])


async def test_logout_all_revokes_every_device_of_the_user(server, nursery):
    api = server.api
    phone = await api.signup_login("alice")
    laptop = await api.login("alice")
    bob = await api.signup_login("bob")
    sockets = [await open_client(nursery, server.ws_url, t["token"]) for t in (phone, laptop, laptop)]
    bob_socket = await open_client(nursery, server.ws_url, bob["token"])
    r = await api.call("POST", "/v1/logout", {"all": True}, token=laptop["token"])
    assert r.status == 200 and r.body["all"] is True
    for s in sockets:
        assert (await s.wait_closed()).code == 4001
    for t in (phone, laptop):
        assert await refused(server, nursery, t["token"])
    assert (await api.call("GET", "/v1/devices", token=bob["token"])).status == 200
    assert (await bob_socket.request({"type": "presence", "user_ids": [bob["user"]["id"]]}))["type"] == "presence"
    fresh = await api.login("alice", device_id=phone["device_id"])
    assert not await refused(server, nursery, fresh["token"])
    r = await api.call("GET", "/v1/devices", token=fresh["token"])
    assert [d["id"] for d in r.body["devices"]] == [phone["device_id"]]  # only what logged in since


async def test_devices_are_listed_and_one_can_be_logged_out(server, nursery):
    api = server.api
    phone = await api.signup_login("alice")
    laptop = await api.login("alice")
    bob = await api.signup_login("bob")
    r = await api.call("GET", "/v1/devices", token=laptop["token"])
    assert r.status == 200
    devices = {d["id"]: d for d in r.body["devices"]}
    assert set(devices) == {phone["device_id"], laptop["device_id"]}
    assert devices[laptop["device_id"]]["current"] and not devices[phone["device_id"]]["current"]
    assert devices[phone["device_id"]]["created_at"] <= devices[phone["device_id"]]["last_login_at"]
    phone_socket = await open_client(nursery, server.ws_url, phone["token"])
    laptop_socket = await open_client(nursery, server.ws_url, laptop["token"])

    # another user's device, or one that does not exist, is not found (and nothing happens)
    for device in (bob["device_id"], "nope", "x" * 100):
        r = await api.call("DELETE", f"/v1/devices/{device}", token=laptop["token"])
        assert (r.status, r.body["error"]["code"]) == (404, "not_found"), device
    assert not await refused(server, nursery, bob["token"])

    r = await api.call("DELETE", f"/v1/devices/{phone['device_id']}", token=laptop["token"])
    assert r.status == 200 and r.body == {"device_id": phone["device_id"], "logged_out": True}
    assert (await phone_socket.wait_closed()).code == 4001
    assert await refused(server, nursery, phone["token"])
    assert not await refused(server, nursery, laptop["token"])
    assert laptop_socket.closed_reason is None
    r = await api.call("GET", "/v1/devices", token=laptop["token"])
    assert [d["id"] for d in r.body["devices"]] == [laptop["device_id"]]


async def test_a_password_change_logs_out_every_other_device_and_reissues_the_callers(server, nursery):
    api = server.api
    phone = await api.signup_login("alice")
    laptop = await api.login("alice")
    phone_socket = await open_client(nursery, server.ws_url, phone["token"])
    laptop_socket = await open_client(nursery, server.ws_url, laptop["token"])
    path = "/v1/users/me/password"

    r = await api.call("POST", path, {"old_password": "wrong-password", "new_password": "n3w-password"},
                       token=laptop["token"])
    assert (r.status, r.body["error"]["code"]) == (403, "forbidden")
    assert not await refused(server, nursery, phone["token"])
    r = await api.call("POST", path, {"old_password": PASSWORD, "new_password": "short"}, token=laptop["token"])
    assert r.status == 400

    r = await api.call("POST", path, {"old_password": PASSWORD, "new_password": "n3w-password"},
                       token=laptop["token"])
    assert r.status == 200 and r.body["device_id"] == laptop["device_id"]
    new_token = r.body["token"]
    for s in (phone_socket, laptop_socket):
        assert (await s.wait_closed()).code == 4001
    for t in (phone["token"], laptop["token"]):
        assert await refused(server, nursery, t)
    assert not await refused(server, nursery, new_token)
    r = await api.call("GET", "/v1/devices", token=new_token)
    assert [d["id"] for d in r.body["devices"]] == [laptop["device_id"]]
    assert (await api.call("POST", "/v1/login", {"username": "alice", "password": PASSWORD})).status == 401
    assert (await api.call("POST", "/v1/login", {"username": "alice", "password": "n3w-password"})).status == 200


async def test_a_token_without_iat_is_older_than_any_cutoff(server, nursery):
    """Tokens issued before chatd had cut-offs carry no ``iat``: they work until a cut-off of their
    user or device, which revokes them."""
    api = server.api
    me = await api.signup_login("alice")
    payload = {"u": me["user"]["id"], "d": me["device_id"], "exp": me["expires_at"], "n": "00"}
    signed = "v1." + base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    legacy = f"{signed}.{auth._sign(server.node.secret, signed)}"
    assert auth.token_claims(server.node.secret, legacy).issued_at == 0.0
    assert not await refused(server, nursery, legacy)
    other = await api.login("alice")
    assert (await api.call("POST", "/v1/logout", {"all": True}, token=other["token"])).status == 200
    assert await refused(server, nursery, legacy)


def test_tokens_carry_their_issue_time_to_the_millisecond():
    token, _ = auth.issue_token("s" * 32, 7, "dev", 60, now=1000.1239)
    assert auth.token_claims("s" * 32, token, now=1001) == (7, "dev", 1060, 1000.123)
    assert auth.issued_at(1000.1239) == 1000.123


def test_the_recent_revocations_window():
    w = RecentRevocations()
    w.add_key("k")
    assert "k" in w and w.refuses("k", 1, "d", 5.0)
    w.add_cutoff(1, "d", 10.0)
    w.add_cutoff(1, "d", 3.0)  # never lowered
    assert w.refuses("x", 1, "d", 9.9) and not w.refuses("x", 1, "d", 10.0)
    assert not w.refuses("x", 1, "e", 9.9) and not w.refuses("x", 2, "d", 9.9)
    w.add_cutoff(1, None, 20.0)
    assert w.refuses("x", 1, "e", 19.0) and not w.refuses("x", 1, "e", 20.0)
    assert token_key("a") != token_key("b")


async def test_a_cutoff_frame_closes_only_the_sessions_of_older_tokens(server, nursery):
    """What a shard does with a peer's ``logout_all``: sessions whose token was issued before the
    cut-off close with 4001, newer ones stay; the window refuses the older token at once, before
    (here: without) any store record."""
    from chatd.protocol import link_frames as lf

    api = server.api
    old = await api.signup_login("alice")
    cut = auth.issued_at() + 0.001
    while auth.issued_at() < cut:  # the next token is issued at or after the cut-off
        pass
    new = await api.login("alice", device_id=old["device_id"])
    old_socket = await open_client(nursery, server.ws_url, old["token"])
    new_socket = await open_client(nursery, server.ws_url, new["token"])
    await server.node.on_link_frame(None, lf.LogoutAll(old["user"]["id"], cut))
    assert (await old_socket.wait_closed()).code == 4001
    c = await open_client(nursery, server.ws_url)
    assert (await c.request({"type": "auth", "token": old["token"]}))["code"] == "invalid_token"
    assert (await new_socket.request({"type": "presence", "user_ids": [1]}))["type"] == "presence"
    assert new_socket.closed_reason is None


async def test_a_v5_sqlite_database_keeps_its_devices_and_revocations(tmp_path):
    """Schema v6 (cut-offs, the device list) on a database of the version before: its devices are
    listed (last login = first login), its revoked tokens stay revoked."""
    import sqlite3

    from chatd.store.sqlite import MIGRATIONS, open_sqlite

    path = str(tmp_path / "v5.sqlite")
    with sqlite3.connect(path) as c:
        for version, statements in MIGRATIONS:
            if version <= 5:
                for sql in statements:
                    c.execute(sql)
        c.execute("PRAGMA user_version=5")
        c.execute("INSERT INTO users (id, username, password_hash, created_at) VALUES (1, 'alice', 'h', 1.0)")
        c.execute("INSERT INTO devices (id, user_id, created_at) VALUES ('phone', 1, 2.0)")
        c.execute("INSERT INTO revoked_tokens VALUES ('k', 1, 'phone', 1e12)")
    async with open_sqlite(path) as store:
        assert await store.devices_of(1) == [Device("phone", 2.0, 2.0)]
        assert await store.token_revoked("k", 1, "phone", 5.0)
        assert not await store.token_revoked("other", 1, "phone", 5.0)
