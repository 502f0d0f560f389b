"""The media objects of ``chatd store copy``: when the two configs keep media in different places
(``fs`` under another data dir, ``fs`` <-> ``s3``, another bucket), every object a media record
names (its served file and its thumbnails) is copied from the source's backend to the
destination's, by key, streamed (``Backend.read`` in chunks into a temporary file, then
``Backend.put``), its SHA-256 checked against the record on the way.

Resumable without a checkpoint: objects are immutable and named by their content, so an object the
destination already holds is skipped (one read of its first byte) and a copy started again only
copies what is missing. Walks the *source store's* media records page by page, so it needs no
listing of either backend.

Resources: one temporary file at a time, under ``tmp_dir`` (removed after each object); both
backends are opened and closed by the caller. Errors: a backend failure (``ChatError``) ends the
copy (run it again to go on); an object the source lacks, or whose bytes do not match its
record's SHA-256, is not copied and is listed in the result (the copy goes on with the others).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .backend import Backend, MissingObject
from ..datadir import private_dir

PLAIN = "application/octet-stream"


@dataclass
class ObjectCopy:
    copied: int = 0
    present: int = 0  # already in the destination (an earlier run, or the same bytes put twice)
    bytes: int = 0
    problems: list[str] = field(default_factory=list)


def describe_media(config) -> str:
    """Where a config keeps media objects (two configs with the same place need no object copy)."""
    m = config.media
    if m.backend == "fs":
        return f"fs:{(config.data_path / 'media' / 'objects').resolve()}"
    return f"{m.backend}:{m.s3_endpoint}/{m.s3_bucket}"


def objects_of(media_id: str, info: dict, size: int) -> list[tuple[str, int, str | None, str]]:
    """(key, size, sha256, mime) of every object a media record names."""
    out = []
    if info.get("key"):
        mime = (info.get("mime") or PLAIN) if info.get("kind") != "file" else PLAIN
        out.append((info["key"], size, info.get("sha256"), mime))
    for t in info.get("thumbnails") or ():
        if t.get("key"):
            out.append((t["key"], t.get("size") or 0, t.get("sha256"), t.get("mime") or PLAIN))
    return out


async def _has(backend: Backend, key: str, size: int) -> bool:
    try:
        async for _ in backend.read(key, 0, min(1, size)):
            break
        return True
    except MissingObject:
        return False


async def copy_objects(source_store, src: Backend, dst: Backend, tmp_dir: Path, *, page_rows: int = 500,
                       progress=None) -> ObjectCopy:
    """Copy the objects of every media record of ``source_store`` from ``src`` to ``dst``."""
    result = ObjectCopy()
    private_dir(tmp_dir)
    after = None
    while True:
        rows, after = await source_store.export_rows("media", after, page_rows)
        for media_id, _, _, size, info, _ in rows:
            for key, n, sha256, mime in objects_of(media_id, json.loads(info), size):
                if await _has(dst, key, n):
                    result.present += 1
                    continue
                await _copy_one(src, dst, tmp_dir, key, n, sha256, mime, result)
            if progress:
                progress("media objects", result.copied + result.present, None)
        if after is None:
            return result


async def missing_objects(source_store, dst: Backend, *, page_rows: int = 500) -> list[str]:
    """The keys of objects ``source_store``'s media records name that ``dst`` lacks (verify)."""
    out = []
    after = None
    while True:
        rows, after = await source_store.export_rows("media", after, page_rows)
        for media_id, _, _, size, info, _ in rows:
            out += [key for key, n, _, _ in objects_of(media_id, json.loads(info), size) if not await _has(dst, key, n)]
        if after is None:
            return out


async def _copy_one(src: Backend, dst: Backend, tmp_dir: Path, key: str, size: int, sha256: str | None, mime: str,
                    result: ObjectCopy) -> None:
    fd, path = tempfile.mkstemp(dir=tmp_dir, prefix="copy-")
    f = os.fdopen(fd, "wb")
    try:
        h, n = hashlib.sha256(), 0
        try:
            async for chunk in src.read(key, 0, size):
                h.update(chunk)
                n += len(chunk)
                await trio.to_thread.run_sync(f.write, chunk)
        except MissingObject:
            result.problems.append(f"object {key}: missing in the source (its record names it): not copied")
            return
        finally:
            f.close()
        if n != size or (sha256 and h.hexdigest() != sha256):
            result.problems.append(f"object {key}: {n} bytes with SHA-256 {h.hexdigest()[:16]}… in the source, "
                                   f"its record says {size} bytes{f', {sha256[:16]}…' if sha256 else ''}: not copied")
            return
        await dst.put(key, path, size, mime)  # consumes the file
        result.copied += 1
        result.bytes += size
    finally:
        if os.path.exists(path):
            os.unlink(path)
