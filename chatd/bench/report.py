"""Merging the workers' measurements into one report, and the summary table.

The report is a plain dict (``--json`` prints it; the shape is pinned by ``REPORT_KEYS`` and the
tests). Loss is computed here, where all books meet: for every channel, the seqs some sender got an
ack for, against the seqs each member device received; an acked seq a member device lacks at the
end (after the drain) is *lost* once for that device.
"""

from __future__ import annotations

import math

from . import seqs as seqsets
from .histogram import Histogram
from .scenarios import SCENARIOS, BenchOptions
from .stats import COUNTERS, HISTOGRAMS, TIMELINES

REPORT_VERSION = 1
REPORT_KEYS = ("version", "scenario", "ok", "problems", "options", "target", "started_at", "setup_s", "run_s",
               "clients", "connections", "counts", "throughput", "latency_ms", "timeline", "generator",
               "server")
SATURATED_UTIL = 0.9


def merge_results(results: list[dict]) -> dict:
    counters = {k: 0 for k in COUNTERS}
    errors: dict[str, int] = {}
    closes: dict[str, int] = {}
    hists = {k: Histogram() for k in HISTOGRAMS}
    timeline = {k: [] for k in TIMELINES if k != "cpu_util"}
    acked: dict[str, list] = {}
    books: dict[int, dict] = {}
    for r in results:
        for k, v in r["counters"].items():
            counters[k] = counters.get(k, 0) + v
        for src, dst in ((r["errors"], errors), (r["closes"], closes)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0) + v
        for k, h in r["hist"].items():
            hists[k].merge(Histogram.from_dict(h))
        for k in timeline:
            tl = r["timeline"].get(k, [])
            dst = timeline[k]
            if len(tl) > len(dst):
                dst.extend([0] * (len(tl) - len(dst)))
            for i, v in enumerate(tl):
                dst[i] += v
        for ch, ranges in r["acked"].items():
            acked[ch] = seqsets.union(acked.get(ch, []), ranges)
        books.update({int(k): v for k, v in r["books"].items()})
    return {"counters": counters, "errors": errors, "closes": closes, "hists": hists, "timeline": timeline,
            "acked": acked, "books": books}


def account(channel_devices: dict[str, list[int]], acked: dict[str, list], books: dict[int, dict]) -> dict:
    """expected deliveries, lost, and deliveries of seqs nobody got an ack for."""
    expected = lost = unacked = 0
    for ch, devices in channel_devices.items():
        a = acked.get(ch, [])
        n = seqsets.size(a)
        expected += n * len(devices)
        for d in devices:
            got = books.get(d, {}).get(ch, [])
            both = seqsets.intersection_size(a, got)
            lost += n - both
            unacked += seqsets.size(got) - both
    return {"expected_deliveries": expected, "lost": lost, "delivered_unacked": unacked}


def _steady_rate(tl: list, ramp_s: float, duration_s: float) -> float:
    """Mean per second over the whole seconds after the ramp-up and within the run."""
    a, b = math.ceil(ramp_s), math.floor(duration_s)
    if b <= a:
        return sum(tl) / duration_s if duration_s else 0.0
    window = tl[a:b] + [0] * max(0, b - len(tl))
    return sum(window[: b - a]) / (b - a)


def build_report(opts: BenchOptions, population, results: list[dict], meta: dict) -> tuple[dict, dict]:
    scenario = SCENARIOS[opts.scenario]
    m = merge_results(results)
    c = m["counters"]
    acct = account(population.channel_devices, m["acked"], m["books"])
    counts = {"sent": c["sent"], "acked": c["acked"], "delivered": c["delivered"],
              "expected_deliveries": acct["expected_deliveries"], "lost": acct["lost"],
              "duplicated": c["duplicated"], "out_of_order": c["out_of_order"],
              "delivered_by_sync": c["delivered_by_sync"], "delivered_unacked": acct["delivered_unacked"],
              "resent": c["resent"], "ack_duplicates": c["ack_duplicates"], "send_failed": c["send_failed"],
              "heartbeats": c["heartbeats"], "connects": c["connects"], "reconnects": c["reconnects"],
              "storm_drops": c["drops"], "connection_failures": c["connection_failures"],
              "errors": dict(sorted(m["errors"].items())), "closes": dict(sorted(m["closes"].items()))}
    tl = m["timeline"]
    n_sec = max([len(v) for v in tl.values()] + [0])
    timeline = [{"t": i, **{k: (tl[k][i] if i < len(tl[k]) else 0) for k in tl}} for i in range(n_sec)]
    throughput = {f"{k}_per_s": round(_steady_rate(tl[k], opts.ramp_up_s, opts.duration_s), 1)
                  for k in ("sent", "acked", "delivered")}
    throughput["window_s"] = [math.ceil(opts.ramp_up_s), math.floor(opts.duration_s)]
    per_proc = []
    for r in results:
        util = r["cpu_s"] / r["wall_s"] if r["wall_s"] else 0.0
        cpu_tl = r["timeline"].get("cpu_util", [])
        hot = sum(1 for u in cpu_tl if u > SATURATED_UTIL)
        per_proc.append({"proc": r["worker"], "devices": len(r["books"]), "cpu_s": round(r["cpu_s"], 2),
                         "cpu_util": round(util, 3), "peak_util_1s": round(max(cpu_tl, default=0.0), 3),
                         "saturated_seconds": hot, "max_rss_kib": r["rusage_maxrss_kib"]})
    # saturated: above the threshold on average, or in more than a tenth of the run's seconds
    saturated = any(p["cpu_util"] > SATURATED_UTIL or p["saturated_seconds"] > max(1, opts.duration_s / 10)
                    for p in per_proc)
    generator = {"procs": len(results), "per_proc": per_proc, "saturated": saturated,
                 "saturated_threshold": SATURATED_UTIL,
                 "drain_s": round(max((r["drain_s"] for r in results), default=0.0), 2)}
    server = meta.get("server")
    if server and opts.scenario == "idle" and meta["connected"]:
        before, loaded = server["rss_kib_before"], server["rss_kib_loaded"]
        if before is not None and loaded is not None:
            server["kib_per_connection"] = round((loaded - before) / meta["connected"], 2)
    if server and server.get("cpu_s") is not None and scenario.sends:
        # the server's CPU over the run (start to the last send's heads) per send and per delivery
        # seen in it; the deliveries of the drain that follows are a few and not counted apart
        def per_send(cpu_s: float) -> float:
            return round(cpu_s / max(1, c["sent"]) * 1e6, 1)
        server["cpu_us_per_send"] = per_send(server["cpu_s"])
        server["cpu_us_per_delivery"] = round(server["cpu_s"] / max(1, c["delivered"]) * 1e6, 2)
        if "procs" in server:  # several processes (a cluster): the sum above, and by role
            by_role: dict[str, float] = {}
            for p in server["procs"].values():
                if p["cpu_s"] is not None:
                    p["cpu_us_per_send"] = per_send(p["cpu_s"])
                    by_role[p["role"]] = by_role.get(p["role"], 0.0) + p["cpu_s"]
            server["cpu_us_per_send_by_role"] = {r: per_send(v) for r, v in sorted(by_role.items())}
    problems = []
    if scenario.sends:
        if c["sent"] == 0:
            problems.append("nothing was sent")
        if c["acked"] != c["sent"]:
            problems.append(f"{c['sent'] - c['acked']} sends never acked")
        if acct["lost"]:
            problems.append(f"{acct['lost']} deliveries lost")
    if c["duplicated"]:
        problems.append(f"{c['duplicated']} duplicated deliveries")
    lc = meta.get("lifecycle")
    if lc is not None and not lc["converged"]:
        problems.append(f"{lc['mismatched']} of {lc['devices_compared']} device views differ from the history"
                        + (f", {lc['devices_behind']} devices behind its head" if lc["devices_behind"] else ""))
    if c["out_of_order"]:
        problems.append(f"{c['out_of_order']} out-of-order deliveries")
    if meta["connect_failed"]:
        problems.append(f"{meta['connect_failed']} devices never connected")
    report = {
        "version": REPORT_VERSION, "scenario": opts.scenario, "ok": not problems, "problems": problems,
        "options": {"clients": opts.clients, "devices": opts.devices, "rate_msgs_per_s": opts.rate,
                    "duration_s": opts.duration_s, "size_chars": opts.size, "ramp_up_s": opts.ramp_up_s,
                    "seed": opts.seed, "procs": opts.procs, "format": opts.fmt, "transport": opts.transport,
                    "group_size": opts.group_size if scenario.channels == "group" else None,
                    "drain_s": opts.drain_s, "reconnect_interval_s": opts.reconnect_interval_s if scenario.storm
                    else None, "offline_s": opts.offline_s if scenario.storm else None,
                    "max_inflight": opts.max_inflight},
        "target": meta["target"], "started_at": meta["started_at"], "setup_s": meta["setup_s"],
        "run_s": meta["run_s"], "clients": opts.clients, "connections": opts.connections,
        "counts": counts, "throughput": throughput,
        "latency_ms": {k: h.summary_ms() for k, h in m["hists"].items()},
        "timeline": timeline, "generator": generator, "server": server,
    }
    if meta.get("cluster"):
        report["cluster"] = meta["cluster"]
    if meta.get("lifecycle") is not None:  # --mix: the rows it made, and whether every device converged
        report["options"]["mix"] = [list(x) for x in opts.mix]
        report["lifecycle"] = meta["lifecycle"]
    return report, m["hists"]


# ---- the summary table -----------------------------------------------------------------------

def _n(v) -> str:
    return f"{v:,}" if isinstance(v, int) else str(v)


def format_summary(r: dict) -> str:
    o = r["options"]
    sc = SCENARIOS[r["scenario"]]
    c = r["counts"]
    t = r["target"]
    lines = []
    what = f"chatd bench {r['scenario']}: {r['clients']:,} clients x {o['devices']} device(s) = " \
           f"{r['connections']:,} connections, {r['generator']['procs']} generator process(es), {o['format']}"
    lines.append(what)
    if sc.sends:
        lines.append(f"  {o['rate_msgs_per_s']:g} msgs/s in total for {o['duration_s']:g} s (ramp-up "
                     f"{o['ramp_up_s']:g} s), {o['size_chars']}-char bodies"
                     + (f", groups of {o['group_size']}" if o["group_size"] else ""))
    else:
        lines.append(f"  held for {o['duration_s']:g} s")
    lines.append(f"  target: {'self-started chatd run' if t['self_started'] else 'deployment'} {t['api']}"
                 + (f" (pid {t['server_pid']})" if t.get("server_pid") else "") + f", started {r['started_at']}")
    lines.append("")
    if sc.sends:
        tp = r["throughput"]
        lines.append(f"  {'':<22}{'count':>12}{'per s':>12}")
        lines.append(f"  {'sent':<22}{_n(c['sent']):>12}{tp['sent_per_s']:>12,.1f}")
        lines.append(f"  {'acked':<22}{_n(c['acked']):>12}{tp['acked_per_s']:>12,.1f}")
        lines.append(f"  {'delivered':<22}{_n(c['delivered']):>12}{tp['delivered_per_s']:>12,.1f}")
        lines.append(f"  {'expected deliveries':<22}{_n(c['expected_deliveries']):>12}")
        for key, label in (("lost", "lost"), ("duplicated", "duplicated"), ("out_of_order", "out of order"),
                           ("resent", "resent"), ("delivered_by_sync", "delivered by sync"),
                           ("send_failed", "send failed")):
            lines.append(f"  {label:<22}{_n(c[key]):>12}")
        lines.append(f"  (per s: mean over seconds {tp['window_s'][0]}..{tp['window_s'][1]} of the run)")
    lines.append(f"  {'connects':<22}{_n(c['connects']):>12}   reconnects {_n(c['reconnects'])}, "
                 f"failures {_n(c['connection_failures'])}, storm drops {_n(c['storm_drops'])}")
    lines.append("")
    heads = ("p50", "p90", "p99", "p99.9", "max", "count")
    lines.append(f"  {'latency (ms)':<16}" + "".join(f"{h:>10}" for h in heads))
    for key, label in (("send_ack", "send -> ack"), ("send_deliver", "send -> deliver"),
                       ("connect", "connect+auth"), ("heartbeat", "heartbeat rtt")):
        h = r["latency_ms"][key]
        if not h["count"]:
            continue
        lines.append(f"  {label:<16}" + "".join(f"{h[k]:>10.2f}" for k in ("p50", "p90", "p99", "p99_9", "max"))
                     + f"{h['count']:>10,}")
    lines.append("")
    g = r["generator"]
    procs = ", ".join(f"#{p['proc']} {p['cpu_util'] * 100:.0f}% (peak {p['peak_util_1s'] * 100:.0f}%"
                      + (f", {p['saturated_seconds']} s above {SATURATED_UTIL * 100:.0f}%" if p["saturated_seconds"]
                         else "") + ")" for p in g["per_proc"])
    lines.append(f"  generator CPU: {procs}"
                 + ("  -- SATURATED: the generator may be the bottleneck; use more --procs"
                    if g["saturated"] else "  (not saturated)"))
    s = r.get("server")
    if s:
        mem = f"  server RSS: {s['rss_kib_before']:,} KiB before, {s['rss_kib_connected']:,} KiB connected"
        if s.get("rss_kib_loaded") is not None:
            mem += f", {int(s['rss_kib_loaded']):,} KiB under load"
        if "kib_per_connection" in s:
            mem += f"; {s['kib_per_connection']:.2f} KiB per connection"
        lines.append(mem)
        if s.get("cpu_util") is not None:
            lines.append(f"  server CPU: {s['cpu_util'] * 100:.0f}% of a core during the run"
                         + (f"; {s['cpu_us_per_send']:,.1f} µs per send, {s['cpu_us_per_delivery']:,.2f} µs per "
                            "delivery" if "cpu_us_per_send" in s else ""))
        if s.get("cpu_us_per_send_by_role"):
            lines.append("  server CPU per send by role (µs, summed over its processes): "
                         + ", ".join(f"{k} {v:,.1f}" for k, v in s["cpu_us_per_send_by_role"].items()))
    cl = r.get("cluster")
    if cl:
        lines.append(f"  cluster: shards {', '.join(cl['shards'])}; devices by shard "
                     + ", ".join(f"{k} {v}" for k, v in cl["devices_by_shard"].items())
                     + f"; sends with the partner on another shard {cl['sends_partner_on_other_shard'] * 100:.0f}%, "
                     f"owner not the sender's shard {cl['sends_owner_remote'] * 100:.0f}%, "
                     f"{cl['link_frames_per_send']:.2f} link frames per send")
    lc = r.get("lifecycle")
    if lc:
        lines.append(f"  lifecycle (--mix {','.join(f'{k}={v:g}' for k, v in o['mix'])}): "
                     + ("converged" if lc["converged"] else "NOT converged")
                     + f", {lc['devices_compared']} device views == the folded HTTP history"
                     + (f" ({lc['mismatched']} differ)" if lc["mismatched"] else "")
                     + (f"; {lc['devices_behind']} behind the stored head (not drained)" if lc["devices_behind"] else ""))
    if c["errors"]:
        lines.append("  errors: " + ", ".join(f"{k} {v}" for k, v in c["errors"].items()))
    if c["closes"]:
        lines.append("  unexpected closes: " + ", ".join(f"{k} {v}" for k, v in c["closes"].items()))
    lines.append("")
    lines.append("  verdict: " + ("OK (nothing lost, duplicated or out of order)" if r["ok"]
                                  else "PROBLEMS: " + "; ".join(r["problems"])))
    return "\n".join(lines)
