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

* ``messages`` rows are only ever written by ``INSERT ... IF NOT EXISTS`` on (channel, bucket, seq), and
  never changed or deleted: a seq belongs to exactly one message, whoever races for it.
* A message for seq N is only attempted when seq N-1 is known to exist (the head this process saw, or
  seq N-1 read back from the store), so the stored seqs are always exactly 1..H: no gap, ever.
* ``message_dedup`` maps (channel, sender, client_msg_id) to the *intended* seq of that message, and is
  written first, only by LWT: ``IF NOT EXISTS`` to claim, ``IF seq = <old>`` to move. The message is
  only ever inserted at the seq its dedup row names, and the row moves off N only after seq N was seen
  holding *another* message. Hence the message of one client_msg_id exists at one seq at most.
* Crash after the claim, before the insert: a resend finds the claim N; if N is still free (N-1 exists,
  so no gap) it inserts there, if another message took N it moves the claim to the head + 1. A second
  owner racing on the same resend ends at the same seq: one insert applies, the other reads the row
  back, sees its own client_msg_id and answers ``duplicate``.
* Crash after the insert, before the ack: the resend finds the claim, the insert at N is not applied and
  returns the stored row: it is ours, so the original message comes back with ``duplicate=True``.
* ``channel_heads`` is a hint written after the insert (``USING TIMESTAMP`` = seq, so a late write
  from a former owner cannot lower it). It never runs ahead of the messages, so the true head is found
  by reading forward from it (:meth:`_probe_head`, one read per bucket, normally one); a head found that
  way is written back.

Cost of one new message with this process's head cached: 2 LWTs (dedup claim, message insert; each
about 4 replica round trips in Paxos v1, 2 in Cassandra 5's Paxos v2) + 1 plain write (head), as 3
sequential client round trips; a channel's appends are serialised by a per-channel lock, so one
channel takes ~1/(3 RTT) messages per second per process (every other channel runs in parallel).
A resend costs 2 LWTs that do not apply + 1 write. A seq taken by someone else (takeover) adds one
read per bucket scanned and one LWT to move the claim.

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
import logging
import math
import time
from collections import OrderedDict

import trio
from cassandra.query import UNSET_VALUE

from ..config import CassandraConfig
from ..errors import ChatError
from .base import AppendResult, Channel, ChannelSummary, Message, Store, User, push_slot
from .cassandra_schema import (COMPONENT, SCHEMA_STATEMENTS, SCHEMA_VERSION, STATEMENTS, bucket_last_seq,
                               bucket_of, channel_from_row, check_schema, message_from_row, new_user_id,
                               push_entry_from_row, push_token_from_row, summary_from_rows, user_from_row,
                               username_key)
from .cql import CqlRunner, CqlSession, check_keyspace_name, connect, shutdown

log = logging.getLogger(__name__)

MAX_SEQ = 2**63 - 1
APPEND_ATTEMPTS = 64  # seq races resolved before giving up with "unavailable"
MEMBER_ATTEMPTS = 32  # membership version races likewise
MAX_TTL_S = 630_720_000  # Cassandra's largest TTL (20 years)
FAN_OUT = 32  # concurrent reads one call issues (get_users, channels_of, group creation)


# ---- the store ------------------------------------------------------------------------------------
class CassandraStore(Store):
    schema_version = SCHEMA_VERSION

    def __init__(self, cql: CqlRunner, *, bucket_size: int, head_cache_max: int = 100_000):
        if bucket_size < 2:
            raise ValueError("bucket_size must be >= 2")
        self._cql = cql
        self.bucket_size = bucket_size
        self._heads: OrderedDict[str, int] = OrderedDict()  # channel -> a seq known to exist (LRU)
        self._head_cache_max = head_cache_max
        self._locks: dict[str, list] = {}  # channel -> [trio.Lock, users]; gone when unused
        self._running = 0
        self._idle = trio.Event()
        self._idle.set()
        self._closed = False
        self.stats = {"appends": 0, "duplicates": 0, "seq_conflicts": 0, "lwt": 0}

    # ---- lifecycle -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _op(self):
        if self._closed:
            raise ChatError("unavailable", "the store is closed")
        if self._running == 0:
            self._idle = trio.Event()
        self._running += 1
        try:
            yield
        finally:
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

    def _note_head(self, channel_id: str, seq: int) -> None:
        """Remember that ``seq`` exists (and so the channel does)."""
        if seq >= self._heads.get(channel_id, -1):
            self._heads[channel_id] = seq
        self._heads.move_to_end(channel_id)
        while len(self._heads) > self._head_cache_max:
            self._heads.popitem(last=False)

    @contextlib.asynccontextmanager
    async def _channel_lock(self, channel_id: str):
        entry = self._locks.get(channel_id)
        if entry is None:
            entry = self._locks[channel_id] = [trio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[channel_id]

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
        if not 0 < user_id < 2**63:
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

    async def add_device(self, user_id, device_id, created_at):
        with self._op():
            await self._lwt("device_insert", (device_id, user_id, created_at))  # the first owner stays

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
        stored = head_row["last_seq"] if head_row and head_row.get("last_seq") is not None else 0
        return max(stored, self._heads.get(channel_id, 0))

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
                    return True
            raise ChatError("unavailable", "the channel's membership is changing too fast; retry")

    async def remove_member(self, channel_id, user_id):
        with self._op():
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
            read = {r["channel_id"]: r["read_seq"] for r in cursors}
            heads = await self._gather(*[lambda c=c: self._cql.one("head_get", (c["channel_id"],))
                                         for c in channels])
            out = []
            for uc, head in zip(channels, heads):
                s = summary_from_rows(uc, head, read.get(uc["channel_id"]))
                known = self._heads.get(s.id, 0)
                if known > s.last_seq:  # this process appended more than the hint shows yet
                    s = ChannelSummary(s.id, s.kind, s.name, known, s.read_seq, s.last_at)
                out.append(s)
            out.sort(key=lambda s: (-s.last_at, s.id))
            return out

    # ---- messages ------------------------------------------------------------------------
    async def append_message(self, channel_id, sender_id, client_msg_id, body, created_at, dm_pair=None):
        with self._op():
            async with self._channel_lock(channel_id):
                head = self._known_head(channel_id)
                if head is None:
                    head = await self._load_channel(channel_id, dm_pair, created_at)
                return await self._append(channel_id, head, sender_id, client_msg_id, body, created_at)

    async def _load_channel(self, channel_id, dm_pair, created_at) -> int:
        """Check the channel exists (creating a 1:1 channel on its first message); return its head."""
        row, head_row = await self._gather(lambda: self._cql.one("channel_get", (channel_id,)),
                                           lambda: self._cql.one("head_get", (channel_id,)))
        if row is None:
            if dm_pair is None:
                raise ChatError("no_such_channel", f"channel {channel_id} does not exist")
            # Members first, the channel row last: a crash in between only repeats this next time.
            await self._write_new_members(channel_id, "dm", "", created_at, list(dm_pair))
            await self._lwt("channel_insert", (channel_id, "dm", "", None, created_at))
        head, _ = await self._probe_head(channel_id, self._head_hint(channel_id, head_row))
        self._note_head(channel_id, head)
        return head

    async def _append(self, channel_id, head, sender_id, client_msg_id, body, created_at) -> AppendResult:
        key = (channel_id, sender_id, client_msg_id)
        applied, row = await self._lwt("dedup_claim", (*key, head + 1))
        intent = head + 1 if applied else row["seq"]
        for _ in range(APPEND_ATTEMPTS):
            applied, row = await self._lwt("msg_insert", (channel_id, self._bucket(intent), intent, sender_id,
                                                          client_msg_id, body, created_at))
            self._note_head(channel_id, intent)  # seq `intent` exists now, whoever wrote it
            if applied:
                await self._set_head(channel_id, intent, created_at)
                self.stats["appends"] += 1
                return AppendResult(Message(channel_id, intent, sender_id, client_msg_id, body, created_at), False)
            if row["sender_id"] == sender_id and row["client_msg_id"] == client_msg_id:
                await self._set_head(channel_id, intent, row["created_at"])  # heal a lagging hint
                self.stats["duplicates"] += 1
                return AppendResult(message_from_row(channel_id, {**row, "seq": intent}), True)
            # Another message holds `intent`: move our claim past the true head, unless someone
            # already moved it (then follow theirs).
            self.stats["seq_conflicts"] += 1
            true_head, _ = await self._probe_head(channel_id, max(intent, self._heads.get(channel_id, 0)))
            self._note_head(channel_id, true_head)
            applied, row = await self._lwt("dedup_move", (true_head + 1, *key, intent))
            intent = true_head + 1 if applied else row.get("seq")
            if intent is None:  # the claim vanished (it is never deleted; be safe anyway): claim again
                applied, row = await self._lwt("dedup_claim", (*key, true_head + 1))
                intent = true_head + 1 if applied else row["seq"]
        raise ChatError("unavailable", "could not assign a sequence number (too much contention); retry")

    async def _set_head(self, channel_id: str, seq: int, at: float) -> None:
        await self._cql.write("head_set", (seq, seq, at, channel_id))

    async def _probe_head(self, channel_id: str, hint: int) -> tuple[int, float | None]:
        """The true head, given ``hint`` (a seq known to exist, or 0), and its message's created_at
        (None if nothing newer than ``hint`` was found). Seqs are 1..H without gaps, so only the
        bucket of hint+1 and the buckets after it, while full, can hold newer ones."""
        head, at = hint, None
        bucket = self._bucket(hint + 1)
        while True:
            top = await self._cql.one("msg_top", (channel_id, bucket))
            if top is None or top["seq"] <= head:
                return head, at
            head, at = top["seq"], top["created_at"]
            if head != bucket_last_seq(bucket, self.bucket_size):
                return head, at
            bucket += 1

    async def head_seq(self, channel_id):
        with self._op():
            return await self._head_seq(channel_id)

    async def _head_seq(self, channel_id: str) -> int:
        row = await self._cql.one("head_get", (channel_id,))
        stored = row["last_seq"] if row and row.get("last_seq") is not None else 0
        head, at = await self._probe_head(channel_id, self._head_hint(channel_id, row))
        if at is not None and head > stored:  # the hint lagged (a writer died before updating it)
            await self._set_head(channel_id, head, at)
        if channel_id in self._heads:
            self._note_head(channel_id, head)
        return head

    async def read_messages(self, channel_id, *, after=None, before=None, limit):
        with self._op():
            if limit <= 0:
                return []
            if after is not None:
                hi = MAX_SEQ if before is None else min(before, MAX_SEQ)
                return await self._read_forward(channel_id, max(after, 0), hi, limit)
            top = await self._head_seq(channel_id)
            if before is not None:
                top = min(top, before - 1)
            return await self._read_backward(channel_id, top, limit)

    async def _read_forward(self, channel_id: str, lo: int, hi: int, limit: int) -> list[Message]:
        """The first ``limit`` messages with lo < seq < hi, bucket by bucket; a bucket that is not
        full up to its last seq is the last one holding messages."""
        out: list[Message] = []
        bucket = self._bucket(lo + 1)
        while len(out) < limit and lo + 1 < hi:
            rows = await self._cql.rows("msg_asc", (channel_id, bucket, lo, hi, limit - len(out)))
            out.extend(message_from_row(channel_id, r) for r in rows)
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
            bucket -= 1
        out.reverse()
        return out

    async def set_read(self, channel_id, user_id, seq):
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

    async def token_revoked(self, token_key):
        with self._op():
            return await self._cql.one("revoked_get", (token_key,)) is not None

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
                if row["device_id"] == token.device_id and row["token"] != token.token:
                    await self._lwt("push_token_delete", (row["token"], token.user_id))
                    await self._cql.write("push_user_token_delete", (token.user_id, row["token"]))
            params = (token.token, token.user_id, token.device_id, token.provider, token.app_id, token.created_at)
            await self._cql.write("push_token_put", params)
            await self._cql.write("push_user_token_put", params)

    async def remove_push_token(self, user_id, token):
        with self._op():
            applied, _ = await self._lwt("push_token_delete", (token, user_id))
            await self._cql.write("push_user_token_delete", (user_id, token))
            return applied

    async def push_tokens(self, user_id):
        with self._op():
            rows = await self._cql.rows("push_user_tokens", (user_id,))
            owners = await self._gather(*[lambda r=r: self._cql.one("push_token_get", (r["token"],)) for r in rows])
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
            return {r["token"]: r["seq"] for r in await self._cql.rows("push_marks_get", (user_id, channel_id))}

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


@contextlib.asynccontextmanager
async def open_cassandra(cfg: CassandraConfig, *, max_inflight: int = 1024):
    """Connect to the configured keyspace, check its schema version, prepare every statement; yield
    the store; on exit wait for running calls and shut the driver down."""
    keyspace = check_keyspace_name(cfg.keyspace)
    cluster, session = await connect(cfg, keyspace)
    try:
        # The version first: the other statements only prepare against the current schema.
        try:
            meta = await CqlSession.prepare(session, SCHEMA_STATEMENTS, cfg)
            row = await meta.one("schema_get", (COMPONENT,))
        except (RuntimeError, ChatError) as e:
            raise RuntimeError(f"Cassandra keyspace {keyspace!r}: cannot read its chatd schema version "
                               f"({e}); run `chatd store migrate`") from e
        bucket_size = check_schema(row, keyspace)
        cql = await CqlSession.prepare(session, STATEMENTS, cfg, max_inflight=max_inflight)
        store = CassandraStore(cql, bucket_size=bucket_size)
        try:
            yield store
        finally:
            await store.aclose()
    finally:
        await shutdown(cluster)
