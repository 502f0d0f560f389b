"""Where media bytes live: one small interface, backends chosen by ``media.backend``.

A backend stores immutable objects under keys (``<media id>/<sha256 of the bytes>.<ext>``: the
name proves the content, and a media id never shares an object with another -- no cross-user
de-duplication, which would tell an uploader that somebody else already has the same file).

:class:`FsBackend` (the default, ``chatd run`` needs nothing more): files under
``<data dir>/media/objects/``, written by the caller to a temporary file on the same file system
and renamed into place after an fsync (a crash never leaves a half file under a key), mode 0600.
Reads are chunked (``CHUNK_BYTES``) in a worker thread; nothing holds a whole object in memory.

Error policy: an I/O failure is ``ChatError("unavailable")`` (logged); a missing object is
:class:`MissingObject` (the caller answers 404 and logs it: the store and the backend disagree).
"""

from __future__ import annotations

import abc
import logging
import os
from pathlib import Path
from typing import AsyncIterator

import trio

from ..datadir import private_dir
from ..errors import ChatError

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024


class MissingObject(Exception):
    pass


class Backend(abc.ABC):
    @abc.abstractmethod
    async def put(self, key: str, path: str, size: int, mime: str) -> None:
        """Store the local file ``path`` (``size`` bytes) under ``key``; the file is consumed
        (moved or deleted) by the call."""

    @abc.abstractmethod
    def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """The bytes ``[start, end)`` of the object, in chunks."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the object (no error if it is gone)."""

    async def aclose(self) -> None:
        pass


def _io_error(what: str, e: OSError) -> ChatError:
    log.error("media %s failed: %s", what, e)
    return ChatError("unavailable", "the media store failed; retry")


class FsBackend(Backend):
    def __init__(self, root: Path):
        self.root = root
        private_dir(root)

    def _path(self, key: str) -> Path:
        if ".." in key or key.startswith("/"):
            raise ValueError(f"bad object key {key!r}")
        return self.root / key

    async def put(self, key, path, size, mime):
        target = self._path(key)

        def move():
            private_dir(target.parent)
            os.chmod(path, 0o600)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            os.replace(path, target)
            fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(fd)  # the rename itself survives a crash
            finally:
                os.close(fd)
        try:
            await trio.to_thread.run_sync(move)
        except OSError as e:
            raise _io_error("write", e) from None

    async def read(self, key, start, end):
        path = self._path(key)
        try:
            f = await trio.to_thread.run_sync(open, path, "rb")
        except FileNotFoundError:
            raise MissingObject(key) from None
        except OSError as e:
            raise _io_error("read", e) from None
        try:
            await trio.to_thread.run_sync(f.seek, start)
            left = end - start
            while left > 0:
                chunk = await trio.to_thread.run_sync(f.read, min(CHUNK_BYTES, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk
        finally:
            f.close()

    async def delete(self, key):
        try:
            await trio.to_thread.run_sync(lambda: self._path(key).unlink(missing_ok=True))
        except OSError as e:
            raise _io_error("delete", e) from None


def open_backend(config, data_dir: Path) -> Backend:
    m = config.media
    if m.backend == "fs":
        return FsBackend(data_dir / "media" / "objects")
    if m.backend == "s3":
        from .s3 import S3Backend
        return S3Backend.from_config(m)
    raise ValueError(f"unknown media backend {m.backend!r}")
