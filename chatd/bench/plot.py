"""``--plot FILE``: a self-contained SVG, written by hand (no plotting dependency).

Top: latency by percentile (HdrHistogram style: the x axis stretches the tail, 50 % → 99.999 %;
the y axis is logarithmic). Bottom: sent, acked and delivered messages per second over the run.
"""

from __future__ import annotations

import math
from xml.sax.saxutils import escape

W, H = 960, 900
LEFT, RIGHT = 80, 30
COLORS = {"send_ack": "#1f77b4", "send_deliver": "#d62728", "connect": "#2ca02c", "heartbeat": "#9467bd",
          "sent": "#7f7f7f", "acked": "#1f77b4", "delivered": "#d62728"}
LABELS = {"send_ack": "send → ack", "send_deliver": "send → deliver", "connect": "connect + auth",
          "heartbeat": "heartbeat rtt", "sent": "sent/s", "acked": "acked/s", "delivered": "delivered/s"}
MAX_NINES = 5  # 99.999 %


def _nines(frac: float) -> float:
    return min(MAX_NINES, -math.log10(max(1e-12, 1 - frac)))


def _fmt(v: float) -> str:
    if v >= 1000:
        return f"{v / 1000:g}k" if v < 1e6 else f"{v / 1e6:g}M"
    return f"{v:g}"


def _polyline(points, color, dash: str = "") -> str:
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline fill="none" stroke="{color}" stroke-width="2"{extra} points="{pts}"/>'


def _legend(x: float, y: float, color: str, label: str, dash: str = "") -> list[str]:
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    return [f'<line x1="{x}" y1="{y - 4}" x2="{x + 24}" y2="{y - 4}" stroke="{color}" stroke-width="2"{extra}/>',
            _text(x + 30, y, label, anchor="start")]


def _text(x, y, s, anchor="middle", size=12, weight="normal") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" '
            f'font-weight="{weight}">{escape(str(s))}</text>')


def latency_panel(hists: dict, top: float, height: float) -> list[str]:
    out = []
    x0, x1 = LEFT, W - RIGHT
    y0, y1 = top + height, top
    series = {k: h for k, h in hists.items() if h.total}
    out.append(_text(W / 2, top - 12, "latency by percentile (ms, log scale)", size=14, weight="bold"))
    out.append(f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="none" stroke="#000"/>')
    if not series:
        out.append(_text(W / 2, top + height / 2, "no latency samples"))
        return out
    lo_ms = max(0.001, min(h.min for h in series.values()) / 1000)
    hi_ms = max(h.max for h in series.values()) / 1000
    lo_dec = math.floor(math.log10(lo_ms))
    hi_dec = math.ceil(math.log10(max(hi_ms, lo_ms * 10)))

    def sx(nines):
        return x0 + (x1 - x0) * nines / MAX_NINES

    def sy(ms):
        v = math.log10(max(ms, 10 ** lo_dec))
        return y0 - (y0 - y1) * (v - lo_dec) / (hi_dec - lo_dec)

    for k in range(MAX_NINES + 1):
        x = sx(k)
        label = "0%" if k == 0 else f"{100 - 100 / 10 ** k:g}%"
        out.append(f'<line x1="{x:.1f}" y1="{y1}" x2="{x:.1f}" y2="{y0}" stroke="#ddd"/>')
        out.append(_text(x, y0 + 16, label))
    for d in range(lo_dec, hi_dec + 1):
        y = sy(10 ** d)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(_text(x0 - 6, y + 4, _fmt(10 ** d), anchor="end"))
    out.append(_text(W / 2, y0 + 34, "percentile"))
    for i, (name, h) in enumerate(series.items()):
        pts = []
        for frac, v in h.curve():
            pts.append((sx(_nines(frac)), sy(v / 1000)))
            if frac >= 1:
                break
        if len(pts) == 1:
            pts.append((x1, pts[0][1]))
        out.append(_polyline(pts, COLORS.get(name, "#000")))
        p = h.summary_ms()
        out += _legend(x0 + 10, y0 + 56 + 18 * i, COLORS.get(name, "#000"),
                       f"{LABELS.get(name, name)}: p50 {p['p50']:g}, p90 {p['p90']:g}, p99 {p['p99']:g}, "
                       f"p99.9 {p['p99_9']:g}, max {p['max']:g} ms (n={h.total:,})")
    return out


def throughput_panel(timeline: list[dict], top: float, height: float) -> list[str]:
    out = []
    x0, x1 = LEFT, W - RIGHT
    y0, y1 = top + height, top
    out.append(_text(W / 2, top - 12, "messages per second (1 s buckets)", size=14, weight="bold"))
    out.append(f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="none" stroke="#000"/>')
    keys = [k for k in ("sent", "acked", "delivered") if any(row.get(k) for row in timeline)]
    if not timeline or not keys:
        out.append(_text(W / 2, top + height / 2, "no messages"))
        return out
    n = len(timeline)
    peak = max(row[k] for row in timeline for k in keys) or 1
    step = 10 ** math.floor(math.log10(peak))
    for mult in (1, 2, 5):
        if peak / (step * mult) <= 6:
            step *= mult
            break
    top_v = math.ceil(peak * 1.05 / step) * step

    def sx(t):
        return x0 + (x1 - x0) * t / max(1, n)

    def sy(v):
        return y0 - (y0 - y1) * v / top_v

    v = 0
    while v <= top_v:
        y = sy(v)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(_text(x0 - 6, y + 4, _fmt(v), anchor="end"))
        v += step
    tstep = max(1, math.ceil(n / 12))
    for t in range(0, n + 1, tstep):
        out.append(_text(sx(t), y0 + 16, f"{t}s"))
    out.append(_text(W / 2, y0 + 34, "time since start"))
    for i, k in enumerate(keys):
        pts = []
        for row in timeline:  # a step line: each bucket spans [t, t+1)
            pts.append((sx(row["t"]), sy(row[k])))
            pts.append((sx(row["t"] + 1), sy(row[k])))
        dash = "6,4" if k == "sent" else ""
        out.append(_polyline(pts, COLORS[k], dash))
        total = sum(row[k] for row in timeline)
        out += _legend(x0 + 10 + 250 * i, y0 + 56, COLORS[k], f"{LABELS[k]} ({total:,} in all)", dash)
    return out


def render_svg(report: dict, hists: dict) -> str:
    o = report["options"]
    title = (f"chatd bench {report['scenario']}: {report['connections']:,} connections, "
             f"{o['rate_msgs_per_s']:g} msgs/s, {o['duration_s']:g} s, {o['format']} — {report['started_at']}")
    body = [f'<rect width="{W}" height="{H}" fill="#fff"/>', _text(W / 2, 24, title, size=15, weight="bold")]
    body += latency_panel(hists, 70, 280)
    body += throughput_panel(report["timeline"], 540, 260)
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="{W}" '
            f'height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif">\n' + "\n".join(body) + "\n</svg>\n")


def write_svg(path: str, report: dict, hists: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_svg(report, hists))
