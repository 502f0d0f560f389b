"""The HTTP API as a contract, over real HTTP: ``/openapi.json`` is valid OpenAPI 3.x and names
every route; a keep-alive client survives early answers; what does not decode is a 400 with the
documented error body; README and docs/protocol.md agree with what the server answers."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import trio
from openapi_spec_validator import validate

from chatd.errors import CODES
from tests.helpers import PASSWORD

ROOT = Path(__file__).resolve().parent.parent


async def test_openapi_is_valid_and_names_every_route(server):
    r = await server.api.call("GET", "/openapi.json")
    assert r.status == 200
    spec = r.body
    validate(spec)  # raises on anything that is not OpenAPI 3.x
    assert spec["openapi"].startswith("3.")
    app_routes = set()
    from chatd.api.app import create_app
    for rule in create_app(server.node).url_map.iter_rules():
        # not JSON API: Prometheus text, the spec itself, the web client's static files
        if rule.rule in ("/metrics", "/openapi.json", "/", "/web/<path:name>") or rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        app_routes |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {(p, m) for p, ops in spec["paths"].items() for m in ops}
    assert app_routes == documented
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            err = op["responses"]["400"]["content"]["application/json"]["schema"]
            assert err["properties"]["error"] == {"$ref": "#/components/schemas/ErrorDetail"}, (path, method)
    assert set(spec["components"]["schemas"]["ErrorDetail"]["properties"]["code"]["enum"]) == set(CODES)


async def _early_answer_then_reuse(client: httpx.AsyncClient, method: str, path: str, body: bytes,
                                   headers: dict, expect: int) -> None:
    """Send the head of a request, the body only after a pause (the server answers early, before
    it read the body), then a second request on the same pooled connection: it must be answered."""
    async def slow_body():
        yield body[:1]
        await trio.sleep(0.02)
        yield body[1:]

    h = {"content-length": str(len(body)), "content-type": "application/json", **headers}
    try:
        r = await client.request(method, path, content=slow_body(), headers=h)
        assert r.status_code == expect, r.text
        assert r.json()["error"]["code"]
    except httpx.WriteError:
        assert expect == 413  # the server closed a connection that still had a megabyte to send
    r = await client.get("/healthz")
    assert r.status_code == 200


async def test_keep_alive_survives_early_answers(server):
    """Regression (issue 12, item 1): an answer sent before the body was read left the connection
    unusable: the next request on it was never answered (hypercorn), 5-14 of 20 tries."""
    api = server.api
    owner, other = await api.signup_login("owner"), await api.signup_login("other")
    g = (await api.call("POST", "/v1/groups", {"name": "g", "members": []}, token=owner["token"])).body["channel"]["id"]
    member = b'{"user_id": %d}' % other["user"]["id"]
    cases = [("POST", "/v1/groups", b'{"name": "x", "members": []}', {}, 401),
             ("PATCH", "/v1/users/me", b'{"about": "x"}', {}, 401),
             ("POST", "/v1/push/tokens", b'{"provider": "fcm", "token": "t"}', {}, 401),
             ("POST", f"/v1/channels/{g}/members", member, {"authorization": f"Bearer {other['token']}"}, 403),
             ("POST", "/v1/nothing-here", b'{"a": 1}', {}, 404),
             ("DELETE", "/v1/users", b'{"a": 1}', {}, 405),
             ("POST", "/v1/users", b"x" * (1024 * 1024 + 1), {}, 413)]
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=server.info.api_url, timeout=10, limits=limits) as client:
        for _ in range(10):
            for case in cases:
                with trio.fail_after(15):
                    await _early_answer_then_reuse(client, *case)


@pytest.mark.parametrize("path", ["/v1/users", "/v1/login"])
async def test_non_utf8_body_is_a_400(server, path):
    """Regression (issue 12, item 2): a body that is not UTF-8 was a 500 with a traceback."""
    for raw in (b'{"username": "al\xffice", "password": "password-123"}', b"\xff\xfe{}", b"\x80"):
        r = await server.api.call("POST", path, raw=raw)
        assert r.status == 400 and r.body["error"]["code"] == "bad_request", (raw, r)
        assert "UTF-8" in r.body["error"]["message"]


async def test_what_the_store_cannot_keep_is_a_400(server):
    """Lone surrogates (valid JSON escapes) never reach the store."""
    me = await server.api.signup_login("alice")
    for path, method, raw in [("/v1/users", "POST", b'{"username": "bob", "password": "password-123", "display_name": "x\\ud83d"}'),
                              ("/v1/users/me", "PATCH", b'{"about": "\\udc00 cut"}')]:
        r = await server.api.call(method, path, raw=raw, token=me["token"])
        assert r.status == 400 and r.body["error"]["code"] == "bad_request", r


async def test_found_by_schemathesis(server):
    """Regressions for what the fuzzer found: a member id above 64 bits was a 500 (the store
    overflowed); 405 answers lacked the ``Allow`` header."""
    api = server.api
    a = await api.signup_login("alice")
    g = (await api.call("POST", "/v1/groups", {"name": "g"}, token=a["token"])).body["channel"]["id"]
    r = await api.call("DELETE", f"/v1/channels/{g}/members/208576174017105686628841553920", token=a["token"])
    assert r.status == 404 and r.body["error"]["code"] == "no_such_user", r
    r = await api.call("TRACE", "/v1/channels")
    assert r.status == 405 and r.headers["Allow"] and "GET" in r.headers["Allow"], r
    # integral JSON numbers are integers (JSON Schema), strings are not
    b = await api.signup_login("bob")
    r = await api.call("POST", f"/v1/channels/{g}/members", raw=b'{"user_id": %d.0}' % b["user"]["id"], token=a["token"])
    assert r.status == 200 and r.body["added"] is True, r
    r = await api.call("POST", f"/v1/channels/{g}/members", {"user_id": str(b["user"]["id"])}, token=a["token"])
    assert r.status == 400


async def test_presence_answers_as_readme_documents(server):
    """Regression (issue 12, item 12): README documented one shape, the server answered another."""
    api = server.api
    a, b = await api.signup_login("alice"), await api.signup_login("bob")
    readme = (ROOT / "README.md").read_text()
    rows = {row.split("|")[1].strip(): row.split("|")[3].strip() for row in readme.splitlines()
            if row.startswith("| `GET /v1/") and "presence" in row}
    answers = {"`GET /v1/presence?user_ids=1,2`": (await api.call("GET", f"/v1/presence?user_ids={b['user']['id']}",
                                                                  token=a["token"])).body,
               "`GET /v1/users/<id>/presence`": (await api.call("GET", f"/v1/users/{b['user']['id']}/presence",
                                                                token=a["token"])).body}
    assert set(rows) == set(answers), rows
    for route, body in answers.items():
        documented = rows[route]
        keys = re.findall(r"(\w+)", documented.replace("id:", ""))
        assert set(keys) >= set(body), (route, documented, body)
        top = re.match(r"`\{(\w+(?:, \w+)*)", documented).group(1).split(", ")
        assert set(top) == set(body), (route, documented, body)


def test_every_error_code_is_documented():
    """Regression (issue 12, item 13): ``bad_request``, ``forbidden``, ``not_found`` were sent
    but not listed in docs/protocol.md."""
    doc = (ROOT / "docs" / "protocol.md").read_text()
    missing = [code for code in CODES if f"`{code}`" not in doc]
    assert not missing, missing


async def test_login_with_a_password_of_spaces_is_not_a_400(server):
    """The models keep what the hand-written checks allowed."""
    api = server.api
    r = await api.call("POST", "/v1/users", {"username": "sp.ace_1", "password": " " * 8, "display_name": ""})
    assert r.status == 201 and r.body["user"]["display_name"] == ""
    r = await api.call("POST", "/v1/login", {"username": "sp.ace_1", "password": " " * 8})
    assert r.status == 200
    r = await api.call("POST", "/v1/login", {"username": "sp.ace_1", "password": PASSWORD, "extra": [1, {"x": 2}]})
    assert r.status == 401 and r.body["error"]["code"] == "bad_credentials"


async def test_authentication_comes_before_the_body(server):
    """A request without a valid token is a 401 whatever its body (the models decode after the
    token check)."""
    for method, path in [("POST", "/v1/groups"), ("PATCH", "/v1/users/me"), ("POST", "/v1/push/tokens")]:
        r = await server.api.call(method, path, raw=b"\xff not json")
        assert r.status == 401 and r.body["error"]["code"] == "not_authenticated", (path, r)
