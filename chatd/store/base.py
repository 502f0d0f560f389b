"""The store interface: the only way chatd code reaches persistent data.

Every method is async and may be called concurrently from many trio tasks. Backends keep their
blocking work off the trio event loop (a worker thread for SQLite, driver futures bridged into
trio for Cassandra) and never leak driver exceptions: a backend failure surfaces as
``ChatError("unavailable")`` and a domain conflict as the matching ``ChatError`` code
(``username_taken``, ``no_such_user``, ``no_such_channel``, ``group_full``).

Durability contract: when a write method returns, the write is durable by the backend's
configured standard (SQLite ``synchronous=FULL``: survives power loss; Cassandra: the configured
write consistency level). The shard acks a message only after :meth:`Store.append_message`
returned.

Push notifications (``chatd/push``): device push tokens per user, a durable outbox of pushes owed to
offline recipients (one row per (recipient, channel, seq), so a repeated enqueue stores nothing new),
per (token, channel) "pushed up to" marks that only rise, and slot leases that make one process the
sender of a slot's outbox rows at a time (``PUSH_SLOTS`` slots, ``push_slot(user_id)``).

Sequencing contract (:meth:`append_message`): per channel, seqs are 1, 2, 3, ... with no gap and
no reuse; a ``(channel_id, sender_id, client_msg_id)`` seen before returns the original message with
``duplicate=True`` and stores nothing. Only the channel's owner shard calls it, so a backend may cache
the head seq per channel, but it must stay safe if two callers ever race on one channel (SQLite:
one write transaction reads the head; Cassandra: conditional insert on ``(channel, bucket, seq)``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class User:
    id: int
    username: str
    display_name: str
    about: str
    created_at: float
    password_hash: str = ""
    disabled: bool = False  # by an operator (chatd admin users disable): cannot log in

    def public(self) -> dict:
        return {"id": self.id, "username": self.username, "display_name": self.display_name,
                "about": self.about, "created_at": self.created_at}


@dataclass(frozen=True)
class Device:
    """One device of a user, as listed (``GET /v1/devices``): its first and its latest login."""
    id: str
    created_at: float
    last_login_at: float


@dataclass(frozen=True)
class Channel:
    id: str
    kind: str  # "dm" | "group"
    name: str
    owner_id: int | None
    created_at: float
    last_seq: int


@dataclass(frozen=True)
class ChannelSummary:
    """One row of "my channels": where the channel is and where this user has read up to."""
    id: str
    kind: str
    name: str
    last_seq: int
    read_seq: int
    last_at: float

    # new messages above read_seq (no events, no deleted ones); None: the backend does not count them
    unread_count: int | None = field(default=None, compare=False)

    @property
    def unread(self) -> int:
        if self.unread_count is not None:
            return self.unread_count
        return max(0, self.last_seq - self.read_seq)


@dataclass(frozen=True)
class Departure:
    """A user who left a group on their own (:meth:`Store.remove_member` with ``left_at``): the
    owner's add does not put them back; it invites them (``invited_by``/``invited_at``), and only
    their own acceptance (:meth:`Store.add_member`) does."""
    channel_id: str
    user_id: int
    left_at: float
    invited_by: int | None = None
    invited_at: float | None = None


@dataclass(eq=False)
class Message:
    """One row of a channel's log: a message, or a lifecycle event (``kind``, chatd/lifecycle.py).

    The first six fields are every row's; the rest have defaults that mean "none" (a plain
    message). A message row is returned *folded* (its current state: ``body`` as last edited,
    ``edited_at``, ``deleted_by``/``deleted_at`` with an erased body, ``reactions``, ``state_seq``
    the seq of the last event folded in, ``reply`` the quote of its ``reply_to`` target). An event
    row: ``target_seq``, its ``body`` (an edit's text, a reaction's emoji; "" once its target was
    deleted: ``redacted``), ``meta`` (a reaction's ``count`` after it; a system event's
    ``user_id``)."""
    channel_id: str
    seq: int
    sender_id: int
    client_msg_id: str
    body: str
    created_at: float
    kind: str = "message"
    target_seq: int = 0
    reply_to: int = 0
    meta: dict | None = None
    edited_at: float = 0.0
    deleted_by: int = 0
    deleted_at: float = 0.0
    state_seq: int = 0
    reactions: tuple = ()  # ((emoji, (user ids, sorted)), ...) in order of first reaction
    reply: dict | None = None  # filled at read: lifecycle.excerpt(target)

    @property
    def redacted(self) -> bool:
        """An event row whose target was deleted: its content is erased."""
        return self.kind in ("edit", "react", "unreact") and not self.body
    # the attachments' metadata as sent (chatd/media: a JSON list, snapshot taken at send), "" if none
    attachments: str = ""


@dataclass(frozen=True)
class AppendResult:
    message: Message
    duplicate: bool


PUSH_SLOTS = 64  # outbox partitions; part of the stored format (rows are filed under push_slot(user))


def push_slot(user_id: int) -> int:
    return user_id % PUSH_SLOTS


@dataclass(frozen=True)
class PushToken:
    """A device's registration with a push platform, relayed by the configured gateway."""
    user_id: int
    device_id: str
    provider: str  # the platform label the client gave ("apns", "fcm", ...); passed through
    token: str  # the platform's device token (Matrix: pushkey); unique across users
    app_id: str
    created_at: float

    def public(self) -> dict:
        return {"device_id": self.device_id, "provider": self.provider, "token": self.token,
                "app_id": self.app_id, "created_at": self.created_at}


@dataclass(frozen=True)
class PushEntry:
    """One message owed to one offline recipient, waiting in the outbox."""
    user_id: int
    channel_id: str
    seq: int
    sender_id: int
    body: str  # "" unless push.include_body (bodies are not copied into the outbox otherwise)
    queued_at: float  # wall-clock time of the enqueue (coalescing window starts here)


@dataclass(frozen=True)
class MediaRecord:
    """One upload (chatd/media): who uploaded it, when, the served size, and ``info``: the rest of
    its metadata (mime, kind, sha256, name, width, height, duration_s, object keys, thumbnails,
    placeholder) as the media service wrote it -- the store keeps it whole, as JSON."""
    id: str
    owner_id: int
    created_at: float
    size: int
    info: dict


class Store(abc.ABC):
    """Domain-level persistence. See the module docstring for the error and durability policy."""

    schema_version: int

    # -- users and devices --
    @abc.abstractmethod
    async def create_user(self, username: str, password_hash: str, display_name: str,
                          created_at: float) -> User:
        """Create a user with a fresh int64 id; ``username_taken`` if the name (case-insensitive) exists."""

    @abc.abstractmethod
    async def get_user(self, user_id: int) -> User | None: ...

    @abc.abstractmethod
    async def get_user_by_name(self, username: str) -> User | None:
        """Case-insensitive lookup; the result carries ``password_hash``."""

    @abc.abstractmethod
    async def get_users(self, user_ids: list[int]) -> dict[int, User]:
        """The users that exist among ``user_ids``."""

    @abc.abstractmethod
    async def update_profile(self, user_id: int, display_name: str | None, about: str | None) -> User: ...

    @abc.abstractmethod
    async def set_password_hash(self, user_id: int, password_hash: str) -> None:
        """Replace the user's password hash (a re-hash with stronger parameters); a user that does
        not exist is left alone."""

    @abc.abstractmethod
    async def set_user_disabled(self, user_id: int, disabled: bool) -> bool:
        """Mark the user disabled (no login) or enabled again; False if there is no such user."""

    @abc.abstractmethod
    async def rename_user(self, user_id: int, username: str) -> User:
        """Give the user a new username (the old one is free again); ``username_taken`` if the new
        one (case-insensitive) belongs to someone else, ``no_such_user``."""

    @abc.abstractmethod
    async def add_device(self, user_id: int, device_id: str, created_at: float) -> None:
        """Record a login of the device at ``created_at``: the first one gives the device to
        ``user_id`` for good (another user's call changes nothing); each of the owner's lists the
        device again (:meth:`devices_of`) and raises its ``last_login_at``."""

    @abc.abstractmethod
    async def device_owner(self, device_id: str) -> int | None: ...

    @abc.abstractmethod
    async def devices_of(self, user_id: int) -> list[Device]:
        """The user's devices that logged in since their last logout (:meth:`revoke_before` drops
        a device from the list), ordered by id."""

    # -- channels and membership --
    @abc.abstractmethod
    async def create_group(self, channel_id: str, name: str, owner_id: int, member_ids: list[int],
                           created_at: float, max_members: int) -> Channel:
        """Create a group with ``owner_id`` and ``member_ids`` (deduplicated) as members.
        ``no_such_user`` if one does not exist, ``group_full`` above ``max_members``."""

    @abc.abstractmethod
    async def get_channel(self, channel_id: str) -> Channel | None:
        """The channel row; a 1:1 channel has one only after its first message."""

    @abc.abstractmethod
    async def set_owner(self, channel_id: str, owner_id: int) -> None:
        """Make ``owner_id`` the group's owner (the caller checked it is a member); ``no_such_channel``."""

    @abc.abstractmethod
    async def groups_created_since(self, owner_id: int, since: float, limit: int) -> list[float]:
        """The creation times (ascending, at most ``limit``, the oldest first) of the groups
        ``owner_id`` created at or after ``since``, ``since`` at most an hour ago (what
        ``limits.groups_created_per_hour`` counts). A group whose creation failed after its checks
        may count (Cassandra records the creation before the channel row)."""

    @abc.abstractmethod
    async def add_member(self, channel_id: str, user_id: int, max_members: int, joined_at: float) -> bool:
        """True if added, False if already a member; ``group_full``/``no_such_user``/``no_such_channel``.
        Adding clears the user's :class:`Departure` from the group, if any."""

    @abc.abstractmethod
    async def remove_member(self, channel_id: str, user_id: int, left_at: float | None = None) -> bool:
        """True if removed, False if not a member. With ``left_at`` the removal is the user's own
        leave: their :class:`Departure` is recorded (also when they were no member any more)."""

    @abc.abstractmethod
    async def departure(self, channel_id: str, user_id: int) -> Departure | None:
        """The user's departure from the group, or None (never left on their own, or rejoined)."""

    @abc.abstractmethod
    async def invite_back(self, channel_id: str, user_id: int, by: int, at: float) -> bool:
        """Record ``by``'s invitation of a user who left (their departure must exist); True if
        recorded, False if there is no departure (the user rejoined, or never left)."""

    @abc.abstractmethod
    async def invitations_of(self, user_id: int, limit: int) -> list[Departure]:
        """The user's departures with an invitation (not accepted yet), the latest invitation
        first, at most ``limit``."""

    @abc.abstractmethod
    async def members(self, channel_id: str) -> list[int]:
        """Stored members (empty for an unknown channel)."""

    @abc.abstractmethod
    async def channels_of(self, user_id: int) -> list[ChannelSummary]:
        """The user's channels, most recently active first."""

    @abc.abstractmethod
    async def channels_page(self, user_id: int, after: str | None, limit: int) -> list[ChannelSummary]:
        """Up to ``limit`` of the user's channels with an id above ``after`` (None: from the
        first), ordered by channel id: a walk page by page lists each channel the user is a member
        of throughout the walk exactly once, whatever happens in the channels meanwhile."""

    # -- messages --
    @abc.abstractmethod
    async def append_message(self, channel_id: str, sender_id: int, client_msg_id: str, body: str,
                             created_at: float, dm_pair: tuple[int, int] | None = None) -> AppendResult:
        """Store the next message of the channel (see the sequencing contract). For a 1:1 channel
        pass ``dm_pair``: its channel row and memberships are created with the first message."""

    def submit_append(self, channel_id: str, sender_id: int, client_msg_id: str, body: str, created_at: float,
                      dm_pair: tuple[int, int] | None,
                      callback: Callable[[AppendResult | None, BaseException | None], None]) -> bool:
        """:meth:`append_message` without a task, for a backend that can queue the write without
        waiting: queue it now, behind every write queued before (the caller's order is kept), and
        call ``callback(result, error)`` in the trio thread once it is durable (``error`` None) or
        failed (``result`` None). False, with nothing queued, when it cannot queue at once: the
        caller then awaits :meth:`append_message`. This default always answers False."""
        return False

    async def append_event(self, channel_id: str, sender_id: int, client_msg_id: str, spec, created_at: float,
                           dm_pair: tuple[int, int] | None = None) -> AppendResult:
        """Append a lifecycle row (``spec``: a :class:`chatd.lifecycle.EventSpec`; a message with
        ``reply_to`` too) under the same sequencing and dedup contract as :meth:`append_message`,
        and fold it into its target: an edit sets the target's body, ``edited_at`` and
        ``state_seq``; a delete **erases** the target's body, the body of every edit of it, its
        reactions and the emoji of every reaction event of it, and its pending pushes, and records
        who deleted it and when; a react / unreact adds or drops the user's reaction and stores the
        count after it (``meta["count"]``). The caller (the channel's owner, under the channel's
        lifecycle lock) has checked the rules (chatd/lifecycle.py). A duplicate answers the
        original row and applies its fold again (harmless: the fold is idempotent)."""
        raise NotImplementedError

    async def find_sent(self, channel_id: str, sender_id: int, client_msg_id: str) -> Message | None:
        """The row stored for ``(channel, sender, client_msg_id)``, if any (a resend's original)."""
        raise NotImplementedError

    async def get_message(self, channel_id: str, seq: int) -> Message | None:
        """The row ``seq`` of the channel, folded (None if there is none)."""
        if seq < 1:
            return None
        rows = await self.read_messages(channel_id, after=seq - 1, before=seq + 1, limit=1)
        return rows[0] if rows else None

    @abc.abstractmethod
    async def read_messages(self, channel_id: str, *, after: int | None = None, before: int | None = None,
                            limit: int) -> list[Message]:
        """Rows (messages folded, and events) in ascending seq. With ``after``: the first ``limit``
        with seq > after (and < before if given). Otherwise the last ``limit`` with seq < before (or
        the newest). A reply's ``reply`` holds the excerpt of its target as it is now."""

    @abc.abstractmethod
    async def expire_messages(self, channel_id: str, before: float) -> int:
        """Retention: delete the channel's oldest messages, every seq up to the highest one whose
        ``created_at`` is before ``before``, so that what is kept stays one gap-free range ending at
        the head. The head seq stays the channel's (the next message still gets head + 1, also when
        every message went). Returns how many were deleted."""

    @abc.abstractmethod
    async def head_seq(self, channel_id: str) -> int:
        """The highest stored seq of the channel (0 if none)."""

    @abc.abstractmethod
    async def set_read(self, channel_id: str, user_id: int, seq: int) -> int:
        """Raise the user's read cursor to ``min(seq, head)`` (never lowers it); return the cursor."""

    async def rename_channel(self, channel_id: str, name: str) -> None:
        """Set a group's name (its row and every member's "my channels" row)."""
        raise NotImplementedError

    async def set_delivered(self, channel_id: str, user_id: int, seq: int) -> int:
        """Raise the member's ``delivered_seq`` (the highest seq one of their devices holds) to
        ``min(seq, head)`` (never lowers it); return it. ``not_member`` if not a member. A
        :meth:`set_read` raises it too (read implies received)."""
        raise NotImplementedError

    async def receipts(self, channel_id: str) -> dict[int, tuple[int, int]]:
        """member -> (delivered_seq, read_seq), for every current member."""
        raise NotImplementedError

    # -- presence --
    @abc.abstractmethod
    async def set_last_active(self, user_id: int, at: float) -> None:
        """Record when the user was last active (never moves backwards)."""

    @abc.abstractmethod
    async def get_last_active(self, user_ids: list[int]) -> dict[int, float]:
        """``last_active_at`` of the users among ``user_ids`` that have one."""

    # -- push notifications --
    @abc.abstractmethod
    async def add_push_token(self, token: PushToken) -> None:
        """Register ``token`` for its user and device. A token names one device: registering it again
        replaces its row (moving it from another user or device), and the device's other tokens go."""

    @abc.abstractmethod
    async def push_token_holder(self, token: str) -> PushToken | None:
        """The registration of ``token``, whoever holds it, or None."""

    @abc.abstractmethod
    async def remove_push_token(self, user_id: int, token: str) -> bool:
        """Unregister the token if ``user_id`` holds it; True if it was registered to them."""

    @abc.abstractmethod
    async def push_tokens(self, user_id: int) -> list[PushToken]:
        """The user's registered tokens, ordered by token."""

    @abc.abstractmethod
    async def enqueue_pushes(self, entries: list[PushEntry]) -> None:
        """Add outbox rows. (user, channel, seq) identifies a row: enqueueing it again keeps one row
        (SQLite keeps the first, Cassandra the last write; both carry the same message)."""

    @abc.abstractmethod
    async def pending_pushes(self, slot: int, limit: int) -> list[PushEntry]:
        """Up to ``limit`` outbox rows of the slot, ordered by (user_id, channel_id, seq)."""

    @abc.abstractmethod
    async def delete_pushes(self, user_id: int, channel_id: str, upto_seq: int) -> None:
        """Drop the user's outbox rows of the channel with seq <= ``upto_seq``."""

    @abc.abstractmethod
    async def push_marks(self, user_id: int, channel_id: str) -> dict[str, int]:
        """token -> the highest seq of the channel already pushed to that token (for this user)."""

    @abc.abstractmethod
    async def set_push_mark(self, user_id: int, channel_id: str, token: str, seq: int) -> None:
        """Raise the token's mark for the channel to ``seq`` (never lowers it)."""

    @abc.abstractmethod
    async def claim_push_slots(self, owner: str, slots: list[int], lease_s: float, now: float) -> list[int]:
        """Take or renew the lease of each slot that is free, expired (``lease_until < now``) or
        already ``owner``'s, until ``now + lease_s``; return the slots ``owner`` now holds (of ``slots``).
        Two owners never hold one slot at once (by the callers' clocks)."""

    @abc.abstractmethod
    async def release_push_slots(self, owner: str, slots: list[int]) -> None:
        """End ``owner``'s leases of ``slots`` at once (slots held by others are left alone)."""

    # -- token revocation (logout; chatd/revocation.py) --
    @abc.abstractmethod
    async def revoke_token(self, token_key: str, user_id: int, device_id: str, expires_at: float) -> None:
        """Record the token (by its key) as revoked until ``expires_at``; repeating it is harmless.
        Backends may forget records after ``expires_at`` (the token has expired by then)."""

    @abc.abstractmethod
    async def token_revoked(self, token_key: str, user_id: int | None = None, device_id: str = "",
                            issued_at: float = 0.0) -> bool:
        """Whether the token with this key was revoked (and has not expired since) or, with
        ``user_id``, falls under a cut-off of the user or of its ``device_id``
        (:meth:`revoke_before`) for a token issued at ``issued_at``. One read (one round trip)."""

    @abc.abstractmethod
    async def revoke_before(self, user_id: int, device_id: str | None, before: float, expires_at: float) -> None:
        """Revoke every token of the user's device ``device_id`` (None: of all the user's
        devices) issued before ``before``, and drop the device(s) from :meth:`devices_of`. A
        cut-off only ever rises (an earlier ``before`` changes nothing); backends may forget it after
        ``expires_at`` (every token it revokes has expired by then)."""

    # -- invites (sign-up with auth.registration = "invite"; chatd/auth.py) --
    @abc.abstractmethod
    async def use_invite(self, invite_id: str, max_uses: int, expires_at: float) -> bool:
        """Count one use of the invite if it has been used fewer than ``max_uses`` times; True if
        counted. Two concurrent calls never both take the last use. Backends may forget the count
        after ``expires_at`` (the invite is refused by then)."""

    # -- bulk (chatd store copy; chatd/store/records.py) --
    @abc.abstractmethod
    async def export_rows(self, kind: str, after, limit: int) -> tuple[list[tuple], object]:
        """Up to ``limit`` records of ``kind`` (``records.KINDS``) following the position ``after``
        (None: from the start), and the position after them: a JSON-able value to pass back, or
        None when this page was the last. Positions stay valid across processes (a copy resumes from
        one) as long as the store is not written meanwhile. Reads only."""

    @abc.abstractmethod
    async def import_rows(self, kind: str, rows: list[tuple]) -> None:
        """Write records of ``kind`` as they are (ids, seqs and times kept): an upsert, so importing
        a row again changes nothing. For a store no server is using (a copy's destination); rows
        whose parents (``records.KINDS`` order) are missing are a caller's bug."""

    async def count_rows(self, kind: str) -> int | None:
        """How many records of ``kind`` there are, if the backend can tell cheaply (for a progress
        bar); None otherwise (this default)."""
        return None

    # -- operations --
    # -- media (chatd/media) --
    # An upload is an *orphan* until a reference names it; references are (media id, channel, the
    # referring message's key "<sender id>:<client_msg_id>"), written before the message is sent.
    @abc.abstractmethod
    async def add_media(self, record: MediaRecord) -> None:
        """Store a new upload's metadata (an orphan until referenced)."""

    @abc.abstractmethod
    async def get_media(self, media_ids: list[str]) -> dict[str, MediaRecord]:
        """The records of those ids that exist."""

    @abc.abstractmethod
    async def media_usage(self, owner_id: int, since: float) -> tuple[int, int]:
        """(uploads, bytes) of the user's uploads created after ``since`` (the hourly quota)."""

    @abc.abstractmethod
    async def add_media_refs(self, media_ids: list[str], channel_id: str, msg_key: str) -> None:
        """Record that the message ``msg_key`` of ``channel_id`` holds these uploads (idempotent);
        they are orphans no more."""

    @abc.abstractmethod
    async def media_channels(self, media_id: str) -> list[str]:
        """The channels holding a message that references the upload."""

    @abc.abstractmethod
    async def remove_media_refs(self, media_ids: list[str], channel_id: str, msg_key: str) -> list[str]:
        """Drop those references; return the ids that no reference names any more."""

    @abc.abstractmethod
    async def orphan_media(self, before: float, limit: int) -> list[MediaRecord]:
        """Uploads created before ``before`` that no reference ever named (at most ``limit``)."""

    @abc.abstractmethod
    async def delete_media(self, media_id: str) -> None:
        """Forget the upload's record (and its orphan mark)."""

    def statistics(self) -> dict[str, float]:
        """The backend's own counters (commits, batches...) by name, for the metrics endpoint:
        the same names on every call, values that only rise. This default keeps none: {}."""
        return {}

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Finish queued writes and release connections. Idempotent."""
