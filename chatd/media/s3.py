"""The ``s3`` media backend: any S3-compatible object store (AWS S3, SeaweedFS, MinIO, Ceph RGW...).

Requests go through httpx (on trio); each is signed with AWS Signature Version 4 by botocore's
own signer (``botocore.auth.S3SigV4Auth``, the implementation the AWS SDKs use) -- never
hand-written crypto. Payloads are signed too (their sha256, computed while reading the file), so
this also works over plain HTTP to a store on a private network.

Writes: an object of at most ``media.s3_part_bytes`` is one ``PUT``; a larger one a multipart
upload in parts of that size (aborted if a part fails, so the store keeps no half object; an
object under a key is all there or absent). Bodies are streamed from the local file in chunks:
nothing holds a part in memory. Reads: ``GET`` with ``Range``, streamed. Objects are private;
chatd streams them to authorized clients, or (``media.s3_presign_s`` > 0) redirects an authorized
download to a presigned URL valid that long (:meth:`S3Backend.presigned_get`).

Configuration: ``media.s3_endpoint``, ``s3_bucket``, ``s3_region``, ``s3_path_style``
(``https://host/bucket/key``; else ``https://bucket.host/key``), credentials from
``media.s3_access_key`` / ``s3_secret_key`` or the usual ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``) environment variables.

Error policy: a transport error or a 5xx is ``ChatError("unavailable")`` (logged with the store's
answer); a 404 on read is :class:`~chatd.media.backend.MissingObject`; any other refusal (403: bad
credentials or clock skew) is logged and ``unavailable`` too -- clients cannot fix it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from urllib.parse import quote, urlsplit
from xml.sax.saxutils import escape

import httpx
import trio
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from ..errors import ChatError
from .backend import CHUNK_BYTES, Backend, MissingObject

log = logging.getLogger(__name__)

TIMEOUT_S = 60.0


class _Signer(S3SigV4Auth):
    """botocore's S3 SigV4 with the payload hash given (``context["payload_sha256"]``) instead of
    read from the body: the body is a stream that botocore never sees."""

    def payload(self, request):
        return request.context["payload_sha256"]


def _file_chunks(path: str, offset: int, length: int):
    async def gen():
        f = await trio.to_thread.run_sync(open, path, "rb")
        try:
            await trio.to_thread.run_sync(f.seek, offset)
            left = length
            while left > 0:
                chunk = await trio.to_thread.run_sync(f.read, min(CHUNK_BYTES, left))
                if not chunk:
                    raise OSError(f"{path} shrank while being uploaded")
                left -= len(chunk)
                yield chunk
        finally:
            f.close()
    return gen()


def _sha256_of(path: str, offset: int, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            chunk = f.read(min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


class S3Backend(Backend):
    def __init__(self, endpoint: str, bucket: str, region: str, access_key: str, secret_key: str,
                 session_token: str | None = None, path_style: bool = True, part_bytes: int = 8 * 1024 * 1024):
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self.region = region
        self.path_style = path_style
        self.part_bytes = part_bytes
        self._credentials = Credentials(access_key, secret_key, session_token)
        self._http = httpx.AsyncClient(timeout=TIMEOUT_S)

    @classmethod
    def from_config(cls, m) -> "S3Backend":
        return cls(m.s3_endpoint, m.s3_bucket, m.s3_region, m.s3_access_key or os.environ.get("AWS_ACCESS_KEY_ID", ""),
                   m.s3_secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
                   os.environ.get("AWS_SESSION_TOKEN") or None, m.s3_path_style, m.s3_part_bytes)

    # ---- requests ------------------------------------------------------------------------
    def _url(self, key: str = "", query: str = "") -> str:
        path = quote(key, safe="/-_.~")
        if self.path_style:
            url = f"{self.endpoint}/{self.bucket}" + (f"/{path}" if key else "")
        else:
            parts = urlsplit(self.endpoint)
            url = f"{parts.scheme}://{self.bucket}.{parts.netloc}/{path}"
        return url + (f"?{query}" if query else "")

    def _signed(self, method: str, url: str, payload_sha256: str, headers: dict | None = None) -> dict:
        req = AWSRequest(method=method, url=url, headers=dict(headers or {}))
        req.context["payload_sha256"] = payload_sha256
        _Signer(self._credentials, "s3", self.region).add_auth(req)
        return dict(req.headers.items())

    async def _send(self, method: str, url: str, *, body=None, payload_sha256: str | None = None,
                    headers: dict | None = None, ok=(200, 204)) -> httpx.Response:
        content = body if body is not None else b""
        sha = payload_sha256 or hashlib.sha256(content if isinstance(content, bytes) else b"").hexdigest()
        signed = self._signed(method, url, sha, headers)
        try:
            r = await self._http.request(method, url, content=content, headers=signed)
        except httpx.HTTPError as e:
            raise self._failed(method, url, repr(e)) from None
        if r.status_code not in ok:
            raise self._failed(method, url, f"{r.status_code} {r.text[:300]}")
        return r

    @staticmethod
    def _failed(method: str, url: str, why: str) -> ChatError:
        log.error("s3 %s %s failed: %s", method, url.split("?")[0], why)
        return ChatError("unavailable", "the media store failed; retry")

    # ---- the backend ---------------------------------------------------------------------
    async def create_bucket(self) -> None:
        """Create the bucket if it does not exist (development and tests; operators make theirs)."""
        await self._send("PUT", self._url(), ok=(200, 409))

    async def put(self, key, path, size, mime):
        try:
            if size <= self.part_bytes:
                sha = await trio.to_thread.run_sync(_sha256_of, path, 0, size)
                await self._send("PUT", self._url(key), body=_file_chunks(path, 0, size), payload_sha256=sha,
                                 headers={"Content-Length": str(size), "Content-Type": mime})
            else:
                await self._put_multipart(key, path, size, mime)
        finally:
            await trio.to_thread.run_sync(lambda: os.path.exists(path) and os.unlink(path))

    async def _put_multipart(self, key, path, size, mime) -> None:
        r = await self._send("POST", self._url(key, "uploads="), headers={"Content-Type": mime})
        m = re.search(rb"<UploadId>([^<]+)</UploadId>", r.content)
        if m is None:
            raise self._failed("POST", self._url(key), "no UploadId in the answer")
        upload_id = m.group(1).decode()
        uid = quote(upload_id, safe="")
        try:
            etags = []
            for number, offset in enumerate(range(0, size, self.part_bytes), start=1):
                length = min(self.part_bytes, size - offset)
                sha = await trio.to_thread.run_sync(_sha256_of, path, offset, length)
                r = await self._send("PUT", self._url(key, f"partNumber={number}&uploadId={uid}"),
                                     body=_file_chunks(path, offset, length), payload_sha256=sha,
                                     headers={"Content-Length": str(length)})
                etags.append((number, r.headers.get("ETag", "")))
            doc = "<CompleteMultipartUpload>" + "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>{escape(e)}</ETag></Part>" for n, e in etags
            ) + "</CompleteMultipartUpload>"
            r = await self._send("POST", self._url(key, f"uploadId={uid}"), body=doc.encode(),
                                 headers={"Content-Type": "application/xml"})
            if b"<Error>" in r.content:  # S3 may answer 200 and fail in the body
                raise self._failed("POST", self._url(key), r.text[:300])
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                try:
                    await self._send("DELETE", self._url(key, f"uploadId={uid}"), ok=(200, 204, 404))
                except ChatError:
                    pass
            raise

    async def read(self, key, start, end):
        url = self._url(key)
        headers = self._signed("GET", url, hashlib.sha256(b"").hexdigest(), {"Range": f"bytes={start}-{end - 1}"})
        try:
            async with self._http.stream("GET", url, headers=headers) as r:
                if r.status_code == 404:
                    raise MissingObject(key)
                if r.status_code not in (200, 206):
                    raise self._failed("GET", url, f"{r.status_code} {(await r.aread())[:300]!r}")
                skip = start if r.status_code == 200 else 0  # a store that ignored the Range
                left = end - start
                async for chunk in r.aiter_bytes(CHUNK_BYTES):
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    if left <= 0:
                        break
                    chunk = chunk[:left]
                    left -= len(chunk)
                    if chunk:
                        yield chunk
        except httpx.HTTPError as e:
            raise self._failed("GET", url, repr(e)) from None

    def presigned_get(self, key: str, expires_s: int, content_type: str, disposition: str) -> str:
        """A URL that GETs the object for ``expires_s`` seconds without credentials (presigned
        mode, docs/media.md), answered with the given ``Content-Type`` and ``Content-Disposition``
        (S3's ``response-*`` overrides, part of the signature)."""
        query = (f"response-content-disposition={quote(disposition, safe='')}"
                 f"&response-content-type={quote(content_type, safe='')}")
        req = AWSRequest(method="GET", url=self._url(key, query))
        S3SigV4QueryAuth(self._credentials, "s3", self.region, expires=expires_s).add_auth(req)
        return req.url

    async def delete(self, key):
        await self._send("DELETE", self._url(key), ok=(200, 204, 404))

    async def aclose(self) -> None:
        await self._http.aclose()
