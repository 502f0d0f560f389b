"""The HTTP API under attack: login throttling that cannot lock the owner out (known devices,
trusted proxies), sign-up limits and invites, bounded hashing queues, scrypt re-hash, names,
media types, unauthenticated bodies and timed-out bodies, history byte budget, security events."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import trio
from click.testing import CliRunner

from chatd import auth
from chatd.api import clientaddr
from chatd.api.clientaddr import client_address, parse_networks
from chatd.api.routes import users as user_routes
from chatd.cli import main
from chatd.config import Config
from tests.conftest import RunningServer, make_config
from tests.helpers import PASSWORD


async def start(nursery, tmp_path, auth_cfg=None, server_cfg=None, **limits):
    cfg = make_config(tmp_path, **limits)
    cfg.update({"auth": auth_cfg or {}, "server": server_cfg or {}}, "test")
    cfg.validate()
    return await RunningServer(nursery, cfg).start()


def _raw_http(url, method, data, headers):
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


async def call(srv, method, path, body=None, headers=None, raw=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    h = {"Content-Type": "application/json", **(headers or {})} if data is not None else dict(headers or {})
    return await trio.to_thread.run_sync(_raw_http, srv.info.api_url + path, method, data, h)


def login_body(name, password=PASSWORD, device_id=None):
    return {"username": name, "password": password, **({"device_id": device_id} if device_id else {})}


# ---- finding 4: throttling that cannot be turned against users ------------------------------------
def test_client_address_behind_trusted_proxies():
    trusted = parse_networks(["10.0.0.0/8", "::1"])
    assert client_address("1.2.3.4", ["9.9.9.9"], trusted) == "1.2.3.4"  # an untrusted peer: its own
    assert client_address("10.0.0.5", ["9.9.9.9"], trusted) == "9.9.9.9"
    # what the client wrote itself is left of the proxies' entries: the right-most untrusted hop wins
    assert client_address("10.0.0.5", ["6.6.6.6, 9.9.9.9, 10.1.1.1"], trusted) == "9.9.9.9"
    assert client_address("10.0.0.5", ["6.6.6.6", "9.9.9.9"], trusted) == "9.9.9.9"  # two header lines
    assert client_address("10.0.0.5", [], trusted) == "10.0.0.5"
    assert client_address("10.0.0.5", ["10.0.0.7"], trusted) == "10.0.0.5"  # all trusted: the peer
    assert client_address("::1", ['for=6.6.6.6, for="[2001:db8::17]:4711";proto=https'], trusted,
                          "forwarded") == "2001:db8::17"
    assert client_address("10.0.0.5", ["for=1.2.3.4:80"], trusted, "forwarded") == "1.2.3.4"
    assert client_address("10.0.0.5", ["unknown"], trusted) == "unknown"
    assert client_address("1.2.3.4", ["9.9.9.9"], ()) == "1.2.3.4"  # nothing trusted: headers ignored


def test_config_of_proxies_and_registration():
    assert Config().auth.scrypt_n == 2**17 and Config().auth.registration == "open"
    cfg = Config.load(env={"CHATD_SERVER__TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.1"})
    assert cfg.server.trusted_proxies == ["10.0.0.0/8", "192.168.1.1"]
    for bad in ({"server": {"trusted_proxies": ["not-an-address"]}}, {"auth": {"registration": "maybe"}},
                {"server": {"proxy_header": "x-real-ip"}}):
        with pytest.raises(ValueError):
            Config.load(overrides=bad, env={})


async def test_the_owner_logs_in_from_a_known_device_while_the_account_is_attacked(nursery, tmp_path):
    srv = await start(nursery, tmp_path, {"login_failures_per_user_burst": 3, "login_failures_per_user_per_min": 0.01})
    me = await srv.api.signup_login("victim")
    for _ in range(3):
        status, body, _ = await call(srv, "POST", "/v1/login", login_body("victim", "guess-guess"))
        assert status == 401 and body["error"]["code"] == "bad_credentials"
    status, body, _ = await call(srv, "POST", "/v1/login", login_body("victim"))
    assert status == 429  # a new device still meets the account's bucket
    status, body, _ = await call(srv, "POST", "/v1/login", login_body("victim", device_id="made-up-device"))
    assert status == 429  # a device id the account does not have is no device of its
    status, body, _ = await call(srv, "POST", "/v1/login", login_body("victim", device_id=me["device_id"]))
    assert status == 200 and body["device_id"] == me["device_id"], body
    # failures on the known device are counted for that device (3 of them), not let through
    for _ in range(3):
        status, _, _ = await call(srv, "POST", "/v1/login", login_body("victim", "guess", me["device_id"]))
        assert status == 401
    status, _, _ = await call(srv, "POST", "/v1/login", login_body("victim", device_id=me["device_id"]))
    assert status == 429


async def test_behind_a_trusted_proxy_each_client_has_its_own_address_bucket(nursery, tmp_path):
    srv = await start(nursery, tmp_path, {"login_failures_per_ip_burst": 3, "login_failures_per_ip_per_min": 0.01},
                      {"trusted_proxies": ["127.0.0.1"]})
    await srv.api.signup_login("alice")
    attacker, alice = {"X-Forwarded-For": "203.0.113.9"}, {"X-Forwarded-For": "198.51.100.7"}
    for i in range(3):
        status, _, _ = await call(srv, "POST", "/v1/login", login_body(f"nobody{i}", "x"), attacker)
        assert status == 401
    status, _, _ = await call(srv, "POST", "/v1/login", login_body("alice"), attacker)
    assert status == 429
    status, _, _ = await call(srv, "POST", "/v1/login", login_body("alice"), alice)
    assert status == 200  # the proxy's other clients are not throttled
    # a client cannot pick its address: what it writes is left of what the proxy appends
    status, _, _ = await call(srv, "POST", "/v1/login", login_body("alice"),
                              {"X-Forwarded-For": "198.51.100.99, 203.0.113.9"})
    assert status == 429


async def test_without_trusted_proxies_forwarded_headers_are_ignored(nursery, tmp_path):
    srv = await start(nursery, tmp_path, {"login_failures_per_ip_burst": 2, "login_failures_per_ip_per_min": 0.01})
    await srv.api.signup_login("alice")
    for i in range(2):
        status, _, _ = await call(srv, "POST", "/v1/login", login_body(f"nobody{i}", "x"),
                                  {"X-Forwarded-For": f"203.0.113.{i}"})
        assert status == 401
    status, _, _ = await call(srv, "POST", "/v1/login", login_body("alice"), {"X-Forwarded-For": "198.51.100.7"})
    assert status == 429


# ---- finding 5: sign-up ---------------------------------------------------------------------------
async def test_sign_ups_are_limited_per_address(nursery, tmp_path):
    srv = await start(nursery, tmp_path, {"signups_per_ip_burst": 2, "signups_per_ip_per_hour": 1.0},
                      {"trusted_proxies": ["127.0.0.1"]})
    one = {"X-Forwarded-For": "203.0.113.1"}
    for name in ("aaa1", "aaa2"):
        status, _, _ = await call(srv, "POST", "/v1/users", {"username": name, "password": PASSWORD}, one)
        assert status == 201
    status, body, headers = await call(srv, "POST", "/v1/users", {"username": "aaa3", "password": PASSWORD}, one)
    assert status == 429 and body["error"]["code"] == "rate_limited"
    assert 3000 <= int(headers["Retry-After"]) <= 3600
    assert await srv.node.store.get_user_by_name("aaa3") is None
    status, _, _ = await call(srv, "POST", "/v1/users", {"username": "bbb1", "password": PASSWORD},
                              {"X-Forwarded-For": "203.0.113.2"})
    assert status == 201
    for i in range(4):  # this host is exempt in the tests' config (auth.signups_unthrottled)
        status, _, _ = await call(srv, "POST", "/v1/users", {"username": f"local{i}", "password": PASSWORD})
        assert status == 201


def test_no_address_is_exempt_from_sign_up_throttling_by_default():
    from chatd.config import Config
    assert Config.from_mapping({}).auth.signups_unthrottled == []


async def test_loopback_sign_ups_are_throttled_when_not_exempt(nursery, tmp_path):
    srv = await start(nursery, tmp_path, {"signups_per_ip_burst": 1, "signups_unthrottled": []})
    status, _, _ = await call(srv, "POST", "/v1/users", {"username": "aaa1", "password": PASSWORD})
    assert status == 201
    status, body, _ = await call(srv, "POST", "/v1/users", {"username": "aaa2", "password": PASSWORD})
    assert status == 429 and body["error"]["code"] == "rate_limited"


async def test_closed_registration(nursery, tmp_path):
    srv = await start(nursery, tmp_path, {"registration": "closed"})
    status, body, _ = await call(srv, "POST", "/v1/users", {"username": "alice", "password": PASSWORD})
    assert status == 403 and body["error"]["code"] == "registration_closed"
    assert await srv.node.store.get_user_by_name("alice") is None


async def test_invites(nursery, tmp_path):
    srv = await start(nursery, tmp_path, {"registration": "invite", "secret": "s" * 40})
    toml = tmp_path / "chatd.toml"
    toml.write_text(f'data_dir = "{tmp_path / "data"}"\n[auth]\nsecret = "{"s" * 40}"\n')
    result = CliRunner().invoke(main, ["admin", "invite", "--config", str(toml), "--uses", "2", "--ttl-s", "600"])
    assert result.exit_code == 0, result.output
    invite = result.output.strip()
    assert invite.startswith("inv1.") and len(invite.splitlines()) == 1

    async def sign_up(name, **extra):
        return await call(srv, "POST", "/v1/users", {"username": name, "password": PASSWORD, **extra})

    status, body, _ = await sign_up("nobody")
    assert status == 403 and body["error"]["code"] == "invite_invalid"
    forged = invite[:-3] + ("AAA" if not invite.endswith("AAA") else "BBB")
    status, body, _ = await sign_up("forger", invite=forged)
    assert status == 403 and body["error"]["code"] == "invite_invalid"
    status, _, _ = await sign_up("first", invite=invite)
    assert status == 201
    status, body, _ = await sign_up("first", invite=invite)
    assert status == 409  # a taken name spends no use
    status, _, _ = await sign_up("second", invite=invite)
    assert status == 201
    status, body, _ = await sign_up("third", invite=invite)
    assert status == 403 and body["error"]["code"] == "invite_invalid" and "used up" in body["error"]["message"]
    expired, _, _ = auth.issue_invite(srv.node.secret, 5, -1)
    status, body, _ = await sign_up("late", invite=expired)
    assert status == 403 and "expired" in body["error"]["message"]
    # a login token is no invite
    me = await srv.api.login("first")
    status, body, _ = await sign_up("tokenuser", invite=me["token"])
    assert status == 403 and body["error"]["code"] == "invite_invalid"


async def test_a_full_sign_up_queue_is_503_and_never_delays_logins(nursery, tmp_path, monkeypatch):
    srv = await start(nursery, tmp_path, {"signup_hashing_threads": 1, "login_hashing_threads": 1,
                                          "hashing_queue_max": 2})
    await srv.api.signup_login("alice")
    release = threading.Event()
    real_hash = auth.hash_password

    def slow_hash(password, n):
        release.wait(20)
        return real_hash(password, n)

    monkeypatch.setattr(user_routes, "hash_password", slow_hash)
    results = []

    async def sign_up(i):
        results.append(await call(srv, "POST", "/v1/users", {"username": f"flood{i}", "password": PASSWORD}))

    try:
        async with trio.open_nursery() as flood:
            for i in range(3):  # one hashing, two waiting: the queue is full
                flood.start_soon(sign_up, i)
            with trio.fail_after(10):
                while _waiting_signups() < 2:
                    await trio.sleep(0.01)
            status, body, headers = await call(srv, "POST", "/v1/users", {"username": "more", "password": PASSWORD})
            assert status == 503 and body["error"]["code"] == "unavailable" and int(headers["Retry-After"]) >= 1
            with trio.fail_after(5):  # logins hash in their own pool
                status, body, _ = await call(srv, "POST", "/v1/login", login_body("alice"))
            assert status == 200
            release.set()
    finally:
        release.set()
    assert sorted(r[0] for r in results) == [201, 201, 201]


_pools: list = []  # the hashing pools the servers of a test made


def _waiting_signups() -> int:
    return sum(p.waiting for p in _pools if p.name == "sign-up")


@pytest.fixture(autouse=True)
def _record_pools(monkeypatch):
    from chatd.api import hashing
    real_init = hashing.HashingPool.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        _pools.append(self)

    monkeypatch.setattr(hashing.HashingPool, "__init__", init)
    yield
    _pools.clear()


async def test_a_weaker_hash_is_replaced_at_login(nursery, tmp_path):
    srv = await start(nursery, tmp_path, {"scrypt_n": 2**11})
    await srv.api.signup_login("alice")
    store = srv.node.store
    user = await store.get_user_by_name("alice")
    assert user.password_hash.startswith("scrypt$2048$8$1$")
    await store.set_password_hash(user.id, auth.hash_password(PASSWORD, 2**9))
    status, _, _ = await call(srv, "POST", "/v1/login", login_body("alice"))
    assert status == 200
    stored = (await store.get_user(user.id)).password_hash
    assert stored.startswith("scrypt$2048$8$1$") and auth.verify_password(PASSWORD, stored)
    status, _, _ = await call(srv, "POST", "/v1/login", login_body("alice", "wrong-password"))
    assert status == 401 and (await store.get_user(user.id)).password_hash == stored


def test_owasp_scrypt_parameters_hash_and_verify():
    stored = auth.hash_password("pw", 2**17)
    assert stored.startswith("scrypt$131072$8$1$") and auth.verify_password("pw", stored)
    assert auth.needs_rehash("scrypt$32768$8$1$x$y", 2**17) and not auth.needs_rehash(stored, 2**17)


# ---- names, media types ---------------------------------------------------------------------------
async def test_names_refuse_control_and_format_characters(server):
    me = await server.api.signup_login("alice")
    t = me["token"]
    for bad in ("evil\u202egnp.exe", "nul\x00", "line\u2028break", "zero\u200bwidth", "\u2066isolate", "bell\x07",
                "private\ue000"):
        r = await server.api.call("PATCH", "/v1/users/me", {"display_name": bad}, token=t)
        assert r.status == 400 and r.body["error"]["code"] == "bad_field", (bad, r)
        r = await server.api.call("POST", "/v1/groups", {"name": bad}, token=t)
        assert r.status == 400 and r.body["error"]["code"] == "bad_field", (bad, r)
        r = await server.api.call("POST", "/v1/users", {"username": "bobby", "password": PASSWORD, "display_name": bad})
        assert r.status == 400 and r.body["error"]["code"] == "bad_field", (bad, r)
    assert await server.node.store.get_user_by_name("bobby") is None
    for good in ("Zoë 👨\u200d👩\u200d👧", "❤\ufe0f love", "עברית", "名前"):
        r = await server.api.call("PATCH", "/v1/users/me", {"display_name": good}, token=t)
        assert r.status == 200 and r.body["user"]["display_name"] == good, (good, r)
        r = await server.api.call("POST", "/v1/groups", {"name": good}, token=t)
        assert r.status == 201, (good, r)
    r = await server.api.call("PATCH", "/v1/users/me", {"display_name": "a\u200db"}, token=t)
    assert r.status == 400  # a joiner between letters is no emoji sequence


async def test_json_bodies_need_the_json_media_type(server):
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": ctype} if ctype else {}
        raw = json.dumps({"username": "alice", "password": PASSWORD}).encode()
        status, body, _ = await trio.to_thread.run_sync(_raw_http_typed, server.info.api_url + "/v1/users", raw, headers)
        assert status == 415 and body["error"]["code"] == "unsupported_media_type", (ctype, body)
    assert await server.node.store.get_user_by_name("alice") is None
    status, _, _ = await call(server, "POST", "/v1/users", {"username": "alice", "password": PASSWORD},
                              {"Content-Type": "application/json; charset=utf-8"})
    assert status == 201
    spec = (await server.api.call("GET", "/openapi.json")).body
    assert "415" in spec["paths"]["/v1/users"]["post"]["responses"]
    assert "415" not in spec["paths"]["/v1/channels"]["get"]["responses"]


def _raw_http_typed(url, data, headers):
    """urllib adds a form Content-Type to a POST without one: a raw request keeps it out."""
    if "Content-Type" in headers:
        return _raw_http(url, "POST", data, headers)
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/users HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        status, _, body = _read_response(s)
        return status, json.loads(body), {}


# ---- finding 8: unauthenticated bodies, timed-out bodies ------------------------------------------
def _read_response(s: socket.socket) -> tuple[int, dict, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise EOFError(buf)
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def _closed_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        while s.recv(65536):
            pass
        return True
    except (socket.timeout, TimeoutError):
        return False
    except ConnectionResetError:
        return True


def _open(srv) -> socket.socket:
    host, port = srv.info.api_url.split("//")[1].split(":")
    return socket.create_connection((host, int(port)), timeout=10)


@pytest.mark.parametrize("path, status, code", [("/v1/groups", 401, "not_authenticated"),
                                                ("/v1/users", 413, "frame_too_large")])
async def test_a_large_body_without_a_token_is_refused_before_it_is_read(server, path, status, code):
    def probe():
        with _open(server) as s:
            s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1048575\r\n\r\n" % path.encode() + b" " * 4096)
            started = time.monotonic()
            got, headers, body = _read_response(s)  # answered with a megabyte still to come
            return got, headers, json.loads(body), time.monotonic() - started, _closed_within(s, 3)

    got, headers, body, took, closed = await trio.to_thread.run_sync(probe)
    assert (got, body["error"]["code"]) == (status, code) and took < 2
    assert headers["connection"] == "close" and closed


async def test_a_chunked_body_without_a_token_is_cut_after_16_kib(server):
    def probe():
        with _open(server) as s:
            s.sendall(b"POST /v1/groups HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
            for _ in range(5):  # 20 KiB of an endless body
                s.sendall(b"1000\r\n" + b" " * 4096 + b"\r\n")
            got, _, body = _read_response(s)
            return got, json.loads(body), _closed_within(s, 3)

    got, body, closed = await trio.to_thread.run_sync(probe)
    assert (got, body["error"]["code"]) == (401, "not_authenticated") and closed


async def test_a_large_body_with_a_token_is_read(server):
    me = await server.api.signup_login("alice")
    r = await server.api.call("PATCH", "/v1/users/me", raw=json.dumps({"about": "y" * 1000}).encode() + b" " * 40_000,
                              token=me["token"])
    assert r.status == 200 and r.body["user"]["about"] == "y" * 1000


async def test_the_connection_is_closed_right_after_a_408(nursery, tmp_path):
    srv = await start(nursery, tmp_path, server_cfg={"http_body_timeout_s": 0.5})
    me = await srv.api.signup_login("alice")

    def probe():
        with _open(srv) as s:
            s.sendall(b"PATCH /v1/users/me HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer %s\r\nContent-Length: 100\r\n\r\n{" % me["token"].encode())
            got, headers, _ = _read_response(s)
            return got, headers, _closed_within(s, 3)

    got, headers, closed = await trio.to_thread.run_sync(probe)
    assert got == 408 and headers.get("connection") == "close" and closed


# ---- finding 9: history byte budget ---------------------------------------------------------------
async def test_http_history_pages_stay_within_the_byte_budget(nursery, tmp_path):
    srv = await start(nursery, tmp_path, max_frame_bytes=64 * 1024, max_body_chars=10_000)
    me = await srv.api.signup_login("alice")
    g = (await srv.api.call("POST", "/v1/groups", {"name": "g"}, token=me["token"])).body["channel"]["id"]
    for i in range(20):
        await srv.node.store.append_message(g, me["user"]["id"], f"c{i}", f"{i:02d}" + "€" * 9_998, 1000.0 + i)
    budget = 64 * 1024
    r = await srv.api.call("GET", f"/v1/channels/{g}/messages?limit=20", token=me["token"])
    seqs = [m["seq"] for m in r.body["messages"]]
    assert r.body["more"] is True and seqs == list(range(20 - len(seqs) + 1, 21)) and 0 < len(seqs) < 20
    assert len(json.dumps(r.body).encode()) <= budget  # (the budget counts 4 bytes a character)
    r = await srv.api.call("GET", f"/v1/channels/{g}/messages?limit=20&after=0", token=me["token"])
    seqs = [m["seq"] for m in r.body["messages"]]
    assert r.body["more"] is True and seqs == list(range(1, len(seqs) + 1))
    r = await srv.api.call("GET", f"/v1/channels/{g}/messages?limit=1&after=19", token=me["token"])
    assert [m["seq"] for m in r.body["messages"]] == [20] and r.body["more"] is False


# ---- security events ------------------------------------------------------------------------------
async def test_security_events_are_logged_without_secrets(server, caplog):
    caplog.set_level(logging.INFO, logger="chatd.security")
    api = server.api
    await api.call("POST", "/v1/users", {"username": "alice", "password": PASSWORD})
    await api.call("POST", "/v1/users", {"username": "alice", "password": PASSWORD})
    await api.call("POST", "/v1/login", {"username": "alice", "password": "wrong-password-1"})
    me = await api.login("alice")
    await api.call("POST", "/v1/logout", token=me["token"])
    await api.call("GET", "/v1/users/me", token=me["token"])
    lines = [r.getMessage() for r in caplog.records if r.name == "chatd.security"]
    uid, dev = me["user"]["id"], me["device_id"]
    assert lines == [f"event=signup outcome=ok user={uid} username=alice addr=127.0.0.1",
                     "event=signup outcome=refused reason=taken addr=127.0.0.1",
                     f"event=login outcome=failed user={uid} username=alice addr=127.0.0.1",
                     f"event=login outcome=ok user={uid} device={dev} addr=127.0.0.1",
                     f"event=logout outcome=ok user={uid} device={dev} addr=127.0.0.1",
                     f"event=token outcome=revoked user={uid} device={dev} addr=127.0.0.1"], lines
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "chatd.security")
    text = "\n".join(lines)
    assert PASSWORD not in text and "wrong-password" not in text and me["token"] not in text
