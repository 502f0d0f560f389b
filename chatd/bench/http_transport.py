"""The bench's SSE and long-poll devices (``chatd bench ... --transport sse|poll``): the same
books, retries and resends as the WebSocket device (its frame handling and connection loop from
chatd/bench/client.py, its send books from chatd/bench/books.py), over docs/protocol.md section 7 -- events from ``GET /v1/stream`` or ``GET /v1/poll``,
sends by ``POST /v1/frames?session=`` (up to ``max_inflight`` sends per POST, one POST at a time
per device: the order per channel is the device's). Every (re)connect starts from a resume
token made of the device's own cursors (:func:`chatd.shard.resume.encode`), as ``auth`` with
``cursors`` does on a WebSocket; the catch-up ends with the ``sync`` event.

HTTP: h11 over one trio TCP connection per stream / per poller / per POSTer (kept alive). A
failure of any of them ends the device's session (its un-acked sends are sent again, with the
same ``client_msg_id``, after the reconnect). No heartbeats: the server keeps a streaming or
polling device online by itself.
"""

from __future__ import annotations

import json
import time
from urllib.parse import quote, urlsplit

import h11
import trio

from ..shard import resume
from .books import Outgoing
from .client import _CONN_ERRORS, AUTH_TIMEOUT_S, BenchClient

POLL_WAIT_S = 20
_ERRORS = _CONN_ERRORS + (h11.ProtocolError, ValueError, KeyError)


def http_base(ws_url: str) -> str:
    p = urlsplit(ws_url)
    return f"{'https' if p.scheme == 'wss' else 'http'}://{p.netloc}"


class _HTTP:
    """One kept-alive HTTP/1.1 connection (h11)."""

    def __init__(self, sock, host: str):
        self.sock, self.host = sock, host
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, base: str) -> "_HTTP":
        p = urlsplit(base)
        return cls(await trio.open_tcp_stream(p.hostname, p.port), p.netloc)

    async def request(self, method: str, target: str, token: str, body: bytes | None = None) -> int:
        if self.h11.our_state is h11.DONE:
            self.h11.start_next_cycle()
        headers = [("host", self.host), ("authorization", f"Bearer {token}")]
        if body is not None:
            headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
        data = self.h11.send(h11.Request(method=method, target=target, headers=headers))
        if body is not None:
            data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        await self.sock.send_all(data)
        while True:
            ev = await self._event()
            if isinstance(ev, h11.Response):
                return ev.status_code

    async def _event(self):
        while True:
            ev = self.h11.next_event()
            if ev is h11.NEED_DATA:
                self.h11.receive_data(await self.sock.receive_some(65536))
                continue
            if isinstance(ev, h11.ConnectionClosed):
                raise OSError("the server closed the connection")
            return ev

    async def chunk(self) -> bytes | None:
        ev = await self._event()
        if isinstance(ev, h11.Data):
            return bytes(ev.data)
        return None  # EndOfMessage

    async def body(self) -> bytes:
        out = b""
        while (c := await self.chunk()) is not None:
            out += c
        return out

    async def aclose(self) -> None:
        await self.sock.aclose()


class HTTPBenchClient(BenchClient):
    """A bench device over SSE (``kind`` "sse") or long polling ("poll")."""

    def __init__(self, dev, ctx, kind: str):
        super().__init__(dev, ctx)
        self.kind = kind
        self.base = http_base(dev.ws_url)
        self._sid: str | None = None
        self._catching_up = False

    def enqueue(self, mono_ns: int, wall_ns: int) -> None:
        self._n += 1
        self.sends.queue(Outgoing(self._n, mono_ns, wall_ns))

    async def run(self) -> None:
        stats = self.stats
        failures = 0
        first = True
        try:
            while not self._stopping:
                await self._stay_offline()
                if not first:
                    stats.reconnects += 1
                first = False
                ok = await self._session()
                failures = 0 if ok else failures + 1
                if failures >= 3:
                    self._report(False)
                if self._drop is not None:
                    stats.drops += 1
                    self._drop = None
                elif not self._stopping and not ok:
                    await self._backoff(failures)
        finally:
            self._report(False)
            self.done.set()

    async def _session(self) -> bool:
        self._authed = trio.Event()
        self._sid = None
        conns: list[_HTTP] = []
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                if self._stopping:
                    nursery.cancel_scope.cancel()
                start = resume.encode({c: s.top() for c, s in self.recv.items()})
                self._syncing = True
                self._conn_started_ns = time.monotonic_ns()
                nursery.start_soon(self._events, start, conns, nursery.cancel_scope)
                with trio.fail_after(AUTH_TIMEOUT_S):
                    await self._authed.wait()
                self.connected = True
                self.stats.connects += 1
                self._report(True)
                if self._build is not None:
                    nursery.start_soon(self._poster, conns, nursery.cancel_scope)
            return self._authed.is_set()
        except _ERRORS as e:
            self._note_close(e)
            return self._authed.is_set()
        finally:
            for c in conns:
                with trio.CancelScope(shield=True):
                    await c.aclose()
            self._ended()

    def _event(self, frame: dict, now: int) -> None:
        t = frame.get("type")
        if t == "ready":
            self._sid = frame["session"]
            if not frame.get("catch_up"):
                self._syncing = False
            self._authed.set()
        elif t == "sync" and "id" not in frame:
            self._syncing = False
            self.stats.hist["connect"].record((now - self._conn_started_ns) // 1000)
        elif t == "close":
            self._close = (frame.get("code", 1006), frame.get("reason", ""))
            self.stats.closes[str(self._close[0])] += 1
            if self._scope is not None:
                self._scope.cancel()
        else:
            self._on_frame(frame, now)

    async def _events(self, start: str, conns: list, scope: trio.CancelScope) -> None:
        try:
            c = await _HTTP.open(self.base)
            conns.append(c)
            token = self.dev.token
            if self.kind == "sse":
                status = await c.request("GET", "/v1/stream?cursor=" + quote(start), token)
                if status != 200:
                    raise OSError(f"stream answered {status}")
                buf = b""
                while True:
                    chunk = await c.chunk()
                    if chunk is None:
                        raise OSError("the stream ended")
                    buf += chunk
                    now = time.monotonic_ns()
                    while b"\n\n" in buf:
                        block, buf = buf.split(b"\n\n", 1)
                        for line in block.split(b"\n"):
                            if line.startswith(b"data: "):
                                self._event(json.loads(line[6:]), now)
            else:
                cursor = start
                last = -1
                while True:
                    status = await c.request("GET", f"/v1/poll?wait_s={POLL_WAIT_S}&cursor={quote(cursor)}", token)
                    body = json.loads(await c.body())
                    if status != 200:
                        raise OSError(f"poll answered {status}")
                    cursor = body["cursor"]
                    if body["answer"] <= last and body["answer"]:
                        continue  # the same answer again
                    last = body["answer"]
                    now = time.monotonic_ns()
                    for f in body["events"]:
                        self._event(f, now)
        except _ERRORS as e:
            self._note_close(e)
        scope.cancel()

    async def _poster(self, conns: list, scope: trio.CancelScope) -> None:
        build = self._build
        sends = self.sends
        max_inflight = min(self.ctx.max_inflight, 64)
        try:
            c = await _HTTP.open(self.base)
            conns.append(c)
            target = "/v1/frames?session=" + quote(self._sid)
            while True:
                await sends.wait()
                frames = sends.take(max_inflight, lambda rid, item: build(rid, item.n, item.wall_ns))
                status = await c.request("POST", target, self.dev.token, b"[" + b",".join(frames) + b"]")
                body = json.loads(await c.body())
                if status != 200:
                    raise OSError(f"frames answered {status}")
                now = time.monotonic_ns()
                for reply in body["replies"]:
                    self._on_frame(reply, now)
        except _ERRORS as e:
            self._note_close(e)
        scope.cancel()
