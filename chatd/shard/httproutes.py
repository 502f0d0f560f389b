"""The shard port's HTTP routes: the same events and requests as its WebSocket, over SSE
(``GET /v1/stream``), long polling (``GET /v1/poll``) and ``POST /v1/frames``
(docs/protocol.md, "Transports"). The device sessions behind them: chatd/shard/httpsession.py.

Every route authenticates with the token (``Authorization: Bearer``, or ``?token=`` for an
``EventSource``, which cannot send headers); nothing here logs a target, a header or a token.
Answers: JSON, errors ``{"error": {"code", "message"}}`` with the code's status (chatd/errors.py)
and ``Retry-After`` on 429/503; every answer carries ``Access-Control-Allow-Origin: *`` (tokens,
never cookies) and ``OPTIONS`` answers a CORS preflight.

Bounds: an SSE write carries at most ``limits.http_flush_bytes`` of events (plus one event) and
is given up after ``limits.slow_consumer_s`` (the connection is dropped: a slow consumer); a
keep-alive comment after ``limits.sse_keepalive_s`` without an event; a poll waits at most
``limits.poll_wait_s`` and answers at most ``http_flush_bytes`` of events (plus one event); a
POST carries at most ``limits.http_frames_per_post`` requests in ``2 * max_frame_bytes`` bytes
and is answered within ``limits.send_answer_s + FRAMES_GRACE_S``; a connection waits at most
``KEEPALIVE_S`` for its next request.
"""

from __future__ import annotations

import json
import math

import msgspec
import trio

from ..errors import CODES, ChatError
from ..protocol import client as proto
from . import resume
from .httpconn import CORS_PREFLIGHT, BadRequest, HTTPConnection, Request
from .httpsession import HTTPSession
from .spec import openapi
from .wsconn import ConnectionClosed

KEEPALIVE_S = 30.0  # an idle keep-alive connection is closed after this long
FRAMES_GRACE_S = 1.0  # a POST's answer waits this much beyond limits.send_answer_s
_encode = msgspec.json.encode


async def serve(server, conn: HTTPConnection, req: Request) -> None:
    """Answer ``req`` and the requests that follow on the connection (keep-alive)."""
    while req is not None:
        try:
            await _route(server, conn, req)
        except ChatError as e:
            await _error(conn, e)
        if not conn.reusable:
            return
        try:
            req = await conn.next_request(KEEPALIVE_S)
        except BadRequest as e:
            await conn.refuse(e.status, str(e))
            return


async def _route(server, conn: HTTPConnection, req: Request) -> None:
    path = req.path.rstrip("/")
    route = None
    for suffix, method, handler in ROUTES:
        if path.endswith(suffix):
            route = method
            if req.method == "OPTIONS":
                return await conn.respond(204, b"", headers=CORS_PREFLIGHT)
            if req.method == method:
                return await handler(server, conn, req)
    if route is not None:
        return await conn.respond_json(405, {"error": {"code": "bad_request", "message": "method not allowed"}},
                                       headers=[(b"allow", f"{route}, OPTIONS".encode())])
    if path.endswith("/openapi.json") and req.method == "GET":
        return await conn.respond_json(200, openapi(server.node.config.limits), headers=[])
    if path in ("", "/"):  # what a WebSocket client asks for, without the upgrade
        raise ChatError("bad_request", "this is the WebSocket endpoint: send an Upgrade: websocket request "
                        "(or use /v1/stream, /v1/poll, /v1/frames)")
    raise ChatError("not_found", "no such route on this port (/v1/stream, /v1/poll, /v1/frames, or a WebSocket)")


async def _error(conn: HTTPConnection, e: ChatError) -> None:
    """The error answer; then the connection is closed (as a WebSocket's refused upgrade is)."""
    headers = [(b"connection", b"close")]
    retry_ms = e.details.get("retry_after_ms")
    if retry_ms is not None or e.code in ("rate_limited", "too_many_connections", "unavailable"):
        headers.append((b"retry-after", str(max(1, math.ceil((retry_ms or 1000) / 1000))).encode()))
    try:
        await conn.respond_json(CODES.get(e.code, 500), {"error": e.to_dict()}, headers=headers)
    except Exception:  # noqa: BLE001 - the answer had started (h11 refuses a second): just close
        conn.h11.send_failed()


def _token(req: Request) -> str:
    auth = req.header("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    token = req.query.get("token")
    if token:
        return token
    raise ChatError("not_authenticated", "send the token: 'Authorization: Bearer <token>' or '?token=<token>'")


def _split_cursor(cursor: str | None) -> tuple[dict | None, str | None, int]:
    """A poll cursor ``<resume token>~<session>~<answer>`` or a bare resume token (an SSE id):
    ``(cursors or None, session id or None, answer number)``; ``bad_cursor`` if malformed."""
    if not cursor:
        return None, None, -1
    token, _, rest = cursor.partition("~")
    sid, _, n = rest.partition("~")
    try:
        cursors = resume.decode(token) if token else None
        number = int(n) if n else -1
    except ValueError as e:
        raise ChatError("bad_cursor", f"not a resume token this server made ({e}); start without one") from None
    return cursors, sid or None, number


def _sse(events) -> bytes:
    out = []
    for data, token in events:
        if token is not None:
            out.append(b"id: " + token.encode() + b"\n")
        out.append(b"data: " + data + b"\n\n")
    return b"".join(out)


async def _until_peer_leaves(conn: HTTPConnection, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` when the client closes its side (a stream or poll it gave up)."""
    try:
        while True:
            data = await conn.stream.receive_some(65536)
            if not data:
                break
            conn.h11.receive_data(data)  # (a pipelined next request: read after this answer)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


# ---- GET /v1/stream ---------------------------------------------------------------------------
async def stream(server, conn: HTTPConnection, req: Request) -> None:
    token = _token(req)
    cursor = req.header("last-event-id") or req.query.get("last_event_id") or req.query.get("cursor")
    start, _, _ = _split_cursor(cursor)
    hs = await server.http.open(token, start, "sse")
    limits = server.node.config.limits
    hs.attached += 1
    try:
        await conn.start(200, [(b"content-type", b"text/event-stream; charset=utf-8"),
                               (b"cache-control", b"no-store"), (b"x-accel-buffering", b"no")])
        await conn.write(b"retry: 1000\n\n")
        complete = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_until_peer_leaves, conn, nursery.cancel_scope)
            complete = await _pump(hs, conn, limits)
            nursery.cancel_scope.cancel()
        if complete:
            await conn.end()
        else:  # the client left, or did not read
            conn.h11.send_failed()
    finally:
        hs.attached -= 1
        hs.end()


async def _pump(hs: HTTPSession, conn: HTTPConnection, limits) -> bool:
    """Write the session's events until it ends (True) or the client does not read (False)."""
    pipe = hs.pipe
    while True:
        with trio.move_on_after(limits.sse_keepalive_s):
            await pipe.wait_events()
        events = hs.take(limits.http_flush_bytes)
        with trio.move_on_after(limits.slow_consumer_s) as late:
            await conn.write(_sse(events) if events else b": keep-alive\n\n")
        if late.cancelled_caught:  # the client does not read: a slow consumer, dropped
            hs.session.node.metrics.slow_consumers.inc()
            hs.end(1013, "slow consumer")
            return False
        if pipe.finished:
            return True


# ---- GET /v1/poll -----------------------------------------------------------------------------
async def poll(server, conn: HTTPConnection, req: Request) -> None:
    token = _token(req)
    limits = server.node.config.limits
    wait_s = limits.poll_wait_s
    if "wait_s" in req.query:
        try:
            wait_s = float(req.query["wait_s"])
        except ValueError:
            wait_s = -1.0
        if not 0 <= wait_s <= limits.poll_wait_s:
            raise ChatError("bad_request", f"wait_s must be a number from 0 to {limits.poll_wait_s:g}")
    start, sid, number = _split_cursor(req.query.get("cursor"))
    hs = server.http.get(sid, token)
    if hs is not None and hs.transport == "poll":
        if number == hs.answer:
            hs.last_answer = None  # acknowledged
        elif number == hs.answer - 1 and hs.last_answer is not None:
            return await conn.respond(200, hs.last_answer)  # the last answer was lost: the same again
        else:
            hs.end(1000, "poll from another point: restarted from its cursor")
            hs = None
    else:
        hs = None
    if hs is None:
        hs = await server.http.open(token, start, "poll")
    hs.poll_gen += 1
    gen = hs.poll_gen
    if hs.poll_scope is not None:
        hs.poll_scope.cancel()  # the newest poll wins: the waiting one answers now, empty
    hs.attached += 1
    left = True
    scope = trio.move_on_after(wait_s)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_until_peer_leaves, conn, nursery.cancel_scope)
            with scope:
                hs.poll_scope = scope
                await hs.pipe.wait_events()
            left = False
            nursery.cancel_scope.cancel()
    finally:
        if hs.poll_scope is scope:
            hs.poll_scope = None
        hs.attached -= 1
        hs.last_seen = trio.current_time()
    if left:
        conn.h11.send_failed()
        return
    events = []
    if gen == hs.poll_gen and hs.pipe.has_events():
        events = hs.take(limits.http_flush_bytes)
        hs.answer += 1
    body = _poll_answer(hs, events)
    if events:
        hs.last_answer = body
    await conn.respond(200, body)


def _poll_answer(hs: HTTPSession, events) -> bytes:
    cursor = f"{hs.delivered or resume.encode({})}~{hs.sid}~{hs.answer}"
    return (b'{"session":' + _encode(hs.sid) + b',"answer":' + str(hs.answer).encode() + b',"cursor":'
            + _encode(cursor) + b',"events":[' + b",".join(d for d, _ in events) + b"]}")


# ---- POST /v1/frames --------------------------------------------------------------------------
async def frames(server, conn: HTTPConnection, req: Request) -> None:
    token = _token(req)
    limits = server.node.config.limits
    try:
        body = json.loads(req.body)
    except (ValueError, UnicodeDecodeError):
        raise ChatError("bad_frame", "the body must be a JSON request object or an array of them") from None
    if not isinstance(body, (list, dict)):
        raise ChatError("bad_frame", "the body must be a JSON request object or an array of them")
    items = body if isinstance(body, list) else [body]
    if not 1 <= len(items) <= limits.http_frames_per_post:
        raise ChatError("bad_request", f"send 1 to {limits.http_frames_per_post} requests per POST")
    sid = req.query.get("session") or req.header("x-chatd-session")
    if sid:
        hs = server.http.get(sid, token)
        if hs is None:
            raise ChatError("not_found", "no such session here (it ended, or it lives on another shard): "
                            "drop 'session' or start a new stream or poll")
    else:
        hs = await server.http.frames_session(token)
    replies: list = [None] * len(items)
    waits = []
    ids = set()
    for i, item in enumerate(items):
        rid = item.get("id") if isinstance(item, dict) else None
        try:
            if not isinstance(item, dict):
                raise proto.ProtocolError("bad_frame", "a frame must be an object")
            if "id" not in item:
                raise proto.ProtocolError("bad_field", "field 'id' is required")
            proto._check_id(rid)
        except proto.ProtocolError as e:
            replies[i] = proto.error_frame(e.code, e.message, None)
            continue
        except ValueError as e:
            replies[i] = proto.error_frame("bad_field", f"field 'id' {e}", None)
            continue
        if (type(rid), rid) in ids:
            replies[i] = proto.error_frame("bad_field", "two requests of one POST have the same 'id'", rid)
            continue
        ids.add((type(rid), rid))
        waits.append((i, rid, hs.pipe.expect(rid)))
    hs.attached += 1
    budget = limits.send_answer_s + FRAMES_GRACE_S
    try:
        with trio.move_on_after(budget):
            for i, _, _ in waits:
                await hs.pipe.feed(json.dumps(items[i], ensure_ascii=False))
            for _, _, w in waits:
                await w.event.wait()
    except ConnectionClosed:
        pass  # the session ended meanwhile: what is unanswered says so below
    finally:
        hs.attached -= 1
        hs.last_seen = trio.current_time()
    for i, rid, w in waits:
        if w.reply is None:
            hs.pipe.forget(rid, w)
            closed = hs.pipe.closed
            replies[i] = proto.error_frame(
                "unavailable", f"no answer within {budget:g} s" if closed is None else
                f"the session ended ({closed.code}); resend", rid, retry_after_ms=500)
        else:
            replies[i] = w.reply
    await conn.respond(200, _encode({"replies": replies}))


ROUTES = [("/v1/stream", "GET", stream), ("/v1/poll", "GET", poll), ("/v1/frames", "POST", frames)]
