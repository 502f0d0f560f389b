"""The message lifecycle as a hypothesis state machine against a real ``chatd run``, on SQLite and on
a real Cassandra (docs/protocol.md, "The message lifecycle").

Three users, two devices each, one group. Rules: send (sometimes a reply), edit, delete, react,
unreact by any user on any device, at any target (their own or not, deleted or not, an event's seq),
and devices disconnecting and reconnecting with their cursors. Every request's answer must be the
one a pure reference model predicts (the ack, or the documented error code); every device must
receive each row once, in seq order, without a gap. At the end every device's folded view
(``chatd.lifecycle.ChannelView``: the fold the page specifies) equals the fold of the HTTP history
of its user and the reference model's state.

The machine is synchronous (hypothesis's stateful testing); the server and the clients live in a
trio loop on a thread of their own, which the rules call into (:class:`Portal`).
"""

from __future__ import annotations

import contextlib
import threading
import uuid

import pytest
import trio
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from trio_websocket import open_websocket_url

from chatd.lifecycle import ChannelView
from chatd.store.cassandra_schema import drop_keyspace, migrate

from .helpers import WSClient, make_config, RunningServer

EMOJI = ["👍", "🎉", ":tada:"]
N_USERS, N_DEVICES = 3, 2


class Portal:
    """A trio loop on a thread: a chatd server and the clients, called into from the machine."""

    def __init__(self, config):
        self.config = config
        self.token = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: trio.run(self._main), daemon=True)
        self._error: BaseException | None = None
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error

    async def _main(self):
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                self.server = await RunningServer(nursery, self.config).start()
                self.token = trio.lowlevel.current_trio_token()
                self._stop = trio.Event()
                self._ready.set()
                await self._stop.wait()
                await self.server.stop()
                nursery.cancel_scope.cancel()
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            self._error = e
            self._ready.set()

    def run(self, afn, *args):
        return trio.from_thread.run(afn, *args, trio_token=self.token)

    def close(self):
        trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join(30)

    async def connect(self, token: str, cursors: dict):
        """A connected, authenticated client and the cancel scope that disconnects it."""
        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with trio.CancelScope() as scope:
                async with open_websocket_url(self.server.ws_url, subprotocols=["chatd.v1.json"],
                                              max_message_size=64 * 1024 * 1024) as ws:
                    client = WSClient(ws, "json")
                    task_status.started((client, scope))
                    await client._pump()
        client, scope = await self.nursery.start(run)
        reply = await client.request({"type": "auth", "token": token, "cursors": cursors})
        assert reply["type"] == "auth", reply
        return client, scope


class Device:
    def __init__(self, user: int, token: str):
        self.user = user
        self.token = token
        self.view = ChannelView(user)
        self.cursor = 0
        self.client = None
        self.scope = None

    def take(self, channel_id: str) -> None:
        """Fold what arrived: each row once, in seq order, no gap."""
        if self.client is None:
            return
        for f in [f for f in self.client.inbox if f.get("type") == "message" and "id" not in f]:
            self.client.inbox.remove(f)
            if f["channel_id"] != channel_id:
                continue
            assert f["seq"] == self.cursor + 1, f"device of {self.user}: got seq {f['seq']} after {self.cursor}"
            self.cursor = f["seq"]
            self.view.apply(f)


class Model:
    """The reference: what the channel holds, from the answers in order (pure, no I/O)."""

    def __init__(self, owner: int):
        self.owner = owner
        self.head = 0
        self.messages: dict[int, dict] = {}  # seq -> state
        self.kinds: dict[int, str] = {}

    def expect(self, user: int, kind: str, target: int) -> str | None:
        """The error code the server must answer, or None (an ack)."""
        m = self.messages.get(target)
        if kind == "send":
            return None
        if kind == "reply":
            return None if m is not None else "no_such_message"
        if m is None:
            return "no_such_message"
        if m["deleted"] is not None:
            return "message_deleted"
        if kind == "edit" and m["sender"] != user:
            return "not_author"
        if kind == "delete" and user not in (m["sender"], self.owner):
            return "not_author"
        return None

    def applied(self, user: int, kind: str, target: int, ack: dict, body: str = "", emoji: str = "") -> None:
        assert ack["seq"] == self.head + 1, (ack, self.head)
        self.head = ack["seq"]
        self.kinds[ack["seq"]] = kind
        if kind in ("send", "reply"):
            self.messages[ack["seq"]] = {"sender": user, "body": body, "edited_at": None, "deleted": None,
                                         "reactions": {}, "reply_to": target if kind == "reply" else 0}
            return
        m = self.messages[target]
        if kind == "edit":
            m["body"], m["edited_at"] = body, ack["created_at"]
        elif kind == "delete":
            m.update(body="", edited_at=None, deleted=user, reactions={})
        elif kind == "react":
            m["reactions"].setdefault(emoji, set()).add(user)
        else:
            m["reactions"].get(emoji, set()).discard(user)
            if not m["reactions"].get(emoji, True):
                del m["reactions"][emoji]

    def snapshot(self, viewer: int) -> dict:
        return {seq: (m["sender"], m["body"], m["edited_at"], m["deleted"],
                      tuple(sorted((e, len(us)) for e, us in m["reactions"].items())),
                      tuple(sorted(e for e, us in m["reactions"].items() if viewer in us)), m["reply_to"])
                for seq, m in self.messages.items()}


class LifecycleMachine(RuleBasedStateMachine):
    portal: Portal = None  # set by the test

    @initialize()
    def setup(self):
        p = self.portal
        api = p.server.api
        tag = uuid.uuid4().hex[:8]
        self.users = [p.run(api.signup_login, f"u{i}{tag}") for i in range(N_USERS)]
        ids = [u["user"]["id"] for u in self.users]
        r = p.run(api.call, "POST", "/v1/groups", {"name": "model", "members": ids[1:]}, self.users[0]["token"])
        assert r.status == 201, r
        self.ch = r.body["channel"]["id"]
        self.model = Model(ids[0])
        self.devices = []
        for u in self.users:
            for _ in range(N_DEVICES):
                login = p.run(api.login, u["user"]["username"])
                self.devices.append(Device(u["user"]["id"], login["token"]))
        for d in self.devices:
            d.client, d.scope = p.run(p.connect, d.token, {self.ch: 0})

    def teardown(self):
        for d in getattr(self, "devices", ()):
            if d.scope is not None:
                trio.from_thread.run_sync(d.scope.cancel, trio_token=self.portal.token)

    # ---- requests ----------------------------------------------------------------------------------
    def _online(self, i: int) -> Device:
        online = [d for d in self.devices if d.client is not None]
        return online[i % len(online)]

    def _request(self, d: Device, frame: dict) -> dict:
        reply = self.portal.run(d.client.request, {"channel_id": self.ch, "client_msg_id": uuid.uuid4().hex, **frame})
        return reply

    def _target(self, pick: int) -> int:
        return 1 + pick % (self.model.head + 1)  # any seq: messages, events, and one past the head

    def _check(self, d: Device, kind: str, target: int, reply: dict, **fields) -> None:
        code = self.model.expect(d.user, kind, target)
        if code is None:
            assert reply["type"] == "ack", (kind, target, reply)
            self.model.applied(d.user, kind, target, reply, **fields)
        else:
            assert (reply["type"], reply.get("code")) == ("error", code), (kind, target, reply)

    @rule(dev=st.integers(0, 99), body=st.text(max_size=12))
    def send(self, dev, body):
        d = self._online(dev)
        reply = self._request(d, {"type": "send", "body": body})
        self._check(d, "send", 0, reply, body=body)

    @precondition(lambda self: self.model.head > 0)
    @rule(dev=st.integers(0, 99), pick=st.integers(0, 999), body=st.text(max_size=12))
    def reply(self, dev, pick, body):
        d, target = self._online(dev), self._target(pick)
        reply = self._request(d, {"type": "send", "body": body, "reply_to": target})
        self._check(d, "reply", target, reply, body=body)

    @precondition(lambda self: self.model.head > 0)
    @rule(dev=st.integers(0, 99), pick=st.integers(0, 999), body=st.text(min_size=1, max_size=12))
    def edit(self, dev, pick, body):
        d, target = self._online(dev), self._target(pick)
        self._check(d, "edit", target, self._request(d, {"type": "edit", "target_seq": target, "body": body}), body=body)

    @precondition(lambda self: self.model.head > 0)
    @rule(dev=st.integers(0, 99), pick=st.integers(0, 999))
    def delete(self, dev, pick):
        d, target = self._online(dev), self._target(pick)
        self._check(d, "delete", target, self._request(d, {"type": "delete", "target_seq": target}))

    @precondition(lambda self: self.model.head > 0)
    @rule(dev=st.integers(0, 99), pick=st.integers(0, 999), emoji=st.sampled_from(EMOJI),
          kind=st.sampled_from(["react", "react", "unreact"]))
    def react(self, dev, pick, emoji, kind):
        d, target = self._online(dev), self._target(pick)
        reply = self._request(d, {"type": kind, "target_seq": target, "emoji": emoji})
        self._check(d, kind, target, reply, emoji=emoji)

    # ---- devices going away and coming back with their cursors ---------------------------------------
    @precondition(lambda self: sum(d.client is not None for d in self.devices) > 1)
    @rule(dev=st.integers(0, 99))
    def disconnect(self, dev):
        d = self._online(dev)
        d.take(self.ch)  # what arrived before the cut is the device's; the rest comes by sync
        trio.from_thread.run_sync(d.scope.cancel, trio_token=self.portal.token)
        d.client = d.scope = None

    @precondition(lambda self: any(d.client is None for d in self.devices))
    @rule(dev=st.integers(0, 99))
    def reconnect(self, dev):
        offline = [d for d in self.devices if d.client is None]
        d = offline[dev % len(offline)]
        d.client, d.scope = self.portal.run(self.portal.connect, d.token, {self.ch: d.cursor})

    @invariant()
    def rows_arrive_in_order(self):
        for d in getattr(self, "devices", ()):
            d.take(self.ch)

    # ---- the end: everyone converged -----------------------------------------------------------------
    def converged(self):
        p = self.portal
        for d in self.devices:
            if d.client is None:
                d.client, d.scope = p.run(p.connect, d.token, {self.ch: d.cursor})

        async def caught_up():
            with trio.fail_after(20):
                while True:
                    for d in self.devices:
                        d.take(self.ch)
                    if all(d.cursor == self.model.head for d in self.devices):
                        return
                    await trio.sleep(0.02)
        p.run(caught_up)
        for d in self.devices:
            history = ChannelView(d.user)
            for f in self._history(d):
                history.apply(f)
            want = self.model.snapshot(d.user)
            assert d.view.snapshot() == history.snapshot() == want, d.user
            # and each message row alone is in its current state (a device that never saw the events)
            folded = ChannelView(d.user)
            for f in self._history(d):
                if "kind" not in f:
                    folded.apply(f)
            assert folded.snapshot() == want, d.user

    def _history(self, d: Device) -> list[dict]:
        out, after = [], 0
        while True:
            r = self.portal.run(self.portal.server.api.call, "GET",
                                f"/v1/channels/{self.ch}/messages?after={after}&limit=37", None, d.token)
            assert r.status == 200, r
            out += r.body["messages"]
            if not r.body["more"]:
                return out
            after = out[-1]["seq"]


def _run_machine(config, examples: int, steps: int) -> None:
    portal = Portal(config)
    try:
        class Machine(LifecycleMachine):
            pass
        Machine.portal = portal

        original_teardown = Machine.teardown

        def teardown(self):
            try:
                if hasattr(self, "devices"):
                    self.converged()
            finally:
                original_teardown(self)
        Machine.teardown = teardown
        # (no shrinking: each step is a round trip to a real server; the failing steps are printed)
        Machine.TestCase.settings = settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                                             suppress_health_check=list(HealthCheck), database=None,
                                             phases=[Phase.explicit, Phase.generate], print_blob=False)
        Machine.TestCase().runTest()
    finally:
        with contextlib.suppress(Exception):
            portal.close()


def test_lifecycle_converges_on_sqlite(tmp_path):
    _run_machine(make_config(tmp_path), examples=6, steps=30)


@pytest.mark.timeout(300)
def test_lifecycle_converges_on_cassandra(tmp_path, cassandra_server):
    cfg = make_config(tmp_path)
    ccfg = cassandra_server.config()
    trio.run(migrate, ccfg)
    cfg.update({"store": {"backend": "cassandra"},
                "cassandra": {"contact_points": ccfg.contact_points, "port": ccfg.port, "local_dc": ccfg.local_dc,
                              "keyspace": ccfg.keyspace, "replication": ccfg.replication}}, source="test")
    cfg.validate()
    try:
        _run_machine(cfg, examples=3, steps=25)
    finally:
        trio.run(drop_keyspace, ccfg)
