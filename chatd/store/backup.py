"""``chatd store backup`` / ``restore`` of the SQLite store (blocking functions: the CLI runs them
directly, no event loop involved).

Backup uses SQLite's online backup API in one step (``Connection.backup(pages=-1)``): it reads the
whole database inside one read transaction, so the copy is the database as of one commit, while the
running chatd keeps writing (WAL mode: readers do not block the writer, nor it them). Every message
acked before the backup began is in it (an ack follows its commit), and each channel's seqs are
gap-free, because a commit holds whole messages. It is written to ``FILE.partial`` and renamed when
complete and checked (``PRAGMA quick_check``), so ``FILE`` is never half a backup.

Restore refuses to touch a store that a process has open: SQLite in WAL mode keeps a shared lock on
byte 128 of the ``-shm`` file (the "dead man switch" of its WAL index) for as long as a connection
is open; restore tries an exclusive lock there and refuses when it cannot get it. An existing store
is only replaced with ``force``, and it is first kept beside itself as ``PATH.before-restore-<time>``.
The backup's schema must not be newer than this chatd's; an older one is migrated when chatd opens it.

Errors: :class:`BackupError` (one line, what to do).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from pathlib import Path

from ..datadir import private_file

WAL_DMS_BYTE = 128  # SQLite's WAL-index dead-man-switch lock (os_unix.c: UNIX_SHM_DMS)


class BackupError(RuntimeError):
    pass


def _summary(conn: sqlite3.Connection) -> dict:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    count = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
             for t in ("users", "channels", "messages") if t in tables}
    return {"schema": version, **count}


def in_use(path: Path) -> bool:
    """Whether some process has the SQLite database at ``path`` open (WAL mode; see above)."""
    shm = Path(str(path) + "-shm")
    try:
        fd = os.open(shm, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, WAL_DMS_BYTE)
        except OSError:
            return True
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, WAL_DMS_BYTE)
        return False
    finally:
        os.close(fd)


def backup(db_path: Path, out: Path, *, force: bool = False) -> dict:
    """Copy the live database at ``db_path`` into ``out``; return its summary (schema, counts, bytes)."""
    if not db_path.exists():
        raise BackupError(f"no SQLite store at {db_path} (check data_dir / store.sqlite_path)")
    if out.exists() and not force:
        raise BackupError(f"{out} exists; choose another file or pass --force to replace it")
    if out.resolve() == db_path.resolve():
        raise BackupError("the backup file is the store itself")
    partial = out.with_name(out.name + ".partial")
    partial.unlink(missing_ok=True)
    private_file(partial)
    src = sqlite3.connect(db_path, timeout=30)  # (read-only would not open a WAL database without its -shm)
    try:
        src.execute("PRAGMA busy_timeout=30000")
        dst = sqlite3.connect(partial)
        try:
            src.backup(dst, pages=-1)  # one step: one read transaction, one consistent state
            check = dst.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise BackupError(f"the backup failed its check ({check}); {db_path} may be damaged")
            summary = _summary(dst)
            dst.execute("PRAGMA journal_mode=DELETE")  # the backup is one self-contained file
        finally:
            dst.close()
    except sqlite3.Error as e:
        partial.unlink(missing_ok=True)
        raise BackupError(f"backup of {db_path} failed: {e}") from None
    finally:
        src.close()
    os.replace(partial, out)
    summary["bytes"] = out.stat().st_size
    return summary


def restore(backup_file: Path, db_path: Path, *, force: bool = False) -> dict:
    """Make ``db_path`` a copy of ``backup_file``; return the backup's summary and where the old
    store was kept (``kept``: None if there was none)."""
    from .sqlite import SCHEMA_VERSION
    if not backup_file.exists():
        raise BackupError(f"no backup file {backup_file}")
    try:
        src = sqlite3.connect(backup_file)
        try:
            if src.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise BackupError(f"{backup_file} is damaged (PRAGMA quick_check failed)")
            summary = _summary(src)
        finally:
            src.close()
    except sqlite3.DatabaseError as e:
        raise BackupError(f"{backup_file} is not an SQLite database ({e})") from None
    if "messages" not in summary:
        raise BackupError(f"{backup_file} is not a chatd store (no messages table)")
    if summary["schema"] > SCHEMA_VERSION:
        raise BackupError(f"{backup_file} has schema v{summary['schema']}, newer than this chatd "
                          f"(v{SCHEMA_VERSION}); upgrade chatd")
    if in_use(db_path):
        raise BackupError(f"{db_path} is in use by a running process: stop chatd first")
    kept = None
    if db_path.exists():
        if not force:
            raise BackupError(f"{db_path} exists; pass --force to replace it (it is kept beside itself)")
        kept = db_path.with_name(f"{db_path.name}.before-restore-{time.strftime('%Y%m%dT%H%M%S')}")
        backup(db_path, kept)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    private_file(db_path)
    try:
        src = sqlite3.connect(backup_file)
        dst = sqlite3.connect(db_path, timeout=30)
        try:
            src.backup(dst, pages=-1)
            dst.execute("PRAGMA journal_mode=WAL")
        finally:
            dst.close()
            src.close()
    except sqlite3.Error as e:
        raise BackupError(f"restore into {db_path} failed: {e}" + (f"; the old store is in {kept}" if kept else "")) \
            from None
    summary["kept"] = str(kept) if kept else None
    return summary
