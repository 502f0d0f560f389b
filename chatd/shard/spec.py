"""The OpenAPI 3.1 document of the shard port's HTTP routes (docs/protocol.md section 7), served
at ``GET /openapi.json`` on that port (the API server's own document describes the API's routes;
these live on the shards because the shards hold delivery state). Built from the config, so the
limits it states are the ones served. tests/test_shard_fuzz.py runs schemathesis against it.

The frames themselves (request and reply objects) are docs/protocol.md's, validated by the
session exactly as on a WebSocket; here a frame is any JSON object.
"""

from __future__ import annotations

ERROR = {"type": "object", "required": ["error"], "properties": {
    "error": {"type": "object", "required": ["code", "message"],
              "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}
FRAME = {"type": "object", "description": "a frame of docs/protocol.md (dispatch on its 'type')"}


def _errors(*codes: int) -> dict:
    return {str(c): {"description": "error", "content": {"application/json": {"schema": ERROR}}} for c in codes}


def openapi(limits) -> dict:
    token_param = {"name": "token", "in": "query", "required": False, "schema": {"type": "string"},
                   "description": "the token, for clients that cannot send headers (EventSource); prefer the header"}
    cursor = {"type": "string", "maxLength": 20000,
              "description": "a resume token (SSE id), or a poll answer's cursor"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "chatd shard: HTTP transports", "version": "1",
                 "description": "SSE, long polling and POST /v1/frames (docs/protocol.md section 7)."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/v1/stream": {"get": {
                "operationId": "stream",
                "summary": "the device's events as Server-Sent Events",
                "parameters": [token_param,
                               {"name": "cursor", "in": "query", "required": False, "schema": cursor},
                               {"name": "last_event_id", "in": "query", "required": False, "schema": cursor},
                               {"name": "Last-Event-ID", "in": "header", "required": False, "schema": cursor}],
                "responses": {"200": {"description": "the stream (never ends by itself)",
                                      "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                              **_errors(400, 401, 429, 503)}}},
            "/v1/poll": {"get": {
                "operationId": "poll",
                "summary": "the device's events by long polling",
                "parameters": [token_param,
                               {"name": "cursor", "in": "query", "required": False, "schema": cursor},
                               {"name": "wait_s", "in": "query", "required": False,
                                "schema": {"type": "number", "minimum": 0, "maximum": limits.poll_wait_s}}],
                "responses": {"200": {"description": "events (maybe none) and the next cursor", "content": {
                    "application/json": {"schema": {
                        "type": "object", "required": ["session", "answer", "cursor", "events"],
                        "properties": {"session": {"type": "string"}, "answer": {"type": "integer"},
                                       "cursor": {"type": "string"},
                                       "events": {"type": "array", "items": FRAME}}}}}},
                              **_errors(400, 401, 429, 503)}}},
            "/v1/frames": {"post": {
                "operationId": "frames",
                "summary": "requests, answered with their replies",
                "parameters": [token_param,
                               {"name": "session", "in": "query", "required": False, "schema": {"type": "string"}}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "oneOf": [FRAME, {"type": "array", "minItems": 1, "maxItems": limits.http_frames_per_post,
                                      "items": {}}]}}}},
                "responses": {"200": {"description": "replies[i] answers request i", "content": {
                    "application/json": {"schema": {"type": "object", "required": ["replies"], "properties": {
                        "replies": {"type": "array", "items": FRAME}}}}}},
                              **_errors(400, 401, 404, 413, 429, 503)}}},
        },
    }
