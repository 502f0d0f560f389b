"""A minimal Prometheus registry (text exposition format 0.0.4). Counters, gauges and histograms
are plain Python numbers updated from the trio thread; no locks, no background tasks."""

from __future__ import annotations

import bisect


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_esc(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str):
        self.name, self.help = name, help

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help):
        super().__init__(name, help)
        self.values: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        lines = self.header()
        for key, v in sorted(self.values.items()) or [((), 0.0)]:
            lines.append(f"{self.name}{_labels(dict(key))} {v:g}")
        return lines


class Gauge(_Metric):
    """A gauge whose value is read from a callable at scrape time, or set directly."""
    kind = "gauge"

    def __init__(self, name, help, fn=None):
        super().__init__(name, help)
        self.fn = fn
        self.value = 0.0

    def set(self, v: float) -> None:
        self.value = v

    def render(self) -> list[str]:
        v = self.fn() if self.fn else self.value
        return self.header() + [f"{self.name} {v:g}"]


class Histogram(_Metric):
    kind = "histogram"
    DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

    def __init__(self, name, help, buckets=DEFAULT_BUCKETS):
        super().__init__(name, help)
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def render(self) -> list[str]:
        lines = self.header()
        cum = 0
        for b, c in zip(self.buckets, self.counts):
            cum += c
            lines.append(f'{self.name}_bucket{{le="{b:g}"}} {cum}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum {self.sum:g}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


class Metrics:
    """The metrics of one chatd process."""

    def __init__(self):
        self._all: list[_Metric] = []
        self.connections = self._add(Gauge("chatd_ws_connections", "Open client WebSocket connections"))
        self.connections_total = self._add(Counter("chatd_ws_connections_total", "Accepted WebSocket connections"))
        self.messages_in = self._add(Counter("chatd_messages_in_total", "Messages stored (acked sends, not duplicates)"))
        self.duplicates = self._add(Counter("chatd_duplicate_sends_total", "Resends answered from the dedup index"))
        self.messages_out = self._add(Counter("chatd_messages_out_total", "Message frames written to client WebSockets"))
        self.errors = self._add(Counter("chatd_errors_total", "Error frames and responses sent, by code"))
        self.slow_consumers = self._add(Counter("chatd_slow_consumer_disconnects_total",
                                                "Connections cut off because their send queue filled"))
        self.session_crashes = self._add(Counter("chatd_session_crashes_total",
                                                 "Client sessions closed with 1011 by a server bug (should stay 0)"))
        self.store_latency = self._add(Histogram("chatd_store_append_seconds", "Latency of durable message appends"))
        self.http_requests = self._add(Counter("chatd_http_requests_total", "HTTP API requests by status"))
        self.link_frames = self._add(Counter("chatd_link_frames_sent_total",
                                             "Frames queued to inter-shard links, by peer and frame type"))
        self.link_drops = self._add(Counter("chatd_link_frames_dropped_total",
                                            "Frames dropped because a link queue was full or the link down"))

    def _add(self, m):
        self._all.append(m)
        return m

    def gauge(self, name: str, help: str, fn) -> Gauge:
        return self._add(Gauge(name, help, fn))

    def render(self) -> str:
        lines: list[str] = []
        for m in self._all:
            lines.extend(m.render())
        return "\n".join(lines) + "\n"
