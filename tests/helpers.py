"""The test suite's plain helpers, written once: a real HTTP client (urllib in a worker thread), a
real WebSocket client (its receiving half, ``Inbox``, shared with tests/transports.py's SSE and
poll clients), an in-process chatd (``serve_run``) and one as an OS process (``chatd run``), the
schemathesis run against one, free loopback ports, ``eventually`` for state in another process,
the DM channel id of two logins, cluster users on distinct home shards, and the CQL
reserved-keyword list. Fixtures are in tests/conftest.py (and tests/cluster.py for the
real-cluster ones); no test module imports another.

No mocks: the clients talk to a chatd listening on loopback. Resources: a started server or
process is stopped by whoever started it (the fixtures, or the test's ``finally``)."""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import msgpack
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from chatd.config import Config
from chatd.ids import dm_channel_id
from chatd.node import serve_run

PASSWORD = "password-123"
POLL_S = 0.05  # how often ``eventually`` looks again: state in another process cannot signal this one

# The cluster tests' shared secrets (chatd refuses secrets under 32 bytes).
TEST_TOKEN_SECRET = "test-token-secret-0123456789abcdefghij"
TEST_LINK_SECRET = "test-link-secret-0123456789abcdefghijk"


async def eventually(condition, timeout: float = 30.0):
    """Until ``condition()`` (a plain or an async function) returns something true, which is returned;
    ``trio.TooSlowError`` after ``timeout`` s. Only for what cannot signal this process (another OS
    process, a store, the outcome of a network fault) or in-process state with no event to wait on
    (a counter): where there is an event, wait on the event."""
    with trio.fail_after(timeout):
        while True:
            result = condition()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            await trio.sleep(POLL_S)


_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port for a server a test starts later (or a port nobody listens on), chosen
    *below* the kernel's ephemeral range (32768+), so that servers binding port 0 meanwhile (link
    listeners) or client sockets can never take it; never the same port twice in one test run."""
    lo, hi = 20000, 32000
    try:
        lo_eph = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
        hi = min(hi, lo_eph - 1)
    except (OSError, ValueError, IndexError):
        pass
    for _ in range(1000):
        port = random.randint(lo, hi)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port found")


def dm(a: dict, b: dict) -> str:
    """The 1:1 channel of two logins (``signup_login`` answers)."""
    return dm_channel_id(a["user"]["id"], b["user"]["id"])


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


class Inbox:
    """The receiving half of every test client (this WebSocket one, tests/transports.py's SSE and
    long-poll ones): each frame received kept in ``inbox``, in order, until a wait takes it;
    ``request`` (the subclass's) and ``send_message`` answer with the reply to their id."""

    def __init__(self):
        self.inbox: list = []
        self._arrived = trio.lowlevel.ParkingLot()
        self.closed_reason = None  # set (by a subclass) when the connection has closed

    def _add(self, frame) -> None:
        self.inbox.append(frame)
        self._arrived.unpark_all()

    async def _wait_for(self, pred, timeout: float):
        """The first frame kept that ``pred`` accepts, taken out (``ConnectionError`` once closed)."""
        with trio.fail_after(timeout):
            while True:
                for i, f in enumerate(self.inbox):
                    if pred(f):
                        return self.inbox.pop(i)
                if self.closed_reason is not None:
                    raise ConnectionError(f"closed: {self.closed_reason}")
                await self._arrived.park()

    async def next_event(self, type_: str | None = None, timeout: float = 10) -> dict:
        return await self._wait_for(lambda f: "id" not in f and (type_ is None or f["type"] == type_), timeout)

    async def messages(self, n: int, timeout: float = 20) -> list[dict]:
        return [await self.next_event("message", timeout) for _ in range(n)]

    async def request(self, frame: dict, timeout: float = 10) -> dict:
        raise NotImplementedError

    async def send_message(self, channel_id: str, body: str, client_msg_id: str | None = None) -> dict:
        return await self.request({"type": "send", "channel_id": channel_id, "body": body,
                                   "client_msg_id": client_msg_id or str(uuid.uuid4())})


class WSClient(Inbox):
    """A WebSocket client that keeps every frame it receives, in order.

    ``request`` sends a frame with a fresh id and returns the reply with that id; all other
    frames stay queued in ``inbox`` for ``next_event``/``messages``."""

    _ids = itertools.count(1)

    def __init__(self, ws, fmt: str):
        super().__init__()
        self.ws = ws
        self.fmt = fmt

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
                self._add(msgpack.unpackb(data) if isinstance(data, bytes) else json.loads(data))
        except ConnectionClosed as e:
            self.closed_reason = e.reason
            self._arrived.unpark_all()

    async def wait_frame(self) -> None:
        """Until the next frame arrives or the connection closes; ``ConnectionError`` if it is closed."""
        if self.closed_reason is not None:
            raise ConnectionError(f"closed: {self.closed_reason}")
        await self._arrived.park()

    async def request(self, frame: dict, timeout: float = 10) -> dict:
        rid = frame.setdefault("id", next(self._ids))
        await self.send(frame)
        return await self._wait_for(lambda f: f.get("id") == rid and f["type"] != "message", timeout)

    async def reply_to(self, rid, timeout: float = 10) -> dict:
        return await self._wait_for(lambda f: f.get("id") == rid and f["type"] != "message", timeout)

    async def wait_closed(self, timeout: float = 20):
        with trio.fail_after(timeout):
            while self.closed_reason is None:
                await self._arrived.park()
        return self.closed_reason

    def pending_messages(self) -> list[dict]:
        return [f for f in self.inbox if f.get("type") == "message"]


async def open_client(nursery, ws_url: str, token: str | None = None, fmt: str = "json",
                      cursors: dict | None = None) -> WSClient:
    """Connect (and authenticate if ``token``); the client lives until the nursery ends."""
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


# ---- an in-process chatd ---------------------------------------------------------------------------
class RunningServer:
    """``serve_run`` (API + shard + SQLite) in the test's nursery, on the ports of ``config``."""

    def __init__(self, nursery, config: Config):
        self.nursery = nursery
        self.config = config
        self.node = None
        self.info = None
        self.api: API | None = None
        self._done = None

    async def start(self):
        box: list = []
        self._done = trio.Event()
        done = self._done

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            try:
                await serve_run(self.config, task_status=task_status, node_out=box)
            finally:
                done.set()

        self.info = await self.nursery.start(run)
        self.node = box[0]
        self.api = API(self.info.api_url)
        return self

    @property
    def ws_url(self) -> str:
        return self.info.ws_url

    @property
    def stopped(self) -> bool:
        return self._done is not None and self._done.is_set()

    async def stop(self):
        self.node.request_stop()
        with trio.fail_after(20):
            await self._done.wait()

    async def restart(self):
        await self.stop()
        # keep the same ports is not needed: clients log in again and get the new ws_url
        return await self.start()


def make_config(tmp_path, **limits) -> Config:
    """A server on loopback port 0 with its data under ``tmp_path``; ``limits`` override ``[limits]``."""
    cfg = Config.from_mapping({
        "data_dir": str(tmp_path / "data"),
        "server": {"api_port": 0, "ws_port": 0, "shutdown_grace_s": 3.0},
        # Cheaper password hashing keeps the 100-member tests quick; same code path.
        "auth": {"scrypt_n": 2**10, "signups_unthrottled": ["127.0.0.0/8"]},
        # Durable commits are what we promise; tests keep them (fsync on tmpfs/ext4 is fast enough).
        "store": {"sqlite_synchronous": "full"},
    })
    cfg.update({"limits": limits}, source="test")
    cfg.validate()
    return cfg


async def setup_pair(server, nursery, fmt="json"):
    """alice and bob, their DM with one stored message ("keep me"), alice connected: for the bad-input
    tests, which end with ``assert_intact``."""
    alice = await server.api.signup_login("alice")
    bob = await server.api.signup_login("bob")
    ch = dm(alice, bob)
    ca = await open_client(nursery, alice["ws_url"], alice["token"], fmt=fmt)
    await ca.send_message(ch, "keep me", "keep-1")
    return alice, bob, ch, ca


async def assert_intact(server, token, ch, bodies):
    """The channel holds exactly ``bodies`` and the server still answers."""
    r = await server.api.call("GET", f"/v1/channels/{ch}/messages?limit=500", token=token)
    assert r.status == 200
    assert [m["body"] for m in r.body["messages"]] == bodies
    assert (await server.api.call("GET", "/healthz")).status == 200


async def users_on_distinct_homes(cluster, prefix, homes_wanted: int, count: int):
    """Sign up ``count`` users (at least) of a cluster so that at least ``homes_wanted`` different
    home shards are covered."""
    out = []
    i = 0
    while len(out) < count or len({u["shard_id"] for u in out}) < homes_wanted:
        out.append(await cluster.api.signup_login(f"{prefix}user{i}"))
        i += 1
        assert i < 60
    return out


# ---- chatd run as an OS process ------------------------------------------------------------------------
class ChatdRun:
    """``chatd run`` as an OS process with a config file (free ports, SQLite under ``tmp_path``, rate
    limits off: the kill -9 test sends as fast as it can) and its log in ``tmp_path/chatd.log``."""

    def __init__(self, tmp_path):
        self.api_port, self.ws_port = free_port(), free_port()
        self.config = tmp_path / "chatd.toml"
        self.config.write_text(
            f'data_dir = "{tmp_path / "data"}"\n'
            f"[server]\napi_port = {self.api_port}\nws_port = {self.ws_port}\n"
            "[auth]\nscrypt_n = 1024\nsignups_unthrottled = [\"127.0.0.0/8\"]\n"
            "[limits]\nrate_frames_per_s = 100000.0\nrate_burst = 100000\n")
        self.log = open(tmp_path / "chatd.log", "ab")
        self.proc: subprocess.Popen | None = None
        self.api = API(f"http://127.0.0.1:{self.api_port}")

    async def start(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "chatd.cli", "run", "--config", str(self.config)],
                                     stdout=self.log, stderr=self.log)

        async def healthy() -> bool:
            assert self.proc.poll() is None, "chatd exited during start-up"
            try:
                return (await self.api.call("GET", "/healthz")).status == 200
            except OSError:
                return False
        await eventually(healthy, timeout=30)

    async def wait_exit(self, timeout=20) -> int:
        """The exit status (``subprocess.TimeoutExpired`` after ``timeout`` s)."""
        return await trio.to_thread.run_sync(functools.partial(self.proc.wait, timeout), abandon_on_cancel=True)


async def schemathesis_finds_nothing(tmp_path, nursery, *, config_edit: tuple[str, str], spec_base,
                                     exclude: list[str], checks_after=None) -> None:
    """schemathesis against a real ``chatd run`` (a :class:`ChatdRun` whose config has
    ``config_edit`` = (old, new) replaced), from the OpenAPI document at ``spec_base(api, alice) +
    "/openapi.json"``: every generated request (authenticated with a real token) answered, not a 5xx
    and as the document says; ``exclude`` are more schemathesis arguments (what the run leaves out,
    and why, is said where it is called). Afterwards the process still serves (``checks_after(api,
    alice)``: what more the caller asks of it), what alice stored is unchanged, it still accepts a
    write, and its log holds no traceback. A short run: a fixed seed (``CHATD_FUZZ_SEED``, 1),
    ``CHATD_FUZZ_EXAMPLES`` cases per operation (40)."""
    p = ChatdRun(tmp_path)
    p.config.write_text(p.config.read_text().replace(*config_edit))
    await p.start()
    try:
        api = p.api
        alice, bob = await api.signup_login("alice"), await api.signup_login("bob")
        ch = f"dm:{alice['user']['id']}:{bob['user']['id']}"
        c = await open_client(nursery, alice["ws_url"], alice["token"])
        for i in range(5):
            await c.send_message(ch, f"before the fuzz {i}")

        async def history():
            r = await api.call("GET", f"/v1/channels/{ch}/messages", token=bob["token"])
            assert r.status == 200, r
            return r.body

        before = await history()
        fuzzer = await api.signup_login("fuzzer")
        st = shutil.which("schemathesis", path=os.path.dirname(sys.executable)) or "schemathesis"
        cmd = [st, "run", f"{spec_base(api, alice)}/openapi.json", "--checks", "all", "--no-color",
               "-H", f"Authorization: Bearer {fuzzer['token']}",
               "-n", os.environ.get("CHATD_FUZZ_EXAMPLES", "40"), "--seed", os.environ.get("CHATD_FUZZ_SEED", "1"),
               "--workers", "2", "--generation-database", "none", "--request-timeout", "20", *exclude]
        result = await trio.run_process(cmd, capture_stdout=True, stderr=subprocess.STDOUT, check=False,
                                        cwd=tmp_path)
        out = result.stdout.decode(errors="replace")
        assert result.returncode == 0, out[-6000:]
        assert "No issues found" in out or " passed" in out, out[-3000:]
        # still healthy, nothing stored by others changed, still accepts writes
        assert p.proc.poll() is None
        if checks_after is not None:
            await checks_after(api, alice)
        assert await history() == before
        await c.send_message(ch, "after the fuzz")
        assert [m["body"] for m in (await history())["messages"]][-1] == "after the fuzz"
        log = (tmp_path / "chatd.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-4000:]
    finally:
        if p.proc.poll() is None:
            p.proc.kill()


# ---- CQL ---------------------------------------------------------------------------------------------
KEYWORDS_FILE = Path(__file__).resolve().parent / "cql_reserved_keywords.txt"


def reserved_keywords() -> frozenset[str]:
    """Cassandra's reserved CQL keywords, lower case (tests/cql_reserved_keywords.txt)."""
    words = (line.strip() for line in KEYWORDS_FILE.read_text().splitlines())
    return frozenset(w.lower() for w in words if w and not w.startswith("#"))
