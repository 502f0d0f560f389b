"""Push notifications: the wire formats (pure) and the service's rules - coalescing, backoff, giving up,
no duplicate per (device, message), rejected tokens, slot leases between processes.

The rules run on trio's mock clock (autojump) against the real ``PushService`` over the real
``CassandraStore`` on the in-memory keyspace model (no worker threads, so the mock clock only moves when
the service waits). The gateway here is a recorder with scripted answers; the HTTP path against real
loopback gateways is in tests/test_push_gateway.py.
"""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from chatd.config import Config, ConfigError, PushConfig
from chatd.push import payload
from chatd.push.payload import DELIVERED, FAILED, REJECTED, RETRY, Notification, Outcome
from chatd.push.service import PushService
from chatd.store.base import PUSH_SLOTS, Message, PushEntry, PushToken, push_slot
from chatd.store.cassandra import CassandraStore
from tests.conftest_store import EmulatedKeyspace


# ---- pure: payloads, answers, schedule --------------------------------------------------------------
TOKEN = PushToken(7, "dev1", "fcm", "tok-abc", "com.example.chat", 1700000000.5)


def entry(seq, user=7, channel="g:00000000000000aa", sender=3, body="", at=0.0):
    return PushEntry(user, channel, seq, sender, body, at)


def test_plan_coalesces_and_skips_what_a_token_already_got():
    other = PushToken(7, "dev2", "apns", "tok-xyz", "", 1.0)
    entries = [entry(4, sender=3), entry(5, sender=9), entry(6, sender=3, body="hi")]
    notes = payload.plan(entries, [TOKEN, other], {"tok-abc": 5, "tok-xyz": 0})
    assert [(n.device.token, n.count, n.first_seq, n.last_seq, n.sender_id, n.body) for n in notes] == [
        ("tok-abc", 1, 6, 6, 3, "hi"), ("tok-xyz", 3, 4, 6, 3, "hi")]
    assert payload.plan(entries, [TOKEN], {"tok-abc": 6}) == []
    assert payload.plan(entries, [], {}) == []
    assert notes[0].id != notes[1].id and len(notes[0].id) == 32
    assert notes[0].id == payload.plan(entries, [TOKEN], {"tok-abc": 5})[0].id  # stable across retries


def test_webhook_document_is_signed_and_private_by_default():
    n = Notification(7, "g:00000000000000aa", 3, 2, 10, 11, TOKEN)
    body, headers = payload.webhook_request(n, "s3cret", 1700000001.25)
    h = dict(headers)
    assert h["Content-Type"] == "application/json" and h[payload.DELIVERY_HEADER] == n.id
    assert payload.verify("s3cret", body, h[payload.SIGNATURE_HEADER])
    assert not payload.verify("other", body, h[payload.SIGNATURE_HEADER])
    assert not payload.verify("s3cret", body + b" ", h[payload.SIGNATURE_HEADER])
    assert h[payload.SIGNATURE_HEADER].startswith("sha256=") and len(h[payload.SIGNATURE_HEADER]) == 7 + 64
    assert json.loads(body) == {
        "id": n.id, "type": "message", "user_id": 7,
        "device": {"device_id": "dev1", "provider": "fcm", "token": "tok-abc", "app_id": "com.example.chat"},
        "channel_id": "g:00000000000000aa", "sender_id": 3, "count": 2, "first_seq": 10, "last_seq": 11,
        "sent_at": 1700000001.25}
    with_body = Notification(7, "g:00000000000000aa", 3, 2, 10, 11, TOKEN, body="see you")
    assert json.loads(payload.webhook_request(with_body, "s", 1.0)[0])["body"] == "see you"


def test_matrix_document_follows_the_push_gateway_api():
    n = Notification(7, "g:00000000000000aa", 3, 4, 10, 13, PushToken(7, "d", "apns", "pk1", "", 1700000000.9))
    body, headers = payload.matrix_request(n, "com.example.default")
    doc = json.loads(body)
    assert doc == {"notification": {
        "event_id": "g:00000000000000aa:13", "room_id": "g:00000000000000aa", "type": "m.room.message",
        "sender": "3", "prio": "high", "counts": {"unread": 4},
        "devices": [{"app_id": "com.example.default", "pushkey": "pk1", "pushkey_ts": 1700000000,
                     "data": {"provider": "apns", "chatd_id": n.id, "first_seq": 10, "last_seq": 13}}]}}
    assert "content" not in doc["notification"]
    n2 = Notification(7, "g:00000000000000aa", 3, 1, 13, 13, TOKEN, body="hello")
    doc2 = json.loads(payload.matrix_request(n2, "x")[0])["notification"]
    assert doc2["content"] == {"msgtype": "m.text", "body": "hello"}
    assert doc2["devices"][0]["app_id"] == "com.example.chat"
    assert payload.matrix_notify_url("http://gw:5000") == "http://gw:5000/_matrix/push/v1/notify"
    assert payload.matrix_notify_url("http://gw/_matrix/push/v1/notify/") == "http://gw/_matrix/push/v1/notify"


@pytest.mark.parametrize("status, body, kind", [
    (200, b"", DELIVERED), (200, b'{"rejected": []}', DELIVERED), (202, b"not json", DELIVERED),
    (200, b'{"rejected": ["tok-abc"]}', REJECTED), (200, b'{"rejected": ["other"]}', DELIVERED),
    (410, b"", REJECTED), (500, b"", RETRY), (503, b"", RETRY), (429, b"", RETRY), (408, b"", RETRY),
    (400, b"", FAILED), (404, b"", FAILED), (301, b"", FAILED)])
def test_webhook_answers(status, body, kind):
    assert payload.webhook_outcome(status, body, "tok-abc").kind == kind


@pytest.mark.parametrize("status, body, kind", [
    (200, b'{"rejected": []}', DELIVERED), (200, b'{"rejected": ["tok-abc"]}', REJECTED),
    (200, b'{"rejected": "tok-abc"}', DELIVERED), (502, b"", RETRY), (410, b"", FAILED), (400, b"", FAILED)])
def test_matrix_answers(status, body, kind):
    assert payload.matrix_outcome(status, body, "tok-abc").kind == kind


def test_backoff_doubles_up_to_the_cap_with_jitter():
    top = [payload.backoff_s(a, 2.0, 60.0, rand=lambda: 1.0) for a in range(1, 9)]
    low = [payload.backoff_s(a, 2.0, 60.0, rand=lambda: 0.0) for a in range(1, 9)]
    assert top == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert low == [t / 2 for t in top]
    assert payload.backoff_s(10_000, 1.0, 5.0) <= 5.0
    assert payload.truncate("abcdef", 4) == "abc…" and payload.truncate("abc", 4) == "abc"


def test_push_config_is_checked():
    assert Config().push.provider == "none" and Config().push.include_body is False
    for bad, match in [({"provider": "apns"}, "unknown provider"),
                       ({"provider": "webhook", "webhook_url": "http://x/"}, "webhook_secret"),
                       ({"provider": "matrix"}, "matrix_gateway_url"),
                       ({"retry_base_s": 0}, "retry_base_s"), ({"max_attempts": 0}, "max_attempts"),
                       ({"lease_s": 10.0}, "lease_s")]:
        with pytest.raises(ConfigError, match=match):
            Config.load(overrides={"push": bad}, env={})
    with pytest.raises(ConfigError, match="unknown config key 'push.retries'"):
        Config.load(overrides={"push": {"retries": 3}}, env={})
    cfg = Config.load(env={"CHATD_PUSH__PROVIDER": "matrix", "CHATD_PUSH__MATRIX_GATEWAY_URL": "http://gw:5000",
                           "CHATD_PUSH__INCLUDE_BODY": "true"})
    assert (cfg.push.provider, cfg.push.include_body) == ("matrix", True)


# ---- the service on a mock clock ------------------------------------------------------------------
class Recorder:
    """A gateway stand-in: records each push with the (mock) time, answers from a script."""

    def __init__(self, answers=None):
        self.answers = answers or (lambda n, i: Outcome(DELIVERED))
        self.sent: list[tuple[float, Notification]] = []

    async def send(self, n: Notification) -> Outcome:
        await trio.sleep(0.01)  # a round trip
        self.sent.append((trio.current_time(), n))
        return self.answers(n, len(self.sent))

    def to(self, token: str) -> list[Notification]:
        return [n for _, n in self.sent if n.device.token == token]


def push_config(**kw) -> PushConfig:
    base = dict(provider="webhook", webhook_url="http://unused/", webhook_secret="s", coalesce_window_s=2.0,
                retry_base_s=1.0, retry_cap_s=8.0, max_attempts=5, poll_interval_s=1.0, lease_s=30.0,
                request_timeout_s=5.0)
    base.update(kw)
    return PushConfig(**base)


class Rig:
    def __init__(self, nursery, store, keyspace):
        self.nursery, self.store, self.keyspace = nursery, store, keyspace
        self.seq: dict[str, int] = {}

    async def service(self, recorder, owner="s1", shards=None, **cfg) -> PushService:
        svc = PushService(self.store, push_config(**cfg), owner, recorder, shards=shards, now=trio.current_time)
        svc.cancel = trio.CancelScope()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with svc.cancel:
                await svc.run(task_status=task_status)
        await self.nursery.start(run)
        return svc

    def message(self, channel="g:00000000000000aa", sender=1, body="hello there"):
        self.seq[channel] = self.seq.get(channel, 0) + 1
        return Message(channel, self.seq[channel], sender, f"c{self.seq[channel]}", body, 0.0)

    async def token(self, user_id, token, device=None):
        await self.store.add_push_token(PushToken(user_id, device or f"dev-{token}", "fcm", token, "app", 1.0))

    async def outbox(self) -> list[PushEntry]:
        return [e for s in range(PUSH_SLOTS) for e in await self.store.pending_pushes(s, 10_000)]


@pytest.fixture
async def rig(nursery):
    keyspace = EmulatedKeyspace(4)
    store = CassandraStore(keyspace, bucket_size=4)
    yield Rig(nursery, store, keyspace)


async def test_a_burst_in_one_channel_is_one_notification(rig, autojump_clock):
    rec = Recorder()
    svc = await rig.service(rec)
    await rig.token(42, "t42")
    await rig.token(43, "t43")
    t0 = trio.current_time()
    for i in range(5):  # five messages within the 2 s window, to two offline members
        svc.notify_offline(rig.message(), [42, 43])
        await trio.sleep(0.3)
    svc.notify_offline(rig.message(channel="g:00000000000000bb"), [42])  # another channel: its own push
    await trio.sleep(5)
    assert [(n.count, n.first_seq, n.last_seq, n.sender_id) for n in rec.to("t42")] == [(5, 1, 5, 1), (1, 1, 1, 1)]
    assert [n.channel_id for n in rec.to("t42")] == ["g:00000000000000aa", "g:00000000000000bb"]
    assert [(n.count, n.first_seq, n.last_seq) for n in rec.to("t43")] == [(5, 1, 5)]
    assert all(at >= t0 + 2.0 for at, _ in rec.sent)  # not before the window closed
    assert all(n.body is None for _, n in rec.sent)  # private by default
    # the next burst is the next notification, from seq 6
    for i in range(3):
        svc.notify_offline(rig.message(), [42])
    await trio.sleep(5)
    assert [(n.count, n.first_seq, n.last_seq) for n in rec.to("t42")][-1] == (3, 6, 8)
    assert await rig.outbox() == []
    assert svc.statistics()["sent"] == 4


async def test_only_members_with_tokens_and_never_the_sender_are_queued(rig, autojump_clock):
    rec = Recorder()
    svc = await rig.service(rec, include_body=True, body_max_chars=5)
    await rig.token(42, "t42")
    await rig.token(1, "t1")  # the sender has a token too
    svc.notify_offline(rig.message(sender=1, body="a long body"), [42, 1, 99])  # 99: no token
    await svc.flush()
    assert [(e.user_id, e.body) for e in await rig.outbox()] == [(42, "a lo…")]
    await trio.sleep(5)
    assert [(n.device.token, n.body) for _, n in rec.sent] == [("t42", "a lo…")]


async def test_retries_back_off_then_deliver_once(rig, autojump_clock):
    rec = Recorder(lambda n, i: Outcome(RETRY, "HTTP 503") if i <= 3 else Outcome(DELIVERED))
    svc = await rig.service(rec)
    await rig.token(42, "t42")
    for _ in range(2):
        svc.notify_offline(rig.message(), [42])
    await trio.sleep(60)
    assert [(n.count, n.first_seq, n.last_seq) for _, n in rec.sent] == [(2, 1, 2)] * 4
    assert len({n.id for _, n in rec.sent}) == 1  # a retry is the same notification
    gaps = [b - a for (a, _), (b, _) in zip(rec.sent, rec.sent[1:])]
    for attempt, gap in enumerate(gaps, start=1):  # base 1 s doubling, half of it jittered
        assert 2 ** (attempt - 1) / 2 <= gap
    stats = svc.statistics()
    assert (stats["sent"], stats["retries"], stats["gave_up"]) == (1, 3, 0)
    assert await rig.outbox() == []


async def test_gives_up_after_max_attempts(rig, autojump_clock):
    rec = Recorder(lambda n, i: Outcome(RETRY, "connection refused"))
    svc = await rig.service(rec, max_attempts=4)
    await rig.token(42, "t42")
    svc.notify_offline(rig.message(), [42])
    await trio.sleep(120)
    assert len(rec.sent) == 4
    assert svc.statistics()["gave_up"] == 1 and await rig.outbox() == []
    svc.notify_offline(rig.message(), [42])  # later messages are pushed again
    await trio.sleep(120)
    assert [n.first_seq for _, n in rec.sent[4:]] == [2] * 4


async def test_a_device_that_got_it_is_not_pushed_again(rig, autojump_clock):
    # two devices; the gateway fails the second one once: the retry goes to that device only
    failed = []

    def answers(n, i):
        if n.device.token == "t-b" and not failed:
            failed.append(n)
            return Outcome(RETRY, "HTTP 502")
        return Outcome(DELIVERED)
    rec = Recorder(answers)
    svc = await rig.service(rec)
    await rig.token(42, "t-a", device="phone")
    await rig.token(42, "t-b", device="tablet")
    m = rig.message()
    svc.notify_offline(m, [42])
    await trio.sleep(30)
    assert [(n.first_seq, n.last_seq) for n in rec.to("t-a")] == [(1, 1)]
    assert [(n.first_seq, n.last_seq) for n in rec.to("t-b")] == [(1, 1), (1, 1)]
    # the same message reaching the outbox again (a replayed fan-out) is not pushed again
    svc.notify_offline(m, [42])
    await trio.sleep(30)
    assert len(rec.sent) == 3 and await rig.outbox() == []
    assert await rig.store.push_marks(42, m.channel_id) == {"t-a": 1, "t-b": 1}


async def test_rejected_token_is_unregistered(rig, autojump_clock):
    rec = Recorder(lambda n, i: Outcome(REJECTED, "HTTP 410") if n.device.token == "dead" else Outcome(DELIVERED))
    svc = await rig.service(rec)
    await rig.token(42, "dead", device="old-phone")
    await rig.token(42, "live", device="new-phone")
    svc.notify_offline(rig.message(), [42])
    await trio.sleep(10)
    assert [t.token for t in await rig.store.push_tokens(42)] == ["live"]
    svc.notify_offline(rig.message(), [42])
    await trio.sleep(10)
    assert [n.first_seq for n in rec.to("dead")] == [1]
    assert [n.first_seq for n in rec.to("live")] == [1, 2]
    assert svc.statistics()["rejected"] == 1


async def test_refused_request_is_not_retried(rig, autojump_clock):
    rec = Recorder(lambda n, i: Outcome(FAILED, "HTTP 400"))
    svc = await rig.service(rec)
    await rig.token(42, "t42")
    svc.notify_offline(rig.message(), [42])
    await trio.sleep(60)
    assert len(rec.sent) == 1 and svc.statistics()["failed"] == 1 and await rig.outbox() == []


async def test_full_queue_drops_without_blocking(rig, autojump_clock):
    svc = PushService(rig.store, push_config(queue_max=3), "s1", Recorder(), now=trio.current_time)
    for _ in range(5):  # not running: nothing drains the queue
        svc.notify_offline(rig.message(), [42, 43])
    assert svc.statistics()["dropped"] == 4 and svc.statistics()["queue"] == 3


async def test_group_of_1000_is_bounded_in_recipients_and_written_in_bounded_batches(rig, autojump_clock,
                                                                                   monkeypatch):
    """One message to a group of 1,000 is one queue item of 999 recipients: the queue is bounded in
    recipients too, and the writer's outbox writes hold at most WRITE_BATCH_RECIPIENTS rows."""
    from chatd.push import service
    monkeypatch.setattr(service, "QUEUE_MAX_RECIPIENTS", 2500)
    monkeypatch.setattr(service, "WRITE_BATCH_RECIPIENTS", 1000)
    members = list(range(2, 1001))  # 999 offline members with tokens; the sender (1) is not pushed
    for u in members:
        await rig.token(u, f"t{u}")
    svc = PushService(rig.store, push_config(), "s1", Recorder(), now=trio.current_time)
    for _ in range(3):  # not running yet: the third would make 2,997 waiting recipients
        svc.notify_offline(rig.message(), members)
    assert (svc.statistics()["queue"], svc.statistics()["dropped"]) == (2, 999)
    writes: list[int] = []
    enqueue = rig.store.enqueue_pushes

    async def recorded(entries):
        writes.append(len(entries))
        return await enqueue(entries)
    monkeypatch.setattr(rig.store, "enqueue_pushes", recorded)
    svc.cancel = trio.CancelScope()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with svc.cancel:
            await svc.run(task_status=task_status)
    await rig.nursery.start(run)
    await svc.flush()
    assert writes == [999, 999]  # one item per write: two would pass 1,000 recipients
    assert len(await rig.outbox()) == 2 * 999
    svc.cancel.cancel()


async def test_restart_sends_the_outbox_and_nothing_twice(rig, autojump_clock):
    rec = Recorder(lambda n, i: Outcome(RETRY, "down"))
    svc = await rig.service(rec)
    await rig.token(42, "t42")
    for _ in range(3):
        svc.notify_offline(rig.message(), [42])
    await trio.sleep(4)
    assert len(rec.sent) >= 1 and len(await rig.outbox()) == 3
    svc.cancel.cancel()  # the process stops; its leases are released
    await trio.testing.wait_all_tasks_blocked()
    rec2 = Recorder()
    await rig.service(rec2)  # a new process on the same store
    await trio.sleep(5)
    assert [(n.count, n.first_seq, n.last_seq) for _, n in rec2.sent] == [(3, 1, 3)]
    assert await rig.outbox() == []


async def test_cluster_processes_split_the_slots_and_take_over(rig, autojump_clock):
    shards = ["s1", "s2"]
    rec1, rec2 = Recorder(), Recorder()
    svc1 = await rig.service(rec1, owner="s1", shards=lambda: list(shards))
    svc2 = await rig.service(rec2, owner="s2", shards=lambda: list(shards))
    users = list(range(1000, 1000 + PUSH_SLOTS))  # one user per slot
    for u in users:
        await rig.token(u, f"t{u}")
    m = rig.message()
    svc1.notify_offline(m, users[: PUSH_SLOTS // 2])  # each writes for half of the users ...
    svc2.notify_offline(m, users[PUSH_SLOTS // 2:])
    await trio.sleep(10)
    got = sorted(n.user_id for r in (rec1, rec2) for _, n in r.sent)
    assert got == users  # ... and every user got exactly one push, from the slot's holder
    slots1 = {push_slot(n.user_id) for _, n in rec1.sent}
    slots2 = {push_slot(n.user_id) for _, n in rec2.sent}
    assert slots1 == set(svc1.wanted_slots()) and slots2 == set(svc2.wanted_slots())
    assert slots1 and slots2 and not slots1 & slots2
    # s2 dies without releasing its leases (kill -9); s1 takes its slots once they expire
    svc2.cancel.cancel()
    svc2._held.clear()
    await rig.store.claim_push_slots("s2", sorted(slots2), 30.0, trio.current_time())
    shards.remove("s2")
    svc1.on_view_change(None, None)
    m2 = rig.message()
    svc1.notify_offline(m2, users)
    await trio.sleep(60)
    assert sorted(n.user_id for _, n in rec1.sent if n.last_seq == 2) == users
    assert all(n.last_seq == 1 for _, n in rec2.sent)
    assert await rig.outbox() == []


async def test_no_push_when_the_member_reconnects_within_the_window(rig, autojump_clock):
    rec = Recorder()
    online: set[int] = set()
    svc = PushService(rig.store, push_config(), "s1", rec, online=online.__contains__, now=trio.current_time)
    await rig.nursery.start(svc.run)
    await rig.token(42, "t42")
    await rig.token(43, "t43")
    svc.notify_offline(rig.message(), [42, 43])
    await trio.sleep(1.0)
    online.add(42)  # 42 connects before the 2 s window ends: its session syncs the message
    await trio.sleep(5)
    assert [n.user_id for _, n in rec.sent] == [43]
    assert await rig.outbox() == [] and svc.statistics()["came_online"] == 1
