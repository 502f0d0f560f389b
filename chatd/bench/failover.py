"""``chatd bench failover``: faults under load against a local cluster (``bin/chatd-local-cluster``).

The run: users in 1:1 pairs and a few groups, one device each, send at ``rate`` messages per second
in total, as docs/protocol.md asks of a client: an ``unavailable`` send is resent with the same
``client_msg_id`` after ``retry_after_ms``; when its connection ends the device logs in again
(discovery gives a live shard), reconnects with ``auth`` + cursors and resends what was not acked.
Meanwhile the faults are applied one at a time, each followed by a recovery and a quiet period:

* ``kill:SHARD``   kill -9 of the shard; started again (same command line) after ``restart_s``.
* ``freeze:SHARD`` SIGSTOP for ``freeze_s`` (longer than the ZooKeeper session: a zombie owner), then SIGCONT.
* ``zk``           kill -9 of ZooKeeper; started again (same command line and data) after ``zk_down_s``.

Processes are found through the cluster's pid files (``CLUSTER_DIR/run/*.pid``); a restarted one
gets its pid file rewritten, so ``bin/chatd-local-cluster stop`` still stops it.

Per fault, over the sends made from the fault until the next one: the time to the first ack on a
channel the faulted shard owned (kill, freeze) or on any channel (zk: writes resumed), counted from
the fault and, for zk, from ZooKeeper's restart; sends answered ``unavailable``; sends answered
after ``answer_bound_s`` or never (must be 0; a send whose connection closed under it is counted
apart, as the client knows at once, and so is a send not answered in time by the faulted shard
itself, to a device connected to it: no server can answer there); duplicated and out-of-order
deliveries seen. At the end, after
every device caught up: lost messages (acked but missing on some member device), and seqs acked
for two different messages (both must be 0).

Resource policy: everything runs in one trio loop; the processes it restarts are detached from it
(their own session, output appended to ``CLUSTER_DIR/logs``) and left running for the operator.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from ..discovery.view import ShardInfo, View
from ..ids import dm_channel_id
from .httpclient import HTTPClient

_WS_ERRORS = (ConnectionClosed, HandshakeError, OSError, trio.BrokenResourceError, trio.ClosedResourceError,
              trio.TooSlowError)


class FailoverError(RuntimeError):
    pass


@dataclass
class FailoverOptions:
    api: str = "http://127.0.0.1:8080"
    cluster_dir: str = "./local-cluster"
    faults: tuple[str, ...] = ("kill:s1", "freeze:s2", "zk")
    clients: int = 40
    group_size: int = 10
    rate: float = 100.0
    warmup_s: float = 3.0
    freeze_s: float = 6.0
    restart_s: float = 8.0
    zk_down_s: float = 5.0
    settle_s: float = 6.0
    answer_bound_s: float = 2.5
    drain_s: float = 20.0
    seed: int = 1


@dataclass
class Attempt:
    channel: str
    sent: float
    answered: float | None = None
    outcome: str = ""  # "ack" | an error code | "closed" (the connection ended under it) | "none"
    shard: str = ""  # the shard the sending device was connected to


@dataclass
class Device:
    index: int
    user_id: int
    username: str
    device_id: str
    token: str
    ws_url: str
    shard: str
    channels: list[str]
    cursors: dict[str, int] = field(default_factory=dict)
    received: dict[str, set] = field(default_factory=dict)
    anomalies: list[tuple[float, str]] = field(default_factory=list)  # (time, "dup" | "order")
    acked: dict[str, tuple[str, int]] = field(default_factory=dict)  # client_msg_id -> (channel, seq)
    attempts: list[Attempt] = field(default_factory=list)


class _Conn:
    """One WebSocket of a device: a reader task routes replies to waiters and books messages."""

    def __init__(self, ws, dev: Device):
        self.ws, self.dev = ws, dev
        self.waiters: dict[int, list] = {}  # request id -> [event, reply]
        self.closed = trio.Event()

    async def read(self) -> None:
        try:
            while True:
                f = json.loads(await self.ws.get_message())
                if f.get("type") == "message":
                    self._book(f)
                elif "id" in f and f["id"] in self.waiters:
                    slot = self.waiters.pop(f["id"])
                    slot[1] = f
                    slot[0].set()
        except _WS_ERRORS:
            pass
        finally:
            self.closed.set()
            for slot in self.waiters.values():
                slot[0].set()

    def _book(self, f: dict) -> None:
        dev, ch, seq = self.dev, f["channel_id"], f["seq"]
        cur = dev.cursors.get(ch, 0)
        got = dev.received.setdefault(ch, set())
        if seq in got:
            dev.anomalies.append((trio.current_time(), "dup"))
        elif seq != cur + 1:
            dev.anomalies.append((trio.current_time(), "order"))
        got.add(seq)
        dev.cursors[ch] = max(cur, seq)

    async def request(self, frame: dict, rid: int, timeout_s: float) -> dict | None:
        """The reply; None if the connection closed first; {} after ``timeout_s``."""
        slot = self.waiters[rid] = [trio.Event(), None]
        await self.ws.send_message(json.dumps({**frame, "id": rid}))
        with trio.move_on_after(timeout_s):
            await slot[0].wait()
            return slot[1]
        self.waiters.pop(rid, None)
        return {}


class FailoverRun:
    def __init__(self, opts: FailoverOptions, log=print):
        self.opts = opts
        self.log = log
        self.dir = Path(opts.cluster_dir).resolve()
        self.devices: list[Device] = []
        self.stopping = False
        self.rids = iter(range(1, 1 << 62))
        self.password = "failover-" + secrets.token_hex(6)
        self.http = HTTPClient(opts.api)

    # ---- processes ---------------------------------------------------------------------------
    def _pid(self, name: str) -> int:
        try:
            return int((self.dir / "run" / f"{name}.pid").read_text())
        except (OSError, ValueError):
            raise FailoverError(f"no pid file for {name} in {self.dir}/run (is the local cluster running?)") from None

    def _capture(self, name: str) -> tuple[list[str], str]:
        pid = self._pid(name)
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        return [a.decode() for a in args], os.readlink(f"/proc/{pid}/cwd")

    def _respawn(self, name: str, argv: list[str], cwd: str) -> None:
        log = open(self.dir / "logs" / f"{'zookeeper' if name == 'zookeeper' else name}.log", "ab")
        proc = subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        (self.dir / "run" / f"{name}.pid").write_text(f"{proc.pid}\n")

    # ---- set-up ------------------------------------------------------------------------------
    async def _call(self, method, path, body=None, token=None, ok=(200, 201), http=None) -> dict:
        status, reply = await (http or self.http).request(method, path, body, token)
        if status not in ok:
            raise FailoverError(f"{method} {path}: HTTP {status}: {reply}")
        return reply

    async def _login(self, dev: Device) -> None:
        http = HTTPClient(self.opts.api, timeout_s=10)  # one per caller: a client serves one task at a time
        try:
            r = await self._call("POST", "/v1/login", {"username": dev.username, "password": self.password,
                                                       "device_id": dev.device_id}, http=http)
        finally:
            await http.aclose()
        dev.token, dev.ws_url, dev.shard = r["token"], r["ws_url"], r["shard_id"]

    async def setup(self) -> None:
        o = self.opts
        prefix = f"fo{o.seed % 1000}-{secrets.token_hex(3)}-"
        for i in range(o.clients):
            name = f"{prefix}{i}"
            await self._call("POST", "/v1/users", {"username": name, "password": self.password}, ok=(201,))
            r = await self._call("POST", "/v1/login", {"username": name, "password": self.password})
            self.devices.append(Device(i, r["user"]["id"], name, r["device_id"], r["token"], r["ws_url"],
                                       r["shard_id"], []))
        for i in range(0, len(self.devices) - 1, 2):  # 1:1 pairs
            a, b = self.devices[i], self.devices[i + 1]
            ch = dm_channel_id(a.user_id, b.user_id)
            a.channels.append(ch)
            b.channels.append(ch)
        for g in range(0, len(self.devices) - o.group_size + 1, o.group_size * 2):  # every other block: a group
            members = self.devices[g:g + o.group_size]
            r = await self._call("POST", "/v1/groups", {"name": f"{prefix}g{g}",
                                                        "members": [d.user_id for d in members[1:]]},
                                 token=members[0].token)
            for d in members:
                d.channels.append(r["channel"]["id"])
        for d in self.devices:
            d.cursors = {ch: 0 for ch in d.channels}

    # ---- the devices -------------------------------------------------------------------------
    async def _device(self, dev: Device) -> None:
        """Connect, send (resending until acked), reconnect when the connection ends."""
        rng = random.Random(self.opts.seed * 100_003 + dev.index)
        period = len(self.devices) / self.opts.rate
        pending: str | None = None  # the client_msg_id being sent (resent after a reconnect)
        channel = ""
        n = 0
        while True:
            try:
                async with open_websocket_url(dev.ws_url, subprotocols=["chatd.v1.json"],
                                              connect_timeout=5, disconnect_timeout=1) as ws:
                    conn = _Conn(ws, dev)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(conn.read)
                        auth = await conn.request({"type": "auth", "token": dev.token, "cursors": dict(dev.cursors)},
                                                  next(self.rids), 10)
                        if not auth or auth.get("type") != "auth":
                            raise OSError(f"auth failed: {auth}")
                        await trio.sleep(rng.random() * period)
                        while True:
                            if self.stopping and pending is None:  # done sending; keep receiving
                                await conn.closed.wait()
                                break
                            if pending is None:
                                channel = rng.choice(dev.channels)
                                pending, n = f"{dev.username}-{n}", n + 1
                            outcome = await self._send(conn, dev, channel, pending)
                            if outcome == "ack":
                                pending = None
                                await trio.sleep(period * (0.5 + rng.random()))
                            elif outcome == "closed":
                                break
                            else:
                                await trio.sleep(0.5)  # retry_after_ms of chatd's unavailable
                        nursery.cancel_scope.cancel()
            except _WS_ERRORS:
                pass
            await trio.sleep(0.3)
            try:
                await self._login(dev)  # discovery now names a live shard
            except (FailoverError, OSError, trio.TooSlowError, ValueError):
                pass

    async def _send(self, conn: _Conn, dev: Device, channel: str, cmid: str) -> str:
        att = Attempt(channel, trio.current_time(), shard=dev.shard)
        dev.attempts.append(att)
        try:
            reply = await conn.request({"type": "send", "channel_id": channel, "client_msg_id": cmid,
                                        "body": f"failover {cmid} {uuid.uuid4().hex[:8]}"},
                                       next(self.rids), self.opts.answer_bound_s * 8)
        except _WS_ERRORS:
            reply = None
        if reply is None:
            att.outcome = "closed"
            return "closed"
        if reply == {}:
            att.outcome = "none"  # never answered (within 8x the bound)
            return "none"
        att.answered = trio.current_time()
        if reply["type"] == "ack":
            att.outcome = "ack"
            dev.acked[cmid] = (reply["channel_id"], reply["seq"])
            return "ack"
        att.outcome = reply.get("code", "error")
        if att.outcome not in ("unavailable", "rate_limited"):
            raise FailoverError(f"send answered {reply}")
        return att.outcome

    # ---- faults ------------------------------------------------------------------------------
    async def _owned_by(self, shard: str) -> set[str]:
        health = await self._call("GET", "/healthz")
        view = View(0, {s: ShardInfo(s, "") for s in health["shards"]})
        return {ch for d in self.devices for ch in d.channels if view.owner_of(ch) == shard}

    async def _fault(self, spec: str) -> dict:
        o = self.opts
        kind, _, target = spec.partition(":")
        rec = {"fault": spec}
        if kind in ("kill", "freeze"):
            rec["channels"] = await self._owned_by(target)
            argv, cwd = self._capture(target)
            rec["t"] = trio.current_time()
            os.kill(self._pid(target), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
            self.log(f"{spec}: {len(rec['channels'])} channels owned by {target}")
            if kind == "kill":
                await trio.sleep(o.restart_s)
                self._respawn(target, argv, cwd)
            else:
                await trio.sleep(o.freeze_s)
                os.kill(self._pid(target), signal.SIGCONT)
            rec["victim"], rec["t_end"] = target, trio.current_time()
        elif kind == "zk":
            argv, cwd = self._capture("zookeeper")
            rec["t"] = trio.current_time()
            os.kill(self._pid("zookeeper"), signal.SIGKILL)
            await trio.sleep(o.zk_down_s)
            self._respawn("zookeeper", argv, cwd)
            rec["t_back"] = trio.current_time()
        else:
            raise FailoverError(f"unknown fault {spec!r} (kill:SHARD, freeze:SHARD, zk)")
        await trio.sleep(o.settle_s)
        return rec

    # ---- the run -----------------------------------------------------------------------------
    async def run(self) -> dict:
        o = self.opts
        await self.setup()
        self.log(f"{len(self.devices)} devices, {sum(1 for _ in self._channels())} channels, {o.rate:g} sends/s")
        faults = []
        async with trio.open_nursery() as nursery:
            for d in self.devices:
                nursery.start_soon(self._device, d)
            await trio.sleep(o.warmup_s)
            t_start = trio.current_time()
            for spec in o.faults:
                faults.append(await self._fault(spec))
            self.stopping = True
            with trio.move_on_after(o.drain_s) as drained:
                await self._wait_caught_up(nursery)
            if drained.cancelled_caught:
                nursery.cancel_scope.cancel()
        await self.http.aclose()
        return self._report(faults, t_start)

    def _channels(self):
        return {ch for d in self.devices for ch in d.channels}

    def _heads(self) -> dict[str, int]:
        heads: dict[str, int] = {}
        for d in self.devices:
            for ch, seq in d.acked.values():
                heads[ch] = max(heads.get(ch, 0), seq)
        return heads

    async def _wait_caught_up(self, nursery) -> None:
        """Until every sender is done and every device has every channel up to its head."""
        while True:
            heads = self._heads()
            if all(d.cursors.get(ch, 0) >= heads.get(ch, 0) for d in self.devices for ch in d.channels):
                if all(not d.attempts or d.attempts[-1].outcome == "ack" for d in self.devices):
                    nursery.cancel_scope.cancel()
                    return
            await trio.sleep(0.2)

    def _report(self, faults: list[dict], t_start: float) -> dict:
        o = self.opts
        attempts = [a for d in self.devices for a in d.attempts]
        anomalies = [x for d in self.devices for x in d.anomalies]
        out = []
        for i, f in enumerate(faults):
            t0 = f["t"]
            t1 = faults[i + 1]["t"] if i + 1 < len(faults) else float("inf")
            window = [a for a in attempts if t0 <= a.sent < t1]
            # A device connected to a killed or frozen shard itself: nobody can answer it there
            # (its client notices by the closed connection, or by heartbeats going unanswered); its
            # sends that were not answered in time while that shard was down are counted apart.
            def stranded(a: Attempt) -> bool:
                if a.outcome == "ack" and a.answered - a.sent <= o.answer_bound_s:
                    return False
                end = a.answered if a.answered is not None else float("inf")
                return any(g.get("victim") == a.shard and a.sent <= g["t_end"] and end >= g["t"] for g in faults)
            on_victim = [a for a in window if stranded(a)]
            window = [a for a in window if not stranded(a)]
            acks = [a for a in window if a.outcome == "ack" and (not f.get("channels") or a.channel in f["channels"])]
            first = min((a.answered for a in acks), default=None)
            row = {"fault": f["fault"], "sends": len(window),
                   "first_ack_s": None if first is None else round(first - t0, 2),
                   "unavailable": sum(1 for a in window if a.outcome == "unavailable"),
                   "unanswered_beyond_bound": sum(1 for a in window if a.outcome == "none" or (
                       a.answered is not None and a.answered - a.sent > o.answer_bound_s)),
                   "connection_closed": sum(1 for a in window if a.outcome == "closed"),
                   "on_faulted_shard": len(on_victim),
                   "slowest_answer_s": round(max((a.answered - a.sent for a in window if a.answered), default=0), 2),
                   "duplicated": sum(1 for t, k in anomalies if k == "dup" and t0 <= t < t1),
                   "out_of_order": sum(1 for t, k in anomalies if k == "order" and t0 <= t < t1)}
            late = [a for a in window if a.outcome == "none" or (a.answered is not None
                                                                 and a.answered - a.sent > o.answer_bound_s)]
            row["late"] = [{"sent_s": round(a.sent - t0, 2), "waited_s": None if a.answered is None else
                            round(a.answered - a.sent, 2), "outcome": a.outcome, "on": a.shard,
                            "channel": a.channel} for a in late[:20]]
            if "t_back" in f:
                after = min((a.answered for a in window if a.outcome == "ack" and a.sent >= f["t_back"]), default=None)
                row["first_ack_after_restart_s"] = None if after is None else round(after - f["t_back"], 2)
            out.append(row)
        heads = self._heads()
        lost = sum(len(set(range(1, heads.get(ch, 0) + 1)) - d.received.get(ch, set()))
                   for d in self.devices for ch in d.channels)
        by_seq: dict[tuple, set] = {}
        for d in self.devices:
            for cmid, key in d.acked.items():
                by_seq.setdefault(key, set()).add(cmid)
        totals = {"acked": sum(len(d.acked) for d in self.devices), "attempts": len(attempts),
                  "lost": lost, "seq_given_twice": sum(1 for s in by_seq.values() if len(s) > 1),
                  "duplicated": sum(1 for _, k in anomalies if k == "dup"),
                  "out_of_order": sum(1 for _, k in anomalies if k == "order"),
                  "unanswered_beyond_bound": sum(r["unanswered_beyond_bound"] for r in out),
                  "seconds": round(trio.current_time() - t_start, 1)}
        ok = all(totals[k] == 0 for k in ("lost", "seq_given_twice", "duplicated", "out_of_order",
                                          "unanswered_beyond_bound"))
        return {"options": {k: v for k, v in vars(o).items()}, "faults": out, "totals": totals, "ok": ok}


def format_report(report: dict) -> str:
    o = report["options"]
    lines = [f"chatd bench failover: {o['clients']} devices, {o['rate']:g} sends/s, answer bound {o['answer_bound_s']} s",
             f"{'fault':<12} {'sends':>6} {'first ack':>9} {'after restart':>13} {'unavail.':>8} "
             f"{'beyond bound':>12} {'conn closed':>11} {'on faulted':>10} {'slowest':>7} {'dup':>4} {'order':>5}"]
    for r in report["faults"]:
        fa = "-" if r["first_ack_s"] is None else f"{r['first_ack_s']:.2f}s"
        ar = r.get("first_ack_after_restart_s")
        ar = "" if "first_ack_after_restart_s" not in r else ("-" if ar is None else f"{ar:.2f}s")
        lines.append(f"{r['fault']:<12} {r['sends']:>6} {fa:>9} {ar:>13} {r['unavailable']:>8} "
                     f"{r['unanswered_beyond_bound']:>12} {r['connection_closed']:>11} {r['on_faulted_shard']:>10} "
                     f"{r['slowest_answer_s']:>6.2f}s "
                     f"{r['duplicated']:>4} {r['out_of_order']:>5}")
    t = report["totals"]
    lines.append(f"acked {t['acked']} messages in {t['seconds']} s; lost {t['lost']}, seq given twice "
                 f"{t['seq_given_twice']}, duplicated {t['duplicated']}, out of order {t['out_of_order']}, "
                 f"unanswered beyond the bound {t['unanswered_beyond_bound']}: {'OK' if report['ok'] else 'FAILED'}")
    return "\n".join(lines)


def run_failover(opts: FailoverOptions, log=print) -> dict:
    started = time.monotonic()
    report = trio.run(FailoverRun(opts, log).run)
    report["totals"]["wall_s"] = round(time.monotonic() - started, 1)
    return report
