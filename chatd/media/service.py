"""The media service: uploads in, authorized reads out, references from messages, collection.

:meth:`MediaService.upload` streams a request body to a temporary file under
``<data dir>/media/tmp`` (chunk by chunk, hashing as it goes: never the whole file in memory),
refusing it once it passes ``media.max_bytes`` (``media_too_large``, the partial file deleted);
then the worker (:mod:`chatd.media.processing`) says what it is; the served file (the upload
itself, or for an inline image its re-encoded copy without metadata) and the thumbnails go to the
backend under ``<id>/<sha256>.<ext>``; the record goes to the store, an *orphan* until a message
references it. The original of a re-encoded image is not kept.

Who may read an upload (:meth:`readable`): its uploader, and every current member of a channel
that holds a message referencing it. Anybody else -- an outsider, a member removed since -- gets
``no_such_media`` (404), the same answer as for an id that does not exist.

References (:meth:`attach`): a ``send`` with ``attachments`` names uploads of the sender (at most
``MAX_ATTACHMENTS``); they are checked and referenced before the message is stored, and the
message carries a snapshot of their public metadata. :meth:`release_message` drops a deleted
message's references and deletes the uploads nothing references any more (the lifecycle issue's
delete calls it). :meth:`collect` deletes the orphans older than ``media.orphan_ttl_s``.

Quota: at most ``media.uploads_per_hour`` uploads and ``media.bytes_per_hour`` bytes per user in
any hour (the store counts them): ``media_quota`` (429) with ``Retry-After``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shutil
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import AsyncIterator

import trio

from ..datadir import private_dir
from ..errors import ChatError
from ..store.base import MediaRecord, Store
from .avdecode import WAVEFORM_BUCKETS
from .backend import Backend, open_backend
from .processing import PLAIN, Processor

log = logging.getLogger(__name__)

MAX_ATTACHMENTS = 10
MAX_NAME_CHARS = 200
INLINE_KINDS = ("image", "audio", "video")
_EXT = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif", "image/avif": "avif",
        "audio/ogg": "ogg", "audio/webm": "webm", "audio/mp4": "m4a", "audio/mpeg": "mp3", "audio/x-wav": "wav",
        "video/webm": "webm", "video/mp4": "mp4"}


class QuotaExceeded(ChatError):
    def __init__(self, message: str, retry_after_s: float):
        super().__init__("media_quota", message)
        self.retry_after_s = retry_after_s


def clean_name(name: str) -> str:
    """A file name to show and to offer in Content-Disposition: no path, no control characters."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip().strip(".")
    return name[:MAX_NAME_CHARS] or "file"


def public(record: MediaRecord) -> dict:
    """What clients see of an upload (the upload answer, and each attachment of a message)."""
    i = record.info
    base = f"/v1/media/{record.id}"
    return {"id": record.id, "kind": i["kind"], "mime": i["mime"], "name": i["name"], "size": record.size,
            "sha256": i["sha256"], "width": i.get("width"), "height": i.get("height"),
            "duration_s": i.get("duration_s"), "waveform": i.get("waveform"), "placeholder": i.get("placeholder"),
            "url": base,
            "thumbnails": [{"px": t["px"], "width": t["width"], "height": t["height"], "mime": t["mime"],
                            "size": t["size"], "url": f"{base}/thumbnails/{t['px']}"}
                           for t in i.get("thumbnails", [])]}


class MediaService:
    def __init__(self, config, store: Store, membership, backend: Backend | None = None):
        self.cfg = config.media
        self.store = store
        self.membership = membership
        root = config.data_path / "media"
        self.tmp = root / "tmp"
        private_dir(self.tmp)
        self.backend = backend if backend is not None else open_backend(config, config.data_path)
        c = self.cfg
        self.processor = Processor(c.workers, c.worker_timeout_s, c.worker_memory_bytes, c.max_pixels)
        self.stats = {"uploads": 0, "upload_bytes": 0, "refused_too_large": 0, "collected": 0, "released": 0}

    # ---- upload ------------------------------------------------------------------------
    async def check_quota(self, user_id: int) -> None:
        now = time.time()
        count, size = await self.store.media_usage(user_id, now - 3600)
        if count >= self.cfg.uploads_per_hour or size >= self.cfg.bytes_per_hour:
            raise QuotaExceeded(f"at most {self.cfg.uploads_per_hour} uploads and {self.cfg.bytes_per_hour} bytes "
                                "an hour; try again later", 60.0)

    async def upload(self, user_id: int, name: str, chunks: AsyncIterator[bytes]) -> MediaRecord:
        """Store one upload read from ``chunks``; its record (module docstring)."""
        work = Path(await trio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="up-", dir=self.tmp)))
        try:
            src = work / "upload"
            digest, size = await self._receive(src, chunks)
            out = work / "out"
            await trio.to_thread.run_sync(out.mkdir)
            info = await self.processor.process(str(src), str(out))
            media_id = secrets.token_urlsafe(16)
            record = await self._keep(media_id, user_id, clean_name(name), src, digest, size, out, info)
            await self.store.add_media(record)
            self.stats["uploads"] += 1
            self.stats["upload_bytes"] += size
            return record
        finally:
            with trio.CancelScope(shield=True):  # (also when the client went away mid-upload)
                await trio.to_thread.run_sync(shutil.rmtree, work, True)

    async def _receive(self, path: Path, chunks: AsyncIterator[bytes]) -> tuple[str, int]:
        limit = self.cfg.max_bytes
        h = hashlib.sha256()
        size = 0
        f = await trio.to_thread.run_sync(lambda: open(path, "wb", buffering=0))
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    self.stats["refused_too_large"] += 1
                    raise ChatError("media_too_large", f"an upload is at most {limit} bytes")
                h.update(chunk)
                await trio.to_thread.run_sync(f.write, chunk)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(f.close)
        return h.hexdigest(), size

    async def _keep(self, media_id, user_id, name, src: Path, digest, size, out: Path, info: dict) -> MediaRecord:
        kind = info["kind"]
        mime = info.get("mime") or PLAIN
        served, served_digest, served_size = src, digest, size
        if kind == "image":
            served = out / info["served"]
            served_digest, served_size = await trio.to_thread.run_sync(_digest, served)
        if kind not in INLINE_KINDS:
            kind = "file"
        key = f"{media_id}/{served_digest}.{_EXT.get(mime, 'bin') if kind != 'file' else 'bin'}"
        thumbs = []
        for t in info.get("thumbnails", []):
            path = out / t["name"]
            d, n = await trio.to_thread.run_sync(_digest, path)
            tkey = f"{media_id}/{d}.{_EXT[t['mime']]}"
            await self.backend.put(tkey, str(path), n, t["mime"])
            thumbs.append({"px": t["px"], "width": t["width"], "height": t["height"], "mime": t["mime"],
                           "size": n, "sha256": d, "key": tkey})
        await self.backend.put(key, str(served), served_size, mime if kind != "file" else PLAIN)
        record_info = {"kind": kind, "mime": mime, "name": name, "sha256": served_digest, "key": key,
                       "width": info.get("width"), "height": info.get("height"),
                       "duration_s": info.get("duration_s"), "waveform": _waveform(info.get("waveform")),
                       "placeholder": info.get("placeholder"), "thumbnails": thumbs, "uploaded_sha256": digest, "uploaded_size": size}
        if info.get("reason"):
            record_info["reason"] = info["reason"]
        return MediaRecord(media_id, user_id, time.time(), served_size, record_info)

    # ---- reads -------------------------------------------------------------------------
    async def readable(self, user_id: int, media_id: str) -> MediaRecord:
        """The record, if ``user_id`` may read it (module docstring); else ``no_such_media``."""
        record = (await self.store.get_media([media_id])).get(media_id) if _plausible_id(media_id) else None
        if record is not None and record.owner_id == user_id:
            return record
        if record is not None:
            for channel_id in await self.store.media_channels(media_id):
                if user_id in await self.membership.members(channel_id):
                    return record
        raise ChatError("no_such_media", "no such media (or not yours to see)")

    # ---- references --------------------------------------------------------------------
    async def attach(self, user_id: int, channel_id: str, client_msg_id: str, media_ids: list[str]) -> str:
        """Check that ``user_id`` uploaded each of ``media_ids``, reference them from the message
        about to be sent, and return the message's ``attachments`` (JSON of their public
        metadata, in the order given). ``bad_attachment`` (400) names what is wrong."""
        if not media_ids:
            return ""
        ids = list(dict.fromkeys(media_ids))
        if len(ids) > MAX_ATTACHMENTS:
            raise ChatError("bad_attachment", f"a message has at most {MAX_ATTACHMENTS} attachments")
        records = await self.store.get_media([i for i in ids if _plausible_id(i)])
        for i in ids:
            r = records.get(i)
            if r is None or r.owner_id != user_id:
                raise ChatError("bad_attachment", f"attachment {i[:40]!r} is not an upload of yours")
        await self.store.add_media_refs(ids, channel_id, msg_key(user_id, client_msg_id))
        return json.dumps([public(records[i]) for i in ids], separators=(",", ":"))

    async def release_message(self, channel_id: str, sender_id: int, client_msg_id: str, attachments: str) -> int:
        """A message was deleted: drop its references; delete the uploads nothing references any
        more (objects, then records). Returns how many were deleted."""
        ids = [a["id"] for a in json.loads(attachments)] if attachments else []
        if not ids:
            return 0
        unreferenced = await self.store.remove_media_refs(ids, channel_id, msg_key(sender_id, client_msg_id))
        for record in (await self.store.get_media(unreferenced)).values():
            await self._delete(record)
        self.stats["released"] += len(unreferenced)
        return len(unreferenced)

    async def collect(self, now: float | None = None) -> int:
        """Delete the orphans older than ``media.orphan_ttl_s``; how many."""
        now = time.time() if now is None else now
        n = 0
        for record in await self.store.orphan_media(now - self.cfg.orphan_ttl_s, 500):
            if await self.store.media_channels(record.id):  # referenced after all (a stale mark)
                continue
            await self._delete(record)
            n += 1
        self.stats["collected"] += n
        return n

    async def _delete(self, record: MediaRecord) -> None:
        for key in [record.info["key"], *(t["key"] for t in record.info.get("thumbnails", []))]:
            await self.backend.delete(key)
        await self.store.delete_media(record.id)

    async def run_collector(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Collect orphans every ``media.gc_interval_s`` until cancelled; a failed round is logged."""
        task_status.started()
        while True:
            await trio.sleep(self.cfg.gc_interval_s)
            try:
                await self.collect()
            except ChatError as e:
                log.warning("media collection failed: %s", e)

    async def aclose(self) -> None:
        """Stop the idle workers and close the backend's connections (at shutdown)."""
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await self.processor.aclose()
            await self.backend.aclose()


def msg_key(sender_id: int, client_msg_id: str) -> str:
    return f"{sender_id}:{client_msg_id}"


def _plausible_id(media_id: str) -> bool:
    return 1 <= len(media_id) <= 64 and media_id.isascii() and all(c.isalnum() or c in "-_" for c in media_id)


def _waveform(w) -> list[int] | None:
    """The worker's waveform, if it is one (64 integers 0-255): a worker's answer is not trusted blindly."""
    if isinstance(w, list) and len(w) == WAVEFORM_BUCKETS and all(type(v) is int and 0 <= v <= 255 for v in w):
        return w
    return None


def _digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


__all__ = ["MediaService", "QuotaExceeded", "public", "clean_name", "msg_key", "MAX_ATTACHMENTS"]
