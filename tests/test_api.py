"""The HTTP API over real HTTP: validation, auth, profiles, groups, channel list, history,
health and metrics. Bad input is always a 4xx with a stable code, never a 500."""

from __future__ import annotations

import pytest
import trio

from chatd import auth
from chatd.api.spec import route
from chatd.auth import issue_token
from chatd.errors import ChatError
from chatd.revocation import token_key
from tests.conftest import RunningServer, make_config
from tests.helpers import PASSWORD, open_client


async def test_signup_validation_and_login(server):
    api = server.api
    for body, code in [({"username": "ab", "password": PASSWORD}, "bad_request"),
                       ({"username": "has space", "password": PASSWORD}, "bad_request"),
                       ({"username": "alice", "password": "short"}, "bad_request"),
                       ({"username": "alice"}, "bad_request"),
                       ({"username": 5, "password": PASSWORD}, "bad_request"),
                       ([1, 2], "bad_request")]:
        r = await api.call("POST", "/v1/users", body)
        assert r.status == 400 and r.body["error"]["code"] == code, (body, r)
    r = await api.call("POST", "/v1/users", raw=b"{not json")
    assert r.status == 400 and r.body["error"]["code"] == "bad_request"
    r = await api.call("POST", "/v1/users", {"username": "alice", "password": PASSWORD, "display_name": "Alice"})
    assert r.status == 201 and r.body["user"]["display_name"] == "Alice" and "password" not in str(r.body)
    r = await api.call("POST", "/v1/users", {"username": "ALICE", "password": PASSWORD})
    assert r.status == 409 and r.body["error"]["code"] == "username_taken"
    r = await api.call("POST", "/v1/login", {"username": "alice", "password": "wrong-password"})
    assert r.status == 401 and r.body["error"]["code"] == "bad_credentials"
    r = await api.call("POST", "/v1/login", {"username": "nobody", "password": PASSWORD})
    assert r.status == 401 and r.body["error"]["code"] == "bad_credentials"
    r = await api.call("POST", "/v1/login", {"username": "alice", "password": PASSWORD})
    assert r.status == 200 and r.body["ws_url"] == server.ws_url and r.body["token"].startswith("v1.")
    # the stored hash is scrypt, never the password
    user = await server.node.store.get_user_by_name("alice")
    assert user.password_hash.startswith("scrypt$") and PASSWORD not in user.password_hash


async def test_tokens_are_checked(server):
    api = server.api
    me = await api.signup_login("alice")
    assert (await api.call("GET", "/v1/users/me")).body["error"]["code"] == "not_authenticated"
    bad = me["token"][:-2] + ("xx" if not me["token"].endswith("xx") else "yy")
    r = await api.call("GET", "/v1/users/me", token=bad)
    assert r.status == 401 and r.body["error"]["code"] == "invalid_token"
    expired, _ = issue_token(server.node.secret, me["user"]["id"], me["device_id"], -1)
    r = await api.call("GET", "/v1/users/me", token=expired)
    assert r.status == 401 and r.body["error"]["code"] == "token_expired"


async def test_profile(server):
    api = server.api
    me = await api.signup_login("alice")
    t = me["token"]
    r = await api.call("PATCH", "/v1/users/me", {"display_name": "Alice A.", "about": "hi"}, token=t)
    assert r.status == 200 and r.body["user"]["display_name"] == "Alice A." and r.body["user"]["about"] == "hi"
    assert (await api.call("GET", "/v1/users/me", token=t)).body["user"]["about"] == "hi"
    r = await api.call("PATCH", "/v1/users/me", {"display_name": ""}, token=t)
    assert r.status == 400
    r = await api.call("GET", f"/v1/users/{me['user']['id']}", token=t)
    assert r.body["user"]["username"] == "alice"
    r = await api.call("GET", "/v1/users/424242", token=t)
    assert r.status == 404 and r.body["error"]["code"] == "no_such_user"
    r = await api.call("GET", "/v1/users/99999999999999999999999", token=t)
    assert r.status == 404


@pytest.fixture
async def capped(nursery, tmp_path):
    srv = RunningServer(nursery, make_config(tmp_path, max_group_members=3))
    await srv.start()
    yield srv
    await srv.stop()


async def test_groups_and_membership(capped):
    api = capped.api
    a, b, c, d = [await api.signup_login(n) for n in ("alice", "bob", "carol", "dave")]
    ids = {n: x["user"]["id"] for n, x in zip("abcd", (a, b, c, d))}
    r = await api.call("POST", "/v1/groups", {"name": "too big", "members": [ids["b"], ids["c"], ids["d"]]}, token=a["token"])
    assert r.status == 409 and r.body["error"]["code"] == "group_full"
    r = await api.call("POST", "/v1/groups", {"name": "ghosts", "members": [777]}, token=a["token"])
    assert r.status == 404 and r.body["error"]["code"] == "no_such_user"
    r = await api.call("POST", "/v1/groups", {"name": "", "members": []}, token=a["token"])
    assert r.status == 400
    r = await api.call("POST", "/v1/groups", {"name": "g", "members": ["bob"]}, token=a["token"])
    assert r.status == 400
    r = await api.call("POST", "/v1/groups", {"name": "trio", "members": [ids["b"]]}, token=a["token"])
    assert r.status == 201
    g = r.body["channel"]["id"]
    assert r.body["channel"]["members"] == sorted([ids["a"], ids["b"]])
    # only the owner adds
    r = await api.call("POST", f"/v1/channels/{g}/members", {"user_id": ids["c"]}, token=b["token"])
    assert r.status == 403 and r.body["error"]["code"] == "forbidden"
    r = await api.call("POST", f"/v1/channels/{g}/members", {"user_id": ids["c"]}, token=a["token"])
    assert r.status == 200 and r.body["added"] is True
    r = await api.call("POST", f"/v1/channels/{g}/members", {"user_id": ids["c"]}, token=a["token"])
    assert r.body["added"] is False
    r = await api.call("POST", f"/v1/channels/{g}/members", {"user_id": ids["d"]}, token=a["token"])
    assert r.status == 409 and r.body["error"]["code"] == "group_full"
    r = await api.call("GET", f"/v1/channels/{g}/members", token=c["token"])
    assert r.body["members"] == sorted([ids["a"], ids["b"], ids["c"]])
    names = {ids["a"]: "alice", ids["b"]: "bob", ids["c"]: "carol"}  # profiles ride along, in the same order
    assert [(u["id"], u["username"]) for u in r.body["users"]] == [(i, names[i]) for i in r.body["members"]]
    r = await api.call("GET", f"/v1/channels/{g}/members", token=d["token"])
    assert r.status == 403 and r.body["error"]["code"] == "not_member"
    # others can't remove; anyone can leave
    r = await api.call("DELETE", f"/v1/channels/{g}/members/{ids['c']}", token=b["token"])
    assert r.status == 403
    r = await api.call("DELETE", f"/v1/channels/{g}/members/{ids['b']}", token=b["token"])
    assert r.status == 200 and r.body["removed"] is True
    r = await api.call("POST", "/v1/channels/g:0000000000000000/members", {"user_id": ids["c"]}, token=a["token"])
    assert r.status == 404 and r.body["error"]["code"] == "no_such_channel"
    r = await api.call("POST", "/v1/channels/bogus/members", {"user_id": ids["c"]}, token=a["token"])
    assert r.status == 404


async def test_channel_list_unread_and_read_receipts(server, nursery):
    api = server.api
    a, b = await api.signup_login("alice"), await api.signup_login("bob")
    ch = (await api.call("GET", f"/v1/dm/{b['user']['id']}", token=a["token"])).body["channel_id"]
    assert ch == f"dm:{a['user']['id']}:{b['user']['id']}"
    assert (await api.call("GET", f"/v1/dm/{a['user']['id']}", token=a["token"])).status == 404
    ca = await open_client(nursery, a["ws_url"], a["token"])
    cb = await open_client(nursery, b["ws_url"], b["token"])
    for i in range(5):
        await ca.send_message(ch, f"m{i}")
    r = await api.call("GET", "/v1/channels", token=b["token"])
    [entry] = r.body["channels"]
    assert entry["id"] == ch and entry["last_seq"] == 5 and entry["unread"] == 5 and entry["peer_id"] == a["user"]["id"]
    reply = await cb.request({"type": "read", "channel_id": ch, "seq": 3})
    assert reply["seq"] == 3
    receipt = await ca.next_event("receipts")  # shown to the other member, coalesced (issue 21)
    assert receipt == {"type": "receipts", "channel_id": ch,
                       "cursors": {str(b["user"]["id"]): {"delivered": 3, "read": 3}}}
    # never backwards, never past the head
    assert (await cb.request({"type": "read", "channel_id": ch, "seq": 1}))["seq"] == 3
    assert (await cb.request({"type": "read", "channel_id": ch, "seq": 99}))["seq"] == 5
    r = await api.call("GET", "/v1/channels", token=b["token"])
    assert r.body["channels"][0]["unread"] == 0
    # typing reaches the other member, not stored
    assert (await ca.request({"type": "typing", "channel_id": ch}))["type"] == "typing"
    assert await cb.next_event("typing") == {"type": "typing", "channel_id": ch, "user_id": a["user"]["id"]}


async def test_history_paging(server, nursery):
    api = server.api
    a, b = await api.signup_login("alice"), await api.signup_login("bob")
    ch = f"dm:{a['user']['id']}:{b['user']['id']}"
    ca = await open_client(nursery, a["ws_url"], a["token"])
    for i in range(1, 31):
        await ca.send_message(ch, f"m{i}")

    async def page(q):
        r = await api.call("GET", f"/v1/channels/{ch}/messages?{q}", token=b["token"])
        assert r.status == 200, r
        return [m["seq"] for m in r.body["messages"]], r.body["more"]

    assert await page("limit=5") == ([26, 27, 28, 29, 30], True)
    assert await page("before=26&limit=5") == ([21, 22, 23, 24, 25], True)
    assert await page("after=27&limit=5") == ([28, 29, 30], False)
    assert await page("after=5&before=9") == ([6, 7, 8], False)
    for q in ("limit=0", "limit=abc", "after=-1", "limit=100000"):
        r = await api.call("GET", f"/v1/channels/{ch}/messages?{q}", token=b["token"])
        assert r.status == 400 and r.body["error"]["code"] == "bad_request", q
    # the same over the WebSocket
    h = await ca.request({"type": "history", "channel_id": ch, "before": 11, "limit": 3})
    assert [m["seq"] for m in h["messages"]] == [8, 9, 10] and h["more"] is True
    h = await ca.request({"type": "history", "channel_id": ch, "after": 28})
    assert [m["seq"] for m in h["messages"]] == [29, 30] and h["more"] is False


async def test_health_metrics_and_unknown_routes(server, nursery):
    api = server.api
    r = await api.call("GET", "/healthz")
    assert r.status == 200 and r.body["status"] == "ok" and r.body["shards"] == ["shard-1"]
    a, b = await api.signup_login("alice"), await api.signup_login("bob")
    ca = await open_client(nursery, a["ws_url"], a["token"])
    await ca.send_message(f"dm:{a['user']['id']}:{b['user']['id']}", "count me")
    await ca.next_event("message")
    text = (await api.call("GET", "/metrics")).body
    assert "chatd_ws_connections 1" in text
    assert "chatd_messages_in_total 1" in text
    assert "chatd_messages_out_total 1" in text
    assert "chatd_store_append_seconds_count 1" in text
    r = await api.call("GET", "/v1/nothing-here")
    assert r.status == 404 and r.body["error"]["code"] == "not_found"
    r = await api.call("DELETE", "/v1/users")
    assert r.status == 405 and r.body["error"]["code"] == "bad_request"
    r = await api.call("POST", "/v1/users", raw=b"x" * (2 * 1024 * 1024))
    assert r.status == 413


async def test_failed_logins_are_throttled_per_user_and_per_address(nursery, tmp_path):
    cfg = make_config(tmp_path)
    cfg.update({"auth": {"login_failures_per_user_burst": 3, "login_failures_per_user_per_min": 60.0,
                         "login_failures_per_ip_burst": 8, "login_failures_per_ip_per_min": 6.0}}, "test")
    srv = await RunningServer(nursery, cfg).start()
    try:
        api = srv.api
        await api.signup_login("victim")
        await api.signup_login("bystander")  # successful logins never count
        for _ in range(3):
            r = await api.call("POST", "/v1/login", {"username": "victim", "password": "guess-guess"})
            assert r.status == 401 and r.body["error"]["code"] == "bad_credentials"
        # the account's bucket is empty: even the right password is refused, before any hashing
        r = await api.call("POST", "/v1/login", {"username": "Victim", "password": PASSWORD})
        assert r.status == 429 and r.body["error"]["code"] == "rate_limited", r
        assert int(r.headers["Retry-After"]) >= 1
        r = await api.call("POST", "/v1/login", {"username": "bystander", "password": PASSWORD})
        assert r.status == 200  # other accounts are not affected
        with trio.fail_after(10):
            while (r := await api.call("POST", "/v1/login", {"username": "victim", "password": PASSWORD})).status == 429:
                await trio.sleep(0.3)  # one token per second refills
        assert r.status == 200
        # one address guessing across many usernames meets its own bucket (8, minus the 3 above)
        codes = [(await api.call("POST", "/v1/login", {"username": f"nobody{i}", "password": "x"})).status
                 for i in range(7)]
        assert codes[:5] == [401] * 5 and codes[-1] == 429, codes
        r = await api.call("POST", "/v1/login", {"username": "bystander", "password": PASSWORD})
        assert r.status == 429  # the address is throttled for every account now
    finally:
        await srv.stop()


async def test_an_authenticated_request_checks_its_token_once(server, monkeypatch):
    """One signature check and one revocation read per authenticated request, the logout
    included; a forged token costs no store read; a route without authentication checks nothing,
    even when a token comes with the request."""
    api = server.api
    me, bob = await api.signup_login("alice"), await api.signup_login("bob")
    key = token_key(me["token"])
    signed, reads = [], []
    real_sign, real_revoked = auth._sign, server.node.store.token_revoked

    def sign(secret, data):
        signed.append(data)
        return real_sign(secret, data)

    async def revoked(token_key_, *identity):
        reads.append(token_key_)
        return await real_revoked(token_key_, *identity)

    monkeypatch.setattr(auth, "_sign", sign)
    monkeypatch.setattr(server.node.store, "token_revoked", revoked)

    async def checks(method, path, body=None, token=me["token"], status=200):
        signed.clear()
        reads.clear()
        r = await api.call(method, path, body, token=token)
        assert r.status == status, (path, r)
        return len(signed), list(reads)

    for method, path, body, status in [("GET", "/v1/users/me", None, 200),
                                       ("PATCH", "/v1/users/me", {"about": "x"}, 200),
                                       ("GET", f"/v1/users/{bob['user']['id']}", None, 200),
                                       ("GET", "/v1/channels", None, 200),
                                       ("GET", f"/v1/dm/{bob['user']['id']}", None, 200),
                                       ("GET", "/v1/connect", None, 200),
                                       ("POST", "/v1/push/tokens", {"provider": "fcm", "token": "t1"}, 201),
                                       ("POST", "/v1/logout", None, 200)]:
        assert await checks(method, path, body, status=status) == (1, [key]), path
    assert await checks("GET", "/v1/users/me", status=401) == (1, [key])  # revoked by the logout
    forged = me["token"][:-2] + ("xx" if not me["token"].endswith("xx") else "yy")
    assert await checks("GET", "/v1/users/me", token=forged, status=401) == (1, [])
    assert await checks("GET", "/v1/users/me", token=None, status=401) == (0, [])
    assert await checks("GET", "/healthz", token=bob["token"]) == (0, [])


async def test_a_store_failure_while_checking_revocation_refuses_the_token(server, monkeypatch):
    """Never accepted unchecked: the answer is ``unavailable``, and the route does not run."""
    api = server.api
    me = await api.signup_login("alice")

    async def failing(token_key_, *identity):
        raise ChatError("unavailable", "the store is down")

    monkeypatch.setattr(server.node.store, "token_revoked", failing)
    r = await api.call("PATCH", "/v1/users/me", {"about": "changed"}, token=me["token"])
    assert (r.status, r.body["error"]["code"]) == (503, "unavailable"), r
    monkeypatch.undo()
    r = await api.call("GET", "/v1/users/me", token=me["token"])
    assert r.status == 200 and r.body["user"]["about"] == ""


def test_only_an_authenticated_route_takes_a_caller():
    async def handler(caller):
        return {}

    assert route(auth=True)(handler).__name__ == "handler"
    with pytest.raises(TypeError, match="no authentication"):
        route(auth=False)(handler)
