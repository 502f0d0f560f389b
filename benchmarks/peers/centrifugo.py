#!/usr/bin/env python3
"""chatd beside Centrifugo v6.9.1: one load generator, the same shapes, the server on core 0 and the
generator on core 1, the servers alternated, ratios printed (issue 24, item 2).

    python benchmarks/peers/centrifugo.py build            # once: go install from the Go module proxy
    python benchmarks/peers/centrifugo.py run [--rounds 2] [--duration 15] [--shapes dm,group100,group1000,idle]

``build`` runs ``go install github.com/centrifugal/centrifugo/v6@v6.9.1`` with ``GOBIN`` under
``~/.cache/chatd/peers/bin`` (about 6 minutes on the 2-core development machine; skipped when the binary
is there). Nothing else is fetched. ``run`` needs that binary and a working chatd (this checkout).

Shapes (each run for ``--duration`` s after a ramp-up; open-loop sends, paced round robin over senders):

* ``dm``: 100 pairs, 1,000 sends/s: each send reaches the partner and the sender's own connection
  (chatd echoes to the sender's devices; a Centrifugo subscriber that publishes gets its own
  publication too);
* ``group100`` / ``group1000``: one group (a Centrifugo channel) of 100 / 1,000 members, 300 / 10
  sends/s;
* ``idle``: 5,000 connections, nothing sent (chatd clients heartbeat at the interval the auth reply names;
  Centrifugo pings every 25 s and the client answers): server RSS per connection and CPU.

The servers: ``chatd run`` (SQLite, ``synchronous=full``: every ack follows an fsync'd commit; rate
limits off, cheap password hashing for the throwaway users) and Centrifugo with the memory engine, no
history (it keeps nothing durable), ``GOMAXPROCS=1``, usage statistics off, client connections without
tokens (``client.insecure``), listening on 127.0.0.1 only. This script never runs ``centrifugo
configdoc`` (it serves on all interfaces); it checks its config with ``centrifugo checkconfig``.

Measured: server CPU (user + system from /proc) over the steady window, per send and per delivery
(a delivery: a message event at any member's connection, the sender's own echo included);
send -> deliver latency p50 / p99 at the other members (the generator's clock); for idle, RSS growth
per connection. Printed: one line per run, then a table with the chatd / Centrifugo ratios (medians
of the rounds). On a shared machine the absolute figures are noise; the ratios of alternated runs
are what to read, and the load average is printed with each run so a disturbed one can be seen.

Resources: every server process is ended (SIGTERM, then SIGKILL) whatever happens; temporary
directories are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from chatd.bench.ws import WebSocket, WSClosed  # noqa: E402 - the lean client of chatd bench

VERSION = "v6.9.1"
MODULE = f"github.com/centrifugal/centrifugo/v6@{VERSION}"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chatd" / "peers"
BINARY = CACHE / "bin" / "centrifugo"
PASSWORD = "password-123"
SHAPES = {  # name: (kind, clients, group size, sends/s)
    "dm": ("dm", 200, 2, 1000.0),
    "group100": ("group", 100, 100, 300.0),
    "group1000": ("group", 1000, 1000, 10.0),
    "idle": ("idle", 5000, 0, 0.0),
}
SERVER_CORE, GENERATOR_CORE = 0, 1


# ---- build ---------------------------------------------------------------------------------------
def build() -> Path:
    if BINARY.exists():
        print(f"{BINARY} is there (delete it to build again)")
        return BINARY
    env = {**os.environ, "GOBIN": str(BINARY.parent), "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
    print(f"go install {MODULE} (a few minutes) ...", flush=True)
    subprocess.run(["go", "install", MODULE], env=env, check=True)
    print(subprocess.run([str(BINARY), "version"], capture_output=True, text=True).stdout.strip())
    return BINARY


# ---- the servers ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def wait_port(port: int, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited during start-up (status {proc.returncode})")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port} after {timeout_s} s")


class Server:
    def __init__(self, name: str, cmd: list[str], env: dict, port: int, workdir: Path):
        self.name = name
        self.log = open(workdir / f"{name}.log", "ab")
        self.proc = subprocess.Popen(["taskset", "-c", str(SERVER_CORE), *cmd], env=env, stdout=self.log,
                                     stderr=self.log, cwd=workdir)
        wait_port(port, self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid  # (taskset execs the server: same pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def start_chatd(workdir: Path) -> tuple[Server, dict]:
    api, ws = free_port(), free_port()
    cfg = workdir / "chatd.toml"
    cfg.write_text(f'data_dir = "{workdir / "data"}"\n[server]\napi_host = "127.0.0.1"\napi_port = {api}\n'
                   f'ws_host = "127.0.0.1"\nws_port = {ws}\n'
                   '[auth]\nscrypt_n = 1024\nsignups_unthrottled = ["127.0.0.0/8"]\n'
                   "[limits]\nrate_frames_per_s = 1000000.0\nrate_burst = 1000000\nflood_close_after = 1000000000\n"
                   "max_connections_per_address = 0\n")
    server = Server("chatd", [sys.executable, "-P", "-m", "chatd.cli", "run", "--config", str(cfg)],
                    dict(os.environ), api, workdir)
    return server, {"api": f"http://127.0.0.1:{api}"}


def start_centrifugo(workdir: Path) -> tuple[Server, dict]:
    port = free_port()
    cfg = workdir / "centrifugo.json"
    cfg.write_text(json.dumps({
        "http_server": {"address": "127.0.0.1", "port": port},
        "usage_stats": {"disabled": True},
        "client": {"insecure": True, "allowed_origins": ["*"]},
        "channel": {"without_namespace": {"allow_subscribe_for_client": True, "allow_publish_for_client": True}},
        "log": {"level": "error"},
    }))
    check = subprocess.run([str(BINARY), "checkconfig", "--config", str(cfg)], capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"centrifugo checkconfig refused the config: {check.stdout}{check.stderr}")
    server = Server("centrifugo", [str(BINARY), "--config", str(cfg)], {**os.environ, "GOMAXPROCS": "1"},
                    port, workdir)
    return server, {"ws": f"ws://127.0.0.1:{port}/connection/websocket"}


# ---- the clients ---------------------------------------------------------------------------------
def http(method: str, url: str, body=None, token: str | None = None):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


class Recorder:
    def __init__(self):
        self.latencies_ms: list[float] = []
        self.deliveries = 0  # at another member (the sender's own echo is not counted)
        self.echoes = 0
        self.sent = 0
        self.counting = False


class ChatdClients:
    """chatd: sign-ups over HTTP, one WebSocket per user, ``send`` frames, ``message`` events."""

    def __init__(self, urls):
        self.api = urls["api"]
        self.heartbeat_s = 5.0  # until an auth reply names the server's interval

    async def setup(self, n: int, group_size: int, kind: str):
        limiter = trio.CapacityLimiter(8)
        users: list = [None] * n
        run = os.urandom(3).hex()

        async def one(i):
            async with limiter:
                name = f"p{run}{i}"
                await trio.to_thread.run_sync(http, "POST", self.api + "/v1/users", {"username": name,
                                                                                       "password": PASSWORD})
                users[i] = await trio.to_thread.run_sync(http, "POST", self.api + "/v1/login",
                                                         {"username": name, "password": PASSWORD})
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        ids = [u["user"]["id"] for u in users]
        channels = [None] * n
        if kind == "dm":
            for i in range(0, n, 2):
                lo, hi = sorted((ids[i], ids[i + 1]))
                channels[i] = channels[i + 1] = f"dm:{lo}:{hi}"
        elif kind == "group":
            for g in range(0, n, group_size):
                owner = users[g]
                ch = (await trio.to_thread.run_sync(http, "POST", self.api + "/v1/groups", {
                    "name": "bench", "members": ids[g + 1:g + group_size]}, owner["token"]))["channel"]["id"]
                channels[g:g + group_size] = [ch] * group_size
        self.users, self.ids, self.channels = users, ids, channels

    async def connect(self, i: int):
        ws = await WebSocket.connect(self.users[i]["ws_url"], "chatd.v1.json")
        await ws.send(json.dumps({"type": "auth", "id": 0, "token": self.users[i]["token"]}).encode())
        while True:
            for _, payload in await ws.receive():
                reply = json.loads(payload)
                if reply.get("type") == "auth":
                    self.heartbeat_s = float(reply["heartbeat_interval_s"])  # as the protocol asks
                    return ws

    def send_frame(self, i: int, n: int) -> bytes:
        return json.dumps({"type": "send", "id": n, "channel_id": self.channels[i], "client_msg_id": str(n),
                           "body": f"{time.perf_counter_ns()}"}).encode()

    def heartbeat(self) -> bytes | None:
        return b'{"type":"heartbeat"}'

    def on_frame(self, i: int, payload: bytes, rec: Recorder) -> None:
        f = json.loads(payload)
        if f.get("type") == "message" and rec.counting:
            if f["sender_id"] == self.ids[i]:
                rec.echoes += 1
            else:
                rec.deliveries += 1
                rec.latencies_ms.append((time.perf_counter_ns() - int(f["body"])) / 1e6)


class CentrifugoClients:
    """Centrifugo: its JSON client protocol (connect, subscribe, publish; ``{}`` ping -> ``{}``)."""

    def __init__(self, urls):
        self.url = urls["ws"]

    async def setup(self, n: int, group_size: int, kind: str):
        size = 2 if kind == "dm" else max(group_size, 1)
        self.channels = [f"c{i // size}" for i in range(n)]

    async def connect(self, i: int):
        ws = await WebSocket.connect(self.url)
        await ws.send(b'{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"%s"}}' % self.channels[i].encode())
        seen = set()
        while seen != {1, 2}:
            for _, payload in await ws.receive():
                for line in payload.split(b"\n"):
                    if line.strip():
                        seen.add(json.loads(line).get("id"))
        return ws

    def send_frame(self, i: int, n: int) -> bytes:
        return json.dumps({"id": 1000 + n, "publish": {"channel": self.channels[i],
                                                       "data": {"t": time.perf_counter_ns(), "from": i}}}).encode()

    def heartbeat(self) -> bytes | None:
        return None  # the server pings; we answer

    def on_frame(self, i: int, payload: bytes, rec: Recorder, ws=None) -> bytes | None:
        for line in payload.split(b"\n"):
            if not line.strip():
                continue
            f = json.loads(line)
            if not f:  # a ping
                return b"{}"
            pub = f.get("push", {}).get("pub")
            if pub is not None and rec.counting:
                if pub["data"]["from"] == i:
                    rec.echoes += 1
                else:
                    rec.deliveries += 1
                    rec.latencies_ms.append((time.perf_counter_ns() - pub["data"]["t"]) / 1e6)
        return None


# ---- one run -------------------------------------------------------------------------------------
async def drive(clients, server: Server, kind: str, n: int, group_size: int, rate: float, duration_s: float,
                ramp_s: float) -> dict:
    await clients.setup(n, group_size, kind)
    rss0 = rss_bytes(server.pid)
    rec = Recorder()
    conns: list = [None] * n
    async with trio.open_nursery() as nursery:
        limiter = trio.CapacityLimiter(64)

        async def open_one(i):
            async with limiter:
                conns[i] = await clients.connect(i)
            nursery.start_soon(reader, i)

        async def reader(i):
            ws = conns[i]
            nursery.start_soon(ws.run_flusher)
            try:
                while True:
                    for _, payload in await ws.receive():
                        reply = clients.on_frame(i, payload, rec)
                        if reply:
                            ws.send_nowait(encode(reply))
            except WSClosed:
                pass

        async with trio.open_nursery() as opening:
            for i in range(n):
                opening.start_soon(open_one, i)
        senders = [i for i in range(n)] if kind != "idle" else []

        async def heartbeats():
            beat = clients.heartbeat()
            if beat is None:
                return
            while True:
                await trio.sleep(clients.heartbeat_s)  # the interval the server's auth reply names
                for ws in conns:
                    ws.send_nowait(encode(beat))

        async def pace():
            k, t0 = 0, trio.current_time()
            while True:
                i = senders[k % len(senders)]
                conns[i].send_nowait(encode(clients.send_frame(i, k)))
                if rec.counting:
                    rec.sent += 1
                k += 1
                await trio.sleep_until(t0 + k / rate)
        nursery.start_soon(heartbeats)
        if senders:
            nursery.start_soon(pace)
        await trio.sleep(ramp_s)
        rec.counting = True
        cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
        await trio.sleep(duration_s)
        cpu, wall = cpu_seconds(server.pid) - cpu0, time.monotonic() - t0
        rec.counting = False
        rss = rss_bytes(server.pid)
        nursery.cancel_scope.cancel()
    lat = sorted(rec.latencies_ms)

    def pct(p):
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 2) if lat else None
    return {"server_cpu_util": round(cpu / wall, 3), "sent": rec.sent, "deliveries": rec.deliveries,
            "cpu_us_per_send": round(cpu * 1e6 / rec.sent, 1) if rec.sent else None,
            "cpu_us_per_delivery": round(cpu * 1e6 / (rec.deliveries + rec.echoes), 2) if rec.deliveries else None,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "rss_per_connection_kib": round((rss - rss0) / n / 1024, 1) if kind == "idle" else None}


def encode(payload: bytes) -> bytes:
    from chatd.bench.ws import OP_TEXT, encode_frame
    return encode_frame(OP_TEXT, payload)


def one_run(server_name: str, shape: str, duration_s: float, ramp_s: float, rate: float | None = None) -> dict:
    kind, n, group_size, shape_rate = SHAPES[shape]
    rate = rate or shape_rate
    workdir = Path(tempfile.mkdtemp(prefix=f"chatd-peers-{server_name}-"))
    server = None
    try:
        server, urls = (start_chatd if server_name == "chatd" else start_centrifugo)(workdir)
        clients = (ChatdClients if server_name == "chatd" else CentrifugoClients)(urls)
        r = trio.run(drive, clients, server, kind, n, group_size, rate, duration_s, ramp_s)
        r["load_avg"] = round(os.getloadavg()[0], 2)
        return r
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help=f"go install {MODULE} (cached)")
    r = sub.add_parser("run", help="alternate chatd and Centrifugo over the shapes; print the ratios")
    r.add_argument("--rounds", type=int, default=2)
    r.add_argument("--duration", type=float, default=15.0)
    r.add_argument("--ramp-up", type=float, default=3.0)
    r.add_argument("--shapes", default=",".join(SHAPES))
    r.add_argument("--servers", default="chatd,centrifugo", help="(chatd alone: a smoke test of the harness)")
    r.add_argument("--rate", type=float, help="sends/s for every shape instead of the shape's own")
    a = ap.parse_args()
    if a.cmd == "build":
        build()
        return
    servers = a.servers.split(",")
    if "centrifugo" in servers and not BINARY.exists():
        raise SystemExit(f"no {BINARY}: run `python {sys.argv[0]} build` first")
    os.sched_setaffinity(0, {GENERATOR_CORE})  # the generator's core; the servers get SERVER_CORE
    results: dict = {}
    for rnd in range(a.rounds):
        for shape in a.shapes.split(","):
            order = servers if rnd % 2 == 0 else servers[::-1]  # alternated
            for name in order:
                res = one_run(name, shape, a.duration, a.ramp_up, a.rate)
                results.setdefault((shape, name), []).append(res)
                print(f"round {rnd + 1} {shape:10s} {name:10s} {json.dumps(res)}", flush=True)
    print("\n| shape | chatd µs CPU/delivery | Centrifugo | ratio | chatd p99 ms | Centrifugo p99 ms | "
          "idle KiB/conn chatd / Centrifugo |\n| --- | --- | --- | --- | --- | --- | --- |")
    for shape in a.shapes.split(","):
        def med(name, key):
            vals = [r[key] for r in results.get((shape, name), []) if r.get(key) is not None]
            return statistics.median(vals) if vals else None
        c, g = med("chatd", "cpu_us_per_delivery"), med("centrifugo", "cpu_us_per_delivery")
        ratio = f"{c / g:.2f}" if c and g else "-"
        ci, gi = med("chatd", "rss_per_connection_kib"), med("centrifugo", "rss_per_connection_kib")
        print(f"| {shape} | {c} | {g} | {ratio} | {med('chatd', 'p99_ms')} | {med('centrifugo', 'p99_ms')} | "
              f"{ci} / {gi} |")


if __name__ == "__main__":
    main()
