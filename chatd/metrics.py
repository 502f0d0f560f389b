"""The metrics of one chatd process, on a ``prometheus_client`` registry of its own.

:class:`Metrics` names every metric once (the names are public: docs/operations.md, the Grafana
dashboard in docs/grafana-chatd.json); the rest of chatd calls ``metrics.<name>.inc(**labels)``,
``.observe(seconds)``, ``.set(value)``. ``prometheus_client`` keeps the values and writes the text
format (:meth:`Metrics.render`, served by a Quart route). Values are updated from the trio thread
only; gauges whose value lives elsewhere are read by a callback at scrape time (:meth:`Metrics.gauge`,
:meth:`Metrics.labeled_gauge`, :meth:`Metrics.counter_from`), so nothing runs between scrapes.

A callback that raises is logged and its metric left out of that scrape: a scrape never fails.
"""

from __future__ import annotations

import logging
from typing import Callable

import prometheus_client as prom
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Counter:
    """A counter. ``labels`` names its label keys (``inc(code=...)``); left out, they are taken
    from the first ``inc``."""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] | None = None):
        self.name, self.help = name, help
        self._c = None if labels is None else self._make(labels)
        # A hot path without labels may add to this plain int instead of calling inc() (one per
        # message frame written); it is folded in whenever the counter is read.
        self.pending = 0

    def _fold(self) -> None:
        if self.pending:
            n, self.pending = self.pending, 0
            self._child({}).inc(n)

    def _make(self, labels) -> prom.Counter:
        base = self.name[:-len("_total")] if self.name.endswith("_total") else self.name
        return prom.Counter(base, self.help, tuple(labels), registry=None)

    def _child(self, labels: dict):
        if self._c is None:
            self._c = self._make(sorted(labels))
        return self._c.labels(**labels) if labels else self._c

    def inc(self, amount: float = 1.0, **labels) -> None:
        self._child(labels).inc(amount)

    def get(self, **labels) -> float:
        self._fold()
        return self._child(labels)._value.get()

    def collect(self):
        self._fold()
        if self._c is None:
            yield CounterMetricFamily(self.name, self.help, value=0.0)
        else:
            yield from self._c.collect()


class Histogram:
    def __init__(self, name: str, help: str, buckets=LATENCY_BUCKETS):
        self.name = name
        self._h = prom.Histogram(name, help, buckets=buckets, registry=None)

    def observe(self, v: float) -> None:
        self._h.observe(v)

    def collect(self):
        return self._h.collect()


class Gauge:
    """A gauge set directly (``set``) or read from ``fn`` at scrape time."""

    def __init__(self, name: str, help: str, fn: Callable[[], float] | None = None):
        self.name, self.help, self.fn = name, help, fn
        self.value = 0.0

    def set(self, v: float) -> None:
        self.value = v

    def collect(self):
        yield GaugeMetricFamily(self.name, self.help, value=self.fn() if self.fn else self.value)


class _LabeledGauge:
    def __init__(self, name: str, help: str, label: str, fn: Callable[[], dict]):
        self.name, self.help, self.label, self.fn = name, help, label, fn

    def collect(self):
        family = GaugeMetricFamily(self.name, self.help, labels=[self.label])
        for key, value in sorted(self.fn().items()):
            family.add_metric([str(key)], value)
        yield family


class _CallbackCounter:
    def __init__(self, name: str, help: str, fn: Callable[[], float]):
        self.name, self.help, self.fn = name, help, fn

    def collect(self):
        base = self.name[:-len("_total")] if self.name.endswith("_total") else self.name
        yield CounterMetricFamily(base, self.help, value=self.fn())


class _Collector:
    """The registry's one collector: every metric of :class:`Metrics`, in definition order
    (prometheus_client's own registration would refuse the gauge ``chatd_ws_connections`` next
    to the counter ``chatd_ws_connections_total``)."""

    def __init__(self):
        self.items: list = []

    def collect(self):
        for item in self.items:
            try:
                yield from list(item.collect())
            except Exception:  # noqa: BLE001 - a broken callback must not fail the scrape
                log.exception("metric %s: callback failed", item.name)


class Metrics:
    """The metrics of one chatd process."""

    def __init__(self):
        self.registry = prom.CollectorRegistry(auto_describe=False)
        self._collector = _Collector()
        self.registry.register(self._collector)
        self.connections = self._add(Gauge("chatd_ws_connections", "Open client WebSocket connections"))
        self.connections_total = self._add(Counter("chatd_ws_connections_total", "Accepted WebSocket connections"))
        self.messages_in = self._add(Counter("chatd_messages_in_total", "Messages stored (acked sends, not duplicates)"))
        self.duplicates = self._add(Counter("chatd_duplicate_sends_total", "Resends answered from the dedup index"))
        self.messages_out = self._add(Counter("chatd_messages_out_total", "Message frames written to client WebSockets"))
        self.errors = self._add(Counter("chatd_errors_total", "Error frames and responses sent, by code", ("code",)))
        self.slow_consumers = self._add(Counter("chatd_slow_consumer_disconnects_total",
                                                "Connections cut off because their send queue filled"))
        self.session_crashes = self._add(Counter("chatd_session_crashes_total",
                                                 "Client sessions closed with 1011 by a server bug (should stay 0)"))
        self.store_latency = self._add(Histogram("chatd_store_append_seconds",
                                                 "Latency of durable message appends (queue + group commit)"))
        self.send_ack = self._add(Histogram("chatd_send_ack_seconds", "Send to ack at the channel's owner: "
                                            "membership check, dedup, store queue, group commit"))
        self.http_requests = self._add(Counter("chatd_http_requests_total", "HTTP API requests by status", ("status",)))
        self.http_latency = self._add(Histogram("chatd_http_request_seconds",
                                                "HTTP API requests: from the request's head to the answer"))
        self.link_frames = self._add(Counter("chatd_link_frames_sent_total",
                                             "Frames queued to inter-shard links, by peer and frame type",
                                             ("peer", "type")))
        self.link_drops = self._add(Counter("chatd_link_frames_dropped_total",
                                            "Frames dropped because a link queue was full or the link down", ("peer",)))
        self.link_refused = self._add(Counter("chatd_link_frames_refused_total",
                                              "Frames not sent because they exceed link_max_frame_bytes",
                                              ("peer", "type")))

    def _add(self, m):
        self._collector.items.append(m)
        return m

    def gauge(self, name: str, help: str, fn: Callable[[], float]) -> Gauge:
        """A gauge read from ``fn()`` at scrape time."""
        return self._add(Gauge(name, help, fn))

    def labeled_gauge(self, name: str, help: str, label: str, fn: Callable[[], dict]) -> None:
        """One gauge sample per item of ``fn()`` (``{label value: value}``), read at scrape time."""
        self._add(_LabeledGauge(name, help, label, fn))

    def counter_from(self, name: str, help: str, fn: Callable[[], float]) -> None:
        """A counter kept elsewhere (e.g. a store's statistics), read at scrape time."""
        self._add(_CallbackCounter(name, help, fn))

    # ---- exposition ----------------------------------------------------------------------------
    CONTENT_TYPE = prom.CONTENT_TYPE_LATEST

    def render(self) -> str:
        return prom.generate_latest(self.registry).decode()
