"""The Cassandra schema and its CQL: versioned migrations, every data statement (prepared by name),
row -> dataclass mapping, bucket arithmetic, and the schema version check at open. Pure, except
:func:`migrate`, :func:`read_schema_row` and :func:`drop_keyspace`.

``chatd store migrate`` (:func:`migrate`) creates the keyspace with the configured replication and
applies every migration newer than the version recorded in ``schema_version``. Opening a store
(:func:`check_schema`) refuses a keyspace whose schema is missing, behind, or newer than this chatd.

Messages live in partitions of ``bucket_size`` consecutive seqs: ``bucket = seq // bucket_size``
(bucket 0 holds seqs 1 .. bucket_size-1, bucket b >= 1 holds b*size .. (b+1)*size-1). The bucket size
is fixed when the keyspace is created and recorded next to the schema version, because it decides
where every message lives; the store reads it at open (docs/cassandra.md has the sizing arithmetic).
"""

from __future__ import annotations

import ast
import json
import logging
import secrets
import time

from ..config import CassandraConfig
from .base import Channel, ChannelSummary, Message, PushEntry, PushToken, User
from .cql import (DRIVER_ERRORS, LWT, READ, WRITE, await_response, check_keyspace_name, connect, consistency_level,
                  error_text, execute_ddl, live_nodes_by_dc, shutdown)

log = logging.getLogger(__name__)

DEFAULT_BUCKET_SIZE = 1000
COMPONENT = "chatd"

# Each migration: (version, [DDL with {ks} for the keyspace]). Only ever append.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE IF NOT EXISTS {ks}.schema_version (
            component text PRIMARY KEY,
            version int,
            bucket_size bigint,
            migrated_at double)""",
        # user ids are random in [1, 2**53): int64 in the store, exact in any JSON client.
        """CREATE TABLE IF NOT EXISTS {ks}.users (
            id bigint PRIMARY KEY,
            username text,
            password_hash text,
            display_name text,
            about text,
            created_at double)""",
        # key: the username with ASCII letters lower-cased (SQLite's NOCASE), claimed with a LWT.
        """CREATE TABLE IF NOT EXISTS {ks}.users_by_name (
            username_key text PRIMARY KEY,
            user_id bigint)""",
        """CREATE TABLE IF NOT EXISTS {ks}.devices (
            device_id text PRIMARY KEY,
            user_id bigint,
            created_at double)""",
        """CREATE TABLE IF NOT EXISTS {ks}.channels (
            id text PRIMARY KEY,
            kind text,
            name text,
            owner_id bigint,
            created_at double)""",
        # A lower bound of the channel's head (see cassandra.py); written only with
        # USING TIMESTAMP <seq>, so the highest seq always wins, whatever order writes arrive in.
        """CREATE TABLE IF NOT EXISTS {ks}.channel_heads (
            channel_id text PRIMARY KEY,
            last_seq bigint,
            last_at double)
            WITH compaction = {{'class': 'LeveledCompactionStrategy'}}""",
        # The authoritative member list; member_version serialises membership changes (LWT).
        """CREATE TABLE IF NOT EXISTS {ks}.members_by_channel (
            channel_id text,
            user_id bigint,
            joined_at double,
            member_version bigint STATIC,
            PRIMARY KEY ((channel_id), user_id))
            WITH CLUSTERING ORDER BY (user_id ASC)""",
        # The same memberships by user, with what "my channels" shows (channel names never change).
        """CREATE TABLE IF NOT EXISTS {ks}.channels_by_user (
            user_id bigint,
            channel_id text,
            kind text,
            name text,
            created_at double,
            joined_at double,
            PRIMARY KEY ((user_id), channel_id))""",
        """CREATE TABLE IF NOT EXISTS {ks}.read_cursors (
            user_id bigint,
            channel_id text,
            read_seq bigint,
            PRIMARY KEY ((user_id), channel_id))
            WITH compaction = {{'class': 'LeveledCompactionStrategy'}}""",
        """CREATE TABLE IF NOT EXISTS {ks}.messages (
            channel_id text,
            bucket bigint,
            seq bigint,
            sender_id bigint,
            client_msg_id text,
            body text,
            created_at double,
            PRIMARY KEY ((channel_id, bucket), seq))
            WITH CLUSTERING ORDER BY (seq DESC)""",
        # (channel, sender, client_msg_id) -> the seq of its stored message (since v3 written after
        # the message; v2 wrote an intended seq first, so an old row may name another message's seq).
        """CREATE TABLE IF NOT EXISTS {ks}.message_dedup (
            channel_id text,
            sender_id bigint,
            client_msg_id text,
            seq bigint,
            PRIMARY KEY ((channel_id, sender_id, client_msg_id)))""",
        # last_active_at per user (set_last_active / get_last_active); written with USING TIMESTAMP
        # = the time itself, so a late, older write never lowers it.
        """CREATE TABLE IF NOT EXISTS {ks}.presence (
            user_id bigint PRIMARY KEY,
            last_active_at double)""",
    ]),
    (2, [  # push notifications (chatd/push, docs/push.md)
        # token -> its one owner (authoritative); the by-user copy lists a user's tokens.
        """CREATE TABLE IF NOT EXISTS {ks}.push_tokens (
            push_token text PRIMARY KEY,
            user_id bigint,
            device_id text,
            provider text,
            app_id text,
            created_at double)""",
        """CREATE TABLE IF NOT EXISTS {ks}.push_tokens_by_user (
            user_id bigint,
            push_token text,
            device_id text,
            provider text,
            app_id text,
            created_at double,
            PRIMARY KEY ((user_id), push_token))""",
        # A queue: rows live seconds (until pushed), so deletes dominate. A tombstone resurrected
        # after gc_grace only causes a skipped push (push_marks), never a duplicate.
        """CREATE TABLE IF NOT EXISTS {ks}.push_outbox (
            slot int,
            user_id bigint,
            channel_id text,
            seq bigint,
            sender_id bigint,
            body text,
            queued_at double,
            PRIMARY KEY ((slot), user_id, channel_id, seq))
            WITH compaction = {{'class': 'LeveledCompactionStrategy'}} AND gc_grace_seconds = 10800""",
        # written with USING TIMESTAMP = seq: the highest seq wins, whatever order writes arrive in.
        """CREATE TABLE IF NOT EXISTS {ks}.push_marks (
            user_id bigint,
            channel_id text,
            push_token text,
            seq bigint,
            PRIMARY KEY ((user_id, channel_id), push_token))""",
        # which process sends a slot's outbox rows, until when (LWT only)
        """CREATE TABLE IF NOT EXISTS {ks}.push_leases (
            slot int PRIMARY KEY,
            owner text,
            lease_until double)""",
    ]),
    (3, [  # batched sequencing (chatd/store/cassandra.py): the CAS target of every append batch
        # The last seq stored in this bucket, written only together with its messages by one
        # conditional batch on the partition: ``... IF bucket_head = <the head the writer saw>``.
        "ALTER TABLE {ks}.messages ADD bucket_head bigint STATIC",
    ]),
    (4, [  # logout revokes tokens (chatd/revocation.py); rows are written with a TTL up to the
        # token's expiry, so the table only ever holds tokens that would still be accepted.
        """CREATE TABLE IF NOT EXISTS {ks}.revoked_tokens (
            token_key text PRIMARY KEY,
            user_id bigint,
            device_id text,
            expires_at double)""",
    ]),
    (5, [  # invites (chatd/auth.py): uses counted per signed invite, by LWT; rows carry a TTL up to
        # the invite's expiry.
        """CREATE TABLE IF NOT EXISTS {ks}.invite_uses (
            invite_id text PRIMARY KEY,
            uses int)""",
    ]),
    (6, [  # sessions (chatd/revocation.py)
        # "every token of the user issued before revoked_before is revoked": device_id '' for all of
        # the user's devices. Written with USING TIMESTAMP = the cut-off (the latest wins) and a TTL
        # up to the expiry of the last token it revokes.
        """CREATE TABLE IF NOT EXISTS {ks}.token_cutoffs (
            user_id bigint,
            device_id text,
            revoked_before double,
            PRIMARY KEY ((user_id), device_id))""",
        # the user's listed devices (GET /v1/devices): written at each login, deleted at its
        # logout, with USING TIMESTAMP = the login / cut-off time, so the later of the two wins.
        """CREATE TABLE IF NOT EXISTS {ks}.devices_by_user (
            user_id bigint,
            device_id text,
            created_at double,
            last_login_at double,
            PRIMARY KEY ((user_id), device_id))""",
    ]),
    (7, [  # operators (chatd admin): a disabled account cannot log in (null: enabled)
        "ALTER TABLE {ks}.users ADD disabled boolean",
    ]),
    (8, [  # groups (issue 20)
        # the groups a user created lately (limits.groups_created_per_hour counts them); rows live
        # GROUPS_CREATED_TTL_S (the hour counted, and a margin for clock skew)
        """CREATE TABLE IF NOT EXISTS {ks}.groups_by_owner (
            owner_id bigint,
            created_at double,
            channel_id text,
            PRIMARY KEY ((owner_id), created_at, channel_id))""",
        # who left a group on their own, and whether its owner invited them back (deleted when they rejoin)
        """CREATE TABLE IF NOT EXISTS {ks}.group_departures (
            channel_id text,
            user_id bigint,
            left_at double,
            invited_by bigint,
            invited_at double,
            PRIMARY KEY ((channel_id), user_id))""",
        # the same invitations by user (GET /v1/invitations); group_departures is authoritative
        """CREATE TABLE IF NOT EXISTS {ks}.invitations_by_user (
            user_id bigint,
            channel_id text,
            PRIMARY KEY ((user_id), channel_id))""",
    ]),
    (9, [  # the message lifecycle (chatd/lifecycle.py; docs/cassandra.md, "The message lifecycle")
        # A row's kind (null: a message) and what an event names; written by its insert only.
        "ALTER TABLE {ks}.messages ADD kind text",
        "ALTER TABLE {ks}.messages ADD target_seq bigint",
        "ALTER TABLE {ks}.messages ADD reply_to bigint",
        "ALTER TABLE {ks}.messages ADD meta text",
        # A message's folded state: written only by its events, USING TIMESTAMP = the event's seq
        # (so the latest event wins whatever order the writes land in, and a replay is harmless).
        "ALTER TABLE {ks}.messages ADD edited_body text",
        "ALTER TABLE {ks}.messages ADD edited_at double",
        "ALTER TABLE {ks}.messages ADD deleted_by bigint",
        "ALTER TABLE {ks}.messages ADD deleted_at double",
        "ALTER TABLE {ks}.messages ADD state_seq bigint",
        # who holds which reaction on a message (bucket: the message's); USING TIMESTAMP = the seq
        # of the react / unreact / delete row that wrote it.
        """CREATE TABLE IF NOT EXISTS {ks}.reactions (
            channel_id text,
            bucket bigint,
            seq bigint,
            emoji text,
            user_id bigint,
            at double,
            PRIMARY KEY ((channel_id, bucket), seq, emoji, user_id))""",
        # the lifecycle rows of each message (bucket: the message's): what a delete must erase
        """CREATE TABLE IF NOT EXISTS {ks}.message_events (
            channel_id text,
            bucket bigint,
            target_seq bigint,
            seq bigint,
            kind text,
            PRIMARY KEY ((channel_id, bucket), target_seq, seq))""",
        # receipts: every member's delivered and read positions in one partition per channel
        # (GET /v1/channels/<id>/receipts is one read); written USING TIMESTAMP = the seq, so they
        # only rise. (read_cursors stays the authority of read_seq and the unread counts.)
        """CREATE TABLE IF NOT EXISTS {ks}.receipt_cursors (
            channel_id text,
            user_id bigint,
            delivered_seq bigint,
            read_seq bigint,
            PRIMARY KEY ((channel_id), user_id))""",
    ]),
    (10, [  # media (chatd/media)
        """CREATE TABLE IF NOT EXISTS {ks}.media (
            id text PRIMARY KEY,
            owner_id bigint,
            created_at double,
            size bigint,
            info text)""",
        # the hourly quota's window: rows live two hours (TTL), one partition per uploader
        """CREATE TABLE IF NOT EXISTS {ks}.media_by_owner (
            owner_id bigint,
            created_at double,
            id text,
            size bigint,
            PRIMARY KEY ((owner_id), created_at, id))""",
        """CREATE TABLE IF NOT EXISTS {ks}.media_refs (
            media_id text,
            channel_id text,
            msg_key text,
            PRIMARY KEY ((media_id), channel_id, msg_key))""",
        # uploads no reference named yet, spread over MEDIA_ORPHAN_BUCKETS partitions by id
        """CREATE TABLE IF NOT EXISTS {ks}.media_orphans (
            bucket int,
            created_at double,
            id text,
            PRIMARY KEY ((bucket), created_at, id))""",
        "ALTER TABLE {ks}.messages ADD attachments text",
    ]),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]
GROUPS_CREATED_TTL_S = 3600 + 300


# ---- data statements and row mapping -----------------------------------------------------
MAX_USER_ID = 2**53  # ids are random in [1, 2**53): exact as JSON numbers in every client

_MSG = ("seq, sender_id, client_msg_id, body, created_at, kind, target_seq, reply_to, meta, edited_body, edited_at, "
        "deleted_by, deleted_at, state_seq, attachments")
_MSG_INSERT = "seq, sender_id, client_msg_id, body, created_at, attachments"
_USER = "id, username, password_hash, display_name, about, created_at"
_TOKEN = "push_token, user_id, device_id, provider, app_id, created_at"
_OUTBOX = "user_id, channel_id, seq, sender_id, body, queued_at"

# name -> (kind, CQL). Every statement names its full partition key: no scans, no ALLOW FILTERING.
# (schema_version is read and written by read_schema_row and migrate, unprepared.)
STATEMENTS: dict[str, tuple[str, str]] = {
    # users and devices
    "user_insert": (LWT, f"INSERT INTO users ({_USER}) VALUES (?, ?, ?, ?, ?, ?) IF NOT EXISTS"),
    "user_delete": (WRITE, "DELETE FROM users WHERE id = ?"),
    "user_get": (READ, f"SELECT {_USER}, disabled FROM users WHERE id = ?"),
    "user_set_disabled": (LWT, "UPDATE users SET disabled = ? WHERE id = ? IF EXISTS"),
    "user_set_name": (LWT, "UPDATE users SET username = ? WHERE id = ? IF EXISTS"),
    "name_release": (LWT, "DELETE FROM users_by_name WHERE username_key = ? IF user_id = ?"),
    "channel_set_owner": (LWT, "UPDATE channels SET owner_id = ? WHERE id = ? IF EXISTS"),
    "presence_set": (WRITE, "UPDATE presence USING TIMESTAMP ? SET last_active_at = ? WHERE user_id = ?"),
    "presence_get": (READ, "SELECT last_active_at FROM presence WHERE user_id = ?"),
    "user_set_password": (LWT, "UPDATE users SET password_hash = ? WHERE id = ? IF EXISTS"),
    "user_set_profile": (WRITE, "UPDATE users SET display_name = ?, about = ? WHERE id = ?"),
    "name_claim": (LWT, "INSERT INTO users_by_name (username_key, user_id) VALUES (?, ?) IF NOT EXISTS"),
    "name_get": (READ, "SELECT user_id FROM users_by_name WHERE username_key = ?"),
    "device_insert": (LWT, "INSERT INTO devices (device_id, user_id, created_at) VALUES (?, ?, ?) IF NOT EXISTS"),
    "device_get": (READ, "SELECT user_id FROM devices WHERE device_id = ?"),
    "user_device_put": (WRITE, "INSERT INTO devices_by_user (user_id, device_id, created_at, last_login_at) "
                               "VALUES (?, ?, ?, ?) USING TIMESTAMP ?"),
    "user_device_delete": (WRITE, "DELETE FROM devices_by_user USING TIMESTAMP ? WHERE user_id = ? AND device_id = ?"),
    "user_devices_delete": (WRITE, "DELETE FROM devices_by_user USING TIMESTAMP ? WHERE user_id = ?"),
    "user_devices": (READ, "SELECT device_id, created_at, last_login_at FROM devices_by_user WHERE user_id = ?"),
    # channels
    "channel_insert": (LWT, "INSERT INTO channels (id, kind, name, owner_id, created_at) "
                            "VALUES (?, ?, ?, ?, ?) IF NOT EXISTS"),
    "channel_get": (READ, "SELECT id, kind, name, owner_id, created_at FROM channels WHERE id = ?"),
    "head_get": (READ, "SELECT last_seq, last_at FROM channel_heads WHERE channel_id = ?"),
    "head_set": (WRITE, "UPDATE channel_heads USING TIMESTAMP ? SET last_seq = ?, last_at = ? "
                        "WHERE channel_id = ?"),
    # membership
    "members_get": (READ, "SELECT user_id, joined_at, member_version FROM members_by_channel "
                          "WHERE channel_id = ?"),
    "member_get": (READ, "SELECT user_id, joined_at, member_version FROM members_by_channel "
                         "WHERE channel_id = ? AND user_id = ?"),
    "member_insert": (WRITE, "INSERT INTO members_by_channel (channel_id, user_id, joined_at) VALUES (?, ?, ?)"),
    "member_delete": (WRITE, "DELETE FROM members_by_channel WHERE channel_id = ? AND user_id = ?"),
    "member_version_set": (WRITE, "UPDATE members_by_channel SET member_version = ? WHERE channel_id = ?"),
    "member_version_cas": (LWT, "UPDATE members_by_channel SET member_version = ? WHERE channel_id = ? "
                                "IF member_version = ?"),
    "user_channel_insert": (WRITE, "INSERT INTO channels_by_user (user_id, channel_id, kind, name, created_at, "
                                   "joined_at) VALUES (?, ?, ?, ?, ?, ?)"),
    "user_channel_delete": (WRITE, "DELETE FROM channels_by_user WHERE user_id = ? AND channel_id = ?"),
    "user_channels": (READ, "SELECT channel_id, kind, name, created_at FROM channels_by_user WHERE user_id = ?"),
    "user_channels_after": (READ, "SELECT channel_id, kind, name, created_at FROM channels_by_user WHERE user_id = ? "
                                  "AND channel_id > ? LIMIT ?"),
    "cursors_between": (READ, "SELECT channel_id, read_seq FROM read_cursors WHERE user_id = ? AND channel_id > ? "
                              "AND channel_id <= ?"),
    "group_created_put": (WRITE, "INSERT INTO groups_by_owner (owner_id, created_at, channel_id) VALUES (?, ?, ?) "
                                 "USING TTL ?"),
    "groups_created_since": (READ, "SELECT created_at FROM groups_by_owner WHERE owner_id = ? AND created_at >= ? "
                                   "LIMIT ?"),
    "departure_put": (WRITE, "INSERT INTO group_departures (channel_id, user_id, left_at, invited_by, invited_at) "
                             "VALUES (?, ?, ?, ?, ?)"),
    "departure_get": (READ, "SELECT left_at, invited_by, invited_at FROM group_departures WHERE channel_id = ? "
                            "AND user_id = ?"),
    "departure_invite": (LWT, "UPDATE group_departures SET invited_by = ?, invited_at = ? WHERE channel_id = ? "
                              "AND user_id = ? IF EXISTS"),
    "departure_delete": (WRITE, "DELETE FROM group_departures WHERE channel_id = ? AND user_id = ?"),
    "user_invitation_put": (WRITE, "INSERT INTO invitations_by_user (user_id, channel_id) VALUES (?, ?)"),
    "user_invitation_delete": (WRITE, "DELETE FROM invitations_by_user WHERE user_id = ? AND channel_id = ?"),
    "user_invitations": (READ, "SELECT channel_id FROM invitations_by_user WHERE user_id = ?"),
    "cursor_set": (WRITE, "INSERT INTO read_cursors (user_id, channel_id, read_seq) VALUES (?, ?, ?)"),
    "cursor_delete": (WRITE, "DELETE FROM read_cursors WHERE user_id = ? AND channel_id = ?"),
    "cursor_get": (READ, "SELECT read_seq FROM read_cursors WHERE user_id = ? AND channel_id = ?"),
    "cursors_of_user": (READ, "SELECT channel_id, read_seq FROM read_cursors WHERE user_id = ?"),
    "cursor_create": (LWT, "INSERT INTO read_cursors (user_id, channel_id, read_seq) VALUES (?, ?, ?) "
                           "IF NOT EXISTS"),
    "cursor_raise": (LWT, "UPDATE read_cursors SET read_seq = ? WHERE user_id = ? AND channel_id = ? "
                          "IF read_seq < ?"),
    # messages
    # one append batch = bucket_advance (the condition) + msg_put per message, on one partition
    "bucket_advance": (LWT, "UPDATE messages SET bucket_head = ? WHERE channel_id = ? AND bucket = ? "
                            "IF bucket_head = ?"),
    "msg_put": (WRITE, f"INSERT INTO messages (channel_id, bucket, {_MSG_INSERT}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
    "msg_put_event": (WRITE, f"INSERT INTO messages (channel_id, bucket, {_MSG_INSERT}, kind, target_seq, reply_to, "
                             "meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
    # the message lifecycle: folds (USING TIMESTAMP = the event's seq), erasure, reactions, the index
    "fold_edit": (WRITE, "UPDATE messages USING TIMESTAMP ? SET edited_body = ?, edited_at = ?, state_seq = ? "
                         "WHERE channel_id = ? AND bucket = ? AND seq = ?"),
    "fold_delete": (WRITE, "UPDATE messages USING TIMESTAMP ? SET edited_body = ?, deleted_by = ?, deleted_at = ?, "
                           "state_seq = ? WHERE channel_id = ? AND bucket = ? AND seq = ?"),
    "fold_state": (WRITE, "UPDATE messages USING TIMESTAMP ? SET state_seq = ? WHERE channel_id = ? AND bucket = ? "
                          "AND seq = ?"),
    "msg_erase": (WRITE, "UPDATE messages SET body = ?, attachments = ? WHERE channel_id = ? AND bucket = ? "
                         "AND seq = ?"),
    "reaction_put": (WRITE, "INSERT INTO reactions (channel_id, bucket, seq, emoji, user_id, at) VALUES (?, ?, ?, ?, ?, ?) "
                            "USING TIMESTAMP ?"),
    "reaction_delete": (WRITE, "DELETE FROM reactions USING TIMESTAMP ? WHERE channel_id = ? AND bucket = ? AND seq = ? "
                               "AND emoji = ? AND user_id = ?"),
    "reactions_drop": (WRITE, "DELETE FROM reactions USING TIMESTAMP ? WHERE channel_id = ? AND bucket = ? AND seq = ?"),
    "reactions_of": (READ, "SELECT user_id FROM reactions WHERE channel_id = ? AND bucket = ? AND seq = ? AND emoji = ?"),
    "reactions_range": (READ, "SELECT seq, emoji, user_id, at FROM reactions WHERE channel_id = ? AND bucket = ? "
                              "AND seq >= ? AND seq <= ?"),
    "event_index_put": (WRITE, "INSERT INTO message_events (channel_id, bucket, target_seq, seq, kind) "
                               "VALUES (?, ?, ?, ?, ?)"),
    "events_of": (READ, "SELECT seq, kind FROM message_events WHERE channel_id = ? AND bucket = ? AND target_seq = ?"),
    "channel_rename": (LWT, "UPDATE channels SET name = ? WHERE id = ? IF EXISTS"),
    "user_channel_rename": (WRITE, "UPDATE channels_by_user SET name = ? WHERE user_id = ? AND channel_id = ?"),
    "receipt_delivered": (WRITE, "UPDATE receipt_cursors USING TIMESTAMP ? SET delivered_seq = ? "
                                 "WHERE channel_id = ? AND user_id = ?"),
    "receipt_read": (WRITE, "UPDATE receipt_cursors USING TIMESTAMP ? SET read_seq = ? WHERE channel_id = ? AND user_id = ?"),
    "receipts_of": (READ, "SELECT user_id, delivered_seq, read_seq FROM receipt_cursors WHERE channel_id = ?"),
    "push_drop": (WRITE, "DELETE FROM push_outbox WHERE slot = ? AND user_id = ? AND channel_id = ? AND seq = ?"),
    "msg_top": (READ, "SELECT seq, created_at, bucket_head FROM messages WHERE channel_id = ? AND bucket = ? "
                      "LIMIT 1"),
    "msg_get": (READ, f"SELECT {_MSG} FROM messages WHERE channel_id = ? AND bucket = ? AND seq = ?"),
    "msg_asc": (READ, f"SELECT {_MSG} FROM messages WHERE channel_id = ? AND bucket = ? AND seq > ? AND seq < ? "
                      "ORDER BY seq ASC LIMIT ?"),
    "msg_desc": (READ, f"SELECT {_MSG} FROM messages WHERE channel_id = ? AND bucket = ? AND seq > ? AND seq < ? "
                       "ORDER BY seq DESC LIMIT ?"),
    # retention: one range delete per bucket (the bucket's static bucket_head stays)
    "msg_expire": (WRITE, "DELETE FROM messages WHERE channel_id = ? AND bucket = ? AND seq <= ?"),
    "dedup_get": (READ, "SELECT seq FROM message_dedup WHERE channel_id = ? AND sender_id = ? "
                        "AND client_msg_id = ?"),
    "dedup_put": (WRITE, "INSERT INTO message_dedup (channel_id, sender_id, client_msg_id, seq) VALUES (?, ?, ?, ?)"),
    # push notifications
    "push_token_get": (READ, f"SELECT {_TOKEN} FROM push_tokens WHERE push_token = ?"),
    "push_token_put": (WRITE, f"INSERT INTO push_tokens ({_TOKEN}) VALUES (?, ?, ?, ?, ?, ?)"),
    "push_token_delete": (LWT, "DELETE FROM push_tokens WHERE push_token = ? IF user_id = ?"),
    "push_user_tokens": (READ, f"SELECT {_TOKEN} FROM push_tokens_by_user WHERE user_id = ?"),
    "push_user_token_put": (WRITE, f"INSERT INTO push_tokens_by_user ({_TOKEN}) VALUES (?, ?, ?, ?, ?, ?)"),
    "push_user_token_delete": (WRITE, "DELETE FROM push_tokens_by_user WHERE user_id = ? AND push_token = ?"),
    "push_enqueue": (WRITE, f"INSERT INTO push_outbox (slot, {_OUTBOX}) VALUES (?, ?, ?, ?, ?, ?, ?)"),
    "push_pending": (READ, f"SELECT {_OUTBOX} FROM push_outbox WHERE slot = ? LIMIT ?"),
    "push_dequeue": (WRITE, "DELETE FROM push_outbox WHERE slot = ? AND user_id = ? AND channel_id = ? AND seq <= ?"),
    "push_marks_get": (READ, "SELECT push_token, seq FROM push_marks WHERE user_id = ? AND channel_id = ?"),
    "push_mark_set": (WRITE, "UPDATE push_marks USING TIMESTAMP ? SET seq = ? WHERE user_id = ? AND channel_id = ? "
                             "AND push_token = ?"),
    "push_lease_create": (LWT, "INSERT INTO push_leases (slot, owner, lease_until) VALUES (?, ?, ?) IF NOT EXISTS"),
    "push_lease_renew": (LWT, "UPDATE push_leases SET lease_until = ? WHERE slot = ? IF owner = ?"),
    # token revocation
    "revoked_put": (WRITE, "INSERT INTO revoked_tokens (token_key, user_id, device_id, expires_at) "
                           "VALUES (?, ?, ?, ?) USING TTL ?"),
    "revoked_get": (READ, "SELECT user_id FROM revoked_tokens WHERE token_key = ?"),
    "cutoff_put": (WRITE, "UPDATE token_cutoffs USING TTL ? AND TIMESTAMP ? SET revoked_before = ? "
                          "WHERE user_id = ? AND device_id = ?"),
    "cutoffs_get": (READ, "SELECT device_id, revoked_before FROM token_cutoffs WHERE user_id = ? "
                          "AND device_id IN (?, ?)"),
    # invites
    "invite_first_use": (LWT, "INSERT INTO invite_uses (invite_id, uses) VALUES (?, 1) IF NOT EXISTS USING TTL ?"),
    "invite_next_use": (LWT, "UPDATE invite_uses USING TTL ? SET uses = ? WHERE invite_id = ? IF uses = ?"),
    # media
    "media_put": (WRITE, "INSERT INTO media (id, owner_id, created_at, size, info) VALUES (?, ?, ?, ?, ?)"),
    "media_get": (READ, "SELECT id, owner_id, created_at, size, info FROM media WHERE id = ?"),
    "media_delete": (WRITE, "DELETE FROM media WHERE id = ?"),
    "media_owner_put": (WRITE, "INSERT INTO media_by_owner (owner_id, created_at, id, size) VALUES (?, ?, ?, ?) "
                               "USING TTL 7200"),
    "media_owner_since": (READ, "SELECT size FROM media_by_owner WHERE owner_id = ? AND created_at > ?"),
    "media_ref_put": (WRITE, "INSERT INTO media_refs (media_id, channel_id, msg_key) VALUES (?, ?, ?)"),
    "media_ref_delete": (WRITE, "DELETE FROM media_refs WHERE media_id = ? AND channel_id = ? AND msg_key = ?"),
    "media_refs_get": (READ, "SELECT channel_id FROM media_refs WHERE media_id = ?"),
    "media_ref_any": (READ, "SELECT channel_id FROM media_refs WHERE media_id = ? LIMIT 1"),
    "media_orphan_put": (WRITE, "INSERT INTO media_orphans (bucket, created_at, id) VALUES (?, ?, ?)"),
    "media_orphan_delete": (WRITE, "DELETE FROM media_orphans WHERE bucket = ? AND created_at = ? AND id = ?"),
    "media_orphans_before": (READ, "SELECT created_at, id FROM media_orphans WHERE bucket = ? AND created_at < ? "
                                   "LIMIT ?"),
    "push_lease_take": (LWT, "UPDATE push_leases SET owner = ?, lease_until = ? WHERE slot = ? IF lease_until < ?"),
}


# ---- pure mapping -------------------------------------------------------------------------------
_ASCII_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def username_key(username: str) -> str:
    """The case-insensitive lookup key: ASCII letters folded, like SQLite's ``COLLATE NOCASE``."""
    return username.translate(_ASCII_FOLD)


def user_from_row(row: dict) -> User:
    return User(id=row["id"], username=row["username"], display_name=row["display_name"] or "",
                about=row["about"] or "", created_at=row["created_at"], password_hash=row["password_hash"] or "",
                disabled=bool(row.get("disabled")))


def message_from_row(channel_id: str, row: dict) -> Message:
    """A ``messages`` row as stored: a message folded to its state (``edited_body`` over ``body``),
    or an event. (Rows written before v9, and the emulator's, lack the lifecycle columns.)"""
    m = Message(channel_id, row["seq"], row["sender_id"], row["client_msg_id"], row["body"], row["created_at"],
                attachments=row.get("attachments") or "")
    get = row.get
    if get("kind") is None and get("reply_to") is None and get("state_seq") is None:
        return m
    m.kind = get("kind") or "message"
    m.target_seq = get("target_seq") or 0
    m.reply_to = get("reply_to") or 0
    m.meta = json.loads(row["meta"]) if get("meta") else None
    m.state_seq = get("state_seq") or 0
    m.deleted_at = get("deleted_at") or 0.0
    m.deleted_by = get("deleted_by") or 0
    if m.deleted_at:
        m.body = ""
    elif get("edited_body") is not None:
        m.body, m.edited_at = row["edited_body"], get("edited_at") or 0.0
    return m


def channel_from_row(row: dict, last_seq: int) -> Channel:
    return Channel(row["id"], row["kind"], row["name"] or "", row["owner_id"], row["created_at"], last_seq)


def summary_from_rows(uc: dict, head: dict | None, read_seq: int | None) -> ChannelSummary:
    """A ``channels_by_user`` row + its ``channel_heads`` row + the user's cursor -> one "my channels" row."""
    last_seq = head["last_seq"] if head and head.get("last_seq") is not None else 0
    last_at = head["last_at"] if head and head.get("last_at") is not None else uc["created_at"]
    return ChannelSummary(uc["channel_id"], uc["kind"], uc["name"] or "", last_seq, read_seq or 0, last_at)


def push_token_from_row(row: dict) -> PushToken:
    return PushToken(row["user_id"], row["device_id"] or "", row["provider"] or "", row["push_token"],
                     row["app_id"] or "", row["created_at"] or 0.0)


def push_entry_from_row(row: dict) -> PushEntry:
    return PushEntry(row["user_id"], row["channel_id"], row["seq"], row["sender_id"], row["body"] or "",
                     row["queued_at"])


def new_user_id() -> int:
    return 1 + secrets.randbelow(MAX_USER_ID - 1)


# ---- bucket arithmetic ----------------------------------------------------------------------
def bucket_of(seq: int, bucket_size: int) -> int:
    return seq // bucket_size


def bucket_last_seq(bucket: int, bucket_size: int) -> int:
    """The highest seq that lives in ``bucket``."""
    return (bucket + 1) * bucket_size - 1


def bucket_first_seq(bucket: int, bucket_size: int) -> int:
    """The lowest seq that lives in ``bucket`` (seqs start at 1)."""
    return max(1, bucket * bucket_size)


# ---- DDL text ----------------------------------------------------------------------------------
def keyspace_ddl(keyspace: str, replication: str) -> str:
    parse_replication(replication)
    return (f"CREATE KEYSPACE IF NOT EXISTS {check_keyspace_name(keyspace)} "
            f"WITH replication = {replication.strip()} AND durable_writes = true")


def parse_replication(replication: str) -> dict[str, str]:
    """``cassandra.replication`` (a CQL map literal) -> ``{option: value}`` as strings;
    ``ValueError`` naming the key if it is not a map of names to names or numbers."""
    text = replication.strip()
    example = "{'class': 'NetworkTopologyStrategy', 'dc1': 3}"
    try:
        value = ast.literal_eval(text) if text.startswith("{") and text.endswith("}") else None
    except (ValueError, SyntaxError):
        value = None
    if not (isinstance(value, dict) and value and all(isinstance(k, str) for k in value)
            and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value.values())):
        raise ValueError(f"cassandra.replication must be a CQL map like {example}, got {replication!r}")
    return {k: str(v) for k, v in value.items()}


def replication_shortfall(replication: str, live_by_dc: dict[str, int]) -> str | None:
    """Why ``replication`` cannot be met by the live nodes (``{data center: live nodes}``), or None.
    SimpleStrategy counts every live node; NetworkTopologyStrategy each data center it names (its
    ``replication_factor`` option stands for every data center not named). Other strategies and
    unparsable factors are left to Cassandra. The text names both numbers and the config key."""
    options = parse_replication(replication)
    strategy = options.get("class", "").rsplit(".", 1)[-1]
    wanted: dict[str | None, str] = {}
    if strategy == "SimpleStrategy":
        wanted[None] = options.get("replication_factor", "")
    elif strategy == "NetworkTopologyStrategy":
        named = {k: v for k, v in options.items() if k not in ("class", "replication_factor")}
        if "replication_factor" in options:
            wanted.update({dc: options["replication_factor"] for dc in live_by_dc if dc not in named})
        wanted.update(named)
    seen = ", ".join(f"{dc!r}: {n} live" for dc, n in sorted(live_by_dc.items())) or "none"
    for dc, factor in wanted.items():
        try:
            rf = int(factor.split("/")[0])  # "3/1": 3 replicas, 1 of them transient
        except ValueError:
            continue
        if dc is not None and dc not in live_by_dc:
            return (f"cassandra.replication names data center {dc!r}, which this cluster does not have "
                    f"(the driver sees {seen}): use the data center names `nodetool status` shows")
        live = sum(live_by_dc.values()) if dc is None else live_by_dc[dc]
        if rf > live:
            where = "the cluster" if dc is None else f"data center {dc!r}"
            return (f"cassandra.replication asks for {rf} replicas in {where}, which has {live} live "
                    f"node{'' if live == 1 else 's'} (the driver sees {seen}): lower the replication factor "
                    f"in cassandra.replication to at most {live} or start more nodes")
    return None


def migration_ddl(keyspace: str, found: int) -> list[tuple[int, list[str]]]:
    """The migrations newer than ``found``, with the keyspace filled in."""
    ks = check_keyspace_name(keyspace)
    return [(v, [s.format(ks=ks) for s in stmts]) for v, stmts in MIGRATIONS if v > found]


def check_schema(row: dict | None, keyspace: str) -> int:
    """The keyspace's bucket size, if its schema is exactly the one this chatd writes; otherwise a
    ``RuntimeError`` that tells the operator what to do."""
    if row is None or row.get("version") is None:
        raise RuntimeError(f"Cassandra keyspace {keyspace!r} has no chatd schema; run `chatd store migrate`")
    version = row["version"]
    if version < SCHEMA_VERSION:
        raise RuntimeError(f"Cassandra keyspace {keyspace!r} has schema v{version}, this chatd needs "
                           f"v{SCHEMA_VERSION}; run `chatd store migrate`")
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"Cassandra keyspace {keyspace!r} has schema v{version}, newer than this chatd "
                           f"supports (v{SCHEMA_VERSION}); upgrade chatd")
    size = row.get("bucket_size")
    if not isinstance(size, int) or size < 2:
        raise RuntimeError(f"Cassandra keyspace {keyspace!r}: invalid bucket_size {size!r} in schema_version")
    return size


# ---- migrate ----------------------------------------------------------------------------------
async def migrate(cfg: CassandraConfig, bucket_size: int = DEFAULT_BUCKET_SIZE) -> tuple[int, int]:
    """Create the keyspace and bring its schema to ``SCHEMA_VERSION``; return (found, now).
    ``bucket_size`` only applies to a keyspace created now; an existing one keeps its own.
    Run it from one place at a time (concurrent schema changes can disagree in Cassandra).

    Safe to re-run at any point: every DDL statement runs with ``ok_if_exists`` (a table, or an
    ``ALTER TABLE ... ADD`` column, that a crashed earlier run already made counts as done), and
    the version is recorded only after all of its step's statements ran. A replication that the
    live nodes cannot meet is refused before the keyspace is created. Errors: ``RuntimeError`` or
    ``ValueError``, each one line that says what failed and what to do."""
    if bucket_size < 2:
        raise ValueError("bucket_size must be >= 2")
    ks = check_keyspace_name(cfg.keyspace)
    cluster, session = await connect(cfg, None)
    try:
        if ks not in cluster.metadata.keyspaces:
            shortfall = replication_shortfall(cfg.replication, live_nodes_by_dc(cluster))
            if shortfall:
                raise RuntimeError(f"{shortfall}; keyspace {ks!r} was not created")
        await execute_ddl(session, keyspace_ddl(ks, cfg.replication), ok_if_exists=True)
        await execute_ddl(session, MIGRATIONS[0][1][0].format(ks=ks), ok_if_exists=True)  # schema_version
        row = await read_schema_row(session, cfg, ks)
        found = row["version"] if row and row.get("version") is not None else 0
        if found > SCHEMA_VERSION:
            raise RuntimeError(f"Cassandra keyspace {ks!r} has schema v{found}, newer than this chatd "
                               f"supports (v{SCHEMA_VERSION}); upgrade chatd")
        size = row["bucket_size"] if row and row.get("bucket_size") else bucket_size
        if size != bucket_size and found:
            log.info("keyspace %s keeps its bucket size %d (asked for %d)", ks, size, bucket_size)
        for version, statements in migration_ddl(ks, found):
            for ddl in statements:
                await execute_ddl(session, ddl, ok_if_exists=True)
            await _run(session, cfg.write_consistency, f"recording schema v{version} in {ks}.schema_version",
                       f"INSERT INTO {ks}.schema_version (component, version, bucket_size, migrated_at) "
                       "VALUES (%s, %s, %s, %s)", (COMPONENT, version, size, time.time()))
            log.info("cassandra keyspace %s migrated to schema v%d", ks, version)
        return found, SCHEMA_VERSION
    finally:
        await shutdown(cluster)


async def read_schema_row(session, cfg: CassandraConfig, ks: str) -> dict | None:
    """The keyspace's ``schema_version`` row (version, bucket_size), or None. Unprepared and with
    the keyspace named: it is read once, and before :func:`check_schema` the other statements
    may not prepare. Failure: a one-line ``RuntimeError``."""
    tables = getattr(session.cluster.metadata.keyspaces.get(ks), "tables", {})
    if "schema_version" not in tables:  # a keyspace chatd did not create (or a migrate that died at once)
        return None
    rows = await _run(session, cfg.read_consistency, f"reading {ks}.schema_version",
                      f"SELECT version, bucket_size FROM {ks}.schema_version WHERE component = %s", (COMPONENT,))
    return rows[0] if rows else None


async def _run(session, consistency: str, what: str, cql: str, params: tuple) -> list[dict]:
    """One unprepared statement of ``migrate`` (it runs a handful, once): rows, or a one-line
    ``RuntimeError`` (an unmet consistency level says how many replicas were alive)."""
    from cassandra import OperationTimedOut, Timeout, Unavailable
    from cassandra.cluster import NoHostAvailable
    from cassandra.query import SimpleStatement
    statement = SimpleStatement(cql, consistency_level=consistency_level(consistency))
    try:
        result = await await_response(session.execute_async(statement, params))
    except DRIVER_ERRORS as e:
        replicas = isinstance(e, (Unavailable, Timeout, OperationTimedOut, NoHostAvailable))
        hint = ("; check that the keyspace's replicas are up (`nodetool status`) and that its replication "
                "factor does not exceed its nodes") if replicas else ""
        raise RuntimeError(f"cassandra: {what} at {consistency} failed: {error_text(e)}{hint}") from e
    return list(result.current_rows)


async def drop_keyspace(cfg: CassandraConfig) -> None:
    """Drop the whole keyspace (test clean-up; never called by chatd itself)."""
    ks = check_keyspace_name(cfg.keyspace)
    cluster, session = await connect(cfg, None)
    try:
        await execute_ddl(session, f"DROP KEYSPACE IF EXISTS {ks}")
    finally:
        await shutdown(cluster)
