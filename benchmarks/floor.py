"""The floor: the thinnest trio + trio-websocket server doing the wire work of a chatd send.

What chatd's per-send machinery costs is only meaningful next to what the same wire work costs
with nothing else around it; absolute rates on a shared 2-core machine are noise, a ratio measured
in the same run is not. This script measures the floor, and (``compare``) chatd beside it:

* ``dm``: every client has a partner (clients 2k and 2k+1). The server receives one frame,
  writes it (framed once) to the partner, and writes an ack plus the same frame (the sender's own
  echo) to the sender in one write: 1 frame in, 3 frames out in 2 socket writes -- what
  ``chatd bench dm`` makes a chatd server do, less the store, the protocol and the routing.
* ``group``: groups of ``--group-size`` clients; the server receives one frame and writes it,
  framed once, to every member (the sender gets the ack in the same write): what a chatd group
  send's fan-out does, less everything else.

* ``cluster-dm``: the cross-shard hop. ``--nodes`` (3) floor processes; client i connects to
  process ``i % nodes``, so the two ends of a pair (2k, 2k+1) are always on different processes.
  The sender's process receives the frame, writes the ack plus the echo to the sender, and
  forwards the payload as one length-prefixed msgpack frame (chatd's link codec,
  :class:`chatd.protocol.link.LinkCodec`) over a direct TCP link (one per pair of processes) to
  the partner's process, which writes it (framed once) to the partner: 1 link frame per send --
  the thinnest version of what ``chatd bench dm --cross-shard`` against a 3-shard cluster makes
  the shards do (chatd sends 2-3 link frames per send: the request to the channel's owner and
  its reply, the deliveries to the members' home shards). Link writes go straight to the socket
  when it takes them (the rest through one writer task), like the client writes. CPU is summed
  over the processes.

The server is a separate process (``floor.py serve``), so its CPU time (user + system, from
``/proc/PID/stat``) is its own; the driver is a small open-loop client in this process (the
lean WebSocket client of ``chatd bench``), sending at ``--rate`` frames/s round-robin over the
senders. Reported: server CPU µs per send and per delivery over the steady window (after
``--ramp-up``), deliveries seen, latency p50/p99 (send -> partner/member, same clock).

Writes use chatd's own primitives (pre-built frames: ``write_nowait``, what the socket takes at
once, then ``send_raw`` for any rest, one ``send_all`` under trio-websocket's stream lock), so the
floor is always as thin as chatd's own writes; ``--send-message`` uses trio-websocket's
``send_message`` instead (for comparison).

Usage::

    python benchmarks/floor.py dm --clients 200 --rate 1000 --duration 15
    python benchmarks/floor.py group --clients 100 --group-size 100 --rate 300 --duration 15
    python benchmarks/floor.py compare dm --clients 200 --rate 1000 --duration 15   # chatd, then the floor
    python benchmarks/floor.py cluster-dm --clients 200 --rate 300 --duration 15
    python benchmarks/floor.py compare cluster-dm --api http://127.0.0.1:8080 --cluster-dir ./local-cluster \
        --clients 200 --rate 300 --duration 15    # against bin/chatd-local-cluster (3 shards)

Resources: the server subprocesses are ended (SIGTERM, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import msgpack
import trio

ACK = b'{"type":"ack","id":%d,"seq":%d}'
MODES = ["dm", "group", "cluster-dm"]


# ---- the server ----------------------------------------------------------------------------

class _LinkOut:
    """cluster-dm: the write side of a link between floor processes: straight to the socket when
    nothing is pending and it takes it all, the rest through one writer task (order kept)."""

    def __init__(self, stream):
        self.stream = stream
        self.buf = bytearray()
        self.busy = False
        self.wake = trio.Event()

    def write(self, data: bytes) -> None:
        if not self.buf and not self.busy:
            try:
                n = self.stream.socket._sock.send(data)
            except BlockingIOError:
                n = 0
            if n == len(data):
                return
            data = data[n:]
        self.buf += data
        self.wake.set()

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            while self.buf:
                data = bytes(self.buf)
                self.buf.clear()
                self.busy = True
                await self.stream.send_all(data)
                self.busy = False


def serve(mode: str, group_size: int, send_message: bool, node: int = 0, link_ports: list[int] | None = None) -> None:
    from trio_websocket import ConnectionClosed, serve_websocket

    from wsproto.connection import ConnectionState

    try:
        from chatd.shard.wsconn import frame
    except ImportError:  # chatd before the framing moved to wsconn.py
        from chatd.shard.session import frame

    async def send_raw(ws, data: bytes) -> None:  # chatd's awaited write of the rest, as it was on
        # trio-websocket (chatd's server now has its own connection: chatd/shard/wsconn.py)
        if ws._close_reason is not None or ws._wsproto.state != ConnectionState.OPEN:
            raise ConnectionClosed(ws._close_reason)
        async with ws._stream_lock:
            try:
                await ws._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await ws._abort_web_socket()
                raise ConnectionClosed(ws._close_reason) from None

    def write_nowait(ws, data: bytes) -> int:  # as chatd.shard.session.write_nowait (kept here so
        # that the floor stays the same when it is run against older chatd code)
        if ws._stream_lock.locked() or ws._close_reason is not None or ws._wsproto.state != ConnectionState.OPEN:
            return 0
        try:
            return ws._stream.socket._sock.send(data)
        except OSError:
            return 0

    from chatd.protocol.link import LinkCodec

    conns: dict[int, object] = {}
    nodes = len(link_ports or ()) or 1
    links: dict[int, _LinkOut] = {}  # cluster-dm: peer node -> its link
    encode = LinkCodec.encode

    def next_frame(codec):  # the floor's own frames (not the link catalog's): framing only
        body = codec.next_body()
        return None if body is None else msgpack.unpackb(body)

    async def write(ws, data: bytes, payload: str, ack: bytes | None) -> None:
        if send_message:
            if ack is not None:
                await ws.send_message(ack.decode())
            await ws.send_message(payload)
        else:
            data = data if ack is None else frame(ack) + data
            n = write_nowait(ws, data)  # chatd's own write: at once if the socket takes it all
            if n < len(data):
                await send_raw(ws, data[n:])

    async def handler(request) -> None:
        ws = await request.accept()
        index = None
        try:
            index = int(await ws.get_message())
            conns[index] = ws
            seq = 0
            if mode == "cluster-dm":
                partner = index ^ 1
                while True:
                    payload = await ws.get_message()
                    seq += 1
                    data = frame(payload)
                    if partner % nodes == node:
                        peer = conns.get(partner)
                        if peer is not None:
                            await write(peer, data, payload, None)
                    else:
                        links[partner % nodes].write(encode({"t": "push", "u": partner, "p": payload}))
                    await write(ws, data, payload, ACK % (seq, seq))
            if mode == "dm":
                members = [index ^ 1]
            else:
                first = index - index % group_size
                members = [i for i in range(first, first + group_size) if i != index]
            while True:
                payload = await ws.get_message()
                seq += 1
                data = None if send_message else frame(payload)
                for m in members:
                    peer = conns.get(m)
                    if peer is not None:
                        try:
                            await write(peer, data, payload, None)
                        except ConnectionClosed:
                            pass
                await write(ws, data, payload, ACK % (seq, seq))
        except ConnectionClosed:
            pass
        finally:
            conns.pop(index, None)

    async def run_link(stream, peer: int, codec) -> None:
        out = links[peer] = _LinkOut(stream)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.run)
            while True:
                while (f := next_frame(codec)) is not None:
                    peer_ws = conns.get(f["u"])
                    if peer_ws is not None:
                        try:
                            await write(peer_ws, frame(f["p"]), f["p"], None)
                        except ConnectionClosed:
                            pass
                data = await stream.receive_some(65536)
                if not data:
                    return
                codec.receive_data(data)

    async def accept_link(stream) -> None:
        codec = LinkCodec(1 << 20)
        while (hello := next_frame(codec)) is None:
            codec.receive_data(await stream.receive_some(65536))
        await run_link(stream, hello["id"], codec)

    async def dial_link(peer: int, nursery) -> None:
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", link_ports[peer])
                break
            except OSError:
                await trio.sleep(0.05)
        await stream.send_all(encode({"t": "hello", "id": node}))
        nursery.start_soon(run_link, stream, peer, LinkCodec(1 << 20))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if link_ports:
                listeners = await trio.open_tcp_listeners(link_ports[node], host="127.0.0.1")
                nursery.start_soon(trio.serve_listeners, accept_link, listeners)
                for peer in range(node + 1, nodes):  # one link per pair: the lower node dials
                    await dial_link(peer, nursery)
                while len(links) < nodes - 1:
                    await trio.sleep(0.01)
            listeners = await nursery.start(lambda task_status: serve_websocket(
                handler, "127.0.0.1", 0, ssl_context=None, task_status=task_status))
            print(f"port {listeners.port}", flush=True)

    trio.run(main)


# ---- the driver ----------------------------------------------------------------------------

def _cpu_s(pids: list[int]) -> float:
    from chatd.bench.target import cpu_s
    return sum(cpu_s(pid) for pid in pids)


def _pct(values: list, p: float) -> float:
    if not values:
        return 0.0
    values.sort()
    return values[min(len(values) - 1, int(len(values) * p))]


async def drive(ports: list[int], pids: list[int], mode: str, clients: int, group_size: int, rate: float, duration_s: float,
                ramp_s: float, size: int) -> dict:
    from chatd.bench.ws import OP_TEXT, WebSocket, WSClosed, encode_frame

    urls = [f"ws://127.0.0.1:{port}/" for port in ports]  # client i connects to process i % len(ports)
    socks: list = [None] * clients
    counts = {"acks": 0, "deliveries": 0, "window_sends": 0, "window_deliveries": 0}
    lat_ns: list[int] = []
    in_window = [False]
    pad = "x" * max(0, size - 16)

    async def connect(i: int, limiter) -> None:
        async with limiter:
            ws = await WebSocket.connect(urls[i % len(urls)])
            await ws.send(b"%d" % i)
            socks[i] = ws

    async def reader(ws) -> None:
        try:
            while True:
                for _op, payload in await ws.receive():
                    if payload.startswith(b'{"type":"ack"'):
                        counts["acks"] += 1
                        continue
                    counts["deliveries"] += 1
                    if in_window[0]:
                        counts["window_deliveries"] += 1
                    if len(lat_ns) < 2_000_000:
                        lat_ns.append(time.monotonic_ns() - int(payload[20:36], 16))
        except WSClosed:
            pass

    limiter = trio.CapacityLimiter(64)
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as cn:
            for i in range(clients):
                cn.start_soon(connect, i, limiter)
        for ws in socks:
            nursery.start_soon(reader, ws)
            nursery.start_soon(ws.run_flusher)
        await trio.sleep(0.5)  # every hello served
        t0 = trio.current_time()
        sent = 0
        cpu0 = cpu1 = None
        t_cpu0 = t_cpu1 = 0.0
        while True:
            now = trio.current_time()
            el = now - t0
            if cpu0 is None and el >= ramp_s:
                cpu0, t_cpu0, in_window[0] = _cpu_s(pids), now, True
                window_start_sent = sent
            if el >= duration_s:
                cpu1, t_cpu1, in_window[0] = _cpu_s(pids), now, False
                counts["window_sends"] = sent - window_start_sent
                break
            due = int(el * rate)
            while sent < due:
                ws = socks[sent % clients]
                body = ('{"type":"send","t":"%016x","channel_id":"dm:00000001:00000002","client_msg_id":"c%d",'
                        '"id":%d,"body":"%s"}' % (time.monotonic_ns(), sent, sent, pad)).encode()
                ws.send_nowait(encode_frame(OP_TEXT, body))
                sent += 1
            await trio.sleep(0.001)
        fan = group_size - 1 if mode == "group" else 1
        expected = sent * (fan + 1)  # members + the sender's own echo
        with trio.move_on_after(10):
            while counts["deliveries"] < expected or counts["acks"] < sent:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    lat_ms = [v / 1e6 for v in lat_ns]
    cpu = cpu1 - cpu0
    return {"mode": mode, "processes": len(pids), "clients": clients, "group_size": group_size if mode == "group" else None,
            "rate": rate, "duration_s": duration_s, "sent": sent, "acks": counts["acks"],
            "deliveries": counts["deliveries"], "expected_deliveries": expected,
            "server_cpu_util": round(cpu / (t_cpu1 - t_cpu0), 3),
            "cpu_us_per_send": round(cpu / max(1, counts["window_sends"]) * 1e6, 1),
            "cpu_us_per_delivery": round(cpu / max(1, counts["window_deliveries"]) * 1e6, 2),
            "latency_ms": {"p50": round(_pct(lat_ms, 0.5), 2), "p99": round(_pct(lat_ms, 0.99), 2)}}


def run_floor(mode: str, clients: int, group_size: int, rate: float, duration_s: float, ramp_s: float,
              size: int, send_message: bool, nodes: int = 3) -> dict:
    n = nodes if mode == "cluster-dm" else 1
    cmd = [sys.executable, os.path.abspath(__file__), "serve", "--mode", mode, "--group-size", str(group_size)]
    if send_message:
        cmd.append("--send-message")
    if mode == "cluster-dm":
        from chatd.bench.target import _free_ports

        cmd += ["--link-ports", ",".join(map(str, _free_ports(n, "127.0.0.1")))]
    procs = []
    try:
        for k in range(n):
            procs.append(subprocess.Popen(cmd + ["--node", str(k)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL))
        ports = []
        for proc in procs:
            line = proc.stdout.readline().decode()
            if not line.startswith("port "):
                raise SystemExit(f"floor server did not start (said {line!r})")
            ports.append(int(line.split()[1]))
        r = trio.run(drive, ports, [p.pid for p in procs], mode, clients, group_size, rate, duration_s, ramp_s,
                     size)
        r["writes"] = "send_message" if send_message else "send_raw"
        return r
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_chatd(mode: str, clients: int, group_size: int, rate: float, duration_s: float, ramp_s: float,
              size: int, extra: list[str]) -> dict:
    """``chatd bench`` with the same options (cluster-dm: ``dm --cross-shard`` against the cluster
    given by ``extra``: ``--api URL --cluster-dir DIR``)."""
    if mode == "cluster-dm":
        mode, extra = "dm", ["--cross-shard", *extra]
    cmd = [sys.executable, "-P", "-m", "chatd.cli", "bench", mode, "--clients", str(clients), "--rate", str(rate),
           "--duration", str(duration_s), "--ramp-up", str(ramp_s), "--size", str(size), "--procs", "1", "--json",
           *extra]
    if mode == "group":
        cmd += ["--group-size", str(group_size)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, check=False).stdout
    r = json.loads(out)
    s, c = r["server"], r["counts"]
    extra_out = {}
    if "cpu_us_per_send_by_role" in s:  # a cluster: CPU summed over its processes, and by role
        extra_out = {"cpu_us_per_send_by_role": s["cpu_us_per_send_by_role"], "cluster": r.get("cluster")}
    return {**extra_out, "ok": r["ok"], "problems": r["problems"], "sent": c["sent"], "delivered": c["delivered"],
            "lost": c["lost"], "duplicated": c["duplicated"], "out_of_order": c["out_of_order"],
            "server_cpu_util": s["cpu_util"], "cpu_us_per_send": s["cpu_us_per_send"],
            "cpu_us_per_delivery": s["cpu_us_per_delivery"],
            "latency_ms": {k: r["latency_ms"]["send_deliver"][k] for k in ("p50", "p99")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="(internal) the floor server")
    s.add_argument("--mode", choices=MODES, required=True)
    s.add_argument("--group-size", type=int, default=100)
    s.add_argument("--send-message", action="store_true")
    s.add_argument("--node", type=int, default=0)
    s.add_argument("--link-ports", default="")
    for name in (*MODES, "compare"):
        p = sub.add_parser(name, help=f"measure the floor ({name})" if name != "compare" else
                           "chatd bench, then the floor with the same options; the ratio of CPU per op")
        if name == "compare":
            p.add_argument("mode", choices=MODES)
            p.add_argument("--api", help="cluster-dm: the cluster's API URL (bin/chatd-local-cluster)")
            p.add_argument("--cluster-dir", help="cluster-dm: its CLUSTER_DIR (the pid files of its processes)")
        p.add_argument("--clients", type=int, default=200)
        p.add_argument("--group-size", type=int, default=100)
        p.add_argument("--rate", type=float, default=1000)
        p.add_argument("--duration", type=float, default=15)
        p.add_argument("--ramp-up", type=float, default=2)
        p.add_argument("--size", type=int, default=64)
        p.add_argument("--send-message", action="store_true")
        p.add_argument("--json", action="store_true")
        p.add_argument("--nodes", type=int, default=3, help="cluster-dm: floor processes")
        if name == "compare":
            p.add_argument("--chatd-arg", action="append", default=[], help="extra argument for chatd bench")
    a = ap.parse_args()
    if a.cmd == "serve":
        serve(a.mode, a.group_size, a.send_message, a.node, [int(p) for p in a.link_ports.split(",") if p])
        return
    mode = a.mode if a.cmd == "compare" else a.cmd
    args = (mode, a.clients, a.group_size, a.rate, a.duration, a.ramp_up, a.size)
    out = {}
    if a.cmd == "compare":
        extra = list(a.chatd_arg)
        if mode == "cluster-dm":
            if not (a.api and a.cluster_dir):
                ap.error("compare cluster-dm needs --api and --cluster-dir (bin/chatd-local-cluster)")
            extra += ["--api", a.api, "--cluster-dir", a.cluster_dir]
        out["chatd"] = run_chatd(*args, extra)
    out["floor"] = run_floor(*args, a.send_message, a.nodes)
    if a.cmd == "compare":
        out["ratio_per_send"] = round(out["chatd"]["cpu_us_per_send"] / out["floor"]["cpu_us_per_send"], 2)
        out["ratio_per_delivery"] = round(out["chatd"]["cpu_us_per_delivery"] / out["floor"]["cpu_us_per_delivery"],
                                          2)
        shards = out["chatd"].get("cpu_us_per_send_by_role", {}).get("shard")
        if shards is not None:
            out["ratio_per_send_shards_only"] = round(shards / out["floor"]["cpu_us_per_send"], 2)
    if a.json:
        print(json.dumps(out, indent=2))
        return
    for who, r in out.items():
        if isinstance(r, dict):
            print(f"{who:6} server CPU {r['server_cpu_util']:.2f} of a core: {r['cpu_us_per_send']:,.1f} µs/send, "
                  f"{r['cpu_us_per_delivery']:,.2f} µs/delivery; p50 {r['latency_ms']['p50']:.2f} ms, "
                  f"p99 {r['latency_ms']['p99']:.2f} ms; sent {r['sent']:,}, delivered "
                  f"{r.get('deliveries', r.get('delivered')):,}"
                  + (f" of {r['expected_deliveries']:,}" if "expected_deliveries" in r else "")
                  + (f"; ok={r['ok']}" if "ok" in r else ""))
    if "ratio_per_send" in out:
        print(f"chatd / floor: {out['ratio_per_send']} per send, {out['ratio_per_delivery']} per delivery"
              + (f" (shards only: {out['ratio_per_send_shards_only']} per send; by role, µs per send: "
                 f"{out['chatd']['cpu_us_per_send_by_role']})" if "ratio_per_send_shards_only" in out else ""))


if __name__ == "__main__":
    main()
