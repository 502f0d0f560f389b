"""The logical records of a store, backend-neutral: what ``chatd store copy`` and ``verify`` move and
compare (:meth:`chatd.store.base.Store.export_rows` / ``import_rows``). Pure: no I/O.

A record is a tuple of the fields named in ``KINDS`` (in that order); the first ``KEY_FIELDS[kind]``
fields identify it. ``KINDS`` is also the copy order: a kind only refers to kinds before it (members
and group departures to channels and users, media to users, messages to channels and, by their
attachments, media; reactions to messages, media references to media and messages), so an
interrupted copy never leaves a row whose parents are missing. Adding a column to a table means adding its field here (at the end), in the
export and import of both backends, and nowhere else.

Every table of both backends is either a kind here, or derived from kinds here (written by the
destination's import as its live store writes it), or deliberately not copied:

* Messages are copied *folded* (what a client reads): an edited message's ``body`` is its last
  edit's text (SQLite keeps only that; Cassandra's ``body`` keeps the original, which no read
  returns, and ``edited_body`` the edit's: the record carries the latter), a deleted one's is ''
  with no ``edited_at``. Event rows (edits, deletes, reactions, system events) are messages rows
  with their ``kind``. A Cassandra import writes the fold columns (``edited_body``, ``edited_at``,
  ``deleted_by``, ``deleted_at``, ``state_seq``) ``USING TIMESTAMP`` = ``state_seq``, the seq of
  the event that wrote them, and each reaction at the reacted message's seq, as the live store's
  folds are timestamped by seq: an event after the copy (a higher seq) still wins.
* Receipts: ``members.delivered_seq`` (SQLite) / ``receipt_cursors`` (Cassandra, with the read
  position too, written from ``read_seq``) are the members record's ``delivered_seq``, read
  implying delivered (the larger of the two, as ``Store.receipts`` answers).
* Derived, SQLite: the indexes only (``media_by_owner``, ``media_orphans`` included; ``referenced``
  is a field of the media record). Derived, Cassandra: ``message_events`` (from the event rows
  that target a message), ``media_orphans`` (from ``referenced``), ``media_by_owner`` (the
  uploads of the last two hours, with the TTL they have left: the hourly quota), ``users_by_name``, ``devices_by_user``,
  ``channel_heads``, ``members_by_channel``'s ``member_version``, ``channels_by_user``,
  ``read_cursors``, ``message_dedup``, ``push_tokens_by_user``, ``invitations_by_user`` (from the
  ``group_departures`` that carry an invitation), and ``groups_by_owner``: the groups a user
  created lately, which ``limits.groups_created_per_hour`` counts. SQLite reads that count from
  ``channels`` (``channels_by_owner``); a Cassandra import of ``channels`` writes one row for each
  group created less than ``GROUPS_CREATED_TTL_S`` ago, with the TTL it has left, so the cap
  counts the same groups the hour after a copy. So it is not a kind of its own: rebuilt from the
  channel, a Cassandra source's row of a creation that died before its channel row, and a group
  handed over within the hour (Cassandra counts its creator, SQLite its owner), count for the
  group's owner, or not at all, after the copy: at most an hour of a rate limit, never data.
  ``verify`` compares the invitations through ``invitations_of`` (what ``GET /v1/invitations``
  reads), not ``groups_by_owner``, which expires on its own within the hour.
* Not in the store: media *objects* (the bytes): ``chatd store copy`` copies them by key between
  the two configs' media backends when they differ (chatd/media/copy.py).
* Not copied: ``push_leases`` (which process of the *old* deployment sends a push slot:
  meaningless in the new one, and expired once it is stopped); ``schema_version`` (each
  destination is migrated to this chatd's schema).
"""

from __future__ import annotations

import hashlib
import json

KINDS: dict[str, tuple[str, ...]] = {
    "users": ("id", "username", "password_hash", "display_name", "about", "created_at", "disabled"),
    "presence": ("user_id", "last_active_at"),
    # last_login_at of a logged-out (unlisted) device is not kept by Cassandra: created_at stands in
    "devices": ("id", "user_id", "created_at", "last_login_at", "listed"),
    "token_cutoffs": ("user_id", "device_id", "revoked_before", "expires_at"),
    "revoked_tokens": ("token_key", "user_id", "device_id", "expires_at"),
    "invite_uses": ("invite_id", "uses", "expires_at"),
    "channels": ("id", "kind", "name", "owner_id", "created_at", "last_seq", "last_at"),
    # delivered_seq: the highest seq one of the member's devices holds, read_seq included (receipts)
    "members": ("channel_id", "user_id", "joined_at", "read_seq", "delivered_seq"),
    # who left a group on their own; invited_by/invited_at None until its owner invites them back
    "group_departures": ("channel_id", "user_id", "left_at", "invited_by", "invited_at"),
    # uploads (chatd/media): referenced is 1 once a message named it (0: an orphan the sweep may take)
    "media": ("id", "owner_id", "created_at", "size", "info", "referenced"),
    # a row of the log folded (chatd/lifecycle.py): body is the text a client reads now (an edit's,
    # '' once deleted); kind None for a message; meta the JSON text of the row's meta
    "messages": ("channel_id", "seq", "sender_id", "client_msg_id", "body", "created_at", "kind", "target_seq",
                 "reply_to", "meta", "edited_at", "deleted_by", "deleted_at", "state_seq", "attachments"),
    "reactions": ("channel_id", "seq", "emoji", "user_id", "at"),
    "media_refs": ("media_id", "channel_id", "msg_key"),
    "push_tokens": ("token", "user_id", "device_id", "provider", "app_id", "created_at"),
    "push_outbox": ("user_id", "channel_id", "seq", "sender_id", "body", "queued_at"),
    "push_marks": ("user_id", "channel_id", "token", "seq"),
}

KEY_FIELDS: dict[str, int] = {
    "users": 1, "presence": 1, "devices": 1, "token_cutoffs": 2, "revoked_tokens": 1, "invite_uses": 1,
    "channels": 1, "members": 2, "group_departures": 2, "media": 1, "messages": 2,
    "reactions": 4, "media_refs": 3, "push_tokens": 1, "push_outbox": 3,
    "push_marks": 3,
}

# Fields a backend keeps only approximately (Cassandra keeps an expiry as a TTL, in whole seconds):
# left out of the digests ``verify`` compares.
APPROXIMATE: dict[str, frozenset[str]] = {
    "token_cutoffs": frozenset({"expires_at"}),
    "invite_uses": frozenset({"expires_at"}),
}


def check_kind(kind: str) -> tuple[str, ...]:
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown record kind {kind!r} (known: {', '.join(KINDS)})") from None


def comparable(kind: str, row: tuple) -> tuple:
    """The row without its approximate fields (what two faithful copies agree on exactly)."""
    skip = APPROXIMATE.get(kind)
    if not skip:
        return tuple(row)
    return tuple(v for name, v in zip(KINDS[kind], row) if name not in skip)


class Digest:
    """An order-independent digest of a set of rows: the XOR of each row's SHA-256 (so two stores
    that export the same rows in different orders agree), plus the count."""

    def __init__(self):
        self.count = 0
        self._acc = 0

    def add(self, row: tuple) -> None:
        h = hashlib.sha256(json.dumps(list(row), separators=(",", ":")).encode()).digest()
        self._acc ^= int.from_bytes(h, "big")
        self.count += 1

    def hexdigest(self) -> str:
        return f"{self._acc:064x}"



def add_messages(h, messages) -> None:
    """Feed one page of a channel's history (in seq order) to ``h`` (a ``hashlib`` hash): the
    per-channel digest of ``verify``. Every row folded as a client reads it: its text as last
    edited or erased, its events' fields, its reactions (who, in order), its reply's excerpt and
    its attachments."""
    for m in messages:
        h.update(json.dumps([m.seq, m.sender_id, m.client_msg_id, m.body, m.created_at, m.kind, m.target_seq,
                             m.reply_to, m.meta, m.edited_at, m.deleted_by, m.deleted_at, m.state_seq,
                             [[e, list(us)] for e, us in m.reactions], m.reply, m.attachments],
                            separators=(",", ":"), sort_keys=True).encode())
        h.update(b"\n")
