"""Push notifications over real sockets: the service and a real chatd against a real HTTP gateway on
loopback (a small h11 server started by each test on a port of its own): normal delivery through both
providers, gateway down, slow, 5xx, rejected tokens, restart with a non-empty outbox, and end to end
through ``chatd run`` (an offline member gets one coalesced push per burst, an online one none).

No test asserts timings: conditions are awaited with generous deadlines; "exactly once" is checked
after the outbox is empty (nothing is left that could still be sent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import h11
import pytest
import trio

from chatd.config import PushConfig
from chatd.push import payload
from chatd.push.providers import MatrixProvider, WebhookProvider
from chatd.push.service import PushService
from chatd.store.base import PUSH_SLOTS, Message, PushToken
from chatd.store.sqlite import open_sqlite
from tests.helpers import RunningServer, eventually, free_port, make_config, open_client

SECRET = "webhook-secret-0123456789abcdefghijklmn"


# ---- a real gateway on loopback ------------------------------------------------------------------
@dataclass
class Received:
    path: str
    headers: dict
    body: bytes
    doc: dict = field(default_factory=dict)


class Gateway:
    """An HTTP/1.1 server on 127.0.0.1. ``answer(request, n)`` -> ``(status, body, delay_s)``: wait
    ``delay_s`` before answering (a client that gives up first is noticed: the request is then counted
    in ``abandoned``, not in ``answered``)."""

    def __init__(self, answer=None):
        self.answer = answer or (lambda req, n: (200, b"{}", 0.0))
        self.received: list[Received] = []
        self.answered: list[tuple[int, Received]] = []
        self.abandoned: list[Received] = []
        self.port = 0
        self._cancel: trio.CancelScope | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def delivered(self) -> list[dict]:
        return [r.doc for status, r in self.answered if 200 <= status < 300]

    async def start(self, nursery) -> "Gateway":
        await nursery.start(self._serve)
        return self

    def stop(self) -> None:
        self._cancel.cancel()

    async def _serve(self, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        with trio.CancelScope() as self._cancel:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, stream):
        conn = h11.Connection(h11.SERVER)
        req, r, chunks = None, None, []
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Request):
                    req = event
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
            if req is None:
                return
            body = b"".join(chunks)
            r = Received(req.target.decode(), {k.decode(): v.decode() for k, v in req.headers}, body)
            try:
                r.doc = json.loads(body)
            except ValueError:
                pass
            self.received.append(r)
            status, answer, delay = self.answer(r, len(self.received))
            if delay:
                with trio.move_on_after(delay):
                    if await stream.receive_some(1) == b"":  # the client hung up: it gave up
                        self.abandoned.append(r)
                        return
            data = conn.send(h11.Response(status_code=status, headers=[
                ("Content-Type", "application/json"), ("Content-Length", str(len(answer)))]))
            data += conn.send(h11.Data(data=answer)) + conn.send(h11.EndOfMessage())
            await stream.send_all(data)
            self.answered.append((status, r))
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            if r is not None and r not in self.abandoned:
                self.abandoned.append(r)
        finally:
            await trio.aclose_forcefully(stream)


async def settled(push: PushService, store, timeout=15.0):
    """Until nothing is queued, in flight or in the outbox: no push can follow any more. (The outbox
    is rows in the store: no event says it is empty.)"""
    async def empty() -> bool:
        await push.flush()
        rows = [e for s in range(PUSH_SLOTS) for e in await store.pending_pushes(s, 10)]
        return not rows and not push.statistics()["inflight"]
    await eventually(empty, timeout)


# ---- the service against a real gateway ------------------------------------------------------------
def push_config(provider, url, **kw) -> PushConfig:
    base = dict(provider=provider, webhook_url=url, webhook_secret=SECRET, matrix_gateway_url=url,
                matrix_app_id="com.example.default", coalesce_window_s=0.2, retry_base_s=0.05, retry_cap_s=0.4,
                max_attempts=50, poll_interval_s=0.5, request_timeout_s=2.0, lease_s=30.0)
    base.update(kw)
    return PushConfig(**base)


class Rig:
    def __init__(self, nursery, store):
        self.nursery, self.store = nursery, store
        self.seq = 0

    async def service(self, cfg: PushConfig) -> PushService:
        if cfg.provider == "webhook":
            provider = WebhookProvider(cfg.webhook_url, cfg.webhook_secret, cfg.request_timeout_s)
        else:
            provider = MatrixProvider(cfg.matrix_gateway_url, cfg.matrix_app_id, cfg.request_timeout_s)
        svc = PushService(self.store, cfg, "s1", provider)
        await self.nursery.start(svc.run)
        return svc

    def message(self, sender=1):
        self.seq += 1
        return Message("g:00000000000000aa", self.seq, sender, f"c{self.seq}", f"secret body {self.seq}", 0.0)

    async def settled(self, svc, timeout=15.0):
        await settled(svc, self.store, timeout)


@pytest.fixture
async def rig(nursery, tmp_path):
    async with open_sqlite(str(tmp_path / "push.db")) as store:
        await store.add_push_token(PushToken(42, "phone", "fcm", "tok-42", "com.example.chat", 1700000000.0))
        yield Rig(nursery, store)
        nursery.cancel_scope.cancel()


async def test_webhook_delivery_is_signed_and_coalesced(rig, nursery):
    gw = await Gateway().start(nursery)
    svc = await rig.service(push_config("webhook", gw.url + "/hooks/chat"))
    for _ in range(4):
        svc.notify_offline(rig.message(), [42])
    await rig.settled(svc)
    (r,) = gw.received
    assert r.path == "/hooks/chat" and r.headers["content-type"] == "application/json"
    assert payload.verify(SECRET, r.body, r.headers["x-chatd-signature"])
    assert r.headers["x-chatd-delivery"] == r.doc["id"]
    doc = r.doc
    assert (doc["user_id"], doc["channel_id"], doc["sender_id"], doc["count"], doc["first_seq"], doc["last_seq"]) == \
        (42, "g:00000000000000aa", 1, 4, 1, 4)
    assert doc["device"] == {"device_id": "phone", "provider": "fcm", "token": "tok-42", "app_id": "com.example.chat"}
    assert "body" not in doc and b"secret body" not in r.body


async def test_matrix_delivery_and_body_when_configured(rig, nursery):
    gw = await Gateway(lambda req, n: (200, b'{"rejected": []}', 0.0)).start(nursery)
    svc = await rig.service(push_config("matrix", gw.url, include_body=True, body_max_chars=8))
    for _ in range(3):
        svc.notify_offline(rig.message(sender=5), [42])
    await rig.settled(svc)
    (r,) = gw.received
    assert r.path == "/_matrix/push/v1/notify"
    note = r.doc["notification"]
    assert (note["room_id"], note["sender"], note["counts"], note["event_id"]) == \
        ("g:00000000000000aa", "5", {"unread": 3}, "g:00000000000000aa:3")
    assert note["content"] == {"msgtype": "m.text", "body": "secret …"}
    (device,) = note["devices"]
    assert (device["app_id"], device["pushkey"], device["data"]["first_seq"]) == ("com.example.chat", "tok-42", 1)


async def test_gateway_down_then_up(rig, nursery):
    port = free_port()  # nobody listens there: the gateway is down
    svc = await rig.service(push_config("webhook", f"http://127.0.0.1:{port}/"))
    for _ in range(3):
        svc.notify_offline(rig.message(), [42])
    await eventually(lambda: svc.statistics()["retries"] >= 2)  # connection refused, retried
    gw = Gateway()
    gw.port = port
    await gw.start(nursery)
    await rig.settled(svc)
    assert [(d["count"], d["first_seq"], d["last_seq"]) for d in gw.delivered()] == [(3, 1, 3)]
    assert svc.statistics()["sent"] == 1


async def test_slow_gateway_times_out_and_the_retry_is_the_same_push(rig, nursery):
    # the first two requests get no answer in time; the third one is answered at once
    gw = await Gateway(lambda req, n: (200, b"{}", 30.0 if n <= 2 else 0.0)).start(nursery)
    svc = await rig.service(push_config("webhook", gw.url, request_timeout_s=0.3))
    for _ in range(2):
        svc.notify_offline(rig.message(), [42])
    await rig.settled(svc)
    await eventually(lambda: len(gw.abandoned) == 2)
    assert [(d["count"], d["first_seq"], d["last_seq"]) for d in gw.delivered()] == [(2, 1, 2)]
    # a gateway that did process a timed-out request can drop the retry: same delivery id
    assert {r.headers["x-chatd-delivery"] for r in gw.received} == {gw.delivered()[0]["id"]}
    assert svc.statistics()["sent"] == 1


async def test_5xx_is_retried_with_backoff(rig, nursery):
    gw = await Gateway(lambda req, n: (503, b'{"error": "busy"}', 0.0) if n <= 3 else (200, b"{}", 0.0)).start(nursery)
    svc = await rig.service(push_config("matrix", gw.url))
    svc.notify_offline(rig.message(), [42])
    await rig.settled(svc)
    assert [s for s, _ in gw.answered] == [503, 503, 503, 200]
    assert len({r.doc["notification"]["devices"][0]["data"]["chatd_id"] for r in gw.received}) == 1
    stats = svc.statistics()
    assert (stats["sent"], stats["retries"], stats["gave_up"]) == (1, 3, 0)


@pytest.mark.parametrize("provider", ["webhook", "matrix"])
async def test_rejected_token_is_unregistered(rig, nursery, provider):
    await rig.store.add_push_token(PushToken(42, "tablet", "apns", "tok-dead", "", 1.0))

    def answer(req, n):
        token = req.doc["device"]["token"] if provider == "webhook" else \
            req.doc["notification"]["devices"][0]["pushkey"]
        if token != "tok-dead":
            return 200, b"{}", 0.0
        if provider == "webhook" and n % 2:
            return 410, b"", 0.0
        return 200, b'{"rejected": ["tok-dead"]}', 0.0
    gw = await Gateway(answer).start(nursery)
    svc = await rig.service(push_config(provider, gw.url))
    svc.notify_offline(rig.message(), [42])
    await rig.settled(svc)
    assert [t.token for t in await rig.store.push_tokens(42)] == ["tok-42"]
    before = len(gw.received)
    assert before == 2
    svc.notify_offline(rig.message(), [42])
    await rig.settled(svc)
    assert len(gw.received) == before + 1  # only the live token from now on
    assert svc.statistics()["rejected"] == 1


# ---- chatd run: end to end ---------------------------------------------------------------------------
def run_config(tmp_path, provider, url, **push):
    cfg = make_config(tmp_path)
    cfg.update({"push": {"provider": provider, "webhook_url": url, "webhook_secret": SECRET,
                         "matrix_gateway_url": url, "coalesce_window_s": 1.0, "retry_base_s": 0.05,
                         "retry_cap_s": 0.3, "poll_interval_s": 0.5, "request_timeout_s": 2.0, **push}},
               source="test")
    cfg.validate()
    return cfg


async def register(api, login, token, provider="fcm", app_id="com.example.chat"):
    r = await api.call("POST", "/v1/push/tokens", {"provider": provider, "token": token, "app_id": app_id},
                       token=login["token"])
    assert r.status == 201, r
    return r.body["push_token"]


def pushed_tokens(gw, provider):
    if provider == "webhook":
        return [(d["device"]["token"], d["count"], d["first_seq"], d["last_seq"]) for d in gw.delivered()]
    out = []
    for d in gw.delivered():
        n = d["notification"]
        dev = n["devices"][0]
        out.append((dev["pushkey"], n["counts"]["unread"], dev["data"]["first_seq"], dev["data"]["last_seq"]))
    return out


async def settled_server(srv, timeout=15.0):
    await settled(srv.node.push, srv.node.store, timeout)


@pytest.mark.parametrize("provider", ["webhook", "matrix"])
async def test_offline_member_gets_one_push_per_burst(nursery, tmp_path, provider):
    gw = await Gateway().start(nursery)
    srv = await RunningServer(nursery, run_config(tmp_path, provider, gw.url)).start()
    try:
        api = srv.api
        alice, bob, carol = [await api.signup_login(n) for n in ("alice", "bob", "carol")]
        await register(api, bob, "tok-bob")
        await register(api, carol, "tok-carol")  # carol is online: no push for her
        r = await api.call("POST", "/v1/groups", {"name": "team", "members": [bob["user"]["id"],
                                                                              carol["user"]["id"]]},
                           token=alice["token"])
        gid = r.body["channel"]["id"]
        ca = await open_client(nursery, alice["ws_url"], alice["token"])
        cc = await open_client(nursery, carol["ws_url"], carol["token"])
        for burst in range(2):
            ids = []
            for i in range(5):  # a burst: sent back to back, acks awaited afterwards
                frame = {"type": "send", "channel_id": gid, "body": f"b{burst} m{i}", "client_msg_id": f"{burst}-{i}",
                         "id": f"{burst}-{i}"}
                await ca.send(frame)
                ids.append(frame["id"])
            for rid in ids:
                assert (await ca.reply_to(rid))["type"] == "ack"
            await cc.messages(5)
            await settled_server(srv)
        # webhook: the burst's count; Matrix: counts.unread is bob's total unread (he read nothing)
        total_after_second = 10 if provider == "matrix" else 5
        assert pushed_tokens(gw, provider) == [("tok-bob", 5, 1, 5), ("tok-bob", total_after_second, 6, 10)]
        if provider == "webhook":
            assert all(payload.verify(SECRET, r.body, r.headers["x-chatd-signature"]) for r in gw.received)
            assert {d["sender_id"] for d in gw.delivered()} == {alice["user"]["id"]}
            assert all("body" not in d for d in gw.delivered())
        # bob comes online: no more pushes for him either
        await open_client(nursery, bob["ws_url"], bob["token"])
        await ca.send_message(gid, "while everybody is online")
        await settled_server(srv)
        assert len(gw.delivered()) == 2
    finally:
        await srv.stop()


async def test_restart_with_a_non_empty_outbox(nursery, tmp_path):
    port = free_port()  # nobody listens there: the gateway is down
    cfg = run_config(tmp_path, "webhook", f"http://127.0.0.1:{port}/")
    srv = await RunningServer(nursery, cfg).start()
    api = srv.api
    alice, bob = await api.signup_login("alice"), await api.signup_login("bob")
    await register(api, bob, "tok-bob")
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    r = await api.call("GET", f"/v1/dm/{bob['user']['id']}", token=alice["token"])
    dm = r.body["channel_id"]
    for i in range(3):
        assert (await ca.send_message(dm, f"m{i}"))["type"] == "ack"
    await eventually(lambda: srv.node.push.statistics()["retries"] >= 1)  # the gateway is down
    await srv.stop()

    gw = Gateway()
    gw.port = port
    await gw.start(nursery)
    srv2 = await RunningServer(nursery, cfg).start()  # same data dir, the gateway is up
    try:
        await settled_server(srv2)
        assert pushed_tokens(gw, "webhook") == [("tok-bob", 3, 1, 3)]
        assert gw.delivered()[0]["channel_id"] == dm
    finally:
        await srv2.stop()


async def test_push_token_routes(server):
    api = server.api
    bob = await api.signup_login("bob")
    r = await api.call("GET", "/v1/push/tokens", token=bob["token"])
    assert r.status == 200 and r.body == {"push_tokens": []}
    t = await register(api, bob, "tok-1", provider="apns", app_id="com.example.ios")
    assert (t["device_id"], t["provider"], t["token"], t["app_id"]) == (bob["device_id"], "apns", "tok-1",
                                                                         "com.example.ios")
    r = await api.call("POST", "/v1/push/tokens", {"provider": "fcm", "token": "tok-2"}, token=bob["token"])
    assert r.status == 201 and r.body["push_token"]["app_id"] == ""  # the device's token is replaced
    r = await api.call("GET", "/v1/push/tokens", token=bob["token"])
    assert [x["token"] for x in r.body["push_tokens"]] == ["tok-2"]
    other = await api.login("bob")  # a second device of bob
    await register(api, other, "tok-3")
    r = await api.call("DELETE", "/v1/push/tokens", {"token": "tok-3"}, token=bob["token"])
    assert r.status == 200 and r.body == {"removed": 1}
    r = await api.call("DELETE", "/v1/push/tokens", {"token": "tok-3"}, token=bob["token"])
    assert r.body == {"removed": 0}
    await register(api, other, "tok-3")
    r = await api.call("DELETE", "/v1/push/tokens", token=bob["token"])  # this device's tokens
    assert r.body == {"removed": 1}
    r = await api.call("GET", "/v1/push/tokens", token=other["token"])
    assert [x["token"] for x in r.body["push_tokens"]] == ["tok-3"]
    for bad in ({"token": "x"}, {"provider": "fcm"}, {"provider": "f c m", "token": "x"},
                {"provider": "fcm", "token": ""}, {"provider": "fcm", "token": "x" * 5000},
                {"provider": "fcm", "token": 5}, {"provider": "fcm", "token": "x", "app_id": 1}):
        r = await api.call("POST", "/v1/push/tokens", bad, token=bob["token"])
        assert r.status == 400 and r.body["error"]["code"] == "bad_request", bad
    r = await api.call("DELETE", "/v1/push/tokens", raw=b"not json", token=bob["token"])
    assert r.status == 400
    r = await api.call("POST", "/v1/push/tokens", {"provider": "fcm", "token": "x"})
    assert r.status == 401 and r.body["error"]["code"] == "not_authenticated"
    assert (await api.call("GET", "/v1/push/tokens")).status == 401
    assert server.node.push is None  # provider "none": tokens are kept, nothing is sent


async def test_another_users_push_token_is_not_taken_over(server, caplog):
    """Issue 20 (low): registering a push token another user holds moved it at once, silently -
    whoever learnt a victim's token cut the victim's notifications off (and had their own sent to
    the victim's phone). Now: refused while the holder's device is logged in; moved (and logged)
    once that device has logged out."""
    api = server.api
    victim, attacker = await api.signup_login("victim"), await api.signup_login("attacker")
    await register(api, victim, "victims-phone-token")
    caplog.set_level("INFO", logger="chatd.security")
    r = await api.call("POST", "/v1/push/tokens", {"provider": "fcm", "token": "victims-phone-token"},
                       token=attacker["token"])
    assert r.status == 409 and r.body["error"]["code"] == "push_token_taken", r
    assert [t["token"] for t in (await api.call("GET", "/v1/push/tokens", token=victim["token"])).body["push_tokens"]] \
        == ["victims-phone-token"]
    assert (await api.call("GET", "/v1/push/tokens", token=attacker["token"])).body["push_tokens"] == []
    assert any("event=push_token outcome=refused" in rec.getMessage() and f"holder={victim['user']['id']}"
               in rec.getMessage() for rec in caplog.records)
    # the phone changes hands: its first account logs out there, the next one registers the token
    assert (await api.call("POST", "/v1/logout", token=victim["token"])).status == 200
    await register(api, attacker, "victims-phone-token")
    assert (await api.call("GET", "/v1/push/tokens", token=attacker["token"])).body["push_tokens"][0]["token"] \
        == "victims-phone-token"
    again = await api.login("victim")
    assert (await api.call("GET", "/v1/push/tokens", token=again["token"])).body["push_tokens"] == []
    assert any("event=push_token outcome=moved" in rec.getMessage() for rec in caplog.records)
    # the same user's other device takes it over as before (a token names one device)
    second = await api.login("attacker")
    await register(api, second, "victims-phone-token")
    assert [t["device_id"] for t in (await api.call("GET", "/v1/push/tokens", token=second["token"])).body[
        "push_tokens"]] == [second["device_id"]]
