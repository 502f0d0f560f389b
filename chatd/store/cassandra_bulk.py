"""Cassandra's side of ``chatd store copy``: whole-table scans out, plain writes in
(:meth:`chatd.store.base.Store.export_rows` / ``import_rows`` of ``CassandraStore``).

The scans are the only statements of chatd without a partition key; they run only here, paged by
the driver (a position is the driver's paging state, base64: valid for the same query on the same
keyspace, from any process). They are prepared on the first bulk call (``BULK_STATEMENTS``), so a
shard never prepares them.

Import writes each record in the shape the live store writes it, derived tables included
(``users_by_name``, ``devices_by_user``, ``channels_by_user``, ``read_cursors``, ``message_dedup``,
``channel_heads``, ``invitations_by_user``, ``groups_by_owner`` for the groups created within its
TTL, with the TTL left (see records.py), and the ``bucket_head`` static of each message bucket, so
the first append after the copy finds the head it expects). Writes that only rise (heads, marks,
presence) carry ``USING TIMESTAMP`` = the value as the live store's do; the rest are plain upserts,
so importing a page again changes nothing. The destination must not be in use: the copy bypasses
the live store's conditional writes. Errors: ``ChatError("unavailable")`` from the driver bridge, as everywhere.
"""

from __future__ import annotations

import base64
import math
import time

from .base import push_slot
from .. import lifecycle as lc
from .cassandra_schema import _MSG, GROUPS_CREATED_TTL_S, bucket_of, username_key
from .cql import READ, WRITE
from .records import check_kind

BULK_STATEMENTS: dict[str, tuple[str, str]] = {
    "users_scan": (READ, "SELECT id, username, password_hash, display_name, about, created_at, disabled FROM users"),
    "presence_scan": (READ, "SELECT user_id, last_active_at FROM presence"),
    "devices_scan": (READ, "SELECT device_id, user_id, created_at FROM devices"),
    "user_device_get": (READ, "SELECT last_login_at FROM devices_by_user WHERE user_id = ? AND device_id = ?"),
    "token_cutoffs_scan": (READ, "SELECT user_id, device_id, revoked_before, TTL(revoked_before) AS ttl "
                                 "FROM token_cutoffs"),
    "revoked_tokens_scan": (READ, "SELECT token_key, user_id, device_id, expires_at FROM revoked_tokens"),
    "invite_uses_scan": (READ, "SELECT invite_id, uses, TTL(uses) AS ttl FROM invite_uses"),
    "channels_scan": (READ, "SELECT id, kind, name, owner_id, created_at FROM channels"),
    "members_scan": (READ, "SELECT channel_id, user_id, joined_at FROM members_by_channel"),
    "group_departures_scan": (READ, "SELECT channel_id, user_id, left_at, invited_by, invited_at "
                                    "FROM group_departures"),
    "media_scan": (READ, "SELECT id, owner_id, created_at, size, info FROM media"),
    "media_orphan_get": (READ, "SELECT id FROM media_orphans WHERE bucket = ? AND created_at = ? AND id = ?"),
    "messages_scan": (READ, f"SELECT channel_id, {_MSG} FROM messages"),
    "reactions_scan": (READ, "SELECT channel_id, seq, emoji, user_id, at FROM reactions"),
    "media_refs_scan": (READ, "SELECT media_id, channel_id, msg_key FROM media_refs"),
    "push_tokens_scan": (READ, "SELECT push_token, user_id, device_id, provider, app_id, created_at "
                               "FROM push_tokens"),
    "push_outbox_scan": (READ, "SELECT user_id, channel_id, seq, sender_id, body, queued_at FROM push_outbox"),
    "push_marks_scan": (READ, "SELECT user_id, channel_id, push_token, seq FROM push_marks"),
    # plain upserts of what the live store writes conditionally
    "user_put": (WRITE, "INSERT INTO users (id, username, password_hash, display_name, about, created_at, "
                        "disabled) VALUES (?, ?, ?, ?, ?, ?, ?)"),
    "name_put": (WRITE, "INSERT INTO users_by_name (username_key, user_id) VALUES (?, ?)"),
    "device_put": (WRITE, "INSERT INTO devices (device_id, user_id, created_at) VALUES (?, ?, ?)"),
    "invite_put": (WRITE, "INSERT INTO invite_uses (invite_id, uses) VALUES (?, ?) USING TTL ?"),
    "channel_put": (WRITE, "INSERT INTO channels (id, kind, name, owner_id, created_at) VALUES (?, ?, ?, ?, ?)"),
    "msg_put_bulk": (WRITE, "INSERT INTO messages (channel_id, bucket, seq, sender_id, client_msg_id, body, created_at, "
                            "kind, target_seq, reply_to, meta, attachments) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
    # a message's folded state, at the timestamp the live store's last fold wrote it (its state_seq)
    "fold_put_bulk": (WRITE, "UPDATE messages USING TIMESTAMP ? SET edited_body = ?, edited_at = ?, deleted_by = ?, "
                             "deleted_at = ?, state_seq = ? WHERE channel_id = ? AND bucket = ? AND seq = ?"),
    "media_owner_put_ttl": (WRITE, "INSERT INTO media_by_owner (owner_id, created_at, id, size) VALUES (?, ?, ?, ?) "
                                   "USING TTL ?"),
    "bucket_head_put": (WRITE, "UPDATE messages USING TIMESTAMP ? SET bucket_head = ? "
                               "WHERE channel_id = ? AND bucket = ?"),
}


def _encode(paging_state: bytes | None) -> str | None:
    return None if paging_state is None else base64.b64encode(paging_state).decode()


def _ttl(expires_at: float) -> int:
    from .cassandra import MAX_TTL_S
    return max(1, min(MAX_TTL_S, math.ceil(expires_at - time.time())))


async def export_rows(store, bulk, kind: str, after, limit: int):
    """One page of records of ``kind`` from ``store`` (a ``CassandraStore``; ``bulk``: its runner of
    ``BULK_STATEMENTS``)."""
    check_kind(kind)
    page = await bulk.execute(f"{kind}_scan", (), paging_state=None if after is None else base64.b64decode(after),
                              fetch_size=max(1, limit))
    rows = page.rows
    now = time.time()
    if kind == "users":
        out = [(r["id"], r["username"], r["password_hash"] or "", r["display_name"] or "", r["about"] or "",
                r["created_at"], int(bool(r["disabled"]))) for r in rows]
    elif kind == "presence":
        out = [(r["user_id"], r["last_active_at"]) for r in rows]
    elif kind == "devices":
        listed = await store._gather(*[lambda r=r: bulk.one("user_device_get", (r["user_id"], r["device_id"]))
                                       for r in rows])
        out = [(r["device_id"], r["user_id"], r["created_at"],
                d["last_login_at"] if d and d.get("last_login_at") is not None else r["created_at"], int(d is not None))
               for r, d in zip(rows, listed)]
    elif kind == "token_cutoffs":
        out = [(r["user_id"], r["device_id"], r["revoked_before"], now + (r["ttl"] or 0)) for r in rows]
    elif kind == "revoked_tokens":
        out = [(r["token_key"], r["user_id"], r["device_id"], r["expires_at"]) for r in rows]
    elif kind == "invite_uses":
        out = [(r["invite_id"], r["uses"], now + (r["ttl"] or 0)) for r in rows]
    elif kind == "channels":
        heads = await store._gather(*[lambda r=r: _true_head(store, r) for r in rows])
        out = [(r["id"], r["kind"], r["name"] or "", r["owner_id"], r["created_at"], seq, at)
               for r, (seq, at) in zip(rows, heads)]
    elif kind == "members":
        rows = [r for r in rows if r["user_id"] is not None]  # a partition with only its static column
        cursors = await store._gather(*[lambda r=r: store._cql.one("cursor_get", (r["user_id"], r["channel_id"]))
                                        for r in rows])
        channel_ids = list(dict.fromkeys(r["channel_id"] for r in rows))
        receipts = await store._gather(*[lambda c=c: store._cql.rows("receipts_of", (c,)) for c in channel_ids])
        held = {(c, x["user_id"]): max(x["delivered_seq"] or 0, x["read_seq"] or 0)
                for c, part in zip(channel_ids, receipts) for x in part}
        out = [(r["channel_id"], r["user_id"], r["joined_at"], (c or {}).get("read_seq") or 0,
                held.get((r["channel_id"], r["user_id"]), 0)) for r, c in zip(rows, cursors)]
    elif kind == "group_departures":
        out = [(r["channel_id"], r["user_id"], r["left_at"], r["invited_by"], r["invited_at"])
               for r in rows if r["left_at"] is not None]  # as ``departure``: no left_at, no departure
    elif kind == "media":
        from .cassandra import _orphan_bucket
        marks = await store._gather(*[lambda r=r: bulk.one("media_orphan_get", (_orphan_bucket(r["id"]),
                                                                                r["created_at"], r["id"]))
                                      for r in rows])
        out = [(r["id"], r["owner_id"], r["created_at"], r["size"], r["info"], int(m is None))
               for r, m in zip(rows, marks)]
    elif kind == "messages":
        out = [_folded_record(r) for r in rows if r["seq"] is not None]  # a bucket with only its static bucket_head
    elif kind == "reactions":
        out = [(r["channel_id"], r["seq"], r["emoji"], r["user_id"], r["at"]) for r in rows]
    elif kind == "media_refs":
        out = [(r["media_id"], r["channel_id"], r["msg_key"]) for r in rows]
    elif kind == "push_tokens":
        out = [(r["push_token"], r["user_id"], r["device_id"] or "", r["provider"] or "", r["app_id"] or "",
                r["created_at"] or 0.0) for r in rows]
    elif kind == "push_outbox":
        out = [(r["user_id"], r["channel_id"], r["seq"], r["sender_id"], r["body"] or "", r["queued_at"])
               for r in rows]
    else:  # push_marks
        out = [(r["user_id"], r["channel_id"], r["push_token"], r["seq"]) for r in rows]
    return out, _encode(page.paging_state)


def _folded_record(r: dict) -> tuple:
    """A ``messages`` row -> its record: the text a client reads (``edited_body`` over ``body``;
    '' once deleted, when ``edited_at`` no longer counts), as ``message_from_row`` folds it."""
    deleted = r["deleted_at"] is not None
    edited = not deleted and r["edited_body"] is not None
    body = "" if deleted else r["edited_body"] if edited else r["body"]
    return (r["channel_id"], r["seq"], r["sender_id"], r["client_msg_id"], body, r["created_at"], r["kind"],
            r["target_seq"], r["reply_to"], r["meta"], r["edited_at"] if edited else None, r["deleted_by"],
            r["deleted_at"], r["state_seq"], r["attachments"] or "")


async def _true_head(store, row: dict) -> tuple[int, float]:
    """A channel's true head seq and when it was written (the head hint may lag: see cassandra.py)."""
    hint = await store._cql.one("head_get", (row["id"],))
    stored = hint["last_seq"] if hint and hint.get("last_seq") is not None else 0
    head, at, _ = await store._probe_head(row["id"], stored)
    if at is None:
        at = hint["last_at"] if hint and hint.get("last_at") is not None else row["created_at"]
    return head, at


def _micros(at: float) -> int:
    return int(at * 1_000_000)


async def import_rows(store, bulk, kind: str, rows: list[tuple]) -> None:
    """Write records of ``kind`` into ``store`` (see the module docstring)."""
    check_kind(kind)
    cql = store._cql
    writes: list[tuple] = []  # (runner, statement, params)
    for r in rows:
        if kind == "users":
            writes += [(bulk, "user_put", (*r[:6], bool(r[6]))), (bulk, "name_put", (username_key(r[1]), r[0]))]
        elif kind == "presence":
            writes.append((cql, "presence_set", (_micros(r[1]), r[1], r[0])))
        elif kind == "devices":
            device_id, user_id, created_at, last_login_at, listed = r
            writes.append((bulk, "device_put", (device_id, user_id, created_at)))
            if listed:
                writes.append((cql, "user_device_put", (user_id, device_id, created_at, last_login_at,
                                                        _micros(last_login_at))))
        elif kind == "token_cutoffs":
            user_id, device_id, before, expires_at = r
            if expires_at > time.time():
                writes.append((cql, "cutoff_put", (_ttl(expires_at), _micros(before), before, user_id, device_id)))
        elif kind == "revoked_tokens":
            if r[3] > time.time():
                writes.append((cql, "revoked_put", (*r, _ttl(r[3]) + 60)))
        elif kind == "invite_uses":
            if r[2] > time.time():
                writes.append((bulk, "invite_put", (r[0], r[1], _ttl(r[2]) + 60)))
        elif kind == "channels":
            channel_id, kind_, name, owner_id, created_at, last_seq, last_at = r
            writes.append((bulk, "channel_put", (channel_id, kind_, name, owner_id, created_at)))
            if last_seq:
                writes.append((cql, "head_set", (last_seq, last_seq, last_at, channel_id)))
            left_s = math.floor(created_at + GROUPS_CREATED_TTL_S - time.time())
            if kind_ == "group" and left_s > 0:  # still counted by limits.groups_created_per_hour
                writes.append((cql, "group_created_put", (owner_id, created_at, channel_id, left_s)))
        elif kind == "group_departures":
            writes.append((cql, "departure_put", r))
            if r[4] is not None:  # invited back: listed by user too
                writes.append((cql, "user_invitation_put", (r[1], r[0])))
        elif kind == "members":
            channel_id, user_id, _, read_seq, delivered_seq = r
            writes.append((cql, "member_insert", r[:3]))
            if delivered_seq:  # receipts: USING TIMESTAMP = the seq, as the live store writes them
                writes.append((cql, "receipt_delivered", (delivered_seq, delivered_seq, channel_id, user_id)))
            if read_seq:
                writes.append((cql, "receipt_read", (read_seq, read_seq, channel_id, user_id)))
        elif kind == "media":
            from .cassandra import _orphan_bucket
            media_id, owner_id, created_at, size, info, referenced = r
            writes.append((cql, "media_put", (media_id, owner_id, created_at, size, info)))
            left_s = math.floor(created_at + MEDIA_BY_OWNER_TTL_S - time.time())
            if left_s > 0:  # still counted by the hourly upload quota
                writes.append((bulk, "media_owner_put_ttl", (owner_id, created_at, media_id, size, left_s)))
            if not referenced:
                writes.append((cql, "media_orphan_put", (_orphan_bucket(media_id), created_at, media_id)))
        elif kind == "messages":  # the rows themselves: one batch per partition, below
            channel_id, seq, sender_id, client_msg_id = r[:4]
            kind_, target_seq, state_seq = r[6], r[7], r[13]
            writes.append((cql, "dedup_put", (channel_id, sender_id, client_msg_id, seq)))
            if state_seq:  # the fold, at the timestamp the live store wrote it: later events still win
                edited_body = "" if r[12] is not None else r[4] if r[10] is not None else None
                writes.append((bulk, "fold_put_bulk", (state_seq, edited_body, r[10], r[11], r[12], state_seq,
                                                       channel_id, bucket_of(seq, store.bucket_size), seq)))
            if kind_ in lc.TARGETED and target_seq:  # message_events: derived from the event rows
                writes.append((cql, "event_index_put", (channel_id, bucket_of(target_seq, store.bucket_size),
                                                        target_seq, seq, kind_)))
        elif kind == "reactions":  # USING TIMESTAMP = the message's seq: below every event after it
            channel_id, seq, emoji, user_id, at = r
            writes.append((cql, "reaction_put", (channel_id, bucket_of(seq, store.bucket_size), seq, emoji, user_id,
                                                 at, seq)))
        elif kind == "media_refs":
            writes.append((cql, "media_ref_put", r))
        elif kind == "push_tokens":
            token, user_id, device_id, provider, app_id, created_at = r
            params = (token, user_id, device_id, provider, app_id, created_at)
            writes += [(cql, "push_token_put", params), (cql, "push_user_token_put", params)]
        elif kind == "push_outbox":
            writes.append((cql, "push_enqueue", (push_slot(r[0]), *r)))
        else:  # push_marks
            user_id, channel_id, token, seq = r
            writes.append((cql, "push_mark_set", (seq, seq, user_id, channel_id, token)))
    if kind == "members":
        writes += await _member_rows(store, rows)
    batches = _message_batches(store.bucket_size, rows) if kind == "messages" else []
    await store._gather(*[lambda w=w: w[0].write(w[1], w[2]) for w in writes],
                        *[lambda b=b: bulk.batch(b) for b in batches])


MEDIA_BY_OWNER_TTL_S = 7200  # media_by_owner's TTL (cassandra_schema's media_owner_put)
MESSAGES_PER_BATCH = 50  # rows of one partition in one unlogged batch, and at most
MAX_BATCH_BYTES = 1 << 20  # body characters in one (as the live store's append batches; a larger message goes alone)


def _message_batches(bucket_size: int, rows: list[tuple]) -> list[list[tuple]]:
    """Message rows grouped by partition (channel, bucket), each group in unlogged single-partition
    batches that also raise the bucket's ``bucket_head`` to their highest seq (``USING TIMESTAMP``
    = seq: the highest wins, whatever order batches land in)."""
    by_partition: dict[tuple[str, int], list[tuple]] = {}
    for r in rows:
        by_partition.setdefault((r[0], bucket_of(r[1], bucket_size)), []).append(r)
    out = []
    for (channel_id, bucket), part in by_partition.items():
        chunk: list[tuple] = []
        size = 0
        for r in part + [None]:
            if chunk and (r is None or len(chunk) == MESSAGES_PER_BATCH or size + _size(r) > MAX_BATCH_BYTES):
                top = max(c[1] for c in chunk)
                out.append([("msg_put_bulk", (channel_id, bucket, *c[1:10], c[14])) for c in chunk]
                           + [("bucket_head_put", (top, top, channel_id, bucket))])
                chunk, size = [], 0
            if r is not None:
                chunk.append(r)
                size += _size(r)
    return out


def _size(r: tuple) -> int:
    return len(r[4]) + len(r[14] or "")


async def _member_rows(store, rows: list[tuple]) -> list[tuple]:
    """The by-user rows of imported memberships (``channels_by_user`` needs the channel's kind and
    name, imported before) and each channel's ``member_version``."""
    cql = store._cql
    channel_ids = list(dict.fromkeys(r[0] for r in rows))
    channels = await store._gather(*[lambda c=c: cql.one("channel_get", (c,)) for c in channel_ids])
    by_id = {c: ch for c, ch in zip(channel_ids, channels) if ch is not None}
    writes: list[tuple] = [(cql, "member_version_set", (0, c)) for c in by_id]
    for channel_id, user_id, joined_at, read_seq, _ in rows:
        ch = by_id.get(channel_id)
        if ch is None:  # a membership of a channel the source never finished creating
            continue
        writes += [(cql, "user_channel_insert", (user_id, channel_id, ch["kind"], ch["name"] or "", ch["created_at"],
                                                 joined_at)),
                   (cql, "cursor_set", (user_id, channel_id, read_seq))]
    return writes
