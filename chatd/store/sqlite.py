"""SQLite backend: the embedded default store.

Resources: one writer connection and ``read_connections`` reader connections to one database
file in WAL mode. All writes go through one long-lived writer *thread* that drains a queue: it
takes everything queued (up to ``commit_batch_max`` operations) into one transaction - group
commit: what arrives while a commit (its fsync) runs shares the next one. Before it begins a
transaction the writer waits for more operations until ``commit_delay_s`` after the oldest one it
holds was queued (never longer: the bound on what the wait adds to a write's latency), as long as
such waits gather any (see :meth:`SQLiteStore._gather`): at 1,000 sends/s, 2 ms lets ~2.7
appends share a commit instead of ~1.15, which saves ~15 % of a send's server CPU (measured in
benchmarks/README.md). Each operation runs inside its own SAVEPOINT, so one failing
operation (a taken username, a full group) does not fail its batch neighbours; except a message
append, which refuses (``no_such_channel``) before it writes anything and so needs none: should
it fail later (an SQLite error), the whole batch is rolled back and every operation in it
answered ``unavailable``, as when a commit fails. The thread hands each finished batch back to
trio with one ``run_sync_soon`` (no thread hop, task or channel per operation: measured in
benchmarks/README.md). At most ``commit_batch_max * 8`` operations wait at once (callers beyond that wait
their turn). Reads run in trio worker threads on a pooled reader connection. The event loop never
blocks on SQLite.

Error policy: ``sqlite3`` errors become ``ChatError("unavailable")``; when a commit fails every
operation of the batch fails and nothing of it is stored (the sequence stays gap-free, because the
next transaction reads the head seq again). Cancelling a caller does not cancel its queued write:
it may still commit, which is safe because sends are deduplicated by ``client_msg_id``.

Schema: versioned migrations in ``MIGRATIONS`` (``PRAGMA user_version``); opening a database
written by a newer chatd is refused with a clear error.
"""

from __future__ import annotations

import contextlib
import json
import ctypes
import json
import logging
import queue
import random
import sqlite3
import threading
import time
from pathlib import Path

import trio

from ..datadir import private_file
from .. import lifecycle as lc
from ..errors import ChatError
from .base import (AppendResult, Channel, ChannelSummary, Departure, Device, MediaRecord, Message, PushEntry,
                   PushToken, Store, User, push_slot)
from .records import KEY_FIELDS, KINDS, check_kind

log = logging.getLogger(__name__)

MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE users (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            username TEXT NOT NULL UNIQUE COLLATE NOCASE,
            password_hash TEXT NOT NULL,
            display_name TEXT NOT NULL DEFAULT '',
            about TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL)""",
        """CREATE TABLE devices (
            id TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id),
            created_at REAL NOT NULL) WITHOUT ROWID""",
        """CREATE TABLE channels (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('dm', 'group')),
            name TEXT NOT NULL DEFAULT '',
            owner_id INTEGER,
            created_at REAL NOT NULL,
            last_seq INTEGER NOT NULL DEFAULT 0,
            last_at REAL NOT NULL) WITHOUT ROWID""",
        """CREATE TABLE members (
            channel_id TEXT NOT NULL,
            user_id INTEGER NOT NULL,
            joined_at REAL NOT NULL,
            read_seq INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (channel_id, user_id)) WITHOUT ROWID""",
        "CREATE INDEX members_by_user ON members (user_id, channel_id)",
        """CREATE TABLE messages (
            channel_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            sender_id INTEGER NOT NULL,
            client_msg_id TEXT NOT NULL,
            body TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (channel_id, seq)) WITHOUT ROWID""",
        "CREATE UNIQUE INDEX messages_dedup ON messages (channel_id, sender_id, client_msg_id)",
    ]),
    (2, [
        "CREATE TABLE presence (user_id INTEGER PRIMARY KEY, last_active_at REAL NOT NULL)",
    ]),
    (3, [  # push notifications (chatd/push)
        """CREATE TABLE push_tokens (
            token TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL,
            device_id TEXT NOT NULL,
            provider TEXT NOT NULL,
            app_id TEXT NOT NULL,
            created_at REAL NOT NULL) WITHOUT ROWID""",
        "CREATE INDEX push_tokens_by_user ON push_tokens (user_id, device_id)",
        """CREATE TABLE push_outbox (
            slot INTEGER NOT NULL,
            user_id INTEGER NOT NULL,
            channel_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            sender_id INTEGER NOT NULL,
            body TEXT NOT NULL,
            queued_at REAL NOT NULL,
            PRIMARY KEY (slot, user_id, channel_id, seq)) WITHOUT ROWID""",
        """CREATE TABLE push_marks (
            user_id INTEGER NOT NULL,
            channel_id TEXT NOT NULL,
            token TEXT NOT NULL,
            seq INTEGER NOT NULL,
            PRIMARY KEY (user_id, channel_id, token)) WITHOUT ROWID""",
        "CREATE TABLE push_leases (slot INTEGER PRIMARY KEY, owner TEXT NOT NULL, lease_until REAL NOT NULL)",
    ]),
    (4, [  # logout revokes tokens (chatd/revocation.py)
        """CREATE TABLE revoked_tokens (
            token_key TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL,
            device_id TEXT NOT NULL,
            expires_at REAL NOT NULL) WITHOUT ROWID""",
        "CREATE INDEX revoked_tokens_by_expiry ON revoked_tokens (expires_at)",
    ]),
    (5, [  # invites (chatd/auth.py): uses counted per signed invite
        """CREATE TABLE invite_uses (
            invite_id TEXT PRIMARY KEY,
            uses INTEGER NOT NULL,
            expires_at REAL NOT NULL) WITHOUT ROWID""",
    ]),
    (6, [  # sessions (chatd/revocation.py): cut-offs per user ('' device) and per device; the device list
        """CREATE TABLE token_cutoffs (
            user_id INTEGER NOT NULL,
            device_id TEXT NOT NULL,
            revoked_before REAL NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (user_id, device_id)) WITHOUT ROWID""",
        "CREATE INDEX token_cutoffs_by_expiry ON token_cutoffs (expires_at)",
        "ALTER TABLE devices ADD COLUMN last_login_at REAL",  # NULL: not since the upgrade (created_at)
        "ALTER TABLE devices ADD COLUMN listed INTEGER NOT NULL DEFAULT 1",  # 0 once logged out
        "CREATE INDEX devices_by_user ON devices (user_id, id)",
    ]),
    (7, [  # operators (chatd admin): a disabled account cannot log in
        "ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0",
    ]),
    (8, [  # groups (issue 20): the groups a user created lately (limits.groups_created_per_hour);
        # who left a group on their own, and whether its owner invited them back
        "CREATE INDEX IF NOT EXISTS channels_by_owner ON channels (owner_id, created_at)",
        """CREATE TABLE IF NOT EXISTS group_departures (
            channel_id TEXT NOT NULL,
            user_id INTEGER NOT NULL,
            left_at REAL NOT NULL,
            invited_by INTEGER,
            invited_at REAL,
            PRIMARY KEY (channel_id, user_id)) WITHOUT ROWID""",
        "CREATE INDEX IF NOT EXISTS group_departures_by_user ON group_departures (user_id, invited_at)",
    ]),
    (9, [  # the message lifecycle (chatd/lifecycle.py): events in the log, messages kept folded
        "ALTER TABLE messages ADD COLUMN kind TEXT",  # NULL: a message; else the event's kind
        "ALTER TABLE messages ADD COLUMN target_seq INTEGER",  # edit / delete / react / unreact
        "ALTER TABLE messages ADD COLUMN reply_to INTEGER",
        "ALTER TABLE messages ADD COLUMN meta TEXT",  # JSON: a reaction's count, a system event's user
        "ALTER TABLE messages ADD COLUMN edited_at REAL",  # a message's folded state, from here on
        "ALTER TABLE messages ADD COLUMN deleted_by INTEGER",
        "ALTER TABLE messages ADD COLUMN deleted_at REAL",
        "ALTER TABLE messages ADD COLUMN state_seq INTEGER",
        "CREATE INDEX messages_by_target ON messages (channel_id, target_seq) WHERE target_seq IS NOT NULL",
        """CREATE TABLE reactions (
            channel_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            emoji TEXT NOT NULL,
            user_id INTEGER NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (channel_id, seq, emoji, user_id)) WITHOUT ROWID""",
        # receipts: the highest seq one of the member's devices holds (read_seq implies it)
        "ALTER TABLE members ADD COLUMN delivered_seq INTEGER NOT NULL DEFAULT 0",
    ]),
    (10, [  # media (chatd/media): uploads, the messages that reference them, attachments on messages
        """CREATE TABLE IF NOT EXISTS media (
            id TEXT PRIMARY KEY,
            owner_id INTEGER NOT NULL,
            created_at REAL NOT NULL,
            size INTEGER NOT NULL,
            info TEXT NOT NULL,
            referenced INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID""",
        "CREATE INDEX IF NOT EXISTS media_by_owner ON media (owner_id, created_at)",
        "CREATE INDEX IF NOT EXISTS media_orphans ON media (referenced, created_at)",
        """CREATE TABLE IF NOT EXISTS media_refs (
            media_id TEXT NOT NULL,
            channel_id TEXT NOT NULL,
            msg_key TEXT NOT NULL,
            PRIMARY KEY (media_id, channel_id, msg_key)) WITHOUT ROWID""",
        "ALTER TABLE messages ADD COLUMN attachments TEXT NOT NULL DEFAULT ''",
    ]),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

DEFAULT_COMMIT_DELAY_S = 0.002  # store.commit_delay_s: measured in benchmarks/README.md
_WAIT_GAIN_MIN = 0.25  # a commit wait pays when it gathers this many operations on average
_WAIT_GAIN_ALPHA = 0.1  # weight of the last wait in that average
_WAIT_PROBE_EVERY = 16  # while waits do not pay, try one every this many batches

_USER_COLS = "id, username, display_name, about, created_at, password_hash, disabled"
_MSG_COLS = "channel_id, seq, sender_id, client_msg_id, body, created_at"
_ROW_COLS = _MSG_COLS + ", kind, target_seq, reply_to, meta, edited_at, deleted_by, deleted_at, state_seq, attachments"
_TOKEN_COLS = "user_id, device_id, provider, token, app_id, created_at"
_OUTBOX_COLS = "user_id, channel_id, seq, sender_id, body, queued_at"
# a ChannelSummary of each of a user's channels (m: the user's membership, ch: the channel); the
# unread count leaves out lifecycle rows and deleted messages
_SUMMARIES = ("SELECT ch.id, ch.kind, ch.name, ch.last_seq, m.read_seq, ch.last_at, "
              "(SELECT COUNT(*) FROM messages x WHERE x.channel_id = ch.id AND x.seq > m.read_seq "
              "AND x.kind IS NULL AND x.deleted_at IS NULL) "
              "FROM members m JOIN channels ch ON ch.id = m.channel_id ")


def _user(row) -> User:
    return User(id=row[0], username=row[1], display_name=row[2], about=row[3], created_at=row[4],
                password_hash=row[5], disabled=bool(row[6]))


def _msg(row) -> Message:
    """A ``Message`` of a ``_ROW_COLS`` row (or of a ``_MSG_COLS`` one: a plain message)."""
    attachments = (row[14] or "") if len(row) > 14 else ""
    if len(row) == 6 or (row[6] is None and row[8] is None and row[13] is None):
        if attachments:
            return Message(*row[:6], attachments=attachments)
        return Message(*row[:6])  # a plain message, never changed
    return Message(*row[:6], kind=row[6] or "message", target_seq=row[7] or 0, reply_to=row[8] or 0,
                   meta=json.loads(row[9]) if row[9] else None, edited_at=row[10] or 0.0, deleted_by=row[11] or 0,
                   deleted_at=row[12] or 0.0, state_seq=row[13] or 0, attachments=attachments)


def _sent_row(c, channel_id: str, sender_id: int, client_msg_id: str):
    return c.execute(f"SELECT {_ROW_COLS} FROM messages WHERE channel_id = ? AND sender_id = ? "
                     "AND client_msg_id = ?", (channel_id, sender_id, client_msg_id)).fetchone()


def _next_seq(c, channel_id: str, created_at: float, dm_pair) -> int:
    """The channel's next seq (in the write transaction); a 1:1 channel is created with its first row."""
    head = c.execute("SELECT last_seq FROM channels WHERE id = ?", (channel_id,)).fetchone()
    if head is None:
        if dm_pair is None:
            raise ChatError("no_such_channel", f"channel {channel_id} does not exist")
        c.execute("INSERT INTO channels (id, kind, created_at, last_at) VALUES (?, 'dm', ?, ?)",
                  (channel_id, created_at, created_at))
        c.executemany("INSERT OR IGNORE INTO members (channel_id, user_id, joined_at) VALUES (?, ?, ?)",
                      [(channel_id, u, created_at) for u in dm_pair])
        head = (0,)
    return head[0] + 1


def _folded(c, channel_id: str, rows: list[Message]) -> list[Message]:
    """Fill in the reactions of the messages among ``rows`` and the excerpts of their replies."""
    reacted = [m.seq for m in rows if m.state_seq and m.kind == "message" and not m.deleted_at]
    if reacted:
        by_seq: dict[int, dict] = {}
        for seq, emoji, uid in c.execute(
                "SELECT seq, emoji, user_id FROM reactions WHERE channel_id = ? AND seq BETWEEN ? AND ? "
                "ORDER BY seq, at, user_id", (channel_id, reacted[0], reacted[-1])):
            by_seq.setdefault(seq, {}).setdefault(emoji, []).append(uid)
        for m in rows:
            r = by_seq.get(m.seq)
            if r:
                m.reactions = tuple((e, tuple(sorted(us))) for e, us in r.items())
    targets = sorted({m.reply_to for m in rows if m.reply_to})
    if targets:
        marks = ",".join("?" * len(targets))
        found = {r[1]: _msg(r) for r in c.execute(f"SELECT {_ROW_COLS} FROM messages WHERE channel_id = ? "
                                                  f"AND seq IN ({marks})", (channel_id, *targets))}
        for m in rows:
            if m.reply_to in found:
                m.reply = lc.excerpt(found[m.reply_to])
    return rows


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA busy_timeout=30000")  # first: other processes may be opening it too
    # Switching a new file to WAL needs an exclusive lock, and SQLite answers "database is locked"
    # at once (no busy handler) when processes race for it: retry, for as long as busy_timeout.
    deadline = time.monotonic() + 30
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01 + random.random() * 0.05)
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    conn.execute("PRAGMA foreign_keys=ON")
    # a deleted message's bytes are zeroed, not left in free pages (redaction, chatd/lifecycle.py)
    conn.execute("PRAGMA secure_delete=ON")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to ``SCHEMA_VERSION``; return the version found before.

    Safe when several processes open one new database at once (cluster mode on a shared file):
    each step re-reads the version inside its write transaction, so only one applies it."""
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise RuntimeError(f"database schema v{found} is newer than this chatd supports (v{SCHEMA_VERSION}); "
                           "upgrade chatd")
    for version, statements in MIGRATIONS:
        if version <= found:
            continue
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute("PRAGMA user_version").fetchone()[0] >= version:  # another process did it
            conn.execute("COMMIT")
            continue
        try:
            for sql in statements:
                conn.execute(sql)
            conn.execute(f"PRAGMA user_version={version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("sqlite schema migrated to v%d", version)
    return found


class _Op:
    __slots__ = ("fn", "atomic", "done", "callback", "result", "error", "queued_at")

    def __init__(self, fn, atomic: bool = False, callback=None):
        self.fn = fn
        self.queued_at = time.monotonic()
        self.atomic = atomic  # fn raises ChatError only before its first write: no SAVEPOINT needed
        self.callback = callback  # called (result, error) in the trio thread instead of done.set()
        self.done = trio.Event() if callback is None else None
        self.result = None
        self.error: BaseException | None = None


def _name_os_thread(name: str) -> None:
    """Give the calling thread an OS name (``top -H``, /proc/PID/task/TID/comm; Python 3.11 sets
    none), so that its CPU time can be told apart: Linux only, a no-op elsewhere or on failure."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME, this thread
    except (OSError, AttributeError):
        pass


def _caller_error(e: BaseException) -> BaseException:
    """What a write's caller gets for an operation's failure: sqlite3 errors become ``unavailable``."""
    if isinstance(e, sqlite3.Error):
        log.error("sqlite write failed: %s", e)
        err = ChatError("unavailable", "the store failed; retry")
        err.__cause__ = e
        return err
    return e


class _BatchFailed(Exception):
    """An operation without a savepoint failed after it may have written: roll the batch back."""


class SQLiteStore(Store):
    schema_version = SCHEMA_VERSION

    def __init__(self, path: str, synchronous: str = "full", batch_max: int = 512, readers: int = 4,
                 commit_delay_s: float = DEFAULT_COMMIT_DELAY_S):
        self.path = path
        self._synchronous = synchronous
        self._batch_max = batch_max
        self._delay_s = commit_delay_s
        self._wait_gain = 1.0  # moving average of the operations a commit wait gathered
        self._skipped_waits = 0
        self._n_readers = readers
        self._writer: sqlite3.Connection | None = None
        self._readers: list[sqlite3.Connection] = []
        self._reader_sem = trio.Semaphore(readers)
        self._ops: queue.SimpleQueue = queue.SimpleQueue()  # _Op, or None: the writer thread ends
        self._room = trio.Semaphore(batch_max * 8)  # operations queued or being committed
        self._closed = False
        self._redacted = False  # (writer thread) a delete in this batch: truncate the WAL after it
        self.stats = {"commits": 0, "ops": 0, "commit_seconds": 0.0, "failed_commits": 0, "commit_waits": 0}

    # ---- lifecycle -----------------------------------------------------------------------
    async def _open(self) -> None:
        def opener():
            private_file(Path(self.path))  # before SQLite creates it (its -wal/-shm take its mode)
            w = _connect(self.path, self._synchronous)
            migrate(w)
            readers = [_connect(self.path, self._synchronous) for _ in range(self._n_readers)]
            return w, readers
        self._writer, self._readers = await trio.to_thread.run_sync(opener)

    async def _writer_loop(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the writer thread until :meth:`aclose` (or cancellation) and it has drained the queue."""
        token = trio.lowlevel.current_trio_token()
        ended = trio.Event()
        crashed: list[BaseException] = []

        def finished(batch: list[_Op]) -> None:  # in the trio thread
            for op in batch:
                self._room.release()
                if op.callback is None:
                    op.done.set()
                    continue
                try:
                    op.callback(op.result, None if op.error is None else _caller_error(op.error))
                except Exception:  # noqa: BLE001 - a bug in a callback must not end the event loop
                    log.exception("store completion callback failed")

        def thread_main() -> None:
            _name_os_thread("chatd-sqlite-wr")
            try:
                self._drain(lambda batch: token.run_sync_soon(finished, batch))
            except trio.RunFinishedError:
                pass
            except BaseException as e:  # a bug: re-raised in the trio task below
                crashed.append(e)
            finally:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(ended.set)

        thread = threading.Thread(target=thread_main, name="chatd-sqlite-writer", daemon=True)
        thread.start()
        task_status.started()
        try:
            await ended.wait()
            if crashed:
                raise crashed[0]
        finally:
            self._ops.put(None)  # (a second None, after aclose's, is never read)
            if thread.is_alive():
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(thread.join)

    def _drain(self, done) -> None:
        """The writer thread: take everything queued, wait for more (see :meth:`_gather`), one
        transaction, hand the batch back."""
        ops = self._ops
        while True:
            op = ops.get()
            if op is None:
                return
            batch = [op]
            end = self._take_queued(batch)
            if not end and self._delay_s > 0 and len(batch) < self._batch_max:
                end = self._gather(batch)
            self._apply_batch(batch)
            done(batch)
            if end:
                return

    def _take_queued(self, batch: list[_Op]) -> bool:
        """Add what is queued now (up to ``batch_max``) to ``batch``; True if the end was read."""
        ops = self._ops
        while len(batch) < self._batch_max:
            try:
                op = ops.get_nowait()
            except queue.Empty:
                return False
            if op is None:
                return True
            batch.append(op)
        return False

    def _gather(self, batch: list[_Op]) -> bool:
        """Let a group commit form: sleep until ``commit_delay_s`` after the oldest operation of
        ``batch`` was queued (so none waits longer than that for its commit to begin), then take
        what came meanwhile. (Sleeping rather than waking for each arrival: one wake-up per batch,
        not one per operation; the writer thread's CPU per send measured the same within noise,
        and the code is simpler.) Only while waits pay: each
        wait's gain (operations that arrived during it) feeds a moving average; below
        ``_WAIT_GAIN_MIN`` (one client sending after each ack, a quiet store) the writer commits
        at once, and tries a wait again every ``_WAIT_PROBE_EVERY`` batches. True if the end was
        read."""
        if self._wait_gain < _WAIT_GAIN_MIN:
            self._skipped_waits += 1
            if self._skipped_waits < _WAIT_PROBE_EVERY:
                return False
        self._skipped_waits = 0
        left = batch[0].queued_at + self._delay_s - time.monotonic()
        if left <= 0:  # the oldest waited its time while the last batch committed
            return False
        time.sleep(left)
        before = len(batch)
        end = self._take_queued(batch)
        self.stats["commit_waits"] += 1
        self._wait_gain += (len(batch) - before - self._wait_gain) * _WAIT_GAIN_ALPHA
        return end

    def _apply_batch(self, batch: list[_Op]) -> None:
        conn = self._writer
        t0 = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                if op.atomic:
                    try:
                        op.result = op.fn(conn)
                    except ChatError as e:  # refused before writing anything
                        op.error = e
                    except Exception as e:  # might have written half: the whole batch fails
                        raise _BatchFailed(e) from e
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    op.result = op.fn(conn)
                except Exception as e:  # noqa: BLE001 - recorded on the op, re-raised to its caller
                    op.error = e
                    conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
            if self._redacted:  # the erased bodies' old pages must not stay in the WAL either
                self._redacted = False
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except (sqlite3.Error, _BatchFailed) as e:
            log.error("sqlite commit of %d ops failed: %s", len(batch), e)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self.stats["failed_commits"] += 1
            for op in batch:
                op.result, op.error = None, ChatError("unavailable", "the store could not commit; retry")
            return
        self.stats["commits"] += 1
        self.stats["ops"] += len(batch)
        self.stats["commit_seconds"] += time.perf_counter() - t0

    async def _write(self, fn, atomic: bool = False):
        if self._closed:
            raise ChatError("unavailable", "the store is closed")
        op = _Op(fn, atomic)
        try:
            self._room.acquire_nowait()
        except trio.WouldBlock:
            await self._room.acquire()  # (no yield on the common path: keeps callers' order)
        self._ops.put(op)
        await op.done.wait()
        if op.error is not None:
            raise _caller_error(op.error)
        return op.result

    def submit_append(self, channel_id, sender_id, client_msg_id, body, created_at, dm_pair, callback) -> bool:
        """:meth:`append_message` without a task: queued now (in the caller's order) for the
        writer thread's next group commit; ``callback(result, error)`` runs in the trio thread once
        it is committed (or failed). False, queueing nothing, when the store is closed or its
        queue is full: use the async call."""
        if self._closed:
            return False
        try:
            self._room.acquire_nowait()
        except trio.WouldBlock:
            return False
        self._ops.put(_Op(self._append_fn(channel_id, sender_id, client_msg_id, body, created_at, dm_pair),
                          atomic=True, callback=callback))
        return True

    def statistics(self) -> dict[str, float]:
        """``commits``, ``ops`` (writes committed), ``commit_seconds``, ``failed_commits``,
        ``commit_waits`` (commits that waited to batch more writes)."""
        return self.stats

    async def _read(self, fn):
        if self._closed:
            raise ChatError("unavailable", "the store is closed")
        async with self._reader_sem:
            conn = self._readers.pop()
            try:
                return await trio.to_thread.run_sync(fn, conn)
            except sqlite3.Error as e:
                log.error("sqlite read failed: %s", e)
                raise ChatError("unavailable", "the store failed; retry") from e
            finally:
                self._readers.append(conn)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ops.put(None)  # the writer thread commits what is queued before it, then ends

    def _close_connections(self) -> None:
        for c in [self._writer, *self._readers]:
            if c is not None:
                c.close()
        self._writer, self._readers = None, []

    # ---- users and devices ---------------------------------------------------------------
    async def create_user(self, username, password_hash, display_name, created_at):
        def fn(c):
            try:
                cur = c.execute("INSERT INTO users (username, password_hash, display_name, created_at) "
                                "VALUES (?, ?, ?, ?)", (username, password_hash, display_name, created_at))
            except sqlite3.IntegrityError:
                raise ChatError("username_taken", f"username {username!r} is taken") from None
            return User(id=cur.lastrowid, username=username, display_name=display_name, about="",
                        created_at=created_at, password_hash=password_hash)
        return await self._write(fn)

    async def get_user(self, user_id):
        def fn(c):
            row = c.execute(f"SELECT {_USER_COLS} FROM users WHERE id = ?", (user_id,)).fetchone()
            return _user(row) if row else None
        return await self._read(fn)

    async def get_user_by_name(self, username):
        def fn(c):
            row = c.execute(f"SELECT {_USER_COLS} FROM users WHERE username = ?", (username,)).fetchone()
            return _user(row) if row else None
        return await self._read(fn)

    async def get_users(self, user_ids):
        ids = list(dict.fromkeys(user_ids))

        def fn(c):
            rows = _select_in(c, f"SELECT {_USER_COLS} FROM users WHERE id IN ({{}})", ids)
            return {row[0]: _user(row) for row in rows}
        return await self._read(fn) if ids else {}

    async def update_profile(self, user_id, display_name, about):
        def fn(c):
            if display_name is not None:
                c.execute("UPDATE users SET display_name = ? WHERE id = ?", (display_name, user_id))
            if about is not None:
                c.execute("UPDATE users SET about = ? WHERE id = ?", (about, user_id))
            row = c.execute(f"SELECT {_USER_COLS} FROM users WHERE id = ?", (user_id,)).fetchone()
            if row is None:
                raise ChatError("no_such_user", f"user {user_id} does not exist")
            return _user(row)
        return await self._write(fn)

    async def set_password_hash(self, user_id, password_hash):
        def fn(c):
            c.execute("UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, user_id))
        await self._write(fn)

    async def set_user_disabled(self, user_id, disabled):
        def fn(c):
            return c.execute("UPDATE users SET disabled = ? WHERE id = ?", (int(disabled), user_id)).rowcount == 1
        return await self._write(fn)

    async def rename_user(self, user_id, username):
        def fn(c):
            try:
                cur = c.execute("UPDATE users SET username = ? WHERE id = ?", (username, user_id))
            except sqlite3.IntegrityError:
                raise ChatError("username_taken", f"username {username!r} is taken") from None
            if cur.rowcount == 0:
                raise ChatError("no_such_user", f"user {user_id} does not exist")
            return _user(c.execute(f"SELECT {_USER_COLS} FROM users WHERE id = ?", (user_id,)).fetchone())
        return await self._write(fn)

    async def add_device(self, user_id, device_id, created_at):
        def fn(c):
            c.execute("INSERT OR IGNORE INTO devices (id, user_id, created_at) VALUES (?, ?, ?)",
                      (device_id, user_id, created_at))
            c.execute("UPDATE devices SET listed = 1, last_login_at = max(coalesce(last_login_at, created_at), ?) "
                      "WHERE id = ? AND user_id = ?", (created_at, device_id, user_id))
        await self._write(fn)

    async def devices_of(self, user_id):
        def fn(c):
            rows = c.execute("SELECT id, created_at, coalesce(last_login_at, created_at) FROM devices "
                             "WHERE user_id = ? AND listed = 1 ORDER BY id", (user_id,))
            return [Device(*row) for row in rows]
        return await self._read(fn)

    async def device_owner(self, device_id):
        def fn(c):
            row = c.execute("SELECT user_id FROM devices WHERE id = ?", (device_id,)).fetchone()
            return row[0] if row else None
        return await self._read(fn)

    # ---- channels ------------------------------------------------------------------------
    async def create_group(self, channel_id, name, owner_id, member_ids, created_at, max_members):
        members = list(dict.fromkeys([owner_id, *member_ids]))

        def fn(c):
            if len(members) > max_members:
                raise ChatError("group_full", f"a group has at most {max_members} members")
            _require_users(c, members)
            c.execute("INSERT INTO channels (id, kind, name, owner_id, created_at, last_at) "
                      "VALUES (?, 'group', ?, ?, ?, ?)", (channel_id, name, owner_id, created_at, created_at))
            c.executemany("INSERT INTO members (channel_id, user_id, joined_at) VALUES (?, ?, ?)",
                          [(channel_id, u, created_at) for u in members])
            return Channel(channel_id, "group", name, owner_id, created_at, 0)
        return await self._write(fn)

    async def get_channel(self, channel_id):
        def fn(c):
            row = c.execute("SELECT id, kind, name, owner_id, created_at, last_seq FROM channels WHERE id = ?",
                            (channel_id,)).fetchone()
            return Channel(*row) if row else None
        return await self._read(fn)

    async def set_owner(self, channel_id, owner_id):
        def fn(c):
            if c.execute("UPDATE channels SET owner_id = ? WHERE id = ? AND kind = 'group'",
                         (owner_id, channel_id)).rowcount == 0:
                raise ChatError("no_such_channel", f"group {channel_id} does not exist")
        await self._write(fn)

    async def add_member(self, channel_id, user_id, max_members, joined_at):
        def fn(c):
            if c.execute("SELECT 1 FROM channels WHERE id = ?", (channel_id,)).fetchone() is None:
                raise ChatError("no_such_channel", f"channel {channel_id} does not exist")
            _require_users(c, [user_id])
            if c.execute("SELECT 1 FROM members WHERE channel_id = ? AND user_id = ?",
                         (channel_id, user_id)).fetchone():
                return False
            (count,) = c.execute("SELECT COUNT(*) FROM members WHERE channel_id = ?", (channel_id,)).fetchone()
            if count >= max_members:
                raise ChatError("group_full", f"a group has at most {max_members} members")
            c.execute("INSERT INTO members (channel_id, user_id, joined_at) VALUES (?, ?, ?)",
                      (channel_id, user_id, joined_at))
            c.execute("DELETE FROM group_departures WHERE channel_id = ? AND user_id = ?", (channel_id, user_id))
            return True
        return await self._write(fn)

    async def remove_member(self, channel_id, user_id, left_at=None):
        def fn(c):
            cur = c.execute("DELETE FROM members WHERE channel_id = ? AND user_id = ?", (channel_id, user_id))
            if left_at is not None:
                c.execute("INSERT OR REPLACE INTO group_departures (channel_id, user_id, left_at) VALUES (?, ?, ?)",
                          (channel_id, user_id, left_at))
            return cur.rowcount > 0
        return await self._write(fn)

    async def departure(self, channel_id, user_id):
        def fn(c):
            row = c.execute("SELECT left_at, invited_by, invited_at FROM group_departures "
                            "WHERE channel_id = ? AND user_id = ?", (channel_id, user_id)).fetchone()
            return Departure(channel_id, user_id, *row) if row else None
        return await self._read(fn)

    async def invite_back(self, channel_id, user_id, by, at):
        def fn(c):
            return c.execute("UPDATE group_departures SET invited_by = ?, invited_at = ? "
                             "WHERE channel_id = ? AND user_id = ?", (by, at, channel_id, user_id)).rowcount > 0
        return await self._write(fn)

    async def invitations_of(self, user_id, limit):
        def fn(c):
            rows = c.execute("SELECT channel_id, user_id, left_at, invited_by, invited_at FROM group_departures "
                             "WHERE user_id = ? AND invited_at IS NOT NULL ORDER BY invited_at DESC, channel_id "
                             "LIMIT ?", (user_id, limit))
            return [Departure(*r) for r in rows]
        return await self._read(fn)

    async def groups_created_since(self, owner_id, since, limit):
        def fn(c):
            return [r[0] for r in c.execute("SELECT created_at FROM channels WHERE owner_id = ? AND created_at >= ? "
                                            "AND kind = 'group' ORDER BY created_at LIMIT ?", (owner_id, since, limit))]
        return await self._read(fn)

    async def members(self, channel_id):
        def fn(c):
            return [r[0] for r in c.execute("SELECT user_id FROM members WHERE channel_id = ? ORDER BY user_id",
                                            (channel_id,))]
        return await self._read(fn)

    async def channels_of(self, user_id):
        def fn(c):
            rows = c.execute(_SUMMARIES + "WHERE m.user_id = ? ORDER BY ch.last_at DESC, ch.id", (user_id,))
            return [ChannelSummary(*r) for r in rows]
        return await self._read(fn)

    async def channels_page(self, user_id, after, limit):
        def fn(c):
            rows = c.execute(_SUMMARIES + "WHERE m.user_id = ? AND m.channel_id > ? ORDER BY m.channel_id LIMIT ?",
                             (user_id, after or "", limit))
            return [ChannelSummary(*r) for r in rows]
        return await self._read(fn)

    # ---- messages ------------------------------------------------------------------------
    async def append_message(self, channel_id, sender_id, client_msg_id, body, created_at, dm_pair=None,
                             attachments=""):
        fn = self._append_fn(channel_id, sender_id, client_msg_id, body, created_at, dm_pair, attachments)
        return await self._write(fn, atomic=True)  # its only ChatError comes before any write

    @staticmethod
    def _append_fn(channel_id, sender_id, client_msg_id, body, created_at, dm_pair, attachments=""):
        def fn(c):
            row = _sent_row(c, channel_id, sender_id, client_msg_id)
            if row:
                return AppendResult(_msg(row), duplicate=True)
            seq = _next_seq(c, channel_id, created_at, dm_pair)
            c.execute(f"INSERT INTO messages ({_MSG_COLS}, attachments) VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (channel_id, seq, sender_id, client_msg_id, body, created_at, attachments))
            c.execute("UPDATE channels SET last_seq = ?, last_at = ? WHERE id = ?", (seq, created_at, channel_id))
            return AppendResult(Message(channel_id, seq, sender_id, client_msg_id, body, created_at,
                                        attachments=attachments), False)
        return fn

    async def append_event(self, channel_id, sender_id, client_msg_id, spec, created_at, dm_pair=None):
        """One transaction: the row, its seq, and its fold into the target (see the base class)."""
        def fn(c):
            row = _sent_row(c, channel_id, sender_id, client_msg_id)
            if row:
                return AppendResult(_msg(row), duplicate=True)
            seq = _next_seq(c, channel_id, created_at, dm_pair)
            kind, target = spec.kind, spec.target_seq
            meta = None
            if kind in (lc.REACT, lc.UNREACT):
                if kind == lc.REACT:
                    c.execute("INSERT OR IGNORE INTO reactions (channel_id, seq, emoji, user_id, at) "
                              "VALUES (?, ?, ?, ?, ?)", (channel_id, target, spec.body, sender_id, created_at))
                else:
                    c.execute("DELETE FROM reactions WHERE channel_id = ? AND seq = ? AND emoji = ? AND user_id = ?",
                              (channel_id, target, spec.body, sender_id))
                (count,) = c.execute("SELECT COUNT(*) FROM reactions WHERE channel_id = ? AND seq = ? AND emoji = ?",
                                     (channel_id, target, spec.body)).fetchone()
                meta = {"count": count}
            elif kind == lc.RENAMED:
                meta = {"name": spec.body}
            elif kind in lc.SYSTEM:
                meta = {"user_id": spec.user_id}
            body = spec.body if kind in (lc.MESSAGE, lc.EDIT, lc.REACT, lc.UNREACT) else ""  # (a name: in meta)
            c.execute(f"INSERT INTO messages ({_ROW_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, "
                      "NULL, ?)", (channel_id, seq, sender_id, client_msg_id, body, created_at,
                                   None if kind == lc.MESSAGE else kind, target or None, spec.reply_to or None,
                                   json.dumps(meta) if meta else None, spec.attachments))
            c.execute("UPDATE channels SET last_seq = ?, last_at = ? WHERE id = ?", (seq, created_at, channel_id))
            if kind == lc.EDIT:
                c.execute("UPDATE messages SET body = ?, edited_at = ?, state_seq = ? WHERE channel_id = ? AND seq = ? "
                          "AND deleted_at IS NULL", (spec.body, created_at, seq, channel_id, target))
            elif kind == lc.DELETE:
                self._erase(c, channel_id, target, sender_id, created_at, seq)
            elif kind in (lc.REACT, lc.UNREACT):
                c.execute("UPDATE messages SET state_seq = ? WHERE channel_id = ? AND seq = ?", (seq, channel_id, target))
            m = Message(channel_id, seq, sender_id, client_msg_id, body, created_at, kind=kind, target_seq=target,
                        reply_to=spec.reply_to, meta=meta, attachments=spec.attachments)
            return AppendResult(m, False)
        return await self._write(fn)

    def _erase(self, c, channel_id: str, seq: int, by: int, at: float, event_seq: int) -> None:
        """Redaction (writer thread): the body and attachments of message ``seq``, of every edit of it, its
        reactions (and the emoji of its reaction events), its pending pushes. Zeroed on disk
        (``secure_delete``); the WAL is truncated after the commit."""
        c.execute("UPDATE messages SET body = '', attachments = '', edited_at = NULL, deleted_by = ?, deleted_at = ?, "
                  "state_seq = ? WHERE channel_id = ? AND seq = ?", (by, at, event_seq, channel_id, seq))
        c.execute("UPDATE messages SET body = '' WHERE channel_id = ? AND target_seq = ? "
                  "AND kind IN ('edit', 'react', 'unreact')", (channel_id, seq))
        c.execute("DELETE FROM reactions WHERE channel_id = ? AND seq = ?", (channel_id, seq))
        c.execute("DELETE FROM push_outbox WHERE channel_id = ? AND seq = ?", (channel_id, seq))
        self._redacted = True

    async def find_sent(self, channel_id, sender_id, client_msg_id):
        def fn(c):
            row = _sent_row(c, channel_id, sender_id, client_msg_id)
            return _msg(row) if row else None
        return await self._read(fn)

    async def read_messages(self, channel_id, *, after=None, before=None, limit):
        def fn(c):
            if after is not None:
                q = f"SELECT {_ROW_COLS} FROM messages WHERE channel_id = ? AND seq > ?"
                args = [channel_id, after]
                if before is not None:
                    q += " AND seq < ?"
                    args.append(before)
                return _folded(c, channel_id, [_msg(r) for r in c.execute(q + " ORDER BY seq LIMIT ?", (*args, limit))])
            q = f"SELECT {_ROW_COLS} FROM messages WHERE channel_id = ?"
            args = [channel_id]
            if before is not None:
                q += " AND seq < ?"
                args.append(before)
            rows = [_msg(r) for r in c.execute(q + " ORDER BY seq DESC LIMIT ?", (*args, limit))]
            rows.reverse()
            return _folded(c, channel_id, rows)
        return await self._read(fn)

    async def expire_messages(self, channel_id, before):
        def fn(c):
            (upto,) = c.execute("SELECT MAX(seq) FROM messages WHERE channel_id = ? AND created_at < ?",
                                (channel_id, before)).fetchone()
            if upto is None:
                return 0
            return c.execute("DELETE FROM messages WHERE channel_id = ? AND seq <= ?", (channel_id, upto)).rowcount
        return await self._write(fn)

    async def head_seq(self, channel_id):
        def fn(c):
            row = c.execute("SELECT last_seq FROM channels WHERE id = ?", (channel_id,)).fetchone()
            return row[0] if row else 0
        return await self._read(fn)

    async def rename_channel(self, channel_id, name):
        def fn(c):
            c.execute("UPDATE channels SET name = ? WHERE id = ? AND kind = 'group'", (name, channel_id))
        await self._write(fn)

    async def set_delivered(self, channel_id, user_id, seq):
        def fn(c):
            c.execute("UPDATE members SET delivered_seq = MAX(delivered_seq, MIN(?, "
                      "(SELECT last_seq FROM channels WHERE id = ?))) WHERE channel_id = ? AND user_id = ?",
                      (seq, channel_id, channel_id, user_id))
            row = c.execute("SELECT delivered_seq FROM members WHERE channel_id = ? AND user_id = ?",
                            (channel_id, user_id)).fetchone()
            if row is None:
                raise ChatError("not_member", "you are not a member of this channel")
            return row[0]
        return await self._write(fn)

    async def receipts(self, channel_id):
        def fn(c):
            return {u: (max(d, r), r) for u, d, r in c.execute(
                "SELECT user_id, delivered_seq, read_seq FROM members WHERE channel_id = ?", (channel_id,))}
        return await self._read(fn)

    async def set_read(self, channel_id, user_id, seq):
        def fn(c):
            c.execute("UPDATE members SET read_seq = MAX(read_seq, MIN(?, "
                      "(SELECT last_seq FROM channels WHERE id = ?))) WHERE channel_id = ? AND user_id = ?",
                      (seq, channel_id, channel_id, user_id))
            c.execute("UPDATE members SET delivered_seq = MAX(delivered_seq, read_seq) WHERE channel_id = ? "
                      "AND user_id = ?", (channel_id, user_id))
            row = c.execute("SELECT read_seq FROM members WHERE channel_id = ? AND user_id = ?",
                            (channel_id, user_id)).fetchone()
            if row is None:
                raise ChatError("not_member", "you are not a member of this channel")
            return row[0]
        return await self._write(fn)

    # ---- presence ------------------------------------------------------------------------
    async def set_last_active(self, user_id, at):
        def fn(c):
            c.execute("INSERT INTO presence (user_id, last_active_at) VALUES (?, ?) ON CONFLICT (user_id) "
                      "DO UPDATE SET last_active_at = MAX(last_active_at, excluded.last_active_at)", (user_id, at))
        await self._write(fn)

    async def get_last_active(self, user_ids):
        ids = list(dict.fromkeys(user_ids))

        def fn(c):
            return dict(_select_in(c, "SELECT user_id, last_active_at FROM presence WHERE user_id IN ({})", ids))
        return await self._read(fn) if ids else {}

    # ---- push notifications --------------------------------------------------------------
    async def add_push_token(self, token):
        def fn(c):
            c.execute("DELETE FROM push_tokens WHERE user_id = ? AND device_id = ? AND token != ?",
                      (token.user_id, token.device_id, token.token))
            c.execute(f"INSERT OR REPLACE INTO push_tokens ({_TOKEN_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
                      (token.user_id, token.device_id, token.provider, token.token, token.app_id, token.created_at))
        await self._write(fn)

    async def push_token_holder(self, token):
        def fn(c):
            row = c.execute(f"SELECT {_TOKEN_COLS} FROM push_tokens WHERE token = ?", (token,)).fetchone()
            return PushToken(*row) if row else None
        return await self._read(fn)

    async def remove_push_token(self, user_id, token):
        def fn(c):
            cur = c.execute("DELETE FROM push_tokens WHERE token = ? AND user_id = ?", (token, user_id))
            if cur.rowcount:
                c.execute("DELETE FROM push_marks WHERE user_id = ? AND token = ?", (user_id, token))
            return cur.rowcount > 0
        return await self._write(fn)

    async def push_tokens(self, user_id):
        def fn(c):
            rows = c.execute(f"SELECT {_TOKEN_COLS} FROM push_tokens WHERE user_id = ? ORDER BY token", (user_id,))
            return [PushToken(*r) for r in rows]
        return await self._read(fn)

    async def enqueue_pushes(self, entries):
        rows = [(push_slot(e.user_id), e.user_id, e.channel_id, e.seq, e.sender_id, e.body, e.queued_at)
                for e in entries]

        def fn(c):
            c.executemany(f"INSERT OR IGNORE INTO push_outbox (slot, {_OUTBOX_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                          rows)
        if rows:
            await self._write(fn)

    async def pending_pushes(self, slot, limit):
        def fn(c):
            rows = c.execute(f"SELECT {_OUTBOX_COLS} FROM push_outbox WHERE slot = ? "
                             "ORDER BY user_id, channel_id, seq LIMIT ?", (slot, limit))
            return [PushEntry(*r) for r in rows]
        return await self._read(fn)

    async def delete_pushes(self, user_id, channel_id, upto_seq):
        def fn(c):
            c.execute("DELETE FROM push_outbox WHERE slot = ? AND user_id = ? AND channel_id = ? AND seq <= ?",
                      (push_slot(user_id), user_id, channel_id, upto_seq))
        await self._write(fn)

    async def push_marks(self, user_id, channel_id):
        def fn(c):
            return dict(c.execute("SELECT token, seq FROM push_marks WHERE user_id = ? AND channel_id = ?",
                                  (user_id, channel_id)).fetchall())
        return await self._read(fn)

    async def set_push_mark(self, user_id, channel_id, token, seq):
        def fn(c):
            c.execute("INSERT INTO push_marks (user_id, channel_id, token, seq) VALUES (?, ?, ?, ?) "
                      "ON CONFLICT (user_id, channel_id, token) DO UPDATE SET seq = MAX(seq, excluded.seq)",
                      (user_id, channel_id, token, seq))
        await self._write(fn)

    async def claim_push_slots(self, owner, slots, lease_s, now):
        def fn(c):
            held = []
            for slot in slots:
                c.execute("INSERT OR IGNORE INTO push_leases (slot, owner, lease_until) VALUES (?, ?, ?)",
                          (slot, owner, now + lease_s))
                c.execute("UPDATE push_leases SET owner = ?, lease_until = ? WHERE slot = ? "
                          "AND (owner = ? OR lease_until < ?)", (owner, now + lease_s, slot, owner, now))
                if c.execute("SELECT owner FROM push_leases WHERE slot = ?", (slot,)).fetchone()[0] == owner:
                    held.append(slot)
            return held
        return await self._write(fn) if slots else []

    async def release_push_slots(self, owner, slots):
        def fn(c):
            c.executemany("UPDATE push_leases SET lease_until = 0 WHERE slot = ? AND owner = ?",
                          [(s, owner) for s in slots])
        if slots:
            await self._write(fn)

    # ---- token revocation ----------------------------------------------------------------
    async def revoke_token(self, token_key, user_id, device_id, expires_at):
        def fn(c):
            c.execute("DELETE FROM revoked_tokens WHERE expires_at < ?", (time.time(),))  # expired anyway
            c.execute("INSERT OR IGNORE INTO revoked_tokens (token_key, user_id, device_id, expires_at) "
                      "VALUES (?, ?, ?, ?)", (token_key, user_id, device_id, expires_at))
        await self._write(fn)

    async def token_revoked(self, token_key, user_id=None, device_id="", issued_at=0.0):
        def fn(c):
            if user_id is None:
                return c.execute("SELECT 1 FROM revoked_tokens WHERE token_key = ?", (token_key,)).fetchone() is not None
            return bool(c.execute(
                "SELECT EXISTS (SELECT 1 FROM revoked_tokens WHERE token_key = ?) OR EXISTS (SELECT 1 FROM "
                "token_cutoffs WHERE user_id = ? AND device_id IN ('', ?) AND revoked_before > ?)",
                (token_key, user_id, device_id, issued_at)).fetchone()[0])
        return await self._read(fn)

    async def revoke_before(self, user_id, device_id, before, expires_at):
        def fn(c):
            c.execute("DELETE FROM token_cutoffs WHERE expires_at < ?", (time.time(),))  # revokes nothing now
            c.execute("INSERT INTO token_cutoffs (user_id, device_id, revoked_before, expires_at) VALUES (?, ?, ?, ?) "
                      "ON CONFLICT (user_id, device_id) DO UPDATE SET "
                      "revoked_before = max(revoked_before, excluded.revoked_before), "
                      "expires_at = max(expires_at, excluded.expires_at)", (user_id, device_id or "", before, expires_at))
            if device_id is None:
                c.execute("UPDATE devices SET listed = 0 WHERE user_id = ?", (user_id,))
            else:
                c.execute("UPDATE devices SET listed = 0 WHERE id = ? AND user_id = ?", (device_id, user_id))
        await self._write(fn)


    # ---- invites ---------------------------------------------------------------------------
    async def use_invite(self, invite_id, max_uses, expires_at):
        def fn(c):
            c.execute("DELETE FROM invite_uses WHERE expires_at < ?", (time.time(),))  # refused anyway
            c.execute("INSERT OR IGNORE INTO invite_uses (invite_id, uses, expires_at) VALUES (?, 0, ?)",
                      (invite_id, expires_at))
            return c.execute("UPDATE invite_uses SET uses = uses + 1 WHERE invite_id = ? AND uses < ?",
                             (invite_id, max_uses)).rowcount == 1
        return await self._write(fn)

    # ---- media ---------------------------------------------------------------------------
    async def add_media(self, record):
        def fn(c):
            c.execute("INSERT INTO media (id, owner_id, created_at, size, info) VALUES (?, ?, ?, ?, ?)",
                      (record.id, record.owner_id, record.created_at, record.size, json.dumps(record.info)))
        await self._write(fn)

    async def get_media(self, media_ids):
        def fn(c):
            rows = _select_in(c, "SELECT id, owner_id, created_at, size, info FROM media WHERE id IN ({})",
                              list(dict.fromkeys(media_ids)))
            return {r[0]: MediaRecord(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows}
        return await self._read(fn)

    async def media_usage(self, owner_id, since):
        def fn(c):
            n, size = c.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM media WHERE owner_id = ? "
                                "AND created_at > ?", (owner_id, since)).fetchone()
            return n, size
        return await self._read(fn)

    async def add_media_refs(self, media_ids, channel_id, msg_key):
        def fn(c):
            c.executemany("INSERT OR IGNORE INTO media_refs (media_id, channel_id, msg_key) VALUES (?, ?, ?)",
                          [(m, channel_id, msg_key) for m in media_ids])
            c.executemany("UPDATE media SET referenced = 1 WHERE id = ?", [(m,) for m in media_ids])
        await self._write(fn)

    async def media_channels(self, media_id):
        def fn(c):
            return [r[0] for r in c.execute("SELECT DISTINCT channel_id FROM media_refs WHERE media_id = ?",
                                            (media_id,))]
        return await self._read(fn)

    async def remove_media_refs(self, media_ids, channel_id, msg_key):
        def fn(c):
            c.executemany("DELETE FROM media_refs WHERE media_id = ? AND channel_id = ? AND msg_key = ?",
                          [(m, channel_id, msg_key) for m in media_ids])
            return [m for m in media_ids
                    if c.execute("SELECT 1 FROM media_refs WHERE media_id = ? LIMIT 1", (m,)).fetchone() is None]
        return await self._write(fn)

    async def orphan_media(self, before, limit):
        def fn(c):
            rows = c.execute("SELECT id, owner_id, created_at, size, info FROM media WHERE referenced = 0 "
                             "AND created_at < ? ORDER BY created_at LIMIT ?", (before, limit))
            return [MediaRecord(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]
        return await self._read(fn)

    async def delete_media(self, media_id):
        def fn(c):
            c.execute("DELETE FROM media WHERE id = ?", (media_id,))
        await self._write(fn)

    # ---- bulk (chatd store copy) -----------------------------------------------------------
    async def export_rows(self, kind, after, limit):
        table, select, _ = _bulk_spec(kind)
        keys = ", ".join(KINDS[kind][:KEY_FIELDS[kind]])

        def fn(c):
            if after is None:
                sql, args = f"SELECT {select} FROM {table} ORDER BY {keys} LIMIT ?", (limit,)
            else:
                marks = ", ".join("?" * len(after))
                sql = f"SELECT {select} FROM {table} WHERE ({keys}) > ({marks}) ORDER BY {keys} LIMIT ?"
                args = (*after, limit)
            return [tuple(r) for r in c.execute(sql, args)]
        rows = await self._read(fn)
        n = KEY_FIELDS[kind]
        return rows, (list(rows[-1][:n]) if len(rows) == limit else None)

    async def import_rows(self, kind, rows):
        table, _, columns = _bulk_spec(kind)
        if kind == "push_outbox":  # the slot is derived from the user
            rows = [(push_slot(r[0]), *r) for r in rows]
        sql = f"INSERT OR REPLACE INTO {table} ({columns}) VALUES ({', '.join('?' * len(columns.split(',')))})"

        def fn(c):
            c.executemany(sql, rows)
        if rows:
            await self._write(fn)

    async def count_rows(self, kind):
        table = _bulk_spec(kind)[0]
        return await self._read(lambda c: c.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


# kind -> (table, the SELECT list giving the record's fields, the columns an import writes)
_BULK_TABLES: dict[str, tuple[str, str, str]] = {
    "devices": ("devices", "id, user_id, created_at, "
                "CASE WHEN listed THEN coalesce(last_login_at, created_at) ELSE created_at END, listed",
                "id, user_id, created_at, last_login_at, listed"),
    "members": ("members", "channel_id, user_id, joined_at, read_seq, MAX(delivered_seq, read_seq)",
                "channel_id, user_id, joined_at, read_seq, delivered_seq"),
    "push_outbox": ("push_outbox", _OUTBOX_COLS, "slot, " + _OUTBOX_COLS),
}


def _bulk_spec(kind: str) -> tuple[str, str, str]:
    """Where a record kind lives in SQLite: by default a table of the kind's name whose columns are
    the record's fields."""
    fields = ", ".join(check_kind(kind))
    return _BULK_TABLES.get(kind, (kind, fields, fields))


def _select_in(c, sql: str, values: list, chunk: int = 500):
    """Rows of ``sql`` (with one ``{}`` for the placeholders of an IN list) over all ``values``,
    in chunks below SQLite's bound-parameter limit."""
    for i in range(0, len(values), chunk):
        part = values[i:i + chunk]
        yield from c.execute(sql.format(",".join("?" * len(part))), part)


def _require_users(c, user_ids) -> None:
    for u in user_ids:
        if c.execute("SELECT 1 FROM users WHERE id = ?", (u,)).fetchone() is None:
            raise ChatError("no_such_user", f"user {u} does not exist")


@contextlib.asynccontextmanager
async def open_sqlite(path: str, synchronous: str = "full", batch_max: int = 512, readers: int = 4,
                      commit_delay_s: float = DEFAULT_COMMIT_DELAY_S):
    """Open (creating and migrating) the database; yield the store; on exit finish queued writes
    and close every connection."""
    store = SQLiteStore(path, synchronous, batch_max, readers, commit_delay_s)
    await store._open()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store._writer_loop)
            try:
                yield store
            finally:
                await store.aclose()  # the writer thread drains the queue, then ends
    finally:
        store._close_connections()
