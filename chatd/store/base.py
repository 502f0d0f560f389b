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

Sequencing contract (:meth:`append_message`): per channel, seqs are 1, 2, 3, ... with no gap and
no reuse; a ``(channel_id, sender_id, client_msg_id)`` seen before returns the original message with
``duplicate=True`` and stores nothing. Only the channel's owner shard calls it, so a backend may cache
the head seq per channel, but it must stay safe if two callers ever race on one channel (SQLite:
one write transaction reads the head; Cassandra: conditional insert on ``(channel, bucket, seq)``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass


@dataclass(frozen=True)
class User:
    id: int
    username: str
    display_name: str
    about: str
    created_at: float
    password_hash: str = ""

    def public(self) -> dict:
        return {"id": self.id, "username": self.username, "display_name": self.display_name,
                "about": self.about, "created_at": self.created_at}


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

    @property
    def unread(self) -> int:
        return max(0, self.last_seq - self.read_seq)


@dataclass(eq=False)
class Message:
    channel_id: str
    seq: int
    sender_id: int
    client_msg_id: str
    body: str
    created_at: float

    def key(self) -> tuple[str, int]:
        return (self.channel_id, self.seq)


@dataclass(frozen=True)
class AppendResult:
    message: Message
    duplicate: bool


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
    async def add_device(self, user_id: int, device_id: str, created_at: float) -> None: ...

    @abc.abstractmethod
    async def device_owner(self, device_id: str) -> int | None: ...

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
    async def add_member(self, channel_id: str, user_id: int, max_members: int, joined_at: float) -> bool:
        """True if added, False if already a member; ``group_full``/``no_such_user``/``no_such_channel``."""

    @abc.abstractmethod
    async def remove_member(self, channel_id: str, user_id: int) -> bool: ...

    @abc.abstractmethod
    async def members(self, channel_id: str) -> list[int]:
        """Stored members (empty for an unknown channel)."""

    @abc.abstractmethod
    async def channels_of(self, user_id: int) -> list[ChannelSummary]:
        """The user's channels, most recently active first."""

    # -- messages --
    @abc.abstractmethod
    async def append_message(self, channel_id: str, sender_id: int, client_msg_id: str, body: str,
                             created_at: float, dm_pair: tuple[int, int] | None = None) -> AppendResult:
        """Store the next message of the channel (see the sequencing contract). For a 1:1 channel
        pass ``dm_pair``: its channel row and memberships are created with the first message."""

    @abc.abstractmethod
    async def read_messages(self, channel_id: str, *, after: int | None = None, before: int | None = None,
                            limit: int) -> list[Message]:
        """Messages in ascending seq. With ``after``: the first ``limit`` with seq > after (and
        < before if given). Otherwise the last ``limit`` with seq < before (or the newest)."""

    @abc.abstractmethod
    async def head_seq(self, channel_id: str) -> int:
        """The highest stored seq of the channel (0 if none)."""

    @abc.abstractmethod
    async def set_read(self, channel_id: str, user_id: int, seq: int) -> int:
        """Raise the user's read cursor to ``min(seq, head)`` (never lowers it); return the cursor."""

    # -- presence --
    @abc.abstractmethod
    async def set_last_active(self, user_id: int, at: float) -> None:
        """Record when the user was last active (never moves backwards)."""

    @abc.abstractmethod
    async def get_last_active(self, user_ids: list[int]) -> dict[int, float]:
        """``last_active_at`` of the users among ``user_ids`` that have one."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Finish queued writes and release connections. Idempotent."""
