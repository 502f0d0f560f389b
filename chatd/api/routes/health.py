"""``GET /healthz`` (JSON: the live shards and the connection count) and ``GET /metrics``
(Prometheus text, docs/operations.md; not in ``/openapi.json``). Neither needs a token; neither
fails but through the app's own error handlers."""

from __future__ import annotations

from quart import Response
from quart_trio import QuartTrio

from .. import models as m
from ..host import ApiHost
from ..spec import hide, route


def register(app: QuartTrio, node: ApiHost) -> None:
    @app.get("/healthz")
    @route(m.Health, auth=False)
    async def healthz():
        return {"status": "ok", "shards": sorted(s.shard_id for s in node.discovery.live()),
                "connections": node.connection_count()}

    @app.get("/metrics")
    @hide
    async def metrics():
        return Response(node.metrics.render(), content_type=node.metrics.CONTENT_TYPE)
