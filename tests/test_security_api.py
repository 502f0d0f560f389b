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
