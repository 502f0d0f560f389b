"""``chatd store copy``: every record of one store into another (SQLite <-> Cassandra, keyspace ->
keyspace), resumable, and ``verify``: do two stores hold the same records?

The copy walks ``records.KINDS`` in order, page by page (``Store.export_rows`` of the source,
``import_rows`` of the destination: ids, seqs, ``client_msg_id`` and times kept, so every device's
cursors stay valid). After each page is written the checkpoint file records the kind and the source
position after it (written to a temporary file and renamed: a crash leaves the old or the new one,
never half of one). A copy started again with the same checkpoint resumes after the last page
recorded; a page written but not yet recorded is written again, which changes nothing (imports are
upserts). The source must not be written during the copy (stop every chatd using it): a position
is only stable while the store is not written.

``verify`` compares, kind by kind, the count and an order-independent digest of the records of both
stores (``records.Digest``), channel by channel the digest of the whole history read through the
ordinary ``read_messages`` path, which is what a client's sync reads, and user by user the
invitations back into groups (``invitations_of``, what ``GET /v1/invitations`` reads: in Cassandra
through its by-user index) of every user the source's ``group_departures`` invite. (Media
*objects* are not store records: ``chatd store copy`` copies and checks them beside this module,
chatd/media/copy.py, when the two configs keep them in different places.)

Resources: both stores are opened by the caller; this module holds one page of rows at a time.
Errors: a store failure (``ChatError``) ends the copy with the checkpoint at the last page written;
:class:`CopyError` is an operator's mistake (a checkpoint of another copy, a destination not empty).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .base import Store
from .records import KINDS, Digest, add_messages, comparable

DEFAULT_PAGE_ROWS = 500
HISTORY_PAGE = 500  # messages per read_messages call while verifying
INVITATIONS_LIMIT = 100_000  # invitations_of while verifying: all of a user's


class CopyError(RuntimeError):
    """A copy that must not start (the message says why and what to do)."""


@dataclass
class Checkpoint:
    """Where a copy is: kinds finished, the kind under way and the source position after the last
    page written, rows written per kind. Saved as JSON at ``path``."""
    path: Path
    source: str
    destination: str
    done: list[str] = field(default_factory=list)
    kind: str | None = None
    position: object = None
    rows: dict[str, int] = field(default_factory=dict)
    complete: bool = False

    @classmethod
    def load_or_new(cls, path: Path, source: str, destination: str) -> tuple["Checkpoint", bool]:
        """The checkpoint of this copy at ``path`` (True: resumed), or a fresh one (False).
        ``CopyError`` if the file belongs to a copy between other stores, or is unreadable."""
        if not path.exists():
            return cls(path, source, destination), False
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CopyError(f"checkpoint {path} is unreadable ({e}); delete it to start the copy again") from None
        if (data.get("source"), data.get("destination")) != (source, destination):
            raise CopyError(f"checkpoint {path} is of a copy from {data.get('source')} to {data.get('destination')}, "
                            f"not from {source} to {destination}: pass another --checkpoint, or delete it")
        return cls(path, source, destination, list(data.get("done", [])), data.get("kind"), data.get("position"),
                   dict(data.get("rows", {})), bool(data.get("complete"))), True

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"source": self.source, "destination": self.destination, "done": self.done,
                                   "kind": self.kind, "position": self.position, "rows": self.rows,
                                   "complete": self.complete}))
        os.replace(tmp, self.path)


class Throttle:
    """At most ``rows_per_s`` rows per second on average since the start (0: no limit)."""

    def __init__(self, rows_per_s: float):
        self.rate = rows_per_s
        self.start = time.monotonic()
        self.rows = 0

    async def took(self, n: int) -> None:
        self.rows += n
        if self.rate > 0:
            ahead = self.start + self.rows / self.rate - time.monotonic()
            if ahead > 0:
                await trio.sleep(ahead)


async def destination_is_empty(dest: Store) -> bool:
    for kind in ("users", "channels", "messages"):
        rows, _ = await dest.export_rows(kind, None, 1)
        if rows:
            return False
    return True


async def copy_store(source: Store, dest: Store, checkpoint: Checkpoint, *, page_rows: int = DEFAULT_PAGE_ROWS,
                     rows_per_s: float = 0.0, progress=None) -> dict[str, int]:
    """Copy every kind not yet done by ``checkpoint``; return the rows written per kind (this run
    and the runs before it). ``progress(kind, rows_of_kind, total_or_None)`` after each page."""
    throttle = Throttle(rows_per_s)
    for kind in KINDS:
        if kind in checkpoint.done:
            continue
        if checkpoint.kind != kind:
            checkpoint.kind, checkpoint.position = kind, None
            checkpoint.rows[kind] = 0
        total = await source.count_rows(kind)
        if progress:
            progress(kind, checkpoint.rows[kind], total)
        while True:
            rows, after = await source.export_rows(kind, checkpoint.position, page_rows)
            await dest.import_rows(kind, rows)
            checkpoint.position = after
            checkpoint.rows[kind] += len(rows)
            if after is None:
                checkpoint.done.append(kind)
                checkpoint.kind = None
            checkpoint.save()
            if progress:
                progress(kind, checkpoint.rows[kind], total)
            await throttle.took(len(rows))
            if after is None:
                break
    checkpoint.complete = True
    checkpoint.save()
    return dict(checkpoint.rows)


async def _kind_digest(store: Store, kind: str, page_rows: int) -> Digest:
    digest = Digest()
    after = None
    while True:
        rows, after = await store.export_rows(kind, after, page_rows)
        for row in rows:
            digest.add(comparable(kind, row))
        if after is None:
            return digest


async def _history_digest(store: Store, channel_id: str) -> tuple[int, str]:
    h = hashlib.sha256()
    n, after = 0, 0
    while True:
        page = await store.read_messages(channel_id, after=after, limit=HISTORY_PAGE)
        add_messages(h, page)
        n += len(page)
        if len(page) < HISTORY_PAGE:
            return n, h.hexdigest()
        after = page[-1].seq


@dataclass
class VerifyReport:
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind -> (source, destination)
    problems: list[str] = field(default_factory=list)
    channels: int = 0
    messages: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


async def verify_stores(source: Store, dest: Store, *, page_rows: int = DEFAULT_PAGE_ROWS,
                        progress=None) -> VerifyReport:
    """Compare every kind (count + digest; messages per channel, through ``read_messages``)."""
    report = VerifyReport()
    for kind in KINDS:
        if kind == "messages":
            continue  # compared channel by channel below
        a, b = await _kind_digest(source, kind, page_rows), await _kind_digest(dest, kind, page_rows)
        report.counts[kind] = (a.count, b.count)
        if a.count != b.count:
            report.problems.append(f"{kind}: {a.count} in the source, {b.count} in the destination")
        elif a.hexdigest() != b.hexdigest():
            report.problems.append(f"{kind}: {a.count} in both, but their contents differ")
        if progress:
            progress(kind, a.count, a.count)
    after, dest_messages = None, 0
    total = (report.counts.get("channels") or (0, 0))[0]
    while True:
        channels, after = await source.export_rows("channels", after, page_rows)
        for ch in channels:
            channel_id = ch[0]
            (na, da), (nb, db) = await _history_digest(source, channel_id), await _history_digest(dest, channel_id)
            report.channels += 1
            report.messages += na
            dest_messages += nb
            if (na, da) != (nb, db):
                report.problems.append(f"channel {channel_id}: {na} messages in the source, {nb} in the destination"
                                       + (", their contents differ" if na == nb else ""))
            if progress:
                progress("messages", report.channels, total)
        if after is None:
            break
    report.counts["messages"] = (report.messages, dest_messages)
    await _verify_invitations(source, dest, page_rows, report)
    return report


async def _verify_invitations(source: Store, dest: Store, page_rows: int, report: VerifyReport) -> None:
    invited: set[int] = set()  # users compared already (a user's departures may span pages)
    after = None
    while True:
        rows, after = await source.export_rows("group_departures", after, page_rows)
        for user_id in dict.fromkeys(r[1] for r in rows if r[4] is not None):
            if user_id in invited:
                continue
            invited.add(user_id)
            a, b = (await source.invitations_of(user_id, INVITATIONS_LIMIT),
                    await dest.invitations_of(user_id, INVITATIONS_LIMIT))
            if a != b:
                report.problems.append(f"user {user_id}: {len(a)} invitations back in the source, {len(b)} "
                                       "in the destination" + (", they differ" if len(a) == len(b) else ""))
        if after is None:
            return
