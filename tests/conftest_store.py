"""An in-memory emulation of one chatd Cassandra keyspace, for running ``CassandraStore`` without a server.

``EmulatedKeyspace`` implements :class:`chatd.store.cql.CqlRunner` by *statement name*: each name in
``chatd.store.cassandra_schema.STATEMENTS`` has a handler with the semantics Cassandra gives that CQL
(upserts, partition-scoped reads, clustering order, ``LIMIT``, paging, ``IF NOT EXISTS`` / ``IF col = ?``
returning ``[applied]`` and the current values, conditional single-partition batches, ``USING
TIMESTAMP`` last-write-wins). It checks what the real cluster would refuse or what would be a bug
(a message written to the wrong bucket, a conditional batch over two partitions).

It is a model, not Cassandra: it proves the store's logic (sequencing, dedup, paging, buckets), not the
CQL text or the driver; the contract suite runs against a real server with ``CHATD_TEST_CASSANDRA``.

Fault injection: ``fail[name] = "before"`` loses the next request of that statement (never applied),
``"after"`` applies it and then reports a timeout - the unknown-outcome case of a real cluster.
"""

from __future__ import annotations

from collections import Counter

import trio
from cassandra.query import UNSET_VALUE

from chatd.errors import ChatError
from chatd.store.cassandra_schema import STATEMENTS, bucket_of
from chatd.store.cql import LWT, PAGE_ROWS, READ, CqlRunner, Page


class EmulatedKeyspace(CqlRunner):
    def __init__(self, bucket_size: int):
        self.bucket_size = bucket_size
        self.tables: dict[str, dict] = {t: {} for t in (
            "schema_version", "users", "users_by_name", "devices", "channels", "channel_heads",
            "members_by_channel", "channels_by_user", "read_cursors", "messages", "message_dedup",
            "push_tokens", "push_tokens_by_user", "push_outbox", "push_marks", "push_leases", "bucket_heads",
            "groups_by_owner", "group_departures", "invitations_by_user",
            "reactions", "message_events", "cell_ts", "receipts")}
        self.calls: Counter = Counter()
        self.fail: dict[str, str] = {}
        self.page_rows: int | None = None  # force small pages to exercise paging

    # ---- CqlRunner ----------------------------------------------------------------------------
    async def execute(self, name, params, *, paging_state=None, fetch_size=PAGE_ROWS):
        await trio.lowlevel.checkpoint()  # a round trip: other tasks run meanwhile
        self.calls[name] += 1
        kind = STATEMENTS[name][0]
        mode = self._failure(name)
        if kind == READ:
            rows = getattr(self, "r_" + name)(*params)
            start = int(paging_state or b"0")
            size = self.page_rows or fetch_size
            nxt = start + size
            return Page(rows[start:nxt], str(nxt).encode() if nxt < len(rows) else None)
        if kind == LWT:
            ok, current = getattr(self, "c_" + name)(*params)
            if ok:
                getattr(self, "w_" + name)(*params)
            result = [{"[applied]": True}] if ok else [{"[applied]": False, **current}]
        else:
            getattr(self, "w_" + name)(*params)
            result = []
        if mode == "after":
            raise ChatError("unavailable", f"injected timeout after {name}")
        return Page(result, None)

    async def execute_batch(self, items, *, conditional):
        await trio.lowlevel.checkpoint()
        self.calls["batch"] += 1
        # chatd batches statements on one members_by_channel partition, or one messages partition
        names = {n for n, _ in items}
        if names == {"dedup_put"} and not conditional:  # a batch's dedup rows: one request, <= 10 partitions
            assert len(items) <= 10, items
            mode = self._failure("dedup_put")
            for name, params in items:
                self.w_dedup_put(*params)
            if mode == "after":
                raise ChatError("unavailable", "injected timeout after batch dedup_put")
            return []
        assert names <= {"member_version_cas", "member_version_set", "member_insert", "member_delete"} or \
            names <= {"bucket_advance", "msg_put", "msg_put_event"}, items
        partitions = {params[1] if n.startswith("member_version") else
                      (params[1], params[2]) if n == "bucket_advance" else
                      (params[0], params[1]) if n in ("msg_put", "msg_put_event") else params[0] for n, params in items}
        assert len(partitions) == 1, f"batch over several partitions: {items}"
        mode = self._failure(items[0][0])
        result = [{"[applied]": True}] if conditional else []
        if conditional:
            for name, params in items:
                if STATEMENTS[name][0] == LWT:
                    ok, current = getattr(self, "c_" + name)(*params)
                    if not ok:
                        result = [{"[applied]": False, **current}]
        if result == [] or result[0]["[applied]"]:
            for name, params in items:
                getattr(self, "w_" + name)(*params)
        if mode == "after":
            raise ChatError("unavailable", f"injected timeout after batch {items[0][0]}")
        return result

    def _failure(self, name):
        mode = self.fail.pop(name, None)
        if mode == "before":
            raise ChatError("unavailable", f"injected failure before {name}")
        return mode

    # ---- users, devices ---------------------------------------------------------------------------
    def c_user_insert(self, uid, *rest):
        row = self.tables["users"].get(uid)
        return row is None, dict(row or {})

    def w_user_insert(self, uid, username, password_hash, display_name, about, created_at):
        self.tables["users"][uid] = {"id": uid, "username": username, "password_hash": password_hash,
                                     "display_name": display_name, "about": about, "created_at": created_at}

    def w_user_delete(self, uid):
        self.tables["users"].pop(uid, None)

    def r_user_get(self, uid):
        row = self.tables["users"].get(uid)
        return [dict(row)] if row else []

    def w_user_set_profile(self, display_name, about, uid):  # an UPDATE is an upsert
        row = self.tables["users"].setdefault(uid, {"id": uid, "username": None, "password_hash": None,
                                                    "display_name": None, "about": None, "created_at": None})
        if display_name is not UNSET_VALUE:
            row["display_name"] = display_name
        if about is not UNSET_VALUE:
            row["about"] = about

    def c_user_set_disabled(self, disabled, uid):
        return uid in self.tables["users"], {}

    def w_user_set_disabled(self, disabled, uid):
        self.tables["users"][uid]["disabled"] = disabled

    def c_user_set_name(self, username, uid):
        return uid in self.tables["users"], {}

    def w_user_set_name(self, username, uid):
        self.tables["users"][uid]["username"] = username

    def c_name_release(self, key, uid):
        row = self.tables["users_by_name"].get(key)
        return row is not None and row["user_id"] == uid, {} if row is None else {"user_id": row["user_id"]}

    def w_name_release(self, key, uid):
        self.tables["users_by_name"].pop(key, None)

    def c_channel_set_owner(self, owner_id, cid):
        return cid in self.tables["channels"], {}

    def w_channel_set_owner(self, owner_id, cid):
        self.tables["channels"][cid]["owner_id"] = owner_id

    def c_name_claim(self, key, uid):
        row = self.tables["users_by_name"].get(key)
        return row is None, dict(row or {})

    def w_name_claim(self, key, uid):
        self.tables["users_by_name"][key] = {"username_key": key, "user_id": uid}

    def r_name_get(self, key):
        row = self.tables["users_by_name"].get(key)
        return [{"user_id": row["user_id"]}] if row else []

    def c_device_insert(self, device_id, uid, at):
        row = self.tables["devices"].get(device_id)
        return row is None, dict(row or {})

    def w_device_insert(self, device_id, uid, at):
        self.tables["devices"][device_id] = {"device_id": device_id, "user_id": uid, "created_at": at}

    def r_device_get(self, device_id):
        row = self.tables["devices"].get(device_id)
        return [{"user_id": row["user_id"]}] if row else []

    # devices_by_user: rows and deletes carry their USING TIMESTAMP; the higher wins (a tie: the delete)
    def _user_devices(self, uid):
        return self.tables.setdefault("devices_by_user", {}).setdefault(uid, {"deleted": -1, "rows": {}})

    def w_user_device_put(self, uid, device_id, created_at, last_login_at, ts):
        part = self._user_devices(uid)
        old = part["rows"].get(device_id)
        if ts > part["deleted"] and (old is None or ts >= old["ts"]):
            part["rows"][device_id] = {"device_id": device_id, "created_at": created_at,
                                       "last_login_at": last_login_at, "ts": ts}

    def w_user_device_delete(self, ts, uid, device_id):
        part = self._user_devices(uid)
        old = part["rows"].get(device_id)
        if old is not None and ts >= old["ts"]:
            del part["rows"][device_id]

    def w_user_devices_delete(self, ts, uid):
        part = self._user_devices(uid)
        part["deleted"] = max(part["deleted"], ts)
        part["rows"] = {d: r for d, r in part["rows"].items() if r["ts"] > ts}

    def r_user_devices(self, uid):
        rows = self._user_devices(uid)["rows"]
        return [{k: r[k] for k in ("device_id", "created_at", "last_login_at")} for _, r in sorted(rows.items())]

    # ---- channels -----------------------------------------------------------------------------------
    def c_channel_insert(self, cid, *rest):
        row = self.tables["channels"].get(cid)
        return row is None, dict(row or {})

    def w_channel_insert(self, cid, kind, name, owner_id, created_at):
        self.tables["channels"][cid] = {"id": cid, "kind": kind, "name": name, "owner_id": owner_id,
                                        "created_at": created_at}

    def r_channel_get(self, cid):
        row = self.tables["channels"].get(cid)
        return [dict(row)] if row else []

    def w_presence_set(self, ts, at, uid):
        row = self.tables.setdefault("presence", {}).get(uid)
        if row is None or ts >= row["ts"]:  # last write wins, by timestamp
            self.tables["presence"][uid] = {"ts": ts, "last_active_at": at}

    def r_presence_get(self, uid):
        row = self.tables.setdefault("presence", {}).get(uid)
        return [{"last_active_at": row["last_active_at"]}] if row else []

    def w_revoked_put(self, key, uid, device_id, expires_at, ttl):
        import time  # USING TTL: the row disappears ttl seconds after the write
        self.tables.setdefault("revoked_tokens", {})[key] = {"user_id": uid, "until": time.time() + ttl}

    def w_cutoff_put(self, ttl, ts, before, uid, device_id):
        import time  # USING TTL and TIMESTAMP: the highest timestamp wins; gone ttl seconds after the write
        part = self.tables.setdefault("token_cutoffs", {}).setdefault(uid, {})
        old = part.get(device_id)
        if old is None or ts >= old["ts"] or old["until"] <= time.time():
            part[device_id] = {"revoked_before": before, "ts": ts, "until": time.time() + ttl}

    def r_cutoffs_get(self, uid, *device_ids):
        import time
        part = self.tables.setdefault("token_cutoffs", {}).get(uid, {})
        return [{"device_id": d, "revoked_before": part[d]["revoked_before"]} for d in sorted(set(device_ids))
                if d in part and part[d]["until"] > time.time()]

    def r_revoked_get(self, key):
        import time
        row = self.tables.setdefault("revoked_tokens", {}).get(key)
        return [{"user_id": row["user_id"]}] if row and row["until"] > time.time() else []

    def c_user_set_password(self, password_hash, uid):
        return uid in self.tables["users"], {}

    def w_user_set_password(self, password_hash, uid):
        self.tables["users"][uid]["password_hash"] = password_hash

    def c_invite_first_use(self, invite_id, ttl):
        row = self.tables.setdefault("invite_uses", {}).get(invite_id)
        return row is None, dict(row or {})

    def w_invite_first_use(self, invite_id, ttl):
        self.tables["invite_uses"][invite_id] = {"invite_id": invite_id, "uses": 1}

    def c_invite_next_use(self, ttl, uses, invite_id, expected):
        row = self.tables.setdefault("invite_uses", {}).get(invite_id)
        current = row["uses"] if row else None
        return current == expected, {"uses": current}

    def w_invite_next_use(self, ttl, uses, invite_id, expected):
        self.tables["invite_uses"][invite_id]["uses"] = uses

    def r_head_get(self, cid):
        row = self.tables["channel_heads"].get(cid)
        return [{"last_seq": row["last_seq"], "last_at": row["last_at"]}] if row else []

    def w_head_set(self, ts, seq, at, cid):
        row = self.tables["channel_heads"].get(cid)
        if row is None or (ts, seq) >= (row["ts"], row["last_seq"]):  # last write wins, by timestamp
            self.tables["channel_heads"][cid] = {"ts": ts, "last_seq": seq, "last_at": at}

    # ---- membership -----------------------------------------------------------------------------
    def _members(self, cid):
        return self.tables["members_by_channel"].setdefault(cid, {"version": None, "rows": {}})

    def r_members_get(self, cid):
        part = self.tables["members_by_channel"].get(cid)
        if part is None:
            return []
        if not part["rows"]:  # a partition with only its static column still returns one row
            return [{"user_id": None, "joined_at": None, "member_version": part["version"]}]
        return [{"user_id": u, "joined_at": j, "member_version": part["version"]}
                for u, j in sorted(part["rows"].items())]

    def r_member_get(self, cid, uid):
        part = self.tables["members_by_channel"].get(cid)
        if part is None or uid not in part["rows"]:
            return []
        return [{"user_id": uid, "joined_at": part["rows"][uid], "member_version": part["version"]}]

    def w_member_insert(self, cid, uid, joined_at):
        self._members(cid)["rows"][uid] = joined_at

    def w_member_delete(self, cid, uid):
        self._members(cid)["rows"].pop(uid, None)

    def w_member_version_set(self, version, cid):
        self._members(cid)["version"] = version

    def c_member_version_cas(self, new, cid, expected):
        current = self.tables["members_by_channel"].get(cid, {}).get("version")
        return current == expected, {"member_version": current}

    def w_member_version_cas(self, new, cid, expected):
        self._members(cid)["version"] = new

    def w_user_channel_insert(self, uid, cid, kind, name, created_at, joined_at):
        self.tables["channels_by_user"][(uid, cid)] = {"channel_id": cid, "kind": kind, "name": name,
                                                       "created_at": created_at}

    def w_user_channel_delete(self, uid, cid):
        self.tables["channels_by_user"].pop((uid, cid), None)

    def r_user_channels(self, uid):
        return [dict(row) for (u, c), row in sorted(self.tables["channels_by_user"].items()) if u == uid]

    def r_user_channels_after(self, uid, after, limit):
        return [row for row in self.r_user_channels(uid) if row["channel_id"] > after][:limit]

    def r_cursors_between(self, uid, lo, hi):
        return [row for row in self.r_cursors_of_user(uid) if lo < row["channel_id"] <= hi]

    def w_group_created_put(self, owner, created_at, cid, ttl):  # (the TTL is not modelled)
        self.tables["groups_by_owner"][(owner, created_at, cid)] = True

    def r_groups_created_since(self, owner, since, limit):
        return [{"created_at": at} for (o, at, _) in sorted(self.tables["groups_by_owner"])
                if o == owner and at >= since][:limit]

    def w_departure_put(self, cid, uid, left_at, invited_by, invited_at):
        self.tables["group_departures"][(cid, uid)] = {"left_at": left_at, "invited_by": invited_by,
                                                       "invited_at": invited_at}

    def r_departure_get(self, cid, uid):
        row = self.tables["group_departures"].get((cid, uid))
        return [dict(row)] if row else []

    def c_departure_invite(self, by, at, cid, uid):
        return (cid, uid) in self.tables["group_departures"], {}

    def w_departure_invite(self, by, at, cid, uid):
        self.tables["group_departures"][(cid, uid)].update(invited_by=by, invited_at=at)

    def w_departure_delete(self, cid, uid):
        self.tables["group_departures"].pop((cid, uid), None)

    def w_user_invitation_put(self, uid, cid):
        self.tables["invitations_by_user"][(uid, cid)] = True

    def w_user_invitation_delete(self, uid, cid):
        self.tables["invitations_by_user"].pop((uid, cid), None)

    def r_user_invitations(self, uid):
        return [{"channel_id": c} for (u, c) in sorted(self.tables["invitations_by_user"]) if u == uid]

    def w_cursor_set(self, uid, cid, seq):
        self.tables["read_cursors"][(uid, cid)] = seq

    def w_cursor_delete(self, uid, cid):
        self.tables["read_cursors"].pop((uid, cid), None)

    def r_cursor_get(self, uid, cid):
        seq = self.tables["read_cursors"].get((uid, cid))
        return [] if seq is None else [{"read_seq": seq}]

    def r_cursors_of_user(self, uid):
        return [{"channel_id": c, "read_seq": s} for (u, c), s in sorted(self.tables["read_cursors"].items())
                if u == uid]

    def c_cursor_create(self, uid, cid, seq):
        current = self.tables["read_cursors"].get((uid, cid))
        return current is None, {} if current is None else {"read_seq": current}

    w_cursor_create = w_cursor_set

    def c_cursor_raise(self, new, uid, cid, bound):
        current = self.tables["read_cursors"].get((uid, cid))
        return current is not None and current < bound, {"read_seq": current}

    def w_cursor_raise(self, new, uid, cid, bound):
        self.tables["read_cursors"][(uid, cid)] = new

    # ---- messages -------------------------------------------------------------------------------
    def _partition(self, cid, bucket):
        return self.tables["messages"].setdefault((cid, bucket), {})

    def c_bucket_advance(self, new, cid, bucket, expected):
        current = self.tables["bucket_heads"].get((cid, bucket))
        return current == expected, {"channel_id": cid, "bucket": bucket, "bucket_head": current}

    def w_bucket_advance(self, new, cid, bucket, expected):
        self.tables["bucket_heads"][(cid, bucket)] = new

    def w_msg_put(self, cid, bucket, seq, sender_id, client_msg_id, body, created_at, attachments=""):
        assert bucket == bucket_of(seq, self.bucket_size), f"seq {seq} written to bucket {bucket}"
        part = self._partition(cid, bucket)
        # A plain INSERT overwrites: in chatd that would be two messages given one seq - a bug.
        assert seq not in part or (part[seq]["sender_id"], part[seq]["client_msg_id"]) == (sender_id, client_msg_id), \
            f"seq {seq} of {cid} overwritten"
        part[seq] = {"seq": seq, "sender_id": sender_id, "client_msg_id": client_msg_id,
                     "body": body, "created_at": created_at, "attachments": attachments or None}

    def w_msg_put_event(self, cid, bucket, seq, sender_id, client_msg_id, body, created_at, attachments, kind, target, reply_to,
                        meta):
        self.w_msg_put(cid, bucket, seq, sender_id, client_msg_id, body, created_at, attachments)
        self._partition(cid, bucket)[seq].update(kind=kind, target_seq=target, reply_to=reply_to, meta=meta)

    # the lifecycle's folds: cells written USING TIMESTAMP (last write wins, by timestamp)
    def _cells(self, cid, bucket, seq, ts, **cells):
        row = self._partition(cid, bucket).get(seq)
        assert row is not None, f"fold of {cid} seq {seq}, which is not stored: a phantom row"
        stamps = self.tables["cell_ts"].setdefault((cid, seq), {})
        for k, v in cells.items():
            if ts >= stamps.get(k, -1):
                stamps[k] = ts
                row[k] = v

    def w_fold_edit(self, ts, body, at, state, cid, bucket, seq):
        self._cells(cid, bucket, seq, ts, edited_body=body, edited_at=at, state_seq=state)

    def w_fold_delete(self, ts, body, by, at, state, cid, bucket, seq):
        self._cells(cid, bucket, seq, ts, edited_body=body, deleted_by=by, deleted_at=at, state_seq=state)

    def w_fold_state(self, ts, state, cid, bucket, seq):
        self._cells(cid, bucket, seq, ts, state_seq=state)

    def w_msg_erase(self, body, attachments, cid, bucket, seq):
        self._cells(cid, bucket, seq, 2**62, body=body, attachments=attachments or None)  # (a real-time write: later than any seq)

    def _reactions(self, cid, bucket):
        return self.tables["reactions"].setdefault((cid, bucket), {})

    def w_reaction_put(self, cid, bucket, seq, emoji, uid, at, ts):
        part = self._reactions(cid, bucket)
        old = part.get((seq, emoji, uid))
        if old is None or ts >= old["ts"]:
            part[(seq, emoji, uid)] = {"seq": seq, "emoji": emoji, "user_id": uid, "at": at, "ts": ts, "live": True}

    def w_reaction_delete(self, ts, cid, bucket, seq, emoji, uid):
        part = self._reactions(cid, bucket)
        old = part.get((seq, emoji, uid))
        if old is None or ts >= old["ts"]:
            part[(seq, emoji, uid)] = {"seq": seq, "emoji": emoji, "user_id": uid, "at": None, "ts": ts, "live": False}

    def w_reactions_drop(self, ts, cid, bucket, seq):
        for key, row in self._reactions(cid, bucket).items():
            if key[0] == seq and ts >= row["ts"]:
                row.update(ts=ts, live=False)

    def _live_reactions(self, cid, bucket):
        return [r for k, r in sorted(self._reactions(cid, bucket).items()) if r["live"]]

    def r_reactions_of(self, cid, bucket, seq, emoji):
        return [{"user_id": r["user_id"]} for r in self._live_reactions(cid, bucket)
                if r["seq"] == seq and r["emoji"] == emoji]

    def r_reactions_range(self, cid, bucket, lo, hi):
        return [{k: r[k] for k in ("seq", "emoji", "user_id", "at")} for r in self._live_reactions(cid, bucket)
                if lo <= r["seq"] <= hi]

    def w_event_index_put(self, cid, bucket, target, seq, kind):
        self.tables["message_events"].setdefault((cid, bucket), {})[(target, seq)] = kind

    def r_events_of(self, cid, bucket, target):
        part = self.tables["message_events"].get((cid, bucket), {})
        return [{"seq": s, "kind": k} for (t, s), k in sorted(part.items()) if t == target]

    def c_channel_rename(self, name, cid):
        row = self.tables["channels"].get(cid)
        return row is not None, dict(row or {})

    def w_channel_rename(self, name, cid):
        self.tables["channels"][cid]["name"] = name

    def w_user_channel_rename(self, name, uid, cid):
        row = self.tables["channels_by_user"].get((uid, cid))
        if row is not None:
            row["name"] = name

    def _receipt(self, cid, uid, ts, col, value):
        row = self.tables["receipts"].setdefault(cid, {}).setdefault(uid, {"user_id": uid, "delivered_seq": None,
                                                                           "read_seq": None, "ts": {}})
        if ts >= row["ts"].get(col, -1):
            row["ts"][col] = ts
            row[col] = value

    def w_receipt_delivered(self, ts, seq, cid, uid):
        self._receipt(cid, uid, ts, "delivered_seq", seq)

    def w_receipt_read(self, ts, seq, cid, uid):
        self._receipt(cid, uid, ts, "read_seq", seq)

    def r_receipts_of(self, cid):
        return [{k: r[k] for k in ("user_id", "delivered_seq", "read_seq")}
                for _, r in sorted(self.tables["receipts"].get(cid, {}).items())]

    def w_push_drop(self, slot, uid, cid, seq):
        self.tables["push_outbox"].get(slot, {}).pop((uid, cid, seq), None)

    def r_msg_top(self, cid, bucket):
        part = self.tables["messages"].get((cid, bucket), {})
        head = self.tables["bucket_heads"].get((cid, bucket))
        if not part:
            return [{"seq": None, "created_at": None, "bucket_head": head}] if head is not None else []
        top = part[max(part)]
        return [{"seq": top["seq"], "created_at": top["created_at"], "bucket_head": head}]

    def r_msg_get(self, cid, bucket, seq):
        row = self.tables["messages"].get((cid, bucket), {}).get(seq)
        return [dict(row)] if row else []

    def _range(self, cid, bucket, lo, hi):
        part = self.tables["messages"].get((cid, bucket), {})
        return [dict(part[s]) for s in sorted(part) if lo < s < hi]

    def r_msg_asc(self, cid, bucket, lo, hi, limit):
        return self._range(cid, bucket, lo, hi)[:limit]

    def r_msg_desc(self, cid, bucket, lo, hi, limit):
        return self._range(cid, bucket, lo, hi)[::-1][:limit]

    def w_msg_expire(self, cid, bucket, upto):
        part = self.tables["messages"].get((cid, bucket), {})
        for seq in [s for s in part if s <= upto]:
            del part[seq]

    def r_dedup_get(self, cid, sender_id, client_msg_id):
        row = self.tables["message_dedup"].get((cid, sender_id, client_msg_id))
        return [{"seq": row["seq"]}] if row else []

    def w_dedup_put(self, cid, sender_id, client_msg_id, seq):
        self.tables["message_dedup"][(cid, sender_id, client_msg_id)] = {
            "channel_id": cid, "sender_id": sender_id, "client_msg_id": client_msg_id, "seq": seq}

    # ---- push notifications ------------------------------------------------------------------
    _TOKEN = ("push_token", "user_id", "device_id", "provider", "app_id", "created_at")

    def r_push_token_get(self, token):
        row = self.tables["push_tokens"].get(token)
        return [dict(row)] if row else []

    def w_push_token_put(self, *values):
        row = dict(zip(self._TOKEN, values))
        self.tables["push_tokens"][row["push_token"]] = row

    def c_push_token_delete(self, token, uid):
        row = self.tables["push_tokens"].get(token)
        current = None if row is None else row["user_id"]
        return current is not None and current == uid, {} if row is None else {"user_id": current}

    def w_push_token_delete(self, token, uid):
        self.tables["push_tokens"].pop(token, None)

    def r_push_user_tokens(self, uid):
        return [dict(row) for (u, _), row in sorted(self.tables["push_tokens_by_user"].items()) if u == uid]

    def w_push_user_token_put(self, *values):
        row = dict(zip(self._TOKEN, values))
        self.tables["push_tokens_by_user"][(row["user_id"], row["push_token"])] = row

    def w_push_user_token_delete(self, uid, token):
        self.tables["push_tokens_by_user"].pop((uid, token), None)

    def w_push_enqueue(self, slot, uid, cid, seq, sender_id, body, queued_at):  # an INSERT is an upsert
        self.tables["push_outbox"].setdefault(slot, {})[(uid, cid, seq)] = {
            "user_id": uid, "channel_id": cid, "seq": seq, "sender_id": sender_id, "body": body,
            "queued_at": queued_at}

    def r_push_pending(self, slot, limit):
        part = self.tables["push_outbox"].get(slot, {})
        return [dict(part[k]) for k in sorted(part)][:limit]

    def w_push_dequeue(self, slot, uid, cid, upto):
        part = self.tables["push_outbox"].get(slot, {})
        for key in [k for k in part if k[0] == uid and k[1] == cid and k[2] <= upto]:
            del part[key]

    def r_push_marks_get(self, uid, cid):
        return [{"push_token": t, "seq": row["seq"]} for (u, c, t), row in sorted(self.tables["push_marks"].items())
                if (u, c) == (uid, cid)]

    def w_push_mark_set(self, ts, seq, uid, cid, token):
        row = self.tables["push_marks"].get((uid, cid, token))
        if row is None or (ts, seq) >= (row["ts"], row["seq"]):  # last write wins, by timestamp
            self.tables["push_marks"][(uid, cid, token)] = {"ts": ts, "seq": seq}

    def c_push_lease_create(self, slot, owner, until):
        row = self.tables["push_leases"].get(slot)
        return row is None, dict(row or {})

    def w_push_lease_create(self, slot, owner, until):
        self.tables["push_leases"][slot] = {"slot": slot, "owner": owner, "lease_until": until}

    def c_push_lease_renew(self, until, slot, owner):
        row = self.tables["push_leases"].get(slot)
        current = None if row is None else row["owner"]
        return current is not None and current == owner, {} if row is None else {"owner": current}

    def w_push_lease_renew(self, until, slot, owner):
        self.tables["push_leases"][slot]["lease_until"] = until

    def c_push_lease_take(self, owner, until, slot, now):
        row = self.tables["push_leases"].get(slot)
        current = None if row is None else row["lease_until"]
        return current is not None and current < now, {} if row is None else {"lease_until": current}

    def w_push_lease_take(self, owner, until, slot, now):
        self.tables["push_leases"][slot].update(owner=owner, lease_until=until)

    # ---- inspection ----------------------------------------------------------------------------
    def stored_seqs(self, cid) -> list[int]:
        return sorted(s for (c, _), part in self.tables["messages"].items() if c == cid for s in part)

    # ---- media ---------------------------------------------------------------------------------
    def _media_table(self, name):
        return self.tables.setdefault(name, {})

    def w_media_put(self, mid, owner_id, created_at, size, info):
        self._media_table("media")[mid] = {"id": mid, "owner_id": owner_id, "created_at": created_at,
                                           "size": size, "info": info}

    def r_media_get(self, mid):
        row = self._media_table("media").get(mid)
        return [dict(row)] if row else []

    def w_media_delete(self, mid):
        self._media_table("media").pop(mid, None)

    def w_media_owner_put(self, owner_id, created_at, mid, size):
        self._media_table("media_by_owner")[(owner_id, created_at, mid)] = size

    def r_media_owner_since(self, owner_id, since):
        return [{"size": size} for (o, t, _), size in sorted(self._media_table("media_by_owner").items())
                if o == owner_id and t > since]

    def w_media_ref_put(self, mid, cid, key):
        self._media_table("media_refs")[(mid, cid, key)] = True

    def w_media_ref_delete(self, mid, cid, key):
        self._media_table("media_refs").pop((mid, cid, key), None)

    def r_media_refs_get(self, mid):
        return [{"channel_id": c} for (m, c, _) in sorted(self._media_table("media_refs")) if m == mid]

    def r_media_ref_any(self, mid):
        return self.r_media_refs_get(mid)[:1]

    def w_media_orphan_put(self, bucket, created_at, mid):
        self._media_table("media_orphans")[(bucket, created_at, mid)] = True

    def w_media_orphan_delete(self, bucket, created_at, mid):
        self._media_table("media_orphans").pop((bucket, created_at, mid), None)

    def r_media_orphans_before(self, bucket, before, limit):
        return [{"created_at": t, "id": m} for (b, t, m) in sorted(self._media_table("media_orphans"))
                if b == bucket and t < before][:limit]

    def handlers_missing(self) -> list[str]:
        out = []
        for name, (kind, _) in STATEMENTS.items():
            need = ["r_"] if kind == READ else ["c_", "w_"] if kind == LWT else ["w_"]
            out += [p + name for p in need if not hasattr(self, p + name)]
        return out
