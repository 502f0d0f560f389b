"""The admin HTTP face of a shard (``chatd shard`` serves it on ``server.api_port``):
``/healthz`` and Prometheus ``/metrics`` (unless ``server.metrics_host`` gives metrics a listener of
their own: :func:`create_metrics_app`, which every role serves there). No user-facing routes."""

from __future__ import annotations

from quart import Response
from quart_schema import hide
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .asgi import HTTPConnection
from .host import ApiHost
from .spec import read_bodies_first


def _bare_app(name: str) -> QuartTrio:
    app = QuartTrio(name)
    app.asgi_http_class = HTTPConnection
    read_bodies_first(app)

    @app.errorhandler(HTTPException)
    async def on_http_error(e: HTTPException):
        return {"error": {"code": "not_found" if e.code == 404 else "bad_request",
                          "message": e.description or e.name}}, e.code
    return app


def add_metrics_route(app: QuartTrio, node: ApiHost) -> None:
    """``GET /metrics`` on ``app``: Prometheus text of the node's registry (not in ``/openapi.json``)."""
    @hide
    async def metrics():
        return Response(node.metrics.render(), content_type=node.metrics.CONTENT_TYPE)
    app.add_url_rule("/metrics", "metrics", metrics, methods=["GET"])


def create_metrics_app(node: ApiHost) -> QuartTrio:
    """Only ``/metrics``: the app of the ``server.metrics_host:metrics_port`` listener."""
    app = _bare_app("chatd-metrics")
    add_metrics_route(app, node)
    return app


def create_admin_app(node: ApiHost) -> QuartTrio:
    app = _bare_app("chatd-shard")

    @app.get("/healthz")
    async def healthz():
        view = node.discovery.view
        ok = node.discovery.writable
        body = {"status": "ok" if ok else "not_registered", "shard_id": node.config.server.shard_id,
                "view": view.version, "shards": sorted(view.shards), "connections": node.connection_count()}
        return body, 200 if ok else 503

    if not node.config.server.metrics_host:
        add_metrics_route(app, node)
    return app
