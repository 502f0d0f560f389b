#!/usr/bin/env python3
"""Acked messages per second on SQLite and on a real Apache Cassandra, measured in one run.

    python benchmarks/store_backends.py [--duration 10] [--rounds 2]

Starts its own single-node Cassandra (bin/chatd-cassandra, a temporary directory, stopped at the
end), then alternates `chatd bench dm` runs against a self-started `chatd run` on each backend (so a
machine that gets busier or quieter during the run affects both alike), for two loads:

* one busy channel: 2 clients in one 1:1 channel, 8 sends in flight each (16 in flight), offered
  far above what either backend takes (the acked rate is the capacity);
* 100 pairs: 200 clients, 100 channels, 4 sends in flight each.

Prints one line per run and a table: acked msgs/s per backend (median of the rounds), the ratio
Cassandra / SQLite, and each server's CPU. Overloaded runs must report 0 duplicated / out of order;
their "lost" (acked, not yet delivered when the bench's drain ends while clients still work through
an open-loop backlog) is shown but not a verdict. Then each backend runs every load once more at 80%
of its measured capacity, where nothing may be lost, duplicated or out of order.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOADS = {
    "one busy channel (16 in flight)": ["--clients", "2", "--rate", "20000", "--max-inflight", "8"],
    "100 pairs": ["--clients", "200", "--rate", "20000", "--max-inflight", "4"],
}


def bench(args: list[str], duration: float, extra: list[str], rate: float | None = None) -> dict:
    if rate is not None:
        args = [a if prev != "--rate" else f"{rate:.0f}" for prev, a in zip(["", *args], args)]
    cmd = [sys.executable, "-P", "-m", "chatd.cli", "bench", "dm", "--procs", "1", "--duration", str(duration),
           "--drain", "10", "--json", *args, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit(f"bench failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    node = Path(tempfile.mkdtemp(prefix="chatd-bench-cassandra-"))
    state = json.loads(subprocess.run([sys.executable, str(ROOT / "bin" / "chatd-cassandra"), "start", "--dir",
                                       str(node)], capture_output=True, text=True, check=True).stdout)
    print(f"Apache Cassandra {state['version']} on 127.0.0.1:{state['port']}", flush=True)
    results: dict[tuple[str, str], list[dict]] = {}
    checks: list[str] = []

    def cassandra_opts() -> list[str]:
        ks = "bench_" + secrets.token_hex(4)
        cfg = node / f"{ks}.toml"
        cfg.write_text('[store]\nbackend = "cassandra"\n[cassandra]\ncontact_points = "127.0.0.1"\n'
                       f'port = {state["port"]}\nkeyspace = "{ks}"\n'
                       "replication = \"{'class': 'SimpleStrategy', 'replication_factor': 1}\"\n")
        subprocess.run([sys.executable, "-P", "-m", "chatd.cli", "store", "migrate", "--config", str(cfg)],
                       check=True, capture_output=True, cwd=ROOT)
        return ["--server-opt", "store.backend=cassandra", "--server-opt", f"cassandra.port={state['port']}",
                "--server-opt", f"cassandra.keyspace={ks}",
                "--server-opt", "cassandra.replication={'class': 'SimpleStrategy', 'replication_factor': 1}"]

    try:
        for rnd in range(a.rounds):
            for load, args in LOADS.items():
                for backend in ("sqlite", "cassandra"):
                    r = bench(args, a.duration, cassandra_opts() if backend == "cassandra" else [])
                    c = r["counts"]
                    print(f"round {rnd + 1} {load:32s} {backend:9s} acked/s {r['throughput']['acked_per_s']:8.1f}"
                          f"  server CPU {r['server']['cpu_util']:.2f}  lost/dup/ooo {c['lost']}/{c['duplicated']}/"
                          f"{c['out_of_order']} (overloaded)", flush=True)
                    if c["duplicated"] + c["out_of_order"]:
                        raise SystemExit("duplicated or out-of-order messages: a bug")
                    results.setdefault((load, backend), []).append(r)
        for load, args in LOADS.items():
            for backend in ("sqlite", "cassandra"):
                rate = 0.8 * statistics.median(r["throughput"]["acked_per_s"] for r in results[(load, backend)])
                r = bench(args, a.duration, cassandra_opts() if backend == "cassandra" else [], rate=rate)
                c = r["counts"]
                line = (f"check {load:32s} {backend:9s} at {rate:6.0f}/s: acked {c['acked']}/{c['sent']}, "
                        f"lost/dup/ooo {c['lost']}/{c['duplicated']}/{c['out_of_order']}, "
                        f"p99 send->ack {r['latency_ms']['send_ack']['p99']:.0f} ms")
                print(line, flush=True)
                checks.append(line)
                if c["lost"] + c["duplicated"] + c["out_of_order"] or c["acked"] != c["sent"]:
                    raise SystemExit("lost, duplicated, out-of-order or unacked messages at 80% load: a bug")
    finally:
        subprocess.run([sys.executable, str(ROOT / "bin" / "chatd-cassandra"), "stop", "--dir", str(node)],
                       capture_output=True)
    print("\n| load | SQLite acked/s | Cassandra acked/s | Cassandra / SQLite | server CPU SQLite / Cassandra |")
    print("| --- | --- | --- | --- | --- |")
    for load in LOADS:
        s = [r["throughput"]["acked_per_s"] for r in results[(load, "sqlite")]]
        c = [r["throughput"]["acked_per_s"] for r in results[(load, "cassandra")]]
        scpu = statistics.median(r["server"]["cpu_util"] for r in results[(load, "sqlite")])
        ccpu = statistics.median(r["server"]["cpu_util"] for r in results[(load, "cassandra")])
        print(f"| {load} | {statistics.median(s):,.0f} | {statistics.median(c):,.0f} | "
              f"{statistics.median(c) / statistics.median(s):.2f} | {scpu:.2f} / {ccpu:.2f} |")


if __name__ == "__main__":
    main()
