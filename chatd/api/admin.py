"""The admin HTTP face of a shard (``chatd shard`` serves it on ``server.api_port``):
``/healthz`` and Prometheus ``/metrics``. No user-facing routes."""

from __future__ import annotations

from quart import Response
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .asgi import HTTPConnection
from .host import ApiHost
from .spec import read_bodies_first


def create_admin_app(node: ApiHost) -> QuartTrio:
    app = QuartTrio("chatd-shard")
    app.asgi_http_class = HTTPConnection
    read_bodies_first(app)

    @app.errorhandler(HTTPException)
    async def on_http_error(e: HTTPException):
        return {"error": {"code": "not_found" if e.code == 404 else "bad_request",
                          "message": e.description or e.name}}, e.code

    @app.get("/healthz")
    async def healthz():
        view = node.discovery.view
        ok = node.discovery.writable
        body = {"status": "ok" if ok else "not_registered", "shard_id": node.config.server.shard_id,
                "view": view.version, "shards": sorted(view.shards), "connections": node.connection_count()}
        return body, 200 if ok else 503

    @app.get("/metrics")
    async def metrics():
        return Response(node.metrics.render(), content_type=node.metrics.CONTENT_TYPE)

    return app
