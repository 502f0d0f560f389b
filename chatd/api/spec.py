"""The HTTP API's contract: ``/openapi.json`` (quart-schema, from :mod:`chatd.api.models`), request
decoding through those models, and the body rule that keeps keep-alive connections usable.

:func:`route` is what every route wears: it documents the request, the answers and the error
statuses, and decodes the body and the query string through the route's models before the route
runs. A non-empty body must be ``Content-Type: application/json`` (any parameters, e.g. a
charset, are ignored), else ``415 unsupported_media_type`` before it is decoded: a cross-site form
can send ``text/plain`` without a CORS preflight, ``application/json`` it cannot. A body that is
not UTF-8 JSON of the model's shape is ``400 bad_request`` naming the field.

Body rule (:func:`install`): every request body is read to its end *before* any answer, the
early ones included (a failed token check, 403, 404, 405): an answer sent while the client is
still sending leaves hypercorn's HTTP/1.1 connection unusable, and a pooled client's next request
on it was never answered. A body that cannot be read to its end is answered with ``Connection:
close`` (the connection is closed after the answer): above ``MAX_CONTENT_LENGTH`` (413), not sent
within ``BODY_TIMEOUT`` (408), and, for a request without a token of valid signature, above
``UNAUTHENTICATED_BODY_BYTES`` (16 KiB: ``401 not_authenticated`` on an authenticated route, 413
on the others; a declared ``Content-Length`` above it is refused before anything of the body is
read, a chunked one once that much has come). Nothing but the token's signature is checked for
this: who may send a large body is decided without the store.
"""

from __future__ import annotations

import functools
import inspect
from typing import Awaitable, Callable

import msgspec
from quart import Quart, current_app, g, request
from quart_schema import OpenAPIProvider, QuartSchema, document_querystring, document_request, document_response
from quart_schema import hide, security_scheme
from quart_schema.openapi import PATH_RE

from werkzeug.exceptions import RequestEntityTooLarge

from ..errors import ChatError
from ..ids import MAX_INT64
from .asgi import ChatdRequest
from .models import ErrorBody, all_models
from .names import schema_pattern

NAME_FIELDS = {"SignUp": ("display_name",), "ProfilePatch": ("display_name",), "GroupCreate": ("name",)}

BEARER = [{"bearer": []}]
UNAUTHENTICATED_BODY_BYTES = 16 * 1024
JSON_TYPE = "application/json"


class _Provider(OpenAPIProvider):
    """quart-schema 0.25 with msgspec models drops the nested models (the ``$ref`` targets) from
    ``components`` and never marks a request body or a query parameter as required; fixed here."""

    def schema(self) -> dict:
        out = super().schema()
        _, components = msgspec.json.schema_components(all_models(), ref_template="#/components/schemas/{name}")
        out["components"]["schemas"] = {**components, **out["components"]["schemas"]}
        for rule in self._app.url_map.iter_rules():  # what msgspec models cannot say: raw bodies
            extra = getattr(self._app.view_functions[rule.endpoint], "chatd_openapi", None)
            if extra:
                path = PATH_RE.sub(r"{\1}", rule.rule)
                for method in rule.methods - {"HEAD", "OPTIONS"}:
                    op = out["paths"][path][method.lower()]
                    op.setdefault("responses", {}).update(extra.get("responses", {}))
                    if "requestBody" in extra:
                        op["requestBody"] = extra["requestBody"]
        for name, schema in out["components"]["schemas"].items():
            _name_pattern(name, schema)
        return out

    def build_request_body(self, model, source):
        body, definitions = super().build_request_body(model, source)
        body["required"] = bool(required_fields(model))
        for content in body.get("content", {}).values():
            _name_pattern(content.get("schema", {}).get("title", ""), content.get("schema", {}))
        return body, definitions

    def build_querystring_parameters(self, model):
        params, definitions = super().build_querystring_parameters(model)
        for p in params:
            if p["name"] in required_fields(model):
                p["required"] = True
        return params, definitions


def _name_pattern(model: str, schema: dict) -> None:
    """The name rule (:mod:`chatd.api.names`, checked in the routes) as a pattern on the name fields."""
    for f in NAME_FIELDS.get(model, ()):
        prop = schema.get("properties", {}).get(f)
        for target in ([prop] if prop and "type" in prop else prop.get("anyOf", []) if prop else []):
            if target.get("type") == "string":
                target["pattern"] = schema_pattern()


def required_fields(model) -> set[str]:
    fields = model.__struct_fields__
    return set(fields[:len(fields) - len(model.__struct_defaults__)])


def install(app: Quart, title: str, has_credentials: Callable[[], bool] = lambda: False) -> QuartSchema:
    """``/openapi.json`` and the body rule on ``app`` (no UI pages: they load scripts from CDNs)."""
    schema = QuartSchema(app, openapi_path="/openapi.json", redoc_ui_path=None, scalar_ui_path=None,
                         swagger_ui_path=None, conversion_preference="msgspec",
                         info={"title": title, "version": "1",
                               "description": "Errors: {\"error\": {\"code\", \"message\"}}; "
                                              "codes in docs/protocol.md."},
                         security_schemes={"bearer": {"type": "http", "scheme": "bearer"}},
                         openapi_provider_class=_Provider)
    read_bodies_first(app, has_credentials)
    return schema


def read_bodies_first(app: Quart, has_credentials: Callable[[], bool] = lambda: False) -> None:
    """The body rule (module docstring) on ``app``. ``has_credentials()`` tells whether the current
    request carries a token worth reading a large body for (a valid signature; nothing is read
    from the store for it). A route marked :func:`streamed_body` is exempt: it authenticates
    the request, then reads the body itself, as a stream, up to its own limit."""
    app.request_class = ChatdRequest

    @app.before_request
    async def read_body_first():
        streamed = getattr(current_app.view_functions.get(request.endpoint), "chatd_stream_max", None)
        if streamed is not None:
            request.body.decide(streamed(), stream=True)
            return
        request.body.decide(current_app.config["MAX_CONTENT_LENGTH"])
        length = request.content_length
        chunked = length is None and "chunked" in request.headers.get("Transfer-Encoding", "").lower()
        small = not chunked and (length or 0) <= UNAUTHENTICATED_BODY_BYTES  # no token check needed
        if not small and not has_credentials():
            if length is not None:
                _refuse_unauthenticated_body()
            request.body.decide(UNAUTHENTICATED_BODY_BYTES)  # a chunked body
            try:
                await request.get_data()
            except RequestEntityTooLarge:
                _refuse_unauthenticated_body()
        else:
            await request.get_data()
        g.body_read = True

    @app.after_request
    async def close_if_body_unread(response):
        if not g.get("body_read", False):
            response.headers["Connection"] = "close"
        return response


def streamed_body(max_bytes: Callable[[], int]):
    """Mark a route that reads its request body itself, as a stream (``async for chunk in
    request.body``), of at most ``max_bytes()`` bytes; it must set ``g.body_read`` once it read the
    body to its end (else the answer closes the connection)."""
    def decorator(func):
        func.chatd_stream_max = max_bytes
        return func
    return decorator


BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
NO_BYTES = {302: "a presigned URL of the bytes (Location)", 304: "not modified"}
DOWNLOAD = {t: BINARY["application/octet-stream"] for t in ("application/octet-stream", "image/*", "audio/*", "video/*")}


def binary_body(func):
    """Document a route's request body as raw bytes (read by the route itself: :func:`streamed_body`)."""
    func.chatd_openapi = {**getattr(func, "chatd_openapi", {}),
                          "requestBody": {"required": False, "content": BINARY}}
    return func


def binary_answers(*statuses: int):
    """Document answers of raw bytes (a download) with these statuses."""
    def decorator(func):
        extra = getattr(func, "chatd_openapi", {})
        responses = {**extra.get("responses", {}),
                     **{s: {"description": NO_BYTES.get(s, "the bytes"),
                                 **({"content": DOWNLOAD} if s not in NO_BYTES else {})} for s in statuses}}
        func.chatd_openapi = {**extra, "responses": responses}
        return func
    return decorator


def _refuse_unauthenticated_body():
    if getattr(current_app.view_functions.get(request.endpoint), "chatd_auth", False):
        raise ChatError("not_authenticated", f"a request body above {UNAUTHENTICATED_BODY_BYTES} bytes needs "
                                             "'Authorization: Bearer <token>' (from /v1/login)")
    raise RequestEntityTooLarge(f"a request body without a token is at most {UNAUTHENTICATED_BODY_BYTES} bytes")


def set_authenticate(app: Quart, authenticate: Callable[[], Awaitable[object]]) -> None:
    """``await authenticate()`` returns the caller of the current request or raises unless it
    carries a valid token; authenticated routes run it once, before their body is decoded."""
    app.extensions["chatd.authenticate"] = authenticate


def route(ok=None, status: int = 200, *, body=None, query=None, errors=(), auth: bool = True, also=()):
    """Document and decode one route.

    With ``auth``, the app's authentication (:func:`set_authenticate`) runs first, once: a
    request without a valid token is a 401 whatever its body; a handler with a ``caller``
    parameter gets what it returned (:class:`chatd.api.caller.Caller`). ``ok``: the answer's
    model (with ``status``); ``body`` / ``query``: the models the request body / query string are
    decoded through, passed as ``data=`` / ``query=``; ``errors``: the error statuses the route
    may answer besides those every route may (400, 413, and 401 with ``auth``); ``also``: other
    successful answers, ``(status, model)`` pairs. A body model without required fields makes the
    body optional: an empty one is its defaults.
    """
    def decorator(func):
        wants_caller = "caller" in inspect.signature(func).parameters
        if wants_caller and not auth:
            raise TypeError(f"{func.__name__} takes a caller but its route has no authentication")

        @functools.wraps(func)
        async def wrapper(*args, **kwargs):
            if auth:
                caller = await current_app.extensions["chatd.authenticate"]()
                if wants_caller:
                    kwargs["caller"] = caller
            if body is not None:
                kwargs["data"] = await decode_body(body, not required_fields(body))
            if query is not None:
                kwargs["query"] = decode_query(query)
            return await func(*args, **kwargs)

        wrapper.chatd_auth = auth
        if body is not None:
            document_request(body)(wrapper)
        if query is not None:
            document_querystring(query)(wrapper)
        if ok is not None:
            document_response(ok, status)(wrapper)
        for other_status, model in also:
            document_response(model, other_status)(wrapper)
        for code in {400, 413, *errors, *((401,) if auth else ()), *((415,) if body is not None else ())}:
            document_response(ErrorBody, code)(wrapper)
        if auth:
            security_scheme(BEARER)(wrapper)
        return wrapper
    return decorator


async def decode_body(model, empty_ok: bool):
    raw = await request.get_data()
    if empty_ok and not raw.strip():
        return model()
    if request.mimetype != JSON_TYPE:
        raise ChatError("unsupported_media_type", f"a request body must be sent as 'Content-Type: {JSON_TYPE}'"
                                                  f" (got {request.mimetype[:60] or 'none'!r})")
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise ChatError("bad_request", f"the request body must be a UTF-8 JSON object ({e})") from None
    if isinstance(obj, dict):  # an integral number is an integer (JSON Schema), 3.0 too; our models are flat
        obj = {k: _integral(v) if not isinstance(v, list) else [_integral(x) for x in v] for k, v in obj.items()}
    try:
        return msgspec.convert(obj, model)
    except msgspec.ValidationError as e:
        raise ChatError("bad_request", f"request body: {e}") from None


def _integral(v):
    return int(v) if isinstance(v, float) and v.is_integer() and abs(v) <= MAX_INT64 else v


def decode_query(model):
    try:
        return msgspec.convert(dict(request.args.items()), model, strict=False)
    except msgspec.ValidationError as e:
        raise ChatError("bad_request", f"query string: {e}") from None


__all__ = ["install", "read_bodies_first", "route", "set_authenticate", "streamed_body", "binary_body",
           "binary_answers", "hide"]
