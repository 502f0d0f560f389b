"""A generator process: its share of the devices, one trio loop, talking to the coordinator over a
pipe.

Conversation (coordinator ⇄ worker), every message a tuple:

1. → ``("ready", {connected, failed})`` once every device connected (or failed three times)
2. ← ``("start", t0_wall_ns)`` (or ``("abort",)``); the run starts at t0 in every process
3. → ``("progress", counters)`` every second while running
4. → ``("heads", {channel: highest acked seq})`` once sending is over and every send is acked (or
   the drain deadline passed)
5. ← ``("heads", merged heads)``; the worker waits until each device has every seq up to its
   channels' heads (or the drain deadline), then stops its clients
6. → ``("result", stats)``; or ``("error", traceback)`` at any point

Pacing is open-loop: send k is due at a fixed time (rate ramping linearly over ``ramp_up``); the
sends due are handed round-robin to the sending devices, and latencies count from the due time, so
a slow server (or a saturated generator) shows as latency instead of silently lowering the rate.
"""

from __future__ import annotations

import gc
import math
import os
import random
import resource
import time
import traceback

import trio

from .client import BenchClient, Codec
from .scenarios import SCENARIOS, WorkerSpec
from .stats import NS, Stats


def view_digest(view) -> str:
    """A folded channel view (chatd/lifecycle.py), as a digest the same for every member: its
    snapshot without "did I react"."""
    import hashlib
    snap = sorted((seq, t[:5] + t[6:]) for seq, t in view.snapshot().items())
    return hashlib.sha256(repr(snap).encode()).hexdigest()


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (thousands of sockets); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft


def count_at(t_s: float, rate: float, ramp_s: float) -> float:
    """Sends due ``t_s`` seconds after the start."""
    if t_s <= 0:
        return 0.0
    if ramp_s > 0 and t_s < ramp_s:
        return rate * t_s * t_s / (2 * ramp_s)
    return rate * (t_s - ramp_s / 2)


def time_of(k: float, rate: float, ramp_s: float) -> float:
    """When send ``k`` (1-based) is due: the inverse of :func:`count_at`."""
    if ramp_s > 0 and k < rate * ramp_s / 2:
        return math.sqrt(2 * ramp_s * k / rate)
    return k / rate + ramp_s / 2


def connect_deadline_s(opts, n_clients: int, spent_s: float) -> float:
    """How much longer the connect phase may last: generous, but bounded."""
    total = (0 if SCENARIOS[opts.scenario].sends else opts.ramp_up_s) + max(60.0, 3 * opts.connect_timeout_s) \
        + n_clients / 50
    return max(0.0, total - spent_s)


class Context:
    """What the clients of one worker share."""

    def __init__(self, spec: WorkerSpec):
        opts = spec.options
        self.spec = spec
        self.opts = opts
        self.stats = Stats()
        self.codec = Codec(opts.fmt)
        self.pad = "x" * (opts.size - 16)
        self.max_inflight = opts.max_inflight
        self.heartbeat_s = 0.0  # 0: the interval the server's auth reply names
        self.rng = random.Random(opts.seed * 1000 + spec.worker)
        self.wall_offset_ns = time.time_ns() - time.monotonic_ns()
        self.connect_limiter = trio.CapacityLimiter(opts.connect_concurrency)
        self.nursery: trio.Nursery | None = None
        self.ready = 0
        self.failed = 0
        self.all_ready = trio.Event()
        self.n_clients = len(spec.devices)

    def client_ready(self, ok: bool) -> None:
        if ok:
            self.ready += 1
        else:
            self.failed += 1
        if self.ready + self.failed >= self.n_clients:
            self.all_ready.set()


def make_client(dev, ctx, transport: str):
    """The device's client: a WebSocket one, or SSE / long polling (chatd/bench/http_transport.py)."""
    if transport == "ws":
        return BenchClient(dev, ctx)
    from .http_transport import HTTPBenchClient
    return HTTPBenchClient(dev, ctx, transport)


def worker_main(conn, spec: WorkerSpec) -> None:
    raise_nofile_limit()
    gc.set_threshold(20_000, 50, 50)  # fewer, cheaper collections (see the gc.freeze below)
    worker = Worker(conn, spec)
    profile_dir = os.environ.get("CHATD_BENCH_PROFILE_DIR")  # profile the generator itself (cProfile)
    try:
        if profile_dir:
            import cProfile

            cProfile.runctx("trio.run(worker.run)", globals(), {"trio": trio, "worker": worker},
                            os.path.join(profile_dir, f"bench-worker-{spec.worker}.prof"))
        else:
            trio.run(worker.run)
    except BaseException:
        if not worker.aborted:
            try:
                conn.send(("error", traceback.format_exc()))
            except OSError:
                pass
    finally:
        conn.close()


class Worker:
    def __init__(self, conn, spec: WorkerSpec):
        self.conn = conn
        self.spec = spec
        self.ctx = Context(spec)
        self.clients = [make_client(d, self.ctx, spec.options.transport) for d in spec.devices]
        self.scenario = SCENARIOS[spec.options.scenario]
        self.aborted = False

    async def _pipe_reader(self, send_channel) -> None:
        while True:
            try:
                msg = await trio.to_thread.run_sync(self.conn.recv, abandon_on_cancel=True)
            except (EOFError, OSError):
                msg = ("abort",)
            await send_channel.send(msg)
            if msg[0] == "abort":
                return

    async def _expect(self, control, kind: str):
        msg = await control.receive()
        if msg[0] == "abort":
            self.aborted = True
        if msg[0] != kind:
            raise RuntimeError(f"expected {kind!r} from the coordinator, got {msg[0]!r}")
        return msg

    async def run(self) -> None:
        ctx, opts, stats = self.ctx, self.spec.options, self.ctx.stats
        control_send, control = trio.open_memory_channel(16)
        async with trio.open_nursery() as nursery:
            ctx.nursery = nursery
            nursery.start_soon(self._pipe_reader, control_send)
            if not self.clients:
                ctx.all_ready.set()
            # 1. connect (for idle, spread over the ramp-up)
            t_connect = time.monotonic()
            for i, c in enumerate(self.clients):
                if not self.scenario.sends and opts.ramp_up_s > 0:
                    await trio.sleep_until(_trio_at(t_connect + opts.ramp_up_s * i / len(self.clients)))
                nursery.start_soon(c.run)
            # Devices not connected by the deadline count as failed (they go on trying).
            with trio.move_on_after(connect_deadline_s(opts, len(self.clients), time.monotonic() - t_connect)):
                await ctx.all_ready.wait()
            # The clients' long-lived objects are all there now: keep the cyclic GC from walking
            # them again and again (full collections over thousands of connections pause the loop
            # for tens of milliseconds, which would show up as latency).
            gc.collect()
            gc.freeze()
            connected = sum(1 for c in self.clients if c.connected)
            self.conn.send(("ready", {"connected": connected, "failed": len(self.clients) - connected}))
            # 2. start together
            _, t0_wall = await self._expect(control, "start")
            t0 = t0_wall - ctx.wall_offset_ns
            stats.t0_ns = t0
            nursery.start_soon(self._reporter, t0)
            await _sleep_until_ns(t0)
            cpu0, wall0 = time.process_time(), time.monotonic()
            end_ns = t0 + int(opts.duration_s * NS)
            async with trio.open_nursery() as run_nursery:
                if self.scenario.storm:
                    for c in self.clients:
                        run_nursery.start_soon(self._storm, c, end_ns)
                if self.scenario.sends:
                    await self._pace(t0)
                await _sleep_until_ns(end_ns)
                run_nursery.cancel_scope.cancel()
            cpu = time.process_time() - cpu0
            wall = time.monotonic() - wall0
            # 3. drain: every send acked
            drain_start = time.monotonic()
            deadline = drain_start + opts.drain_s
            while time.monotonic() < deadline and not all(c.idle() for c in self.clients):
                await trio.sleep(0.02)
            heads: dict[str, int] = {}
            for ch, seqs in stats.acked_seqs.items():
                heads[ch] = max(seqs)
            self.conn.send(("heads", heads))
            _, all_heads = await self._expect(control, "heads")
            deadline = time.monotonic() + opts.drain_s
            while time.monotonic() < deadline and not all(c.caught_up(all_heads) for c in self.clients):
                await trio.sleep(0.02)
            drained_s = time.monotonic() - drain_start
            # 4. stop and report
            for c in self.clients:
                c.stop()
            with trio.move_on_after(5):
                for c in self.clients:
                    await c.done.wait()
            result = stats.to_dict()
            result.update(worker=self.spec.worker, cpu_s=cpu, wall_s=wall, drain_s=drained_s,
                          books={c.dev.index: c.books() for c in self.clients},
                          views={c.dev.index: {ch: (view_digest(v), c.recv[ch].top() if ch in c.recv else 0)
                                                    for ch, v in c.lifecycle.views.items()}
                                 for c in self.clients if c.lifecycle is not None},
                          rusage_maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            self.conn.send(("result", result))
            nursery.cancel_scope.cancel()

    async def _reporter(self, t0: int) -> None:
        stats = self.ctx.stats
        await _sleep_until_ns(t0)
        k = 1
        cpu_prev, wall_prev = time.process_time(), time.monotonic()
        while True:
            await _sleep_until_ns(t0 + k * NS)
            cpu, wall = time.process_time(), time.monotonic()
            stats.timeline["cpu_util"].append(round((cpu - cpu_prev) / max(wall - wall_prev, 1e-3), 3))
            cpu_prev, wall_prev = cpu, wall
            k += 1
            progress = stats.counters()
            progress["connected"] = sum(1 for c in self.clients if c.connected)
            progress["errors"] = sum(stats.errors.values())
            self.conn.send(("progress", self.spec.worker, progress))

    async def _pace(self, t0: int) -> None:
        senders = [c for c in self.clients if c.dev.send_channel]
        rate = self.spec.rate
        if not senders or rate <= 0:
            return
        opts = self.spec.options
        self.ctx.rng.shuffle(senders)
        ramp = opts.ramp_up_s
        total = int(count_at(opts.duration_s, rate, ramp))
        off = self.ctx.wall_offset_ns
        issued = 0
        i = 0
        n = len(senders)
        while issued < total:
            elapsed = (time.monotonic_ns() - t0) / NS
            due = min(total, int(count_at(elapsed, rate, ramp)))
            while issued < due:
                issued += 1
                at = t0 + int(time_of(issued, rate, ramp) * NS)
                senders[i].enqueue(at, at + off)
                i += 1
                if i == n:
                    i = 0
            if issued >= total:
                break
            next_at = t0 + int(time_of(issued + 1, rate, ramp) * NS)
            await trio.sleep(max((next_at - time.monotonic_ns()) / NS, 0.0005))

    async def _storm(self, client: BenchClient, end_ns: int) -> None:
        opts = self.spec.options
        rng = self.ctx.rng
        while True:
            await trio.sleep(rng.uniform(0.5, 1.5) * opts.reconnect_interval_s)
            if time.monotonic_ns() >= end_ns:
                return
            client.drop(abrupt=rng.random() < 0.5, offline_s=rng.uniform(0, opts.offline_s))


def _trio_at(monotonic_s: float) -> float:
    return trio.current_time() + (monotonic_s - time.monotonic())


async def _sleep_until_ns(mono_ns: int) -> None:
    delay = (mono_ns - time.monotonic_ns()) / NS
    if delay > 0:
        await trio.sleep(delay)
