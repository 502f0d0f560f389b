"""The coordinator: target up, stage set, worker processes started, run in lockstep, results merged.

Resource policy: the self-started server (if any) and every worker process are owned by
:func:`run_bench` and ended in its ``finally`` (workers: terminate after a grace period; server:
SIGTERM, then SIGKILL). A worker that dies or reports an error ends the run with
:class:`BenchError` carrying its traceback; so does a phase that overruns its deadline.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import trio

from .population import Population, SetupError, populate, split
from .report import build_report
from .scenarios import SCENARIOS, BenchOptions, WorkerSpec
from .target import LocalServer, TargetError, cpu_s, rss_kib, wait_healthy
from .topology import role_of, topology
from .worker import worker_main

START_DELAY_S = 0.3


async def _converged(api_url: str, population, results: dict) -> dict:
    """--mix: every device's folded view of each of its channels against the fold of the HTTP
    history (read with a member's token), as digests (chatd/bench/worker.py ``view_digest``). A
    device that does not hold the channel up to the stored head (rows stored after the drain gave
    up: an overloaded run, which reports its unacked sends) cannot be compared: counted apart."""
    from ..lifecycle import ChannelView
    from .httpclient import HTTPClient
    from .worker import view_digest
    views = {int(i): v for r in results.values() for i, v in r.get("views", {}).items()}
    devices = {d.index: d for d in population.devices}
    http = HTTPClient(api_url)
    compared = mismatched = behind = 0
    try:
        for ch, members in population.channel_devices.items():
            token = devices[members[0]].token
            view, after = ChannelView(devices[members[0]].user_id), 0
            while True:
                status, body = await http.request("GET", f"/v1/channels/{ch}/messages?limit=500&after={after}",
                                                  token=token)
                if status != 200:
                    raise BenchError(f"history of {ch}: HTTP {status}")
                for f in body["messages"]:
                    view.apply(f)
                if body["messages"]:
                    after = body["messages"][-1]["seq"]
                if not body["more"]:
                    break
            want, head = view_digest(view), after
            for i in members:
                got, top = views.get(i, {}).get(ch, (None, 0))
                if top < head:
                    behind += 1
                    continue
                compared += 1
                mismatched += got != want
    finally:
        await http.aclose()
    return {"devices_compared": compared, "mismatched": mismatched, "devices_behind": behind,
            "converged": compared > 0 and not mismatched and not behind}


class BenchError(RuntimeError):
    pass


@dataclass
class TargetOptions:
    api: str | None = None
    server_env: dict = field(default_factory=dict)
    server_pids: dict[str, int] = field(default_factory=dict)  # name -> pid (--server-pid, --cluster-dir)
    keep_data: bool = False


class Display:
    """The live one-line progress display: stderr, and only when it is a terminal."""

    def __init__(self, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._last = 0.0
        self._width = 0

    def status(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        text = text[:160]
        self.stream.write("\r" + text.ljust(self._width))
        self._width = len(text)
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


class _Workers:
    def __init__(self, specs: list[WorkerSpec], display: Display, on_tick):
        mp = multiprocessing.get_context("spawn")
        self.display = display
        self.on_tick = on_tick
        self.conns = []
        self.procs = []
        self.progress: dict[int, dict] = {}
        self.finished: set[int] = set()
        self.phase = "connecting"
        self.t0_mono: float | None = None
        for spec in specs:
            parent, child = mp.Pipe()
            p = mp.Process(target=worker_main, args=(child, spec), name=f"chatd-bench-{spec.worker}", daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)

    def send_all(self, msg) -> None:
        for c in self.conns:
            c.send(msg)

    def gather(self, kind: str, timeout_s: float) -> dict[int, object]:
        out: dict[int, object] = {}
        deadline = time.monotonic() + timeout_s
        while len(out) < len(self.conns):
            live = {self.conns[i]: i for i in range(len(self.conns)) if i not in self.finished}
            for conn in multiprocessing.connection.wait(list(live), timeout=0.25):
                i = live[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    self.procs[i].join(2)
                    raise BenchError(f"generator process {i} died (exit code {self.procs[i].exitcode})") from None
                if msg[0] == "progress":
                    self.progress[msg[1]] = msg[2]
                elif msg[0] == "error":
                    raise BenchError(f"generator process {i} failed:\n{msg[1]}")
                elif msg[0] == kind:
                    out[i] = msg[1]
                    if kind == "result":
                        self.finished.add(i)
                else:
                    raise BenchError(f"generator process {i}: unexpected {msg[0]!r} while waiting for {kind!r}")
            self.on_tick()
            self._show()
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {timeout_s:.0f} s waiting for the generators ({kind})")
        return out

    def _show(self) -> None:
        if not self.display.enabled:
            return
        tot: dict[str, int] = {}
        for p in self.progress.values():
            for k, v in p.items():
                tot[k] = tot.get(k, 0) + v
        t = "" if self.t0_mono is None else f"t={max(0.0, time.monotonic() - self.t0_mono):5.1f}s "
        self.display.status(f"{self.phase}: {t}conns {tot.get('connected', 0)} sent {tot.get('sent', 0)} "
                            f"acked {tot.get('acked', 0)} delivered {tot.get('delivered', 0)} "
                            f"errors {tot.get('errors', 0)} reconnects {tot.get('reconnects', 0)}")

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("abort",))
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(2)
        for c in self.conns:
            c.close()


class _RssSampler:
    """The summed RSS of the server processes (all of them, or None if one cannot be read)."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.samples: list[tuple[float, int]] = []  # (monotonic s, KiB)
        self._last = 0.0

    def sample(self) -> int | None:
        if not self.pids:
            return None
        values = [rss_kib(p) for p in self.pids]
        if None in values:
            return None
        v = sum(values)
        self.samples.append((time.monotonic(), v))
        return v

    def tick(self) -> None:
        if time.monotonic() - self._last >= 1.0:
            self._last = time.monotonic()
            self.sample()


def _cpu_all(pids: dict[str, int]) -> dict[str, float | None]:
    return {name: cpu_s(pid) for name, pid in pids.items()}


def run_bench(opts: BenchOptions, topts: TargetOptions, display: Display | None = None) -> tuple[dict, dict]:
    """Run one bench; ``(report, merged histograms)``."""
    display = display or Display()
    opts.validate()
    scenario = SCENARIOS[opts.scenario]
    started_at = datetime.now(timezone.utc)
    server = None
    target: dict = {}
    workers = None
    try:
        if topts.api:
            api_url = topts.api.rstrip("/")
            health = wait_healthy(api_url, 10)
            pids = dict(topts.server_pids)
            target = {"api": api_url, "self_started": False, "server_pid": next(iter(pids.values()), None)}
            if len(pids) > 1:
                target["server_pids"] = pids
        else:
            display.status("starting chatd run ...", force=True)
            server = LocalServer(topts.server_env, keep_data=topts.keep_data)
            api_url = server.start()
            health = {}
            pids = {"server": server.pid}
            target = {"api": api_url, "self_started": True, "server_pid": server.pid,
                      "server_env": dict(sorted(topts.server_env.items()))}
        t_setup = time.monotonic()
        population: Population = trio.run(populate, api_url, opts, lambda s: display.status(s),
                                          health.get("shards") or [])
        setup_s = time.monotonic() - t_setup
        rss = _RssSampler(list(pids.values()))
        rss_before = rss.sample()

        groups = split(population.devices, opts.procs)
        total_senders = sum(1 for d in population.devices if d.send_channel)
        specs = [WorkerSpec(worker=i, options=opts, devices=devs, total_senders=total_senders)
                 for i, devs in enumerate(groups)]
        workers = _Workers(specs, display, rss.tick)
        ready = workers.gather("ready", 60 + opts.ramp_up_s + max(60.0, 3 * opts.connect_timeout_s)
                               + opts.connections / 50)  # the workers give up before this
        connected = sum(r["connected"] for r in ready.values())
        failed = sum(r["failed"] for r in ready.values())
        rss_connected = rss.sample()
        t0_wall = time.time_ns() + int(START_DELAY_S * 1e9)
        t0_mono = time.monotonic() + START_DELAY_S
        workers.t0_mono = t0_mono
        workers.phase = scenario.name
        workers.send_all(("start", t0_wall))
        cpu0, t_cpu0 = _cpu_all(pids), time.monotonic()
        heads_by_worker = workers.gather("heads", opts.duration_s + opts.drain_s + 60)
        t_send_end = time.monotonic()
        cpu1 = _cpu_all(pids)
        heads: dict[str, int] = {}
        for h in heads_by_worker.values():
            for ch, seq in h.items():
                heads[ch] = max(seq, heads.get(ch, 0))
        workers.phase = "draining"
        workers.send_all(("heads", heads))
        results = workers.gather("result", opts.drain_s + 60)
        display.clear()
        hold = [v for t, v in rss.samples if t0_mono + 1.0 <= t <= t0_mono + opts.duration_s]
        server_info = None
        if pids:
            loaded = statistics.median(hold) if hold else rss_connected
            cpu = {name: None if cpu0[name] is None or cpu1[name] is None else cpu1[name] - cpu0[name]
                   for name in pids}
            total = None if None in cpu.values() else sum(cpu.values())
            server_info = {"pid": next(iter(pids.values())), "rss_kib_before": rss_before,
                           "rss_kib_connected": rss_connected, "rss_kib_loaded": loaded,
                           "rss_kib_max": max((v for _, v in rss.samples), default=None),
                           "cpu_util": None if total is None else round(total / max(1e-9, t_send_end - t_cpu0), 3),
                           "cpu_s": None if total is None else round(total, 3),
                           "rss_timeline": [[round(t - t0_mono, 1), v] for t, v in rss.samples]}
            if len(pids) > 1:  # the sums above are over all of them; each one's share here
                server_info["procs"] = {name: {"pid": pid, "role": role_of(name), "cpu_s": None if cpu[name] is None
                                               else round(cpu[name], 3)} for name, pid in pids.items()}
        lifecycle = trio.run(_converged, api_url, population, results) if opts.mix else None
        meta = {"started_at": started_at.isoformat(timespec="seconds"), "target": target, "lifecycle": lifecycle,
                "setup_s": round(setup_s, 2), "run_s": round(t_send_end - t0_mono, 2),
                "connected": connected, "connect_failed": failed, "server": server_info,
                "http_calls": population.http_calls, "user_prefix": population.prefix,
                "cluster": topology(population.devices, population.channel_devices, population.shards)}
        return build_report(opts, population, [results[i] for i in sorted(results)], meta)
    except (SetupError, TargetError) as e:
        raise BenchError(str(e)) from None
    finally:
        display.clear()
        if workers is not None:
            workers.close()
        if server is not None:
            code = server.stop()
            if code not in (0, None):
                print(f"chatd bench: the server exited with status {code}; log:\n{server.final_log_tail}",
                      file=sys.stderr)
