"""Cassandra backend: the cluster's store (schema in ``cassandra_schema.py``, driver bridge in ``cql.py``).

Resources: one driver ``Cluster``/``Session`` (connected in a worker thread at open), every statement
prepared once; requests run concurrently through the trio bridge, at most ``max_inflight`` at a time.
:meth:`CassandraStore.aclose` refuses new calls, waits for running ones, then shuts the driver down.

Errors: driver failures become ``ChatError("unavailable")`` (``cql.py``); domain conflicts get the same
codes as SQLite. A timed-out conditional write has an unknown outcome; every multi-step write below is
ordered so that retrying the whole call is safe.

Consistency: reads and writes at ``LOCAL_QUORUM`` (read quorum + write quorum > replicas: a read sees
every acked write in the DC), lightweight transactions (LWT, Paxos) at ``LOCAL_SERIAL``.

Sequencing (:meth:`append_message`) - why two owners can never both store seq N, and why a crash can
create neither a duplicate nor a gap:

* ``messages`` rows are only ever written by one single-partition conditional batch that also moves
  the partition's static ``bucket_head`` from the head the writer saw (``IF bucket_head = n``, null
  for a bucket's first batch) to the last seq it writes; rows are never changed or deleted. Two
  writers that saw the same head cannot both apply, and rows and head move together: the stored
  seqs are always exactly 1..H, each held by one message, whoever races for them.
* A channel's sends queue in arrival order; one caller at a time (the leader) takes all queued ones
  (up to ``MAX_BATCH``, one per dedup key, never across a bucket) into one batch. A caller whose
  message is stored writes its ``message_dedup`` row itself, after the batch.
* ``channel_heads`` (the head hint) is written only once every message up to it has its dedup row
  (``USING TIMESTAMP`` = seq, so a late write cannot lower it): it is the *indexed mark*. Above it
  can be (1) messages this process stored whose row is not written yet - kept in ``_unindexed``,
  checked by the leader before every batch and re-written if their write failed; (2) messages of a
  writer that died before indexing - whoever loads the channel (``_catch_up``) reads and indexes
  everything above the hint before appending; (3) messages another owner writes right now - our
  next batch fails its condition, and we read, index and match what it wrote before retrying.
  So a resend always finds its original: in memory, in ``message_dedup``, or among the rows read
  after a failed condition, and is answered ``duplicate`` with the original message.
* A timed-out batch may have applied: the resend's batch then fails its condition and finds it (3).
* A dedup row left by schema v2 can name a seq that holds another message (an intent): a hit counts
  only if the row at that seq is this message.

Cost of one new message with the channel loaded: 1 read (dedup lookup, in parallel for the batch),
a share of one conditional batch (one Paxos round per batch), 1 write (its dedup row) and a share of
the head-hint write; only the read and the batch are on the channel's critical path. A resend costs
2 reads. A bucket moved by another owner adds one read per bucket scanned, the rows it wrote and
their dedup writes.

Membership: ``members_by_channel`` is authoritative; a change is a conditional batch on its partition
that bumps the static ``member_version`` (so the member cap holds under concurrent adds), then the
``channels_by_user``/``read_cursors`` rows are written or deleted. A crash between the two leaves those
by-user rows stale; repeating the add (or the remove) repairs them. Read cursors only rise
(``IF read_seq < ?``).

Where this differs from SQLite: writes of one call are not one transaction, so after a crash (and
before the repair above) ``channels_of`` can list a channel the user has left or miss one just joined,
and ``channels_of``/``get_channel`` take ``last_seq`` from the ``channel_heads`` hint, which lags the
true head only if a writer died between its insert and its head write, until the channel's next
append or :meth:`head_seq`. ``head_seq``, ``read_messages`` and ``set_read`` always use the true head.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import zlib
import math
import time
from collections import OrderedDict, deque

import trio
from cassandra.query import UNSET_VALUE

from .. import lifecycle as lc
from ..config import CassandraConfig
from ..errors import ChatError
from ..ids import MAX_INT64
from .base import AppendResult, Channel, ChannelSummary, Departure, Device, MediaRecord, Message, Store, User, push_slot
from .cassandra_schema import (GROUPS_CREATED_TTL_S, SCHEMA_VERSION, STATEMENTS, bucket_last_seq,
                               bucket_of, channel_from_row, check_schema, message_from_row, new_user_id,
                               push_entry_from_row, push_token_from_row, read_schema_row, summary_from_rows,
                               user_from_row, username_key)
from .cql import CqlRunner, CqlSession, check_keyspace_name, connect, shutdown

log = logging.getLogger(__name__)

MAX_SEQ = MAX_INT64
APPEND_ATTEMPTS = 64  # seq races resolved before giving up with "unavailable"
MAX_BATCH = 64  # messages in one conditional batch (one partition, one mutation)
MAX_SUBMITTED = 8192  # appends queued without a task (submit_append) at once; more: the task path
HINT_SKIPS = 8  # head-hint writes of a channel skipped in a row for a later batch's (see _indexed)
DEDUP_BATCH = 10  # dedup rows per unlogged batch (Cassandra warns above 10 partitions in one batch)
MAX_BATCH_BYTES = 1 << 20  # body characters in one batch (a single larger message goes alone)
MEMBER_ATTEMPTS = 32  # membership version races likewise
MAX_TTL_S = 630_720_000  # Cassandra's largest TTL (20 years)
UNREAD_SCAN = 200  # rows above a read position counted exactly (channels_of)
FAN_OUT = 32  # concurrent reads one call issues (get_users, channels_of, group creation)


def _micros(at: float) -> int:
    """A wall-clock time as a write timestamp (``USING TIMESTAMP``: microseconds)."""
    return int(at * 1_000_000)


# ---- the append queue -----------------------------------------------------------------------------
class _Append:
    __slots__ = ("sender_id", "client_msg_id", "body", "attachments", "created_at", "dm_pair", "wake", "callback",
                 "result", "error", "batch", "index_failed", "indexed_tick", "looked", "lookup_tick", "dedup_seq",
                 "extra")

    def __init__(self, sender_id, client_msg_id, body, created_at, dm_pair, callback=None, extra=None, attachments=""):
        self.extra = extra  # a lifecycle row: (kind or None, target_seq, reply_to, meta JSON, meta) else None
        self.sender_id = sender_id
        self.client_msg_id = client_msg_id
        self.body = body
        self.attachments = attachments
        self.created_at = created_at
        self.dm_pair = dm_pair
        # a caller task waits on ``wake``; a submitted one (no task) is answered by ``callback``
        self.callback = callback
        self.wake = trio.Event() if callback is None else None
        self.result: AppendResult | None = None
        self.error: BaseException | None = None
        self.batch: list | None = None  # [last seq, its created_at, rows not yet indexed] if stored here
        self.index_failed = False
        self.indexed_tick: int | None = None  # when its dedup row was written (stored here)
        self.looked: trio.Event | None = None  # its dedup lookup ahead of the batch, if one ran
        self.lookup_tick: int | None = None  # when that lookup started
        self.dedup_seq: int | None = None  # what it found

    @property
    def key(self) -> tuple[int, str]:
        return self.sender_id, self.client_msg_id

    def finish(self) -> None:
        """Its batch is done with it (a result or an error): wake its caller, or call back."""
        if self.callback is None:
            self.wake.set()
            return
        callback, self.callback = self.callback, None
        try:
            callback(self.result, self.error)
        except Exception:  # noqa: BLE001 - a bug in a callback must not end the channel's batches
            log.exception("append completion callback failed")


def _stored_hint(head_row: dict | None) -> int:
    return head_row["last_seq"] if head_row and head_row.get("last_seq") is not None else 0


class _ChannelQueue:
    __slots__ = ("items", "busy")

    def __init__(self):
        self.items: deque[_Append] = deque()
        self.busy = False


# ---- the store ------------------------------------------------------------------------------------
class CassandraStore(Store):
    schema_version = SCHEMA_VERSION

    def __init__(self, cql: CqlRunner, *, bucket_size: int, head_cache_max: int = 100_000, background=None):
        """``background``: a nursery for the dedup rows and head hint of stored batches, so the
        callers are answered right after their batch applied; without one, each caller writes its
        own row before it returns (the emulator tests use that)."""
        if bucket_size < 2:
            raise ValueError("bucket_size must be >= 2")
        self._cql = cql
        self._background = background
        self.bucket_size = bucket_size
        self._heads: OrderedDict[str, int] = OrderedDict()  # channel -> a seq known to exist (LRU)
        self._head_cache_max = head_cache_max
        self._bucket_heads: dict[str, int | None] = {}  # channel -> bucket_head of the bucket of head+1
        self._head_at: dict[str, tuple[int, float]] = {}  # channel -> (head, its created_at) when known
        self._queues: dict[str, _ChannelQueue] = {}  # channel -> its appends waiting for a batch
        self._unindexed: dict[str, dict] = {}  # channel -> {dedup key: _Append} stored, row not yet written
        self._batches: dict[str, deque] = {}  # channel -> stored batches not fully indexed, in seq order
        self._hint_skips: dict[str, int] = {}  # channel -> head-hint writes skipped in a row
        self._loaded_tick: dict[str, int] = {}  # channel -> when it was last (re)loaded
        self._tick = 0  # orders lookups, loads and index writes
        self._running = 0
        self._submitted = 0  # appends queued by submit_append and not yet answered
        self._idle = trio.Event()
        self._idle.set()
        self._closed = False
        self._prepare_bulk = None  # set by open_cassandra: prepares cassandra_bulk.BULK_STATEMENTS
        self._bulk = None
        self.stats = {"appends": 0, "batches": 0, "duplicates": 0, "seq_conflicts": 0, "lwt": 0}

    def statistics(self) -> dict[str, float]:
        """``appends``, ``batches``, ``duplicates``, ``seq_conflicts``, ``lwt`` (conditional writes)."""
        return self.stats

    # ---- lifecycle -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _op(self):
        if self._closed:
            raise ChatError("unavailable", "the store is closed")
        self._enter()
        try:
            yield
        finally:
            self._exit()

    def _enter(self) -> None:
        if self._running == 0:
            self._idle = trio.Event()
        self._running += 1

    def _exit(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._idle.set()

    async def aclose(self) -> None:
        """Refuse new calls and wait for the running ones (each bounded by the request timeout)."""
        self._closed = True
        await self._idle.wait()

    # ---- helpers -------------------------------------------------------------------------
    async def _gather(self, *thunks):
        """Run zero-argument async callables concurrently (at most FAN_OUT at once); their results
        in order. The first failure (in argument order) is raised after all have finished."""
        results: list = [None] * len(thunks)
        errors: list = [None] * len(thunks)
        limiter = trio.Semaphore(FAN_OUT)

        async def run(i, thunk):
            async with limiter:
                try:
                    results[i] = await thunk()
                except Exception as e:  # noqa: BLE001 - re-raised below, outside the nursery
                    errors[i] = e

        async with trio.open_nursery() as nursery:
            for i, thunk in enumerate(thunks):
                nursery.start_soon(run, i, thunk)
        for e in errors:
            if e is not None:
                raise e
        return results

    async def _lwt(self, name, params):
        self.stats["lwt"] += 1
        return await self._cql.lwt(name, params)

    def _bucket(self, seq: int) -> int:
        return bucket_of(seq, self.bucket_size)

    def _known_head(self, channel_id: str) -> int | None:
        head = self._heads.get(channel_id)
        if head is not None:
            self._heads.move_to_end(channel_id)
        return head

    def _note_head(self, channel_id: str, seq: int, bucket_head: int | None, at: float | None = None) -> None:
        """Remember that ``seq`` exists, every message up to it is indexed, and what the
        ``bucket_head`` of the bucket of seq+1 is (the expected value of the next batch's condition);
        and ``at``, the created_at of message ``seq``, when the caller knows it (``channels_of``
        reports it while the head hint written after the ack is still on its way)."""
        if seq >= self._heads.get(channel_id, -1):
            self._heads[channel_id] = seq
            self._bucket_heads[channel_id] = bucket_head
            if at is not None:
                self._head_at[channel_id] = (seq, at)
        self._heads.move_to_end(channel_id)
        while len(self._heads) > self._head_cache_max:
            old, _ = self._heads.popitem(last=False)
            self._bucket_heads.pop(old, None)
            self._head_at.pop(old, None)
            self._loaded_tick.pop(old, None)

    # ---- users and devices ---------------------------------------------------------------
    async def create_user(self, username, password_hash, display_name, created_at):
        with self._op():
            # 1. the user row under a fresh random id (a collision just draws again);
            # 2. the name, by LWT. A crash between them leaves a row nobody can find or log in to.
            for _ in range(8):
                user_id = new_user_id()
                applied, _ = await self._lwt("user_insert", (user_id, username, password_hash, display_name, "",
                                                             created_at))
                if applied:
                    break
            else:
                raise ChatError("unavailable", "could not allocate a user id; retry")
            applied, _ = await self._lwt("name_claim", (username_key(username), user_id))
            if not applied:
                await self._cql.write("user_delete", (user_id,))
                raise ChatError("username_taken", f"username {username!r} is taken")
            return User(id=user_id, username=username, display_name=display_name, about="",
                        created_at=created_at, password_hash=password_hash)

    async def get_user(self, user_id):
        with self._op():
            return await self._get_user(user_id)

    async def _get_user(self, user_id: int) -> User | None:
        if not 0 < user_id <= MAX_INT64:
            return None
        row = await self._cql.one("user_get", (user_id,))
        return user_from_row(row) if row else None

    async def get_user_by_name(self, username):
        with self._op():
            row = await self._cql.one("name_get", (username_key(username),))
            return await self._get_user(row["user_id"]) if row else None

    async def get_users(self, user_ids):
        with self._op():
            ids = list(dict.fromkeys(user_ids))
            users = await self._gather(*[lambda u=u: self._get_user(u) for u in ids])
            return {u.id: u for u in users if u is not None}

    async def update_profile(self, user_id, display_name, about):
        with self._op():
            user = await self._get_user(user_id)
            if user is None:
                raise ChatError("no_such_user", f"user {user_id} does not exist")
            if display_name is None and about is None:
                return user
            await self._cql.write("user_set_profile", (UNSET_VALUE if display_name is None else display_name,
                                                       UNSET_VALUE if about is None else about, user_id))
            return User(id=user.id, username=user.username,
                        display_name=user.display_name if display_name is None else display_name,
                        about=user.about if about is None else about, created_at=user.created_at,
                        password_hash=user.password_hash)

    async def set_password_hash(self, user_id, password_hash):
        with self._op():
            await self._lwt("user_set_password", (password_hash, user_id))  # IF EXISTS: no partial row

    async def set_user_disabled(self, user_id, disabled):
        with self._op():
            if not 0 < user_id <= MAX_INT64:
                return False
            applied, _ = await self._lwt("user_set_disabled", (bool(disabled), user_id))
            return applied

    async def rename_user(self, user_id, username):
        """Claim the new name (LWT), point the user at it, then release the old name. A crash in
        between leaves the old name claimed by the user (it stays taken until renamed again)."""
        with self._op():
            user = await self._get_user(user_id)
            if user is None:
                raise ChatError("no_such_user", f"user {user_id} does not exist")
            new_key, old_key = username_key(username), username_key(user.username)
            if new_key != old_key:
                applied, row = await self._lwt("name_claim", (new_key, user_id))
                if not applied and row.get("user_id") != user_id:
                    raise ChatError("username_taken", f"username {username!r} is taken")
            await self._lwt("user_set_name", (username, user_id))
            if new_key != old_key:
                await self._lwt("name_release", (old_key, user_id))
            return await self._get_user(user_id)

    async def add_device(self, user_id, device_id, created_at):
        with self._op():
            applied, row = await self._lwt("device_insert", (device_id, user_id, created_at))  # the first owner stays
            if not applied and row.get("user_id") != user_id:
                return
            first = created_at if applied or row.get("created_at") is None else row["created_at"]
            await self._cql.write("user_device_put", (user_id, device_id, first, created_at, _micros(created_at)))

    async def devices_of(self, user_id):
        with self._op():
            rows = await self._cql.rows("user_devices", (user_id,))
            return sorted((Device(r["device_id"], r["created_at"], r["last_login_at"]) for r in rows),
                          key=lambda d: d.id)

    async def device_owner(self, device_id):
        with self._op():
            row = await self._cql.one("device_get", (device_id,))
            return row["user_id"] if row else None

    # ---- channels ------------------------------------------------------------------------
    async def create_group(self, channel_id, name, owner_id, member_ids, created_at, max_members):
        with self._op():
            members = list(dict.fromkeys([owner_id, *member_ids]))
            if len(members) > max_members:
                raise ChatError("group_full", f"a group has at most {max_members} members")
            await self._require_users(members)
            # counted before the channel exists: a creation that dies after this still counts
            await self._cql.write("group_created_put", (owner_id, created_at, channel_id, GROUPS_CREATED_TTL_S))
            applied, _ = await self._lwt("channel_insert", (channel_id, "group", name, owner_id, created_at))
            if not applied:
                raise ChatError("unavailable", f"channel id {channel_id} exists already; retry")
            await self._write_new_members(channel_id, "group", name, created_at, members)
            return Channel(channel_id, "group", name, owner_id, created_at, 0)

    async def _write_new_members(self, channel_id, kind, name, created_at, members) -> None:
        """Members of a channel being created: its members partition in one single-partition batch
        (chunked for very large caps), then the per-user rows. Nobody else writes these yet."""
        chunk = 200
        for i in range(0, len(members), chunk):
            items = [("member_insert", (channel_id, u, created_at)) for u in members[i:i + chunk]]
            if i == 0:
                items.insert(0, ("member_version_set", (0, channel_id)))
            await self._cql.batch(items)
        await self._gather(*[lambda u=u: self._write_user_rows(channel_id, u, kind, name, created_at, created_at)
                             for u in members])

    async def _write_user_rows(self, channel_id, user_id, kind, name, created_at, joined_at, cursor=True):
        await self._cql.write("user_channel_insert", (user_id, channel_id, kind, name, created_at, joined_at))
        if cursor:
            await self._cql.write("cursor_set", (user_id, channel_id, 0))

    async def _require_users(self, user_ids) -> None:
        found = await self._gather(*[lambda u=u: self._get_user(u) for u in user_ids])
        for u, user in zip(user_ids, found):
            if user is None:
                raise ChatError("no_such_user", f"user {u} does not exist")

    async def get_channel(self, channel_id):
        with self._op():
            row, head = await self._gather(lambda: self._cql.one("channel_get", (channel_id,)),
                                           lambda: self._cql.one("head_get", (channel_id,)))
            if row is None:
                return None
            return channel_from_row(row, self._head_hint(channel_id, head))

    def _head_hint(self, channel_id: str, head_row: dict | None) -> int:
        return self._probe_from(channel_id, _stored_hint(head_row))

    async def set_owner(self, channel_id, owner_id):
        with self._op():
            row = await self._cql.one("channel_get", (channel_id,))
            if row is None or row["kind"] != "group":
                raise ChatError("no_such_channel", f"group {channel_id} does not exist")
            await self._lwt("channel_set_owner", (owner_id, channel_id))

    async def add_member(self, channel_id, user_id, max_members, joined_at):
        with self._op():
            for _ in range(MEMBER_ATTEMPTS):
                channel, user, rows = await self._gather(
                    lambda: self._cql.one("channel_get", (channel_id,)), lambda: self._get_user(user_id),
                    lambda: self._cql.rows("members_get", (channel_id,)))
                if channel is None:
                    raise ChatError("no_such_channel", f"channel {channel_id} does not exist")
                if user is None:
                    raise ChatError("no_such_user", f"user {user_id} does not exist")
                version = rows[0]["member_version"] if rows else None
                current = {r["user_id"]: r["joined_at"] for r in rows if r["user_id"] is not None}
                if user_id in current:  # already a member; make sure its by-user row exists too
                    await self._write_user_rows(channel_id, user_id, channel["kind"], channel["name"] or "",
                                                channel["created_at"], current[user_id], cursor=False)
                    return False
                if len(current) >= max_members:
                    raise ChatError("group_full", f"a group has at most {max_members} members")
                applied, _ = await self._cql.batch([
                    ("member_version_cas", ((version or 0) + 1, channel_id, version)),
                    ("member_insert", (channel_id, user_id, joined_at))], conditional=True)
                if applied:
                    await self._write_user_rows(channel_id, user_id, channel["kind"], channel["name"] or "",
                                                channel["created_at"], joined_at)
                    await self._cql.write("departure_delete", (channel_id, user_id))
                    await self._cql.write("user_invitation_delete", (user_id, channel_id))
                    return True
            raise ChatError("unavailable", "the channel's membership is changing too fast; retry")

    async def remove_member(self, channel_id, user_id, left_at=None):
        with self._op():
            if left_at is not None:  # first: a leave that dies half-way is still a leave
                await self._cql.write("departure_put", (channel_id, user_id, left_at, None, None))
            for _ in range(MEMBER_ATTEMPTS):
                row = await self._cql.one("member_get", (channel_id, user_id))
                if row is None:  # not a member; finish a removal that died half-way, if one did
                    await self._delete_user_rows(channel_id, user_id)
                    return False
                version = row["member_version"]
                applied, _ = await self._cql.batch([
                    ("member_version_cas", ((version or 0) + 1, channel_id, version)),
                    ("member_delete", (channel_id, user_id))], conditional=True)
                if applied:
                    await self._delete_user_rows(channel_id, user_id)
                    return True
            raise ChatError("unavailable", "the channel's membership is changing too fast; retry")

    async def departure(self, channel_id, user_id):
        with self._op():
            row = await self._cql.one("departure_get", (channel_id, user_id))
            if row is None or row.get("left_at") is None:
                return None
            return Departure(channel_id, user_id, row["left_at"], row.get("invited_by"), row.get("invited_at"))

    async def invite_back(self, channel_id, user_id, by, at):
        with self._op():
            await self._cql.write("user_invitation_put", (user_id, channel_id))  # a stray one is filtered out
            applied, _ = await self._lwt("departure_invite", (by, at, channel_id, user_id))
            return applied

    async def invitations_of(self, user_id, limit):
        # invitations_by_user lists, group_departures decides: a listed channel whose departure has no
        # invitation (accepted, left again, or an invite_back that found none) is left out
        with self._op():
            rows = await self._cql.rows("user_invitations", (user_id,))
            found = await self._gather(*[lambda r=r: self._cql.one("departure_get", (r["channel_id"], user_id))
                                         for r in rows])
            out = [Departure(r["channel_id"], user_id, d["left_at"], d["invited_by"], d["invited_at"])
                   for r, d in zip(rows, found)
                   if d and d.get("invited_at") is not None and d.get("left_at") is not None]
            out.sort(key=lambda d: (-d.invited_at, d.channel_id))
            return out[:limit]

    async def groups_created_since(self, owner_id, since, limit):
        with self._op():
            rows = await self._cql.rows("groups_created_since", (owner_id, since, limit))
            return [r["created_at"] for r in rows]

    async def _delete_user_rows(self, channel_id: str, user_id: int) -> None:
        await self._gather(lambda: self._cql.write("user_channel_delete", (user_id, channel_id)),
                           lambda: self._cql.write("cursor_delete", (user_id, channel_id)))

    async def members(self, channel_id):
        with self._op():
            return await self._members(channel_id)

    async def _members(self, channel_id: str) -> list[int]:
        rows = await self._cql.rows("members_get", (channel_id,))
        return [r["user_id"] for r in rows if r["user_id"] is not None]  # a static-only row has none

    async def channels_of(self, user_id):
        with self._op():
            channels, cursors = await self._gather(lambda: self._cql.rows("user_channels", (user_id,)),
                                                   lambda: self._cql.rows("cursors_of_user", (user_id,)))
            out = await self._summaries(channels, cursors)
            out.sort(key=lambda s: (-s.last_at, s.id))
            return out

    async def channels_page(self, user_id, after, limit):
        with self._op():
            page = await self._cql.execute("user_channels_after", (user_id, after or "", limit),
                                           fetch_size=max(limit, 1))
            channels = page.rows
            if not channels:
                return []
            cursors = await self._cql.rows("cursors_between", (user_id, after or "", channels[-1]["channel_id"]))
            return await self._summaries(channels, cursors)  # in id order, as channels_by_user clusters them

    async def _summaries(self, channels: list[dict], cursors: list[dict]) -> list[ChannelSummary]:
        """``channels_by_user`` rows with their heads (read now) and the user's cursors -> summaries."""
        read = {r["channel_id"]: r["read_seq"] for r in cursors}
        heads = await self._gather(*[lambda c=c: self._cql.one("head_get", (c["channel_id"],)) for c in channels])
        out = []
        for uc, head in zip(channels, heads):
            s = summary_from_rows(uc, head, read.get(uc["channel_id"]))
            known = self._heads.get(s.id, 0)
            if known > s.last_seq:  # this process appended more than the hint shows yet
                seq_at = self._head_at.get(s.id)
                at = seq_at[1] if seq_at is not None and seq_at[0] == known else s.last_at
                s = ChannelSummary(s.id, s.kind, s.name, known, s.read_seq, at)
            out.append(s)
        counts = await self._gather(*[lambda s=s: self._unread(s) for s in out if s.last_seq > s.read_seq])
        it = iter(counts)
        return [dataclasses.replace(s, unread_count=next(it)) if s.last_seq > s.read_seq else s for s in out]

    # ---- messages ------------------------------------------------------------------------
    async def append_message(self, channel_id, sender_id, client_msg_id, body, created_at, dm_pair=None,
                             attachments=""):
        """Queue the message on its channel and wait for its batch. The caller's order is the seq
        order: nothing yields between the call and the enqueue. One caller at a time per channel
        (the *leader*) runs batches; when its own message is done it hands the lead to the next.
        A caller whose message was stored then writes its ``message_dedup`` row itself, off the
        leader's path (see :meth:`_index_stored`). With a background nursery this is
        :meth:`submit_append` and a wait for its callback."""
        if self._background is not None:
            return await self._append_submitted(channel_id, sender_id, client_msg_id, body, created_at, dm_pair,
                                                attachments=attachments)
        with self._op():
            return await self._append(channel_id, _Append(sender_id, client_msg_id, body, created_at, dm_pair,
                                                          attachments=attachments))

    # ---- the message lifecycle (chatd/lifecycle.py; docs/cassandra.md) ------------------------
    async def append_event(self, channel_id, sender_id, client_msg_id, spec, created_at, dm_pair=None):
        """The row goes through the append queue like a message (same fence, dedup and seqs);
        then its fold is written (:meth:`_fold`). Two steps, not one transaction: a crash between
        them leaves the row without its fold until the resend (the client's, with the same
        ``client_msg_id``), which answers ``duplicate`` and writes the fold again; every fold
        write is ``USING TIMESTAMP`` = the row's seq, so a replay never undoes a later event."""
        with self._op():
            kind, target = spec.kind, spec.target_seq
            meta = None
            if kind in (lc.REACT, lc.UNREACT):  # the count after it (the owner holds the channel's lock)
                rows = await self._cql.rows("reactions_of", (channel_id, self._bucket(target), target, spec.body))
                users = {r["user_id"] for r in rows}
                users.add(sender_id) if kind == lc.REACT else users.discard(sender_id)
                meta = {"count": len(users)}
            elif kind == lc.RENAMED:
                meta = {"name": spec.body}
            elif kind in lc.SYSTEM:
                meta = {"user_id": spec.user_id}
            body = spec.body if kind in (lc.MESSAGE, lc.EDIT, lc.REACT, lc.UNREACT) else ""  # (a name: in meta)
            extra = (None if kind == lc.MESSAGE else kind, target or None, spec.reply_to or None,
                     json.dumps(meta) if meta else None, meta)
            if self._background is not None:  # (the queue's leader is the background task, as for sends)
                result = await self._append_submitted(channel_id, sender_id, client_msg_id, body, created_at, dm_pair,
                                                      extra=extra, attachments=spec.attachments)
            else:
                item = _Append(sender_id, client_msg_id, body, created_at, dm_pair, extra=extra,
                               attachments=spec.attachments)
                result = await self._append(channel_id, item)
            if result.message.kind in lc.TARGETED:
                await self._fold(result.message)
            return result

    async def _fold(self, ev: Message) -> None:
        """Write what ``ev`` (an edit, delete, react or unreact row) does to its target."""
        cid, target, seq = ev.channel_id, ev.target_seq, ev.seq
        tb = self._bucket(target)
        if ev.redacted:
            return  # its target was deleted since (this is a replay): nothing to fold
        row = await self._cql.one("msg_get", (cid, tb, target))
        if row is None or row.get("kind") is not None:  # never write a row that is not there
            return
        await self._cql.write("event_index_put", (cid, tb, target, seq, ev.kind))
        if ev.kind == lc.EDIT:
            await self._cql.write("fold_edit", (seq, ev.body, ev.created_at, seq, cid, tb, target))
        elif ev.kind == lc.DELETE:
            await self._erase(cid, target, ev)
        else:
            if ev.kind == lc.REACT:
                await self._cql.write("reaction_put", (cid, tb, target, ev.body, ev.sender_id, ev.created_at, seq))
            else:
                await self._cql.write("reaction_delete", (seq, cid, tb, target, ev.body, ev.sender_id))
            await self._cql.write("fold_state", (seq, seq, cid, tb, target))

    async def _erase(self, cid: str, target: int, ev: Message) -> None:
        """Redaction: the message's text and its edits' (``edited_body`` at the delete's seq wins
        over every edit's), its edit and reaction rows' text, its reactions, its pending pushes."""
        tb, seq = self._bucket(target), ev.seq
        await self._cql.write("fold_delete", (seq, "", ev.sender_id, ev.created_at, seq, cid, tb, target))
        events = await self._cql.rows("events_of", (cid, tb, target))
        members = await self._members(cid) if not cid.startswith("dm:") else [
            int(u) for u in cid.split(":")[1:]]
        await self._gather(
            lambda: self._cql.write("msg_erase", ("", "", cid, tb, target)),
            lambda: self._cql.write("reactions_drop", (seq, cid, tb, target)),
            *[lambda e=e: self._cql.write("msg_erase", ("", "", cid, self._bucket(e["seq"]), e["seq"]))
              for e in events if e["kind"] in (lc.EDIT, lc.REACT, lc.UNREACT)],
            *[lambda u=u: self._cql.write("push_drop", (push_slot(u), u, cid, target)) for u in members])

    async def find_sent(self, channel_id, sender_id, client_msg_id):
        with self._op():
            mine = self._unindexed.get(channel_id, {}).get((sender_id, client_msg_id))
            if mine is not None and mine.result is not None:
                return mine.result.message
            row = await self._cql.one("dedup_get", (channel_id, sender_id, client_msg_id))
            if not row or not row.get("seq"):
                return None
            seq = row["seq"]
            stored = await self._cql.one("msg_get", (channel_id, self._bucket(seq), seq))
            if stored and stored["sender_id"] == sender_id and stored["client_msg_id"] == client_msg_id:
                return message_from_row(channel_id, {**stored, "seq": seq})
            return None

    async def _folded(self, channel_id: str, rows: list[Message]) -> list[Message]:
        """The reactions of the messages among ``rows`` and the excerpts of their replies."""
        reacted = [m for m in rows if m.state_seq and m.kind == "message" and not m.deleted_at]
        if reacted:
            by_bucket: dict[int, list[int]] = {}
            for m in reacted:
                by_bucket.setdefault(self._bucket(m.seq), []).append(m.seq)
            found = await self._gather(*[lambda b=b, ss=ss: self._cql.rows("reactions_range", (channel_id, b, ss[0], ss[-1]))
                                         for b, ss in by_bucket.items()])
            by_seq: dict[int, list] = {}
            for part in found:
                for r in part:
                    by_seq.setdefault(r["seq"], []).append(r)
            for m in reacted:
                rs = sorted(by_seq.get(m.seq, ()), key=lambda r: (r["at"] or 0.0, r["user_id"]))
                emoji: dict[str, list[int]] = {}
                for r in rs:
                    emoji.setdefault(r["emoji"], []).append(r["user_id"])
                m.reactions = tuple((e, tuple(sorted(us))) for e, us in emoji.items())
        targets = sorted({m.reply_to for m in rows if m.reply_to})
        if targets:
            got = await self._gather(*[lambda t=t: self._cql.one("msg_get", (channel_id, self._bucket(t), t))
                                       for t in targets])
            quoted = {t: lc.excerpt(message_from_row(channel_id, {**r, "seq": t}))
                      for t, r in zip(targets, got) if r is not None}
            for m in rows:
                if m.reply_to in quoted:
                    m.reply = quoted[m.reply_to]
        return rows

    async def _append(self, channel_id: str, item: "_Append") -> AppendResult:
        """:meth:`append_message` of a queued item (a message or a lifecycle row); inside ``_op``."""
        queue = self._queues.get(channel_id)
        if queue is None:
            queue = self._queues[channel_id] = _ChannelQueue()
        queue.items.append(item)
        if queue.busy:
            if channel_id in self._heads:  # look up its dedup row while the batch ahead runs
                await self._lookup(channel_id, item)
            await item.wake.wait()  # done, or asked to lead
        if item.result is None and item.error is None:
            queue.busy = True
            try:
                while item.result is None and item.error is None:
                    await self._run_batch(channel_id, queue)
            finally:
                if queue.items:
                    queue.items[0].wake.set()  # the next waiter leads
                else:
                    queue.busy = False
                    del self._queues[channel_id]
        if item.error is not None:
            raise item.error
        if item.batch is not None and self._background is None:
            await self._index_stored(channel_id, [item])
        return item.result

    async def _append_submitted(self, channel_id, sender_id, client_msg_id, body, created_at, dm_pair, **row):
        done = trio.Event()
        box: list = []

        def answered(result, error) -> None:
            box.append((result, error))
            done.set()
        if not self.submit_append(channel_id, sender_id, client_msg_id, body, created_at, dm_pair, answered, **row):
            if self._closed:
                raise ChatError("unavailable", "the store is closed")
            raise ChatError("unavailable", "too many messages waiting for the store; retry")
        await done.wait()
        result, error = box[0]
        if error is not None:
            raise error
        return result

    def submit_append(self, channel_id, sender_id, client_msg_id, body, created_at, dm_pair, callback,
                      extra=None, attachments="") -> bool:
        """:meth:`append_message` without a caller task: the message joins its channel's queue now
        (the caller's order is the seq order), the channel's batches are run by one task in the
        background nursery while its queue is not empty (:meth:`_lead`), and ``callback(result,
        error)`` is called once its batch applied (the dedup row and head hint follow, as for
        every batch) or failed. While a batch runs, a queued message's dedup row is looked up
        ahead. False when there is no background nursery, the store is closed, or
        ``MAX_SUBMITTED`` appends are waiting already (a store that does not answer)."""
        if self._background is None or self._closed or self._submitted >= MAX_SUBMITTED:
            return False
        self._submitted += 1

        def answered(result, error) -> None:
            self._submitted -= 1
            callback(result, error)
        queue = self._queues.get(channel_id)
        if queue is None:
            queue = self._queues[channel_id] = _ChannelQueue()
        item = _Append(sender_id, client_msg_id, body, created_at, dm_pair, answered, extra, attachments)
        queue.items.append(item)
        if not queue.busy:
            queue.busy = True
            self._enter()  # (aclose waits for the leader)
            self._background.start_soon(self._lead, channel_id, queue)
        elif channel_id in self._heads:  # look up its dedup row while the batch ahead runs
            self._begin_lookup(item)
            self._background.start_soon(self._look, channel_id, item)
        return True

    async def _lead(self, channel_id: str, queue: "_ChannelQueue") -> None:
        """Run the channel's batches until its queue is empty (the submitted appends' leader)."""
        try:
            while queue.items:
                try:
                    await self._run_batch(channel_id, queue)
                except Exception:  # noqa: BLE001 - a bug: its batch was answered 'unavailable'
                    log.exception("cassandra append batch of %s failed", channel_id)
        finally:
            while queue.items:  # (only when cancelled: at shutdown) the rest are not stored
                it = queue.items.popleft()
                it.error = ChatError("unavailable", "the store is closed; retry")
                it.finish()
            queue.busy = False
            if self._queues.get(channel_id) is queue:
                del self._queues[channel_id]
            self._exit()

    async def _run_batch(self, channel_id: str, queue: "_ChannelQueue") -> None:
        """Take the queued messages (up to MAX_BATCH / MAX_BATCH_BYTES, one per dedup key) and
        store them; every taken item ends with a result or an error."""
        batch: list[_Append] = []
        keys, size = set(), 0
        while queue.items and len(batch) < MAX_BATCH:
            it = queue.items[0]
            if it.key in keys or (batch and size + len(it.body) > MAX_BATCH_BYTES):
                break  # a resend of a message in this batch waits for the next one
            queue.items.popleft()
            batch.append(it)
            keys.add(it.key)
            size += len(it.body)
        try:
            head = self._known_head(channel_id)
            if head is None:
                head = await self._load_channel(channel_id, batch[0].dm_pair, batch[0].created_at)
            await self._store_batch(channel_id, head, batch)
        except ChatError as e:  # store trouble: every unanswered message of the batch gets it
            for it in batch:
                if it.result is None:
                    it.error = e
        except BaseException:  # a bug: the others get "unavailable", the leader's call raises it
            for it in batch:
                if it.result is None:
                    it.error = ChatError("unavailable", "the message was not stored; retry")
            raise
        finally:
            for it in batch:
                it.finish()

    async def _load_channel(self, channel_id, dm_pair, created_at) -> int:
        """Check the channel exists (creating a 1:1 channel on its first message); return its head,
        with every message up to it indexed in ``message_dedup``."""
        row, head_row = await self._gather(lambda: self._cql.one("channel_get", (channel_id,)),
                                           lambda: self._cql.one("head_get", (channel_id,)))
        if row is None:
            if dm_pair is None:
                raise ChatError("no_such_channel", f"channel {channel_id} does not exist")
            # Members first, the channel row last: a crash in between only repeats this next time.
            await self._write_new_members(channel_id, "dm", "", created_at, list(dm_pair))
            await self._lwt("channel_insert", (channel_id, "dm", "", None, created_at))
        return await self._catch_up(channel_id, _stored_hint(head_row))

    async def _catch_up(self, channel_id: str, indexed: int, probed=None) -> int:
        """The true head, found from the stored head hint ``indexed`` (every message up to it has
        its ``message_dedup`` row; ``probed``: ``_probe_head`` already read); the messages above it
        (written by a writer that died before indexing them, or by another owner right now) are
        indexed, then the hint is written. Returns the head."""
        head, at, bucket_head = probed or await self._probe_head(channel_id, self._probe_from(channel_id, indexed))
        if head > indexed:
            rows = await self._index_above(channel_id, indexed, head)
            at = at if at is not None else rows[-1].created_at
            await self._set_head(channel_id, head, at)
        self._note_head(channel_id, head, bucket_head, at)
        self._loaded_tick[channel_id] = self._next_tick()  # earlier lookups may have missed rows
        return head

    def _probe_from(self, channel_id: str, stored: int) -> int:
        """Where a head probe may start: the stored hint, or a higher seq this process knows exists."""
        return max(stored, self._heads.get(channel_id, 0))

    async def _index_above(self, channel_id: str, lo: int, head: int) -> list[Message]:
        """Read the messages with lo < seq <= head (another writer's, or a dead one's) and write
        their dedup rows; return them."""
        if head <= lo:
            return []
        rows = await self._read_forward(channel_id, lo, head + 1, head - lo)
        await self._index(channel_id, rows)
        return rows

    async def _index(self, channel_id: str, messages: list[Message]) -> None:
        await self._gather(*[lambda m=m: self._cql.write("dedup_put", (channel_id, m.sender_id, m.client_msg_id,
                                                                      m.seq)) for m in messages])

    async def _index_stored(self, channel_id: str, items: list["_Append"]) -> None:
        """Write the dedup rows of messages this process just stored (one batch's, in the
        background nursery; or one caller's own, without one), and once every message of a batch
        and of all earlier batches is indexed, the head hint. Until its row is written a message is
        in ``_unindexed`` (the leader checks resends against it); a failed write leaves it there,
        and the next batch of the channel writes it again. The hint is never written past a message
        without its row: after a crash, the next owner indexes everything above the hint before it
        appends (:meth:`_catch_up`), so no resend can be stored twice."""
        async def some(chunk):  # one request: an unlogged batch of at most DEDUP_BATCH rows
            rows = [("dedup_put", (channel_id, *it.key, it.result.message.seq)) for it in chunk]
            try:
                if len(rows) == 1:
                    await self._cql.write(*rows[0])
                else:
                    await self._cql.batch(rows)
                return True
            except ChatError:  # stored and acked all the same; retried by the channel's next batch
                for it in chunk:
                    it.index_failed = True
                return False
        chunks = [items[i:i + DEDUP_BATCH] for i in range(0, len(items), DEDUP_BATCH)]
        done = await self._gather(*[lambda c=c: some(c) for c in chunks])
        await self._indexed(channel_id, [it for c, ok in zip(chunks, done) if ok for it in c])

    async def _lookup(self, channel_id: str, item: "_Append") -> None:
        """Read ``item``'s dedup row ahead of its batch. The result is used only if the lookup
        started after the channel was (re)loaded; a failed one is done again by the leader."""
        self._begin_lookup(item)
        await self._look(channel_id, item)

    def _begin_lookup(self, item: "_Append") -> None:
        """Mark the lookup as started (before its read: a tick too early only makes the batch
        more careful)."""
        item.looked = trio.Event()
        item.lookup_tick = self._next_tick()

    async def _look(self, channel_id: str, item: "_Append") -> None:
        try:
            row = await self._cql.one("dedup_get", (channel_id, *item.key))
            item.dedup_seq = row["seq"] if row and row.get("seq") else None
        except ChatError:
            item.lookup_tick = None
        finally:
            item.looked.set()

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    async def _indexed(self, channel_id: str, items: list["_Append"]) -> None:
        """``items`` (stored here) have their dedup rows now. They stay in ``_unindexed``, marked
        with the time, until no lookup that started before that time can still be pending."""
        for it in items:
            it.indexed_tick = self._next_tick()
            it.batch[2] -= 1
        batches = self._batches.get(channel_id)
        done = None
        while batches and batches[0][2] == 0:
            done = batches.popleft()
        if not batches:
            self._batches.pop(channel_id, None)
        # A later batch of the channel, still being indexed, writes a higher hint: this one's
        # write would be overwritten (if that one's rows fail, the hint lags: repaired as above).
        # Skipped at most HINT_SKIPS times in a row, so a busy channel's hint keeps moving.
        if done is not None and batches and self._hint_skips.get(channel_id, 0) < HINT_SKIPS:
            self._hint_skips[channel_id] = self._hint_skips.get(channel_id, 0) + 1
            return
        if done is not None:
            self._hint_skips.pop(channel_id, None)
            try:
                await self._set_head(channel_id, done[0], done[1])
            except ChatError:
                pass  # a lagging hint is repaired by the next reader or owner

    def _prune_memory(self, channel_id: str, queue_items) -> None:
        """Forget indexed messages that no pending lookup can have missed."""
        memory = self._unindexed.get(channel_id)
        if not memory:
            return
        queue = self._queues.get(channel_id)
        ticks = [it.lookup_tick for it in (*queue_items, *(queue.items if queue else ()))
                 if it.lookup_tick is not None]
        oldest = min(ticks, default=self._tick + 1)
        for key in [k for k, it in memory.items() if it.indexed_tick is not None and it.indexed_tick < oldest]:
            del memory[key]
        if not memory:
            del self._unindexed[channel_id]

    async def _store_batch(self, channel_id: str, head: int, batch: list["_Append"]) -> None:
        # 0. Messages stored here are checked from memory while a lookup may have missed their dedup
        #    row: not yet written, or written after the lookup started. Rows that failed to be
        #    written are written again now.
        memory = self._unindexed.get(channel_id, {})
        retry = [it for it in memory.values() if it.index_failed and it.indexed_tick is None]
        # 1. Resends: a message_dedup row names the seq of an earlier copy (rows exist only for
        #    stored messages; one left by schema v2 may name a seq that holds another message).
        for it in batch:
            if it.looked is not None:
                await it.looked.wait()
        loaded = self._loaded_tick.get(channel_id, 0)
        lookups = [it for it in batch if it.lookup_tick is None or it.lookup_tick <= loaded]
        tick = self._next_tick()
        rows = await self._gather(*[lambda it=it: self._cql.one("dedup_get", (channel_id, *it.key))
                                    for it in lookups],
                                  *[lambda it=it: self._cql.write("dedup_put", (channel_id, *it.key,
                                                                                it.result.message.seq))
                                    for it in retry])
        for it, row in zip(lookups, rows):
            it.lookup_tick = tick
            it.dedup_seq = row["seq"] if row and row.get("seq") else None
        if retry:
            await self._indexed(channel_id, retry)
        for it in batch:
            mine = memory.get(it.key)
            if mine is not None and (mine.indexed_tick is None or mine.indexed_tick >= it.lookup_tick):
                it.result = AppendResult(mine.result.message, True)
                self.stats["duplicates"] += 1
        self._prune_memory(channel_id, queue_items=batch)
        known = [(it, it.dedup_seq) for it in batch if it.result is None and it.dedup_seq]
        stored = await self._gather(*[lambda s=s: self._cql.one("msg_get", (channel_id, self._bucket(s), s))
                                      for _, s in known])
        for (it, seq), row in zip(known, stored):
            if row and row["sender_id"] == it.sender_id and row["client_msg_id"] == it.client_msg_id:
                it.result = AppendResult(message_from_row(channel_id, {**row, "seq": seq}), True)
                self.stats["duplicates"] += 1
        fresh = [it for it in batch if it.result is None]
        # 2. The new ones, as consecutive seqs: one conditional batch per bucket they fall in.
        for _ in range(APPEND_ATTEMPTS):
            if not fresh:
                return
            bucket = self._bucket(head + 1)
            chunk = fresh[:bucket_last_seq(bucket, self.bucket_size) - head]
            expected = self._bucket_heads.get(channel_id)
            new_head = head + len(chunk)
            items = [("bucket_advance", (new_head, channel_id, bucket, expected))]
            items += [("msg_put", (channel_id, bucket, head + 1 + i, it.sender_id, it.client_msg_id, it.body,
                                   it.created_at, it.attachments)) if it.extra is None else
                      ("msg_put_event", (channel_id, bucket, head + 1 + i, it.sender_id, it.client_msg_id, it.body,
                                         it.created_at, it.attachments, *it.extra[:4])) for i, it in enumerate(chunk)]
            self.stats["lwt"] += 1
            applied, current = await self._cql.batch(items, conditional=True)
            if applied:
                record = [new_head, chunk[-1].created_at, len(chunk)]
                self._batches.setdefault(channel_id, deque()).append(record)
                unindexed = self._unindexed.setdefault(channel_id, {})
                for i, it in enumerate(chunk):
                    m = Message(channel_id, head + 1 + i, it.sender_id, it.client_msg_id, it.body, it.created_at,
                                attachments=it.attachments)
                    if it.extra is not None:
                        m.kind, m.target_seq, m.reply_to, m.meta = (it.extra[0] or "message", it.extra[1] or 0,
                                                                    it.extra[2] or 0, it.extra[4])
                    it.result = AppendResult(m, False)
                    it.batch = record
                    unindexed[it.key] = it
                if self._background is not None:
                    self._background.start_soon(self._index_stored, channel_id, list(chunk))
                head = new_head
                self._note_head(channel_id, head, head if self._bucket(head + 1) == bucket else None,
                                chunk[-1].created_at)
                self.stats["appends"] += len(chunk)
                self.stats["batches"] += 1
                fresh = fresh[len(chunk):]
                continue
            # Another writer advanced this bucket (ownership moved), or it is a bucket written
            # before schema v3 (no bucket_head yet): catch up, index what it wrote, and answer
            # ours that it already stored as duplicates.
            self.stats["seq_conflicts"] += 1
            before = head
            self._bucket_heads[channel_id] = current.get("bucket_head")
            head, _, bucket_head = await self._probe_head(channel_id, before)
            theirs = await self._index_above(channel_id, before, head)
            by_key = {(m.sender_id, m.client_msg_id): m for m in theirs}
            for it in fresh:
                m = by_key.get(it.key)
                if m is not None:
                    it.result = AppendResult(m, True)
                    self.stats["duplicates"] += 1
            fresh = [it for it in fresh if it.result is None]
            self._note_head(channel_id, head, bucket_head)
        raise ChatError("unavailable", "could not assign a sequence number (too much contention); retry")

    async def _set_head(self, channel_id: str, seq: int, at: float) -> None:
        await self._cql.write("head_set", (seq, seq, at, channel_id))

    async def _probe_head(self, channel_id: str, hint: int) -> tuple[int, float | None, int | None]:
        """The true head, given ``hint`` (a seq known to exist, or 0); its message's created_at
        (None if nothing newer than ``hint`` was found); and the ``bucket_head`` of the bucket the
        next seq falls in (None there is none yet). Seqs are 1..H without gaps, so only the bucket
        of hint+1 and the buckets after it, while full, can hold newer ones."""
        head, at = hint, None
        bucket = self._bucket(hint + 1)
        while True:
            top = await self._cql.one("msg_top", (channel_id, bucket))
            bucket_head = top.get("bucket_head") if top else None
            if top is None or top["seq"] is None or top["seq"] <= head:
                return head, at, bucket_head
            head, at = top["seq"], top["created_at"]
            if head != bucket_last_seq(bucket, self.bucket_size):
                return head, at, bucket_head
            bucket += 1

    async def expire_messages(self, channel_id, before):
        """Read forward from the oldest kept message to the first one not before ``before``, then
        one range delete per bucket up to the last expired seq (row tombstones in the partitions
        of old buckets, which nothing reads once they are empty: see docs/cassandra.md)."""
        with self._op():
            upto, first, n, after = None, None, 0, 0
            while True:
                page = await self._read_forward(channel_id, after, MAX_SEQ, 500)
                for m in page:
                    if m.created_at >= before:
                        break
                    first = m.seq if first is None else first
                    upto, n = m.seq, n + 1
                else:
                    if len(page) == 500:
                        after = page[-1].seq
                        continue
                break
            if upto is None:
                return 0
            await self._gather(*[lambda b=b: self._cql.write("msg_expire", (channel_id, b, upto))
                                 for b in range(self._bucket(first), self._bucket(upto) + 1)])
            return n

    async def head_seq(self, channel_id):
        with self._op():
            return await self._head_seq(channel_id)

    async def _head_seq(self, channel_id: str) -> int:
        row = await self._cql.one("head_get", (channel_id,))
        stored = _stored_hint(row)
        probed = await self._probe_head(channel_id, self._probe_from(channel_id, stored))
        if probed[0] > stored and channel_id not in self._batches and channel_id not in self._queues:
            # the hint lags and nobody here is about to move it: a writer died before it did
            return await self._catch_up(channel_id, stored, probed)
        return probed[0]

    async def read_messages(self, channel_id, *, after=None, before=None, limit):
        with self._op():
            if limit <= 0:
                return []
            if after is not None:
                hi = MAX_SEQ if before is None else min(before, MAX_SEQ)
                return await self._folded(channel_id, await self._read_forward(channel_id, max(after, 0), hi, limit))
            top = await self._head_seq(channel_id)
            if before is not None:
                top = min(top, before - 1)
            return await self._folded(channel_id, await self._read_backward(channel_id, top, limit))

    async def _read_forward(self, channel_id: str, lo: int, hi: int, limit: int) -> list[Message]:
        """The first ``limit`` messages with lo < seq < hi, bucket by bucket; a bucket that is not
        full up to its last seq is the last one holding messages."""
        out: list[Message] = []
        bucket = self._bucket(lo + 1)
        last_bucket = None  # the head's bucket, read once buckets come back empty (retention)
        while len(out) < limit and lo + 1 < hi:
            rows = await self._cql.rows("msg_asc", (channel_id, bucket, lo, hi, limit - len(out)))
            out.extend(message_from_row(channel_id, r) for r in rows)
            if not rows and not out:  # below the retention horizon: the kept messages start later
                if last_bucket is None:
                    hint = _stored_hint(await self._cql.one("head_get", (channel_id,)))
                    last_bucket = self._bucket(max(hint, self._heads.get(channel_id, 0)))
                if bucket < last_bucket and bucket_last_seq(bucket, self.bucket_size) + 1 < hi:
                    lo, bucket = bucket_last_seq(bucket, self.bucket_size), bucket + 1
                    continue
                break
            if not rows or rows[-1]["seq"] != bucket_last_seq(bucket, self.bucket_size):
                break
            lo, bucket = rows[-1]["seq"], bucket + 1
        return out

    async def _read_backward(self, channel_id: str, top: int, limit: int) -> list[Message]:
        """The last ``limit`` messages with seq <= top, in ascending order (buckets below the top one
        are full, so this stops at the limit or at bucket 0)."""
        out: list[Message] = []
        bucket = self._bucket(top)
        while top >= 1 and len(out) < limit and bucket >= 0:
            rows = await self._cql.rows("msg_desc", (channel_id, bucket, 0, top + 1, limit - len(out)))
            out.extend(message_from_row(channel_id, r) for r in rows)
            if not rows:  # below the retention horizon (what is kept is one range up to the head)
                break
            bucket -= 1
        out.reverse()
        return out

    async def rename_channel(self, channel_id, name):
        """The channel row (authoritative), then each member's by-user row (a crash in between
        leaves stale names in "my channels" until the next rename: repeating it repairs them)."""
        with self._op():
            await self._lwt("channel_rename", (name, channel_id))
            members = await self._members(channel_id)
            await self._gather(*[lambda u=u: self._cql.write("user_channel_rename", (name, u, channel_id))
                                 for u in members])

    async def _unread(self, s: ChannelSummary) -> int:
        """New, undeleted messages above the read position: counted exactly over the first
        ``UNREAD_SCAN`` rows above it; rows beyond those count one each (an estimate for a channel
        that far behind, where a client shows "99+" anyway)."""
        rows = await self._read_forward(s.id, s.read_seq, s.last_seq + 1, UNREAD_SCAN)
        fresh = sum(1 for m in rows if m.kind == "message" and not m.deleted_at)
        return fresh + max(0, s.last_seq - s.read_seq - len(rows))

    async def set_delivered(self, channel_id, user_id, seq):
        with self._op():
            member, head = await self._gather(lambda: self._cql.one("member_get", (channel_id, user_id)),
                                              lambda: self._head_seq(channel_id))
            if member is None:
                raise ChatError("not_member", "you are not a member of this channel")
            target = max(0, min(seq, head))
            await self._cql.write("receipt_delivered", (target, target, channel_id, user_id))
            row = {r["user_id"]: r for r in await self._cql.rows("receipts_of", (channel_id,))}.get(user_id) or {}
            return max(target, row.get("delivered_seq") or 0, row.get("read_seq") or 0)

    async def receipts(self, channel_id):
        with self._op():
            rows, members = await self._gather(lambda: self._cql.rows("receipts_of", (channel_id,)),
                                               lambda: self._members(channel_id))
            by_user = {r["user_id"]: r for r in rows}
            out = {}
            for u in members:
                r = by_user.get(u) or {}
                read = r.get("read_seq") or 0
                out[u] = (max(r.get("delivered_seq") or 0, read), read)
            return out

    async def set_read(self, channel_id, user_id, seq):
        read = await self._set_read(channel_id, user_id, seq)
        with self._op():
            await self._cql.write("receipt_read", (read, read, channel_id, user_id))
        return read

    async def _set_read(self, channel_id, user_id, seq):
        with self._op():
            member, head, cursor = await self._gather(
                lambda: self._cql.one("member_get", (channel_id, user_id)), lambda: self._head_seq(channel_id),
                lambda: self._cql.one("cursor_get", (user_id, channel_id)))
            if member is None:
                raise ChatError("not_member", "you are not a member of this channel")
            target = min(seq, head)
            current = cursor["read_seq"] if cursor else None
            for _ in range(MEMBER_ATTEMPTS):
                if current is not None and target <= current:
                    return current
                if current is None:
                    applied, row = await self._lwt("cursor_create", (user_id, channel_id, max(target, 0)))
                else:
                    applied, row = await self._lwt("cursor_raise", (target, user_id, channel_id, target))
                if applied:
                    return max(target, 0) if current is None else target
                current = row.get("read_seq")
            raise ChatError("unavailable", "the read cursor is changing too fast; retry")

    # ---- presence ----------------------------------------------------------------------------
    async def set_last_active(self, user_id, at):
        with self._op():
            await self._cql.write("presence_set", (int(at * 1_000_000), at, user_id))

    async def get_last_active(self, user_ids):
        with self._op():
            ids = list(dict.fromkeys(user_ids))
            rows = await self._gather(*[lambda u=u: self._cql.one("presence_get", (u,)) for u in ids])
            return {u: r["last_active_at"] for u, r in zip(ids, rows) if r is not None}

    # ---- token revocation --------------------------------------------------------------------
    async def revoke_token(self, token_key, user_id, device_id, expires_at):
        with self._op():
            ttl = max(1, min(MAX_TTL_S, math.ceil(expires_at - time.time()) + 60))  # a minute of clock skew
            await self._cql.write("revoked_put", (token_key, user_id, device_id, expires_at, ttl))

    async def token_revoked(self, token_key, user_id=None, device_id="", issued_at=0.0):
        with self._op():
            if user_id is None or not 0 < user_id <= MAX_INT64:
                return await self._cql.one("revoked_get", (token_key,)) is not None
            # two partitions, read at once: one round trip
            key_row, cutoffs = await self._gather(lambda: self._cql.one("revoked_get", (token_key,)),
                                                  lambda: self._cql.rows("cutoffs_get", (user_id, "", device_id)))
            return key_row is not None or any(r["revoked_before"] > issued_at for r in cutoffs
                                              if r["revoked_before"] is not None)

    async def revoke_before(self, user_id, device_id, before, expires_at):
        with self._op():
            ttl = max(1, min(MAX_TTL_S, math.ceil(expires_at - time.time())))
            ts = _micros(before)
            await self._cql.write("cutoff_put", (ttl, ts, before, user_id, device_id or ""))
            if device_id is None:
                await self._cql.write("user_devices_delete", (ts, user_id))
            else:
                await self._cql.write("user_device_delete", (ts, user_id, device_id))

    # ---- invites ---------------------------------------------------------------------------
    async def use_invite(self, invite_id, max_uses, expires_at):
        with self._op():
            if max_uses < 1:
                return False
            ttl = max(1, min(MAX_TTL_S, math.ceil(expires_at - time.time()) + 60))
            applied, row = await self._lwt("invite_first_use", (invite_id, ttl))
            for _ in range(MEMBER_ATTEMPTS):
                if applied:
                    return True
                uses = row.get("uses")
                if uses is None:  # expired between the two statements: it is refused anyway
                    return False
                if uses >= max_uses:
                    return False
                applied, row = await self._lwt("invite_next_use", (ttl, uses + 1, invite_id, uses))
            raise ChatError("unavailable", "the invite is being used by many sign-ups at once; retry")

    # ---- media -----------------------------------------------------------------------------
    # ``media`` is authoritative; ``media_orphans`` marks the uploads no reference named yet (a mark
    # left by a crash between the writes only makes the collector look at the record again: it
    # checks ``media_refs`` before deleting), ``media_by_owner`` counts the hourly quota.
    async def add_media(self, record):
        with self._op():
            await self._cql.write("media_put", (record.id, record.owner_id, record.created_at, record.size,
                                                json.dumps(record.info)))
            await self._gather(
                lambda: self._cql.write("media_owner_put", (record.owner_id, record.created_at, record.id,
                                                            record.size)),
                lambda: self._cql.write("media_orphan_put", (_orphan_bucket(record.id), record.created_at,
                                                             record.id)))

    async def get_media(self, media_ids):
        with self._op():
            ids = list(dict.fromkeys(media_ids))
            rows = await self._gather(*[lambda i=i: self._cql.one("media_get", (i,)) for i in ids])
            return {r["id"]: _media(r) for r in rows if r}

    async def media_usage(self, owner_id, since):
        with self._op():
            rows = await self._cql.rows("media_owner_since", (owner_id, since))
            return len(rows), sum(r["size"] or 0 for r in rows)

    async def add_media_refs(self, media_ids, channel_id, msg_key):
        with self._op():
            records = await self.get_media(media_ids)
            await self._gather(*[lambda m=m: self._cql.write("media_ref_put", (m, channel_id, msg_key))
                                 for m in media_ids])
            await self._gather(*[lambda r=r: self._cql.write("media_orphan_delete", (_orphan_bucket(r.id),
                                                                                      r.created_at, r.id))
                                 for r in records.values()])

    async def media_channels(self, media_id):
        with self._op():
            return list(dict.fromkeys(r["channel_id"] for r in await self._cql.rows("media_refs_get", (media_id,))))

    async def remove_media_refs(self, media_ids, channel_id, msg_key):
        with self._op():
            await self._gather(*[lambda m=m: self._cql.write("media_ref_delete", (m, channel_id, msg_key))
                                 for m in media_ids])
            left = await self._gather(*[lambda m=m: self._cql.one("media_ref_any", (m,)) for m in media_ids])
            return [m for m, row in zip(media_ids, left) if row is None]

    async def orphan_media(self, before, limit):
        with self._op():
            marks = await self._gather(*[lambda b=b: self._cql.rows("media_orphans_before", (b, before, limit))
                                         for b in range(MEDIA_ORPHAN_BUCKETS)])
            ids = sorted((r["created_at"], r["id"]) for rows in marks for r in rows)[:limit]
            records = await self.get_media([i for _, i in ids])
            gone = [(t, i) for t, i in ids if i not in records]
            await self._gather(*[lambda t=t, i=i: self._cql.write("media_orphan_delete", (_orphan_bucket(i), t, i))
                                 for t, i in gone])
            return [records[i] for _, i in ids if i in records]

    async def delete_media(self, media_id):
        with self._op():
            record = (await self.get_media([media_id])).get(media_id)
            await self._cql.write("media_delete", (media_id,))
            if record is not None:
                await self._cql.write("media_orphan_delete", (_orphan_bucket(media_id), record.created_at, media_id))

    # ---- push notifications ----------------------------------------------------------------
    # ``push_tokens`` (by token) is authoritative, ``push_tokens_by_user`` lists them: a by-user row
    # whose token moved to someone else (a crash or a race between the two writes) is never
    # returned by push_tokens, and is removed by the next add/remove of that user.
    async def add_push_token(self, token):
        with self._op():
            old = await self._cql.one("push_token_get", (token.token,))
            if old and old["user_id"] != token.user_id:
                await self._cql.write("push_user_token_delete", (old["user_id"], token.token))
            for row in await self._cql.rows("push_user_tokens", (token.user_id,)):
                if row["device_id"] == token.device_id and row["push_token"] != token.token:
                    await self._lwt("push_token_delete", (row["push_token"], token.user_id))
                    await self._cql.write("push_user_token_delete", (token.user_id, row["push_token"]))
            params = (token.token, token.user_id, token.device_id, token.provider, token.app_id, token.created_at)
            await self._cql.write("push_token_put", params)
            await self._cql.write("push_user_token_put", params)

    async def push_token_holder(self, token):
        with self._op():
            row = await self._cql.one("push_token_get", (token,))
            return push_token_from_row(row) if row else None

    async def remove_push_token(self, user_id, token):
        with self._op():
            applied, _ = await self._lwt("push_token_delete", (token, user_id))
            await self._cql.write("push_user_token_delete", (user_id, token))
            return applied

    async def push_tokens(self, user_id):
        with self._op():
            rows = await self._cql.rows("push_user_tokens", (user_id,))
            owners = await self._gather(*[lambda r=r: self._cql.one("push_token_get", (r["push_token"],)) for r in rows])
            return sorted((push_token_from_row(o) for o in owners if o and o["user_id"] == user_id),
                          key=lambda t: t.token)

    async def enqueue_pushes(self, entries):
        with self._op():
            await self._gather(*[lambda e=e: self._cql.write("push_enqueue", (
                push_slot(e.user_id), e.user_id, e.channel_id, e.seq, e.sender_id, e.body, e.queued_at))
                for e in entries])

    async def pending_pushes(self, slot, limit):
        with self._op():
            page = await self._cql.execute("push_pending", (slot, limit), fetch_size=max(limit, 1))
            return [push_entry_from_row(r) for r in page.rows]

    async def delete_pushes(self, user_id, channel_id, upto_seq):
        with self._op():
            await self._cql.write("push_dequeue", (push_slot(user_id), user_id, channel_id, upto_seq))

    async def push_marks(self, user_id, channel_id):
        with self._op():
            return {r["push_token"]: r["seq"] for r in await self._cql.rows("push_marks_get", (user_id, channel_id))}

    async def set_push_mark(self, user_id, channel_id, token, seq):
        with self._op():
            await self._cql.write("push_mark_set", (seq, seq, user_id, channel_id, token))

    async def claim_push_slots(self, owner, slots, lease_s, now):
        with self._op():
            until = now + lease_s

            async def claim(slot):
                applied, row = await self._lwt("push_lease_renew", (until, slot, owner))
                if applied:
                    return True
                if row.get("owner") is None:  # no lease row yet
                    applied, _ = await self._lwt("push_lease_create", (slot, owner, until))
                    if applied:
                        return True
                applied, _ = await self._lwt("push_lease_take", (owner, until, slot, now))
                return applied
            held = await self._gather(*[lambda s=s: claim(s) for s in slots])
            return [s for s, ok in zip(slots, held) if ok]

    async def release_push_slots(self, owner, slots):
        with self._op():
            await self._gather(*[lambda s=s: self._lwt("push_lease_renew", (0.0, s, owner)) for s in slots])

    # ---- bulk (chatd store copy; cassandra_bulk.py) ----------------------------------------------
    async def _bulk_runner(self):
        if self._bulk is None:
            if self._prepare_bulk is None:
                raise ChatError("unavailable", "this store was opened without bulk statements")
            self._bulk = await self._prepare_bulk()
        return self._bulk

    async def export_rows(self, kind, after, limit):
        from . import cassandra_bulk
        with self._op():
            return await cassandra_bulk.export_rows(self, await self._bulk_runner(), kind, after, limit)

    async def import_rows(self, kind, rows):
        from . import cassandra_bulk
        with self._op():
            await cassandra_bulk.import_rows(self, await self._bulk_runner(), kind, rows)


MEDIA_ORPHAN_BUCKETS = 16


def _orphan_bucket(media_id: str) -> int:
    return zlib.crc32(media_id.encode()) % MEDIA_ORPHAN_BUCKETS


def _media(row: dict) -> MediaRecord:
    return MediaRecord(row["id"], row["owner_id"], row["created_at"], row["size"], json.loads(row["info"]))


@contextlib.asynccontextmanager
async def open_cassandra(cfg: CassandraConfig, *, max_inflight: int = 1024):
    """Connect to the configured keyspace, check its schema version, prepare every statement; yield
    the store; on exit wait for running calls and shut the driver down."""
    keyspace = check_keyspace_name(cfg.keyspace)
    cluster, session = await connect(cfg, keyspace)
    try:
        # The version first: the other statements only prepare against the current schema.
        bucket_size = check_schema(await read_schema_row(session, cfg, keyspace), keyspace)
        cql = await CqlSession.prepare(session, STATEMENTS, cfg, max_inflight=max_inflight)
        async with trio.open_nursery() as background:  # dedup rows and head hints after the ack
            store = CassandraStore(cql, bucket_size=bucket_size, background=background)

            async def prepare_bulk():  # on the first export/import only (chatd store copy)
                from .cassandra_bulk import BULK_STATEMENTS
                return await CqlSession.prepare(session, BULK_STATEMENTS, cfg, max_inflight=max_inflight)
            store._prepare_bulk = prepare_bulk
            try:
                yield store
            finally:
                await store.aclose()
    finally:
        await shutdown(cluster)
