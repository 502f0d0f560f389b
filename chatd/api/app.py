"""The HTTP API as a quart-trio application bound to a node (:class:`~chatd.api.host.ApiHost`).

JSON in, JSON out; the contract is ``/openapi.json``, generated from :mod:`chatd.api.models`
through which every request is decoded (:mod:`chatd.api.spec`, which also reads every body before
any answer). Errors are ``{"error": {"code", "message"}}`` with a 4xx status for client mistakes
(codes from :mod:`chatd.errors`); an unexpected exception is logged and answered with
``internal``/500 without details. Authentication: ``Authorization: Bearer <token>`` from /v1/login,
checked once per request by :func:`chatd.api.caller.authenticate`, whose :class:`Caller` the
handlers receive. Bodies are at most 1 MiB (413 above), 16 KiB without a token of valid signature
(:mod:`chatd.api.spec`), and ``application/json``.

:func:`create_app` holds what is app-wide: the body rule, the error handlers, the request count and
latency metrics, the token check. The routes are in :mod:`chatd.api.routes`, one module per
resource, each with ``register(app, node)``. Not Quart blueprints: a blueprint's routes are
decorated once, at import, but the models of some routes depend on the node's configuration (the
member cap of ``POST /v1/groups``, the page size of history, the presence batch size), and each
module keeps per-app state (the login guard, the hashing limiter) that a module-level blueprint
would have to look up per request; ``register`` closes over both, with the node typed as the
protocol that names what the API may use of it. The hooks are app-wide anyway (every request is
counted, every error answered the same way), which is what blueprints would add.
"""

from __future__ import annotations

import logging
import time

from quart import g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..auth import token_claims
from ..errors import ChatError
from . import clientaddr, securitylog as security
from .asgi import HTTPConnection
from .caller import Caller, authenticate
from .clientaddr import request_address
from .common import RetryLater, error_answer
from .hashing import retry_after_header
from .host import ApiHost
from .routes import channels, health, media, operator, presence, push, users
from .spec import install, set_authenticate
from .web import add_web_client

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
ROUTES = (health, users, presence, channels, push, operator, media)

_HTTP_CODES = {400: "bad_request", 401: "not_authenticated", 403: "forbidden", 404: "not_found",
               405: "bad_request", 413: "frame_too_large", 429: "rate_limited"}


def create_app(node: ApiHost) -> QuartTrio:
    app = QuartTrio("chatd")
    app.asgi_http_class = HTTPConnection
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["BODY_TIMEOUT"] = node.config.server.http_body_timeout_s
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    metrics = node.metrics

    @app.before_request
    async def started():  # first: before the body is read
        g.started = time.perf_counter()

    def has_credentials() -> bool:  # a large body's check; the route's check reuses its claims
        authorization = request.headers.get("Authorization", "")
        if not authorization.startswith("Bearer "):
            return False
        try:
            g.token_claims = (authorization, token_claims(node.secret, authorization[len("Bearer "):].strip()))
        except ChatError:
            return False
        return True

    install(app, "chatd HTTP API", has_credentials)
    clientaddr.install(app, node.config.server.trusted_proxies, node.config.server.proxy_header)

    @app.errorhandler(ChatError)
    async def on_chat_error(e: ChatError):
        metrics.errors.inc(code=e.code)
        if isinstance(e, RetryLater):
            return {"error": e.to_dict()}, e.http_status, retry_after_header(e.retry_after_s)
        return {"error": e.to_dict()}, e.http_status

    @app.errorhandler(HTTPException)
    async def on_http_error(e: HTTPException):
        body, status = error_answer(metrics, _HTTP_CODES.get(e.code, "bad_request"), e.description or e.name, e.code)
        return body, status, [h for h in e.get_headers() if h[0] == "Allow"]  # 405 names the methods

    @app.errorhandler(Exception)
    async def on_unexpected(e: Exception):
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_answer(metrics, "internal", "internal server error", 500)

    @app.after_request
    async def count(response):
        metrics.http_requests.inc(status=str(response.status_code))
        if "started" in g:
            metrics.http_latency.observe(time.perf_counter() - g.started)
        return response

    def revoked_token_used(user_id: int, device_id: str) -> None:
        security.event("token", "revoked", user=user_id, device=device_id, addr=request_address())

    async def caller() -> Caller:
        authorization = request.headers.get("Authorization", "")
        checked = g.get("token_claims")
        return await authenticate(node.secret, node.store, authorization, revoked_token_used,
                                  checked[1] if checked and checked[0] == authorization else None)

    set_authenticate(app, caller)
    for module in ROUTES:
        module.register(app, node)
    add_web_client(app)
    return app
