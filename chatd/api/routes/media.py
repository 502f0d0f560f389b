"""Media: ``POST /v1/media`` (upload), ``GET /v1/media/<id>`` and ``GET /v1/media/<id>/thumbnails/<px>``.

Upload: the raw file is the request body (any ``Content-Type``: it is ignored, the type is sniffed
from the bytes), its name in ``?name=``. Not resumable: an upload is at most ``media.max_bytes``
(25 MiB by default), a failed one is sent again; resumable uploads would need their partial state
shared by every API server for little gain at that size. The token is checked before a byte of
the body is read (401 and the connection closed otherwise), then the hourly quota
(``media_quota``, 429 + ``Retry-After``), then the body is streamed to disk (``media_too_large``,
413, once it passes the limit -- declared or not -- and the connection closed). Answer 201
``{media}`` (:class:`chatd.api.models.Media`).

``GET /v1/media/limits``: ``{max_bytes, max_attachments}`` (a client refuses a too-large file before
sending a byte of it).

Download: to the uploader and to members of a channel with a message holding it; anybody else
gets ``no_such_media`` (404, as for an id that does not exist). ``Range``, ``ETag`` /
``If-None-Match`` (304) and the safety headers of :mod:`chatd.media.serving`; with
``media.s3_presign_s`` > 0 (``s3`` only) a 302 to a presigned bucket URL instead, after the same
authorization (docs/media.md: the bucket's CORS).
"""

from __future__ import annotations

from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import RequestEntityTooLarge

from ...errors import ChatError
from ...media import serving
from ...media.backend import MissingObject
from ...media.service import INLINE_KINDS, MAX_ATTACHMENTS, public
from .. import models as m
from ..caller import Caller
from ..common import RetryLater
from ..host import ApiHost
from ..spec import binary_answers, binary_body, route, streamed_body


def register(app: QuartTrio, node: ApiHost) -> None:
    media = node.media

    async def body_chunks():
        try:
            async for chunk in request.body:
                yield chunk
        except RequestEntityTooLarge:
            raise ChatError("media_too_large", f"an upload is at most {media.cfg.max_bytes} bytes") from None
        g.body_read = True

    @app.post("/v1/media")
    @streamed_body(lambda: media.cfg.max_bytes)
    @binary_body
    @route(m.MediaAnswer, 201, query=m.MediaUploadQuery, errors=(429,))
    async def upload(query: m.MediaUploadQuery, caller: Caller):
        try:
            await media.check_quota(caller.user_id)
        except ChatError as e:
            if e.code == "media_quota":
                raise RetryLater("media_quota", e.message, getattr(e, "retry_after_s", 60.0)) from None
            raise
        record = await media.upload(caller.user_id, query.name or "file", body_chunks())
        return {"media": public(record)}, 201

    @app.get("/v1/media/limits")
    @route(m.MediaLimits)
    async def limits(caller: Caller):
        return {"max_bytes": media.cfg.max_bytes, "max_attachments": MAX_ATTACHMENTS}

    @app.get("/v1/media/<string:media_id>")
    @binary_answers(200, 206, 302, 304)
    @route(errors=(404, 416))
    async def download(media_id: str, caller: Caller):
        record = await media.readable(caller.user_id, media_id)
        i = record.info
        return await _answer(media, i["key"], i["mime"], i["kind"] in INLINE_KINDS, i["name"], i["sha256"],
                             record.size)

    @app.get("/v1/media/<string:media_id>/thumbnails/<int:px>")
    @binary_answers(200, 206, 302, 304)
    @route(errors=(404, 416))
    async def thumbnail(media_id: str, px: int, caller: Caller):
        record = await media.readable(caller.user_id, media_id)
        for t in record.info.get("thumbnails", []):
            if t["px"] == px:
                return await _answer(media, t["key"], t["mime"], True, f"{px}-{record.info['name']}", t["sha256"],
                                     t["size"])
        raise ChatError("no_such_media", f"this media has no {px}-px thumbnail")


async def _answer(media, key: str, mime: str, inline: bool, name: str, sha256: str, size: int):
    headers = serving.headers(mime, inline, name, sha256, size)
    presign_s = media.cfg.s3_presign_s if media.cfg.backend == "s3" else 0
    if presign_s:  # presigned mode: the bytes come from the bucket, with chatd's type and disposition
        url = media.backend.presigned_get(key, presign_s, headers["Content-Type"], headers["Content-Disposition"])
        return Response(b"", 302, {"Location": url, "Cache-Control": f"private, max-age={max(0, presign_s - 60)}",
                                   "X-Content-Type-Options": "nosniff"})
    if serving.not_modified(request.headers.get("If-None-Match"), sha256):
        return Response(b"", 304, headers)
    try:
        span = serving.parse_range(request.headers.get("Range"), size)
    except serving.Unsatisfiable:
        return Response(b"", 416, {**headers, "Content-Range": f"bytes */{size}"})
    start, end = span if span is not None else (0, size)
    chunks = media.backend.read(key, start, end)
    try:
        first = await chunks.__anext__() if end > start else b""
    except StopAsyncIteration:
        first = b""
    except MissingObject:
        raise ChatError("no_such_media", "the media's bytes are missing (reported to the operator)") from None

    async def body():
        yield first
        async for chunk in chunks:
            yield chunk
    status = 200
    if span is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    return Response(body(), status, headers)
