"""Test clients of the shard port's HTTP transports (docs/protocol.md, "Transports"): an SSE
client and a long-poll client written from the protocol page, over real loopback sockets (h11
for HTTP, nothing of chatd's server code), both with the interface of helpers.WSClient
(``request``, ``next_event``, ``messages``, ``inbox``) so one scenario runs over every
transport. Plain helpers like tests/helpers.py: no fixtures, no tests."""

from __future__ import annotations

import itertools
import json
from contextlib import aclosing
from urllib.parse import quote, urlsplit

import h11
import trio

from tests.helpers import Inbox, open_client


def http_base(ws_url: str) -> str:
    parts = urlsplit(ws_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return f"{scheme}://{parts.netloc}"


class HTTPStream:
    """One HTTP/1.1 request over its own TCP connection: the head, then the body in pieces."""

    def __init__(self, sock, conn):
        self.sock = sock
        self.conn = conn
        self.status = None
        self.headers = {}

    @classmethod
    async def open(cls, url: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None):
        parts = urlsplit(url)
        sock = await trio.open_tcp_stream(parts.hostname, parts.port)
        conn = h11.Connection(h11.CLIENT)
        target = parts.path + (("?" + parts.query) if parts.query else "")
        hs = [("host", parts.netloc)] + list((headers or {}).items())
        if body is not None:
            hs.append(("content-length", str(len(body))))
        await sock.send_all(conn.send(h11.Request(method=method, target=target, headers=hs)))
        if body is not None:
            await sock.send_all(conn.send(h11.Data(data=body)))
        await sock.send_all(conn.send(h11.EndOfMessage()))
        self = cls(sock, conn)
        while self.status is None:
            ev = await self._event()
            if isinstance(ev, h11.Response):
                self.status = ev.status_code
                self.headers = {n.decode().lower(): v.decode() for n, v in ev.headers}
        return self

    async def _event(self):
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                self.conn.receive_data(await self.sock.receive_some(65536))
                continue
            return ev

    async def chunk(self) -> bytes | None:
        """The next piece of the body; None at its end."""
        while True:
            ev = await self._event()
            if isinstance(ev, h11.Data):
                return bytes(ev.data)
            if isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                return None

    async def read_all(self) -> bytes:
        out = b""
        while (c := await self.chunk()) is not None:
            out += c
        return out

    async def aclose(self):
        await self.sock.aclose()


async def http_json(url: str, method: str = "GET", token: str | None = None, body=None, headers=None):
    hs = dict(headers or {})
    if token:
        hs["authorization"] = f"Bearer {token}"
    raw = None
    if body is not None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        hs["content-type"] = "application/json"
    s = await HTTPStream.open(url, method, hs, raw)
    try:
        data = await s.read_all()
    finally:
        await s.aclose()
    return s.status, (json.loads(data) if data and s.headers.get("content-type", "").startswith("application/json")
                      else data)


def parse_sse(buf: bytes):
    """(complete events [(id or None, data dict)], the rest of buf). Comments are skipped."""
    events = []
    while b"\n\n" in buf:
        block, buf = buf.split(b"\n\n", 1)
        ev_id, data = None, []
        for line in block.split(b"\n"):
            if line.startswith(b":"):
                continue
            name, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if name == b"id":
                ev_id = value.decode()
            elif name == b"data":
                data.append(value)
        if data:
            events.append((ev_id, json.loads(b"\n".join(data))))
    return events, buf


class _Inbox(Inbox):
    """An HTTP transport's client: requests by ``POST /v1/frames`` (of its session once it has one)."""
    _ids = itertools.count(1)

    def __init__(self):
        super().__init__()
        self.session = None

    async def request(self, frame: dict, timeout: float = 10) -> dict:
        frame.setdefault("id", next(self._ids))
        url = self.base + "/v1/frames" + (f"?session={self.session}" if self.session else "")
        status, body = await http_json(url, "POST", self.token, [frame])
        assert status == 200, (status, body)
        return body["replies"][0]


class SSEClient(_Inbox):
    """``GET /v1/stream`` kept open, reconnected with ``Last-Event-ID`` as a browser does."""

    def __init__(self, base: str, token: str):
        super().__init__()
        self.base, self.token = base, token
        self.last_id = None
        self.ids: list = []  # (id, frame) of every event with an id
        self.stream: HTTPStream | None = None

    async def connect(self, last_event_id: str | None = None, query: str = ""):
        headers = {"authorization": f"Bearer {self.token}", "accept": "text/event-stream"}
        if last_event_id:
            headers["last-event-id"] = last_event_id
        self.stream = await HTTPStream.open(self.base + "/v1/stream" + query, headers=headers)
        assert self.stream.status == 200, self.stream.status
        return self.stream

    async def events(self):
        """``(id or None, frame)`` of each event of the stream, as it comes, until the stream ends."""
        buf = b""
        while True:
            c = await self.stream.chunk()
            if c is None:
                return
            buf += c
            events, buf = parse_sse(buf)
            for event in events:
                yield event

    async def pump(self, stop_after: int | None = None):
        """Read events into the inbox until the stream ends (or ``stop_after`` events: then the
        client drops the connection)."""
        n = 0
        async with aclosing(self.events()) as events:
            async for ev_id, frame in events:
                if ev_id is not None:
                    self.last_id = ev_id
                    self.ids.append((ev_id, frame))
                if frame.get("type") == "ready":
                    self.session = frame["session"]
                self._add(frame)
                n += 1
                if stop_after is not None and n >= stop_after:
                    await self.stream.aclose()
                    return


class PollClient(_Inbox):
    """``GET /v1/poll`` in a loop, each poll carrying the last answer's cursor."""

    def __init__(self, base: str, token: str, wait_s: float = 25):
        super().__init__()
        self.base, self.token, self.wait_s = base, token, wait_s
        self.cursor = None
        self.answers: list = []

    async def poll_once(self, cursor: str | None = None, wait_s: float | None = None):
        cursor = self.cursor if cursor is None else cursor
        q = f"?wait_s={self.wait_s if wait_s is None else wait_s}"
        if cursor:
            q += "&cursor=" + quote(cursor)
        status, body = await http_json(self.base + "/v1/poll" + q, token=self.token)
        assert status == 200, (status, body)
        return body

    def take(self, body):
        self.answers.append(body)
        self.cursor = body["cursor"]
        self.session = body["session"]
        for f in body["events"]:
            self._add(f)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED):
        started = False
        while True:
            body = await self.poll_once()
            self.take(body)
            if not started:
                started = True
                task_status.started(self)


async def open_transport(nursery, kind: str, ws_url: str, token: str):
    """A client of ``kind`` ('ws', 'sse', 'poll') authenticated with ``token``, started from now."""
    if kind == "ws":
        return await open_client(nursery, ws_url, token)
    base = http_base(ws_url)
    if kind == "sse":
        c = SSEClient(base, token)
        await c.connect()
        nursery.start_soon(c.pump)
        await c.next_event("ready")
        return c
    c = PollClient(base, token)
    await nursery.start(c.run)
    await c.next_event("ready")
    return c


class CuttingProxy:
    """A TCP proxy on a free loopback port in front of ``upstream`` (host, port). Each connection
    takes the next entry of ``cuts``: after that many bytes from the server it drops both sides
    (None or no entry left: never). With ``refuse_upgrade`` a request asking for a WebSocket
    upgrade gets ``403`` and nothing reaches the server (a proxy that breaks WebSocket)."""

    def __init__(self, upstream: tuple[str, int], cuts=(), refuse_upgrade: bool = False, eat_websocket: bool = False):
        self.upstream = upstream
        self.cuts = list(cuts)
        self.refuse_upgrade = refuse_upgrade
        self.eat_websocket = eat_websocket  # pass the upgrade, then drop every frame from the server
        self.port = None
        self.refused = 0

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client):
        cut = self.cuts.pop(0) if self.cuts else None
        async with client:
            first = await client.receive_some(65536)
            upgrade = b"upgrade: websocket" in first.lower()
            if self.refuse_upgrade and upgrade:
                self.refused += 1
                await client.send_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                return
            try:
                server = await trio.open_tcp_stream(*self.upstream)
            except OSError:
                return
            async with server:
                await server.send_all(first)
                async with trio.open_nursery() as n:
                    n.start_soon(self._pipe, client, server, None, n.cancel_scope)
                    n.start_soon(self._pipe, server, client, cut, n.cancel_scope, self.eat_websocket and upgrade)

    @staticmethod
    async def _pipe(src, dst, cut, scope, eat_after_head=False):
        sent = 0
        head = b""
        try:
            while True:
                data = await src.receive_some(65536)
                if not data:
                    break
                if eat_after_head:  # the 101 answer passes, the frames after it do not
                    if head is None:
                        continue
                    before = len(head)
                    head += data
                    end = head.find(b"\r\n\r\n")
                    if end >= 0:
                        data = data[:end + 4 - before]
                        head = None
                if cut is not None and sent + len(data) >= cut:
                    await dst.send_all(data[:cut - sent])
                    break
                sent += len(data)
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


class FramesClient:
    """Requests by ``POST /v1/frames`` only (no stream: a bot's way), with ``request(frame,
    timeout)`` like helpers.WSClient, for tests/faults.SendLog."""
    _ids = itertools.count(1)

    def __init__(self, base: str, token: str):
        self.base, self.token = base, token

    async def request(self, frame: dict, timeout: float = 10) -> dict:
        frame.setdefault("id", next(self._ids))
        with trio.fail_after(timeout):
            status, body = await http_json(self.base + "/v1/frames", "POST", self.token, [frame])
        assert status == 200, (status, body)
        return body["replies"][0]


class RobustReceiver:
    """A device that keeps receiving over ``kind`` ('sse' or 'poll') through anything: after a
    drop or a refused connection it asks ``GET /v1/connect`` where to go and resumes from its
    last resume token (SSE ``Last-Event-ID``, the poll's ``cursor``), as docs/protocol.md says.
    ``seqs[channel]``: every message seq received, in order (duplicates and gaps included)."""

    def __init__(self, api, creds: dict, kind: str):
        self.api, self.creds, self.kind = api, creds, kind
        self.base = http_base(creds["ws_url"])
        self.seqs: dict[str, list[int]] = {}
        self.resume = None  # the last id / cursor
        self.reconnects = 0
        self.got = trio.lowlevel.ParkingLot()

    def _take(self, frame):
        if frame.get("type") == "message":
            self.seqs.setdefault(frame["channel_id"], []).append(frame["seq"])
            self.got.unpark_all()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED):
        started = False
        while True:
            try:
                if self.kind == "sse":
                    c = SSEClient(self.base, self.creds["token"])
                    await c.connect(last_event_id=self.resume)
                    if not started:
                        started = True
                        task_status.started(self)
                    async with aclosing(c.events()) as events:
                        async for ev_id, frame in events:
                            if ev_id is not None:
                                self.resume = ev_id
                            self._take(frame)
                else:
                    p = PollClient(self.base, self.creds["token"], wait_s=5)
                    while True:
                        with trio.fail_after(15):
                            body = await p.poll_once(cursor=self.resume or "")
                        if not started:
                            started = True
                            task_status.started(self)
                        self.resume = body["cursor"]
                        for frame in body["events"]:
                            self._take(frame)
            except (OSError, h11.ProtocolError, AssertionError, trio.TooSlowError, trio.BrokenResourceError):
                pass
            self.reconnects += 1
            await trio.sleep(0.2)  # the client's backoff before it asks where to go
            try:
                r = await self.api.call("GET", "/v1/connect", token=self.creds["token"])
                if r.status == 200:
                    self.base = http_base(r.body["ws_url"])
            except OSError:
                pass

    async def wait_for(self, channel_id: str, seq: int, timeout: float = 30):
        with trio.fail_after(timeout):
            while not self.seqs.get(channel_id) or self.seqs[channel_id][-1] < seq:
                await self.got.park()
