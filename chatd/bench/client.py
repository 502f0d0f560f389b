"""One simulated device: a robust chatd client (protocol v1) that also keeps the books.

Behaviour (as ``docs/protocol.md`` asks of a client): ``auth`` with ``cursors`` for its channels on
every (re)connect; up to ``max_inflight`` sends in flight; every send not acked when the connection
ends is sent again, with the same ``client_msg_id``, on the next one; retryable errors
(``unavailable``, ``rate_limited``) are retried; after any close it reconnects (backoff capped at
2 s) until :meth:`BenchClient.stop`. ``drop`` is the storm scenario's deliberate disconnect.

Books, per channel: the seqs this device received (:class:`~chatd.bench.seqs.SeqSet`). A seq it has
already is *duplicated*; a new seq below the highest seen is *out of order*. Latencies: send→ack
from the scheduled send time (monotonic, this process); send→deliver from the scheduled wall-clock
time written into the body (``time.time_ns`` hex, first 16 characters) to this device's arrival,
counted for live deliveries to other devices only (not the sender's own echo, not sync catch-up).
"""

from __future__ import annotations

import json
import time

import msgpack
import trio

from .books import Outgoing, SendBooks
from .seqs import SeqSet
from .ws import OP_BINARY, OP_TEXT, WebSocket, WSClosed, WSError, encode_frame

RETRYABLE = frozenset({"unavailable", "rate_limited"})
AUTH_TIMEOUT_S = 15.0
_CONN_ERRORS = (OSError, WSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)


class Codec:
    """Frames of one format; the parts of a send frame that never change are encoded once."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        if fmt == "msgpack":
            self.subprotocol, self.opcode = "chatd.v1.msgpack", OP_BINARY
            self.decode = _unpack
            self.encode = msgpack.Packer(use_bin_type=True).pack
        else:
            self.subprotocol, self.opcode = "chatd.v1.json", OP_TEXT
            self.decode = json.loads
            self.encode = lambda obj: json.dumps(obj, separators=(",", ":")).encode()

    def sender(self, channel: str, tag: str, pad: str):
        """``build(request_id, n, wall_ns) -> payload`` for sends of one device to one channel."""
        if self.fmt == "msgpack":
            pack = msgpack.Packer(use_bin_type=True).pack

            def build(rid: int, n: int, wall_ns: int) -> bytes:
                return pack({"type": "send", "id": rid, "channel_id": channel, "client_msg_id": f"{tag}{n}",
                             "body": f"{wall_ns:016x}{pad}"})
            return build
        head = ('{"type":"send","channel_id":"%s","client_msg_id":"%s' % (channel, tag)).encode()
        tail = (pad + '"}').encode()

        def build(rid: int, n: int, wall_ns: int) -> bytes:
            return head + b'%d","id":%d,"body":"%016x' % (n, rid, wall_ns) + tail
        return build


def _unpack(payload: bytes):
    return msgpack.unpackb(payload, raw=False)


class Lifecycle:
    """One device's part of ``--mix``: which op each scheduled send becomes (seeded), its targets
    (this device's own acked messages; a deleted one is never targeted again), and the fold of
    every row the device receives (chatd/lifecycle.py ``ChannelView``), compared at the end with
    the folded HTTP history."""

    def __init__(self, mix: tuple, rng, user_id: int):
        self.ops = [op for op, _ in mix]
        self.weights = [w for _, w in mix]
        self.rng = rng
        self.own: list[int] = []
        self.reacted: set[int] = set()
        self.user_id = user_id
        self.views: dict = {}

    def choose(self, channel: str):
        op = self.rng.choices(self.ops, self.weights)[0]
        if op == "send" or not self.own:
            return None
        if op == "delete":
            target = self.own.pop(self.rng.randrange(len(self.own)))
            self.reacted.discard(target)
            return {"type": "delete", "channel_id": channel, "target_seq": target}
        target = self.rng.choice(self.own)
        if op == "edit":
            return {"type": "edit", "channel_id": channel, "target_seq": target}
        kind = "unreact" if target in self.reacted else "react"
        self.reacted.symmetric_difference_update({target})
        return {"type": kind, "channel_id": channel, "target_seq": target, "emoji": "👍"}

    def fold(self, frame: dict) -> None:
        from ..lifecycle import ChannelView
        view = self.views.get(frame["channel_id"])
        if view is None:
            view = self.views[frame["channel_id"]] = ChannelView(self.user_id)
        view.apply(frame)


class BenchClient:
    def __init__(self, dev, ctx):
        self.dev = dev
        self.ctx = ctx
        self.stats = ctx.stats
        self.user_id = dev.user_id
        self.tag = dev.tag
        self.recv: dict[str, SeqSet] = {c: SeqSet() for c in dev.channels}
        self.last: dict[str, int] = {c: 0 for c in dev.channels}
        self.sends = SendBooks(self.stats)  # outbox, in flight, request ids
        self._build = ctx.codec.sender(dev.send_channel, dev.tag, ctx.pad) if dev.send_channel else None
        self._n = 0
        self._hb: dict[int, int] = {}
        self._ws: WebSocket | None = None  # while authenticated: sends may be written directly
        self._scope: trio.CancelScope | None = None
        self._authed = trio.Event()
        self._auth_id = 0
        self._syncing = False
        self._conn_started_ns = 0
        self._stopping = False
        self._drop: str | None = None  # "abrupt" | "clean" while a storm drop is under way
        self._offline_until_ns = 0
        self._close: tuple[int, str] | None = None
        self.heartbeat_interval_s = ctx.heartbeat_s or 5.0
        self.connected = False
        self._reported = False  # the first outcome (connected / failed 3 times) told to the worker
        self.done = trio.Event()
        mix = ctx.opts.mix
        self.lifecycle = Lifecycle(mix, ctx.rng, dev.user_id) if mix else None

    def _frame(self, rid: int, item: Outgoing) -> bytes:
        """The payload of a scheduled item: a send (the prebuilt fast frame) or a lifecycle request."""
        if item.op is None:
            return self._build(rid, item.n, item.wall_ns)
        frame = {**item.op, "id": rid, "client_msg_id": f"{self.tag}{item.n}"}
        if frame["type"] == "edit":
            frame["body"] = f"{item.wall_ns:016x}{self.ctx.pad}e"
        return self.ctx.codec.encode(frame)

    # ---- what the worker calls -------------------------------------------------------------
    def enqueue(self, mono_ns: int, wall_ns: int) -> None:
        """A send is due: written at once when the connection is free for it (no task switch),
        otherwise queued for the writer task."""
        self._n += 1
        item = Outgoing(self._n, mono_ns, wall_ns,
                        None if self.lifecycle is None else self.lifecycle.choose(self.dev.send_channel))
        ws, sends = self._ws, self.sends
        # a lifecycle request always goes through the writer (keeps the order)
        if item.op is None and ws is not None and not sends.outbox and len(sends.inflight) < self.ctx.max_inflight:
            rid = sends.wrote_now(item)
            ws.send_nowait(encode_frame(self.ctx.codec.opcode, self._build(rid, item.n, item.wall_ns)))
            return
        sends.queue(item)

    def drop(self, abrupt: bool, offline_s: float) -> None:
        """Storm: end the connection now (TCP reset-like if ``abrupt``), reconnect after ``offline_s``."""
        if self.connected and self._scope is not None and not self._stopping:
            self._drop = "abrupt" if abrupt else "clean"
            self._offline_until_ns = time.monotonic_ns() + int(offline_s * 1e9)
            self._scope.cancel()

    def stop(self) -> None:
        self._stopping = True
        if self._scope is not None:
            self._scope.cancel()

    def idle(self) -> bool:
        """Connected, nothing waiting to be sent, nothing waiting for an ack."""
        return self.connected and not self.sends.outbox and not self.sends.inflight and not self._syncing

    def caught_up(self, heads: dict) -> bool:
        return all(self.recv[c].top() >= heads.get(c, 0) for c in self.recv)

    def books(self) -> dict:
        return {c: s.ranges for c, s in self.recv.items()}

    # ---- connection loop -------------------------------------------------------------------
    def _report(self, ok: bool) -> None:
        """Tell the worker the first outcome (connected, or failed 3 times), once."""
        if not self._reported:
            self._reported = True
            self.ctx.client_ready(ok)

    async def _backoff(self, failures: int) -> None:
        await trio.sleep(min(2.0, 0.1 * 2 ** min(failures, 5)) * (0.5 + self.ctx.rng.random()))

    async def _stay_offline(self) -> None:
        """Storm: until the drop's offline time is over."""
        delay_ns = self._offline_until_ns - time.monotonic_ns()
        if delay_ns > 0:
            await trio.sleep(delay_ns / 1e9)

    async def run(self) -> None:
        """Keep one connection up until :meth:`stop`; reports the first outcome to the worker."""
        ctx, stats = self.ctx, self.stats
        failures = 0
        first = True
        try:
            while not self._stopping:
                await self._stay_offline()
                self._close = None
                ws = None
                try:
                    async with ctx.connect_limiter:
                        self._conn_started_ns = time.monotonic_ns()
                        with trio.fail_after(ctx.opts.connect_timeout_s):
                            ws = await WebSocket.connect(self.dev.ws_url, ctx.codec.subprotocol)
                except _CONN_ERRORS as e:
                    stats.connection_failures += 1
                    stats.errors["connect:" + type(e).__name__] += 1
                    failures += 1
                    if failures >= 3:
                        self._report(False)
                    await self._backoff(failures)
                    continue
                if not first:
                    stats.reconnects += 1
                first = False
                stats.connects += 1
                ok = await self._serve(ws)
                if ok:
                    failures = 0
                else:
                    failures += 1
                drop = self._drop
                self._drop = None
                if drop is not None:
                    stats.drops += 1
                    if drop == "abrupt":
                        await ws.abort()
                    else:
                        await ws.close(1000, "storm")
                elif self._stopping:
                    with trio.CancelScope(shield=True):
                        await ws.close(1000, "bench done")
                else:
                    await ws.abort()
                    code = self._close[0] if self._close else 1006
                    stats.closes[str(code)] += 1
                    if not ok:
                        await self._backoff(failures)
        finally:
            self._report(False)
            self.done.set()

    async def _serve(self, ws: WebSocket) -> bool:
        """One connection's life; True if it authenticated."""
        self._authed = trio.Event()
        self.sends.rid = 0
        self._hb.clear()
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                if self._stopping:
                    nursery.cancel_scope.cancel()
                nursery.start_soon(self._reader, ws, nursery.cancel_scope)
                if not await self._auth(ws):
                    nursery.cancel_scope.cancel()
                    return False
                self.connected = True
                self._report(True)
                nursery.start_soon(self._guard, ws.run_flusher, nursery.cancel_scope)
                if self._build is not None:
                    nursery.start_soon(self._writer, ws, nursery.cancel_scope)
                    self._ws = ws
                nursery.start_soon(self._heartbeater, ws, nursery.cancel_scope)
            return self._authed.is_set()
        finally:
            self._ended()

    def _ended(self) -> None:
        """A connection (session) ended: not connected; every send not acked is sent again on the next."""
        self.connected = False
        self._ws = None
        self._scope = None
        self._syncing = False
        self.sends.requeue()

    async def _auth(self, ws: WebSocket) -> bool:
        self._auth_id = self.sends.next_id()
        frame = {"type": "auth", "id": self._auth_id, "token": self.dev.token}
        if self.recv:
            frame["cursors"] = {c: s.top() for c, s in self.recv.items()}
            for c, s in self.recv.items():
                self.last[c] = s.top()
            self._syncing = True
        try:
            await ws.send(self.ctx.codec.encode(frame), self.ctx.codec.opcode)
            with trio.fail_after(AUTH_TIMEOUT_S):
                await self._authed.wait()
        except _CONN_ERRORS as e:
            self._note_close(e)
            return False
        return True

    def _note_close(self, e: BaseException) -> None:
        if self._close is None:
            if isinstance(e, WSClosed):
                self._close = (e.code, e.reason)
            else:
                self.stats.errors["conn:" + type(e).__name__] += 1
                self._close = (1006, str(e))

    # ---- tasks of one connection -----------------------------------------------------------
    async def _guard(self, fn, scope: trio.CancelScope) -> None:
        try:
            await fn()
        except _CONN_ERRORS as e:
            self._note_close(e)
            scope.cancel()

    async def _reader(self, ws: WebSocket, scope: trio.CancelScope) -> None:
        decode = self.ctx.codec.decode
        on_frame = self._on_frame
        try:
            while True:
                msgs = await ws.receive()
                now = time.monotonic_ns()
                for _, payload in msgs:
                    on_frame(decode(payload), now)
        except _CONN_ERRORS as e:
            self._note_close(e)
            scope.cancel()

    async def _writer(self, ws: WebSocket, scope: trio.CancelScope) -> None:
        build = self._build
        opcode = self.ctx.codec.opcode
        max_inflight = self.ctx.max_inflight
        sends = self.sends

        def payload(rid: int, item: Outgoing) -> bytes:
            return encode_frame(opcode, build(rid, item.n, item.wall_ns) if item.op is None else self._frame(rid, item))
        try:
            while True:
                await sends.wait(max_inflight)
                await ws.send_frames(sends.take(max_inflight - len(sends.inflight), payload))
        except _CONN_ERRORS as e:
            self._note_close(e)
            scope.cancel()

    async def _heartbeater(self, ws: WebSocket, scope: trio.CancelScope) -> None:
        codec = self.ctx.codec
        try:
            await trio.sleep(self.ctx.rng.uniform(0, self.heartbeat_interval_s))
            while True:
                rid = self.sends.next_id()
                self._hb[rid] = time.monotonic_ns()
                await ws.send(codec.encode({"type": "heartbeat", "id": rid}), codec.opcode)
                await trio.sleep(self.heartbeat_interval_s)
        except _CONN_ERRORS as e:
            self._note_close(e)
            scope.cancel()

    # ---- incoming frames -------------------------------------------------------------------
    def _on_frame(self, obj: dict, now: int) -> None:
        t = obj.get("type")
        stats = self.stats
        if t == "message":
            ch = obj["channel_id"]
            seq = obj["seq"]
            got = self.recv.get(ch)
            if got is None:
                got = self.recv[ch] = SeqSet()
                self.last[ch] = 0
            if seq <= self.last[ch]:
                if seq in got:
                    stats.duplicated += 1
                    return
                stats.out_of_order += 1
                got.add(seq)
            else:
                self.last[ch] = seq
                if not got.add(seq):
                    return  # beyond a gap this device resynced from: asked for again, not a duplicate
            stats.delivered += 1
            stats.at("delivered", now)
            if self.lifecycle is not None:
                self.lifecycle.fold(obj)
            if self._syncing:
                stats.delivered_by_sync += 1
            elif "kind" in obj and obj["kind"] != "edit":
                pass  # a reaction or a delete: no send time in it
            elif not (obj["sender_id"] == self.user_id and obj["client_msg_id"].startswith(self.tag)):
                stats.h_deliver.record((now + self.ctx.wall_offset_ns - int(obj["body"][:16], 16)) // 1000)
        elif t == "ack":
            item = self.sends.answered(obj.get("id"))
            if item is None:
                return
            stats.acked += 1
            if self.lifecycle is not None and item.op is None and not obj.get("duplicate"):
                self.lifecycle.own.append(obj["seq"])
            if obj.get("duplicate"):
                stats.ack_duplicates += 1
            stats.acked_seqs[obj["channel_id"]].append(obj["seq"])
            stats.h_ack.record((now - item.mono_ns) // 1000)
            stats.at("acked", now)
        elif t == "heartbeat":
            sent = self._hb.pop(obj.get("id"), None)
            if sent is not None:
                stats.heartbeats += 1
                stats.hist["heartbeat"].record((now - sent) // 1000)
        elif t == "auth":
            hb = obj.get("heartbeat_interval_s")
            if not self.ctx.heartbeat_s and isinstance(hb, (int, float)) and hb > 0:
                self.heartbeat_interval_s = float(hb)
            if not self._syncing:
                stats.hist["connect"].record((now - self._conn_started_ns) // 1000)
            self._authed.set()
        elif t == "sync":
            if obj.get("id") == self._auth_id and self._syncing:
                self._syncing = False
                stats.hist["connect"].record((now - self._conn_started_ns) // 1000)
                for c, code in (obj.get("errors") or {}).items():
                    stats.errors["sync:" + str(code)] += 1
        elif t == "error":
            code = str(obj.get("code"))
            stats.errors[code] += 1
            rid = obj.get("id")
            if rid == self._auth_id and not self._authed.is_set():
                self._close = (1008, f"auth refused: {code}")
                if self._scope is not None:
                    self._scope.cancel()
                return
            item = self.sends.answered(rid)
            if item is None:
                return
            if code in RETRYABLE:
                delay = max(0.0, float(obj.get("retry_after_ms") or 0) / 1000.0)
                self.ctx.nursery.start_soon(self._retry_later, item, delay)
            else:
                stats.send_failed += 1

    async def _retry_later(self, item: Outgoing, delay_s: float) -> None:
        await trio.sleep(delay_s)
        self.sends.retry(item)
