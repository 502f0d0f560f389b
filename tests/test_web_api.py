"""What the web client needs from the API, over real HTTP: the static files at GET / (packaged,
nothing loaded from elsewhere, no path out of chatd/web), a user by username, where to reconnect
with only a token, and a group's owner in its member list."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import PASSWORD

WEB = Path(__file__).parent.parent / "chatd" / "web"


async def test_index_and_static_files(server):
    api = server.api
    r = await api.call("GET", "/")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
    assert '<script type="module" src="/web/js/main.js">' in r.body
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    for src in re.findall(r'(?:src|href)="(/web/[^"]+)"', r.body):
        assert (await api.call("GET", src)).status == 200, src
    r = await api.call("GET", "/web/js/main.js")
    assert r.status == 200 and "javascript" in r.headers["Content-Type"]
    for bad in ("/web/../api/app.py", "/web/%2e%2e/api/app.py", "/web/nothing.js", "/web/"):
        assert (await api.call("GET", bad)).status == 404, bad


def test_web_client_loads_nothing_from_elsewhere():
    """No CDN, no web font, no remote script: every URL in the client is relative to its origin."""
    files = [p for p in WEB.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"index.html", "app.css", "main.js", "connection.js"}
    for p in files:
        # a namespace name is an identifier, never fetched (document.createElementNS)
        text = p.read_text().replace('"http://www.w3.org/2000/svg"', '"<svg namespace>"')
        assert not re.search(r"(?i:https?://|wss?://|(?:src|href)\s*=\s*[\"']//|@import)|\burl\(", text), p


async def test_user_by_name_connect_and_owner(server):
    api = server.api
    alice = await api.signup_login("alice")
    bob = await api.signup_login("bob")
    t = alice["token"]
    r = await api.call("GET", "/v1/users/by-name/BOB", token=t)  # case-insensitive, like login
    assert r.status == 200 and r.body["user"]["id"] == bob["user"]["id"] and "password" not in str(r.body)
    r = await api.call("GET", "/v1/users/by-name/nobody", token=t)
    assert r.status == 404 and r.body["error"]["code"] == "no_such_user"
    assert (await api.call("GET", "/v1/users/by-name/bob")).status == 401
    r = await api.call("GET", "/v1/connect", token=t)
    assert r.status == 200 and r.body["ws_url"] == alice["ws_url"] and r.body["device_id"] == alice["device_id"]
    assert (await api.call("GET", "/v1/connect", token=t[:-3] + "abc")).body["error"]["code"] == "invalid_token"
    r = await api.call("POST", "/v1/groups", {"name": "g", "members": [bob["user"]["id"]]}, token=bob["token"])
    g = r.body["channel"]["id"]
    r = await api.call("GET", f"/v1/channels/{g}/members", token=t)
    assert r.status == 403 or r.body["error"]["code"] == "not_member"
    r = await api.call("GET", f"/v1/channels/{g}/members", token=bob["token"])
    assert {k: v for k, v in r.body.items() if k != "users"} == {
        "channel_id": g, "members": [bob["user"]["id"]], "owner_id": bob["user"]["id"]}
    assert [u["username"] for u in r.body["users"]] == ["bob"]
    dm = f"dm:{alice['user']['id']}:{bob['user']['id']}"
    r = await api.call("GET", f"/v1/channels/{dm}/members", token=t)
    assert r.body["owner_id"] is None
    assert PASSWORD not in str(r.body)
