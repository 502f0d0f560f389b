"""``GET /healthz`` (JSON: the live shards and the connection count) and ``GET /metrics``
(Prometheus text, docs/operations.md; not in ``/openapi.json``; not here but on a listener of its
own when ``server.metrics_host`` is set). Neither needs a token; neither fails but through the app's
own error handlers."""

from __future__ import annotations

from quart_trio import QuartTrio

from .. import models as m
from ..admin import add_metrics_route
from ..host import ApiHost
from ..spec import route


def register(app: QuartTrio, node: ApiHost) -> None:
    @app.get("/healthz")
    @route(m.Health, auth=False)
    async def healthz():
        return {"status": "ok", "shards": sorted(s.shard_id for s in node.discovery.live()),
                "connections": node.connection_count()}

    if not node.config.server.metrics_host:
        add_metrics_route(app, node)
