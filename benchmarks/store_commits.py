"""Appends per group commit during a ``chatd bench`` run, beside its CPU per send.

Starts a ``chatd run`` (the bench's own environment: no rate limit, cheap password hash, plus any
``--server-opt SECTION.KEY=VALUE``), reads the store's counters from ``/metrics``
(``chatd_store_ops_total``, ``chatd_store_commits``, ``chatd_store_commit_seconds_total``) before
and after ``chatd bench SCENARIO --api URL --server-pid PID ...``, and prints the bench's figures
with the store's for the run: ops per commit, commit latency, server CPU per send, p50/p99.
(The counts include the bench's set-up writes - sign-ups, device logins - a few hundred against
the ~10,000 appends of a 10 s run at 1,000 sends/s.)

Usage::

    python benchmarks/store_commits.py [--server-opt store.sqlite_commit_delay_s=0] -- \
        dm --clients 200 --rate 1000 --duration 15 --ramp-up 2 --procs 1

Resources: the server process and its temporary data directory are removed whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import urllib.request

from chatd.bench.target import SERVER_ENV_DEFAULTS, LocalServer, server_opt_env


def store_counters(api_url: str) -> dict[str, float]:
    with urllib.request.urlopen(api_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for name in ("ops_total", "commits", "commit_seconds_total", "failed_commits_total", "commit_waits_total"):
        m = re.search(rf"^chatd_store_{name} ([0-9.e+-]+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def thread_cpu(pid: int) -> dict[str, list[float]]:
    """User and system CPU seconds per thread name (threads of one name summed)."""
    out: dict[str, list[float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, _, rest = f.read().rpartition(")")
        except OSError:
            continue
        name = head.partition("(")[2]
        fields = rest.split()
        t = out.setdefault(name, [0.0, 0.0])
        t[0] += int(fields[11]) / tick
        t[1] += int(fields[12]) / tick
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server-opt", action="append", default=[])
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- then chatd bench's scenario and options")
    a = ap.parse_args()
    bench = a.bench[1:] if a.bench[:1] == ["--"] else a.bench
    env = dict(SERVER_ENV_DEFAULTS)
    env.update(server_opt_env(o) for o in a.server_opt)
    server = LocalServer(env)
    url = server.start()
    try:
        before, cpu0 = store_counters(url), thread_cpu(server.pid)
        out = subprocess.run([sys.executable, "-P", "-m", "chatd.cli", "bench", *bench, "--api", url,
                              "--server-pid", str(server.pid), "--json"], stdout=subprocess.PIPE, check=False).stdout
        after, cpu1 = store_counters(url), thread_cpu(server.pid)
    finally:
        server.stop()
    r = json.loads(out)
    d = {k: after[k] - before[k] for k in after}
    c = r["counts"]
    print(json.dumps({
        "ok": r["ok"], "sent": c["sent"], "lost": c["lost"], "duplicated": c["duplicated"],
        "out_of_order": c["out_of_order"],
        "server_cpu_util": r["server"]["cpu_util"], "cpu_us_per_send": r["server"]["cpu_us_per_send"],
        "latency_ms": {k: r["latency_ms"]["send_deliver"][k] for k in ("p50", "p99")},
        "store_ops": d["ops_total"], "store_commits": d["commits"], "commit_waits": d["commit_waits_total"],
        "failed_commits": d["failed_commits_total"],
        "ops_per_commit": round(d["ops_total"] / max(d["commits"], 1), 2),
        "commit_ms": round(1000 * d["commit_seconds_total"] / max(d["commits"], 1), 3),
        # CPU µs per send by thread (user, system), over the whole bench run (set-up included)
        "thread_cpu_us_per_send": {name: [round(1e6 * (u - cpu0.get(name, [0, 0])[0]) / max(c["sent"], 1), 1),
                                          round(1e6 * (s - cpu0.get(name, [0, 0])[1]) / max(c["sent"], 1), 1)]
                                   for name, (u, s) in cpu1.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
