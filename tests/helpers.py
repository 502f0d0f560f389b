"""Test helpers: a real HTTP client (urllib in a worker thread) and a real WebSocket client.

No mocks: these talk to a chatd listening on loopback."""

from __future__ import annotations

import itertools
import json
import urllib.error
import urllib.request
import uuid

import msgpack
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

PASSWORD = "password-123"


class HTTPResult:
    def __init__(self, status: int, body, headers=None):
        self.status = status
        self.body = body
        self.headers = headers or {}

    def __repr__(self):
        return f"HTTPResult({self.status}, {self.body!r})"


def _http(method, url, body, token, raw):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, payload, headers = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as e:
        status, payload, headers = e.code, e.read(), e.headers
    if "json" in headers.get("Content-Type", ""):
        return HTTPResult(status, json.loads(payload), headers)
    return HTTPResult(status, payload.decode(), headers)


class API:
    def __init__(self, base_url: str):
        self.base = base_url

    async def call(self, method: str, path: str, body=None, token: str | None = None, raw: bytes | None = None):
        return await trio.to_thread.run_sync(_http, method, self.base + path, body, token, raw)

    async def signup_login(self, username: str, device_id: str | None = None) -> dict:
        r = await self.call("POST", "/v1/users", {"username": username, "password": PASSWORD})
        assert r.status in (201, 409), r
        return await self.login(username, device_id)

    async def login(self, username: str, device_id: str | None = None) -> dict:
        body = {"username": username, "password": PASSWORD}
        if device_id:
            body["device_id"] = device_id
        r = await self.call("POST", "/v1/login", body)
        assert r.status == 200, r
        return r.body


class WSClient:
    """A WebSocket client that keeps every frame it receives, in order.

    ``request`` sends a frame with a fresh id and returns the reply with that id; all other
    frames stay queued in ``events`` for ``next_event``/``messages``."""

    _ids = itertools.count(1)

    def __init__(self, ws, fmt: str):
        self.ws = ws
        self.fmt = fmt
        self.inbox: list = []
        self._arrived = trio.lowlevel.ParkingLot()
        self.closed_reason = None

    def encode(self, frame):
        return msgpack.packb(frame) if self.fmt == "msgpack" else json.dumps(frame)

    async def send_raw(self, data) -> None:
        await self.ws.send_message(data)

    async def send(self, frame: dict) -> None:
        await self.ws.send_message(self.encode(frame))

    async def _pump(self):
        try:
            while True:
                data = await self.ws.get_message()
                self.inbox.append(msgpack.unpackb(data) if isinstance(data, bytes) else json.loads(data))
                self._arrived.unpark_all()
        except ConnectionClosed as e:
            self.closed_reason = e.reason
            self._arrived.unpark_all()

    async def _wait_for(self, pred, timeout: float):
        with trio.fail_after(timeout):
            while True:
                for i, f in enumerate(self.inbox):
                    if pred(f):
                        return self.inbox.pop(i)
                if self.closed_reason is not None:
                    raise ConnectionError(f"closed: {self.closed_reason}")
                await self._arrived.park()

    async def request(self, frame: dict, timeout: float = 10) -> dict:
        rid = frame.setdefault("id", next(self._ids))
        await self.send(frame)
        return await self._wait_for(lambda f: f.get("id") == rid and f["type"] != "message", timeout)

    async def reply_to(self, rid, timeout: float = 10) -> dict:
        return await self._wait_for(lambda f: f.get("id") == rid and f["type"] != "message", timeout)

    async def next_event(self, type_: str | None = None, timeout: float = 10) -> dict:
        return await self._wait_for(lambda f: "id" not in f and (type_ is None or f["type"] == type_), timeout)

    async def messages(self, n: int, timeout: float = 20) -> list[dict]:
        return [await self.next_event("message", timeout) for _ in range(n)]

    async def wait_closed(self, timeout: float = 20):
        with trio.fail_after(timeout):
            while self.closed_reason is None:
                await self._arrived.park()
        return self.closed_reason

    def pending_messages(self) -> list[dict]:
        return [f for f in self.inbox if f.get("type") == "message"]

    async def send_message(self, channel_id: str, body: str, client_msg_id: str | None = None) -> dict:
        return await self.request({"type": "send", "channel_id": channel_id, "body": body,
                                   "client_msg_id": client_msg_id or str(uuid.uuid4())})


async def open_client(nursery, ws_url: str, token: str | None = None, fmt: str = "json",
                      cursors: dict | None = None) -> WSClient:
    """Connect (and authenticate if ``token``); the client lives until the nursery ends."""
    ready = trio.Event()
    box: list = []

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        subprotocols = ["chatd.v1.msgpack"] if fmt == "msgpack" else ["chatd.v1.json"]
        async with open_websocket_url(ws_url, subprotocols=subprotocols,
                                      max_message_size=64 * 1024 * 1024) as ws:
            client = WSClient(ws, fmt)
            task_status.started(client)
            await client._pump()

    client = await nursery.start(run)
    if token is not None:
        frame = {"type": "auth", "token": token}
        if cursors is not None:
            frame["cursors"] = cursors
        reply = await client.request(frame)
        assert reply["type"] == "auth", reply
        client.auth_id = frame["id"]
    return client
