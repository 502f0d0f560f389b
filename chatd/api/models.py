"""The HTTP API's typed models (msgspec Structs): request bodies and query strings are decoded
*through* these (:mod:`chatd.api.spec`), responses are documented by them, and ``/openapi.json`` is
generated from them. A limit that depends on the configuration (the page size, the member cap) is
checked in the route; what is fixed is stated here once.

Strings in request bodies are UTF-8 without lone surrogates (msgspec's JSON decoder refuses
both), so nothing the store cannot keep gets past decoding.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from ..errors import CODES
from ..ids import MAX_INT64

UserId = Annotated[int, Meta(ge=1, le=MAX_INT64)]
Seq = Annotated[int, Meta(ge=0, le=MAX_INT64)]


def text(lo: int, hi: int, pattern: str | None = None, description: str | None = None):
    return Annotated[str, Meta(min_length=lo, max_length=hi, pattern=pattern, description=description)]


# ---- errors --------------------------------------------------------------------------------------
ErrorCode = Literal[tuple(CODES)]  # type: ignore[valid-type]  # the stable codes (chatd.errors)


class ErrorDetail(Struct):
    code: ErrorCode
    message: str


class ErrorBody(Struct):
    """Every error answer: ``{"error": {"code", "message"}}``."""
    error: ErrorDetail


# ---- request bodies ----------------------------------------------------------------------------
class SignUp(Struct):
    username: text(3, 32, r"^[A-Za-z0-9_.-]*$", "3-32 of A-Za-z0-9_.-")
    password: text(8, 1024)
    display_name: text(0, 64) | None = None
    invite: text(1, 512, description="from `chatd admin invite`; needed when auth.registration = invite") | None = None


class Login(Struct):
    username: text(0, 64)
    password: text(0, 1024)
    device_id: text(1, 64) | None = None


class ProfilePatch(Struct):
    display_name: text(1, 64) | None = None
    about: text(0, 1000) | None = None


class LogoutRequest(Struct):
    all: bool = msgspec.field(default=False)  # every device of the user, not only the caller's


class PasswordChange(Struct):
    old_password: text(0, 1024)
    new_password: text(8, 1024)


class GroupCreate(Struct):
    name: text(1, 128)
    members: list[UserId] = []


def group_create(max_members: int) -> type[GroupCreate]:
    """``GroupCreate`` with the configured member cap (``limits.max_group_members``)."""
    return msgspec.defstruct("GroupCreate", [("members", Annotated[list[UserId], Meta(max_length=max_members)], [])],
                             bases=(GroupCreate,))


class GroupRename(Struct):
    name: text(1, 128)


class GroupRenamed(Struct):
    channel_id: str
    name: str
    seq: int  # the `renamed` row of the log (0: stored, but the owner shard did not log it)


class MemberAdd(Struct):
    user_id: UserId


class PushTokenCreate(Struct):
    provider: text(1, 32, r"^[A-Za-z0-9_.-]*$", "e.g. fcm, apns")
    token: text(1, 4096)
    app_id: text(0, 256) = ""


class PushTokenDelete(Struct):
    token: text(1, 4096) | None = None


# ---- query strings -----------------------------------------------------------------------------
class HistoryQuery(Struct, forbid_unknown_fields=True):
    after: Seq | msgspec.UnsetType = msgspec.UNSET  # (a query string has no null)
    before: Seq | msgspec.UnsetType = msgspec.UNSET
    limit: Annotated[int, Meta(ge=1)] = 50


def history_query(page_max: int) -> type[HistoryQuery]:
    """``HistoryQuery`` with the configured page size (``limits.history_page_max``)."""
    return msgspec.defstruct("HistoryQuery", [("limit", Annotated[int, Meta(ge=1, le=page_max)], 50)],
                             bases=(HistoryQuery,))


class PresenceQuery(Struct, forbid_unknown_fields=True):
    user_ids: Annotated[str, Meta(description="comma-separated user ids")]


def presence_query(max_ids: int) -> type[PresenceQuery]:
    """``PresenceQuery`` with the configured number of ids (``presence.max_query``)."""
    one = "[1-9][0-9]{0,17}"  # user ids are below 2**53 (18 digits are below 2**63)
    ids = Annotated[str, Meta(pattern=f"^{one}(,{one}){{0,{max_ids - 1}}}$",
                              description=f"comma-separated user ids, 1 to {max_ids}")]
    return msgspec.defstruct("PresenceQuery", [("user_ids", ids)], bases=(PresenceQuery,))


CHANNELS_PAGE_DEFAULT = 100
CHANNELS_PAGE_MAX = 500


class ChannelsQuery(Struct, forbid_unknown_fields=True):
    limit: Annotated[int, Meta(ge=1, le=CHANNELS_PAGE_MAX)] = CHANNELS_PAGE_DEFAULT
    cursor: Annotated[str, Meta(min_length=1, max_length=200, pattern="^[A-Za-z0-9_-]*$",
                                description="the previous page's next")] | msgspec.UnsetType = msgspec.UNSET


def unset_to_none(v):
    return None if v is msgspec.UNSET else v


# ---- responses ---------------------------------------------------------------------------------
class User(Struct):
    id: int
    username: str
    display_name: str
    about: str
    created_at: float


class UserAnswer(Struct):
    user: User


class LoginAnswer(Struct):
    token: str
    expires_at: int
    user: User
    device_id: str
    ws_url: str
    shard_id: str
    # the same shard's HTTP transports (docs/protocol.md, "Transports"), for clients whose WebSocket is blocked
    stream_url: str
    poll_url: str
    frames_url: str


class Status(Struct):
    status: Literal["online", "offline"]
    last_active_at: float | None


class PresenceAnswer(Struct):
    users: dict[str, Status]


class UserPresence(Struct):
    user_id: int
    status: Literal["online", "offline"]
    last_active_at: float | None


class LogoutAnswer(Struct):
    user_id: int
    device_id: str
    logged_out: bool
    all: bool = False


class Device(Struct):
    id: str
    created_at: float  # its first login
    last_login_at: float
    current: bool  # the device of the token that asked


class DeviceList(Struct):
    devices: list[Device]


class DeviceLoggedOut(Struct):
    device_id: str
    logged_out: bool


class PasswordChanged(Struct):
    """The caller's new session: every token of the user issued before the change is revoked,
    the caller's own included."""
    token: str
    expires_at: int
    device_id: str


class Group(Struct):
    id: str
    kind: Literal["group"]
    name: str
    owner_id: int
    members: list[int]


class GroupAnswer(Struct):
    channel: Group


class ChannelItem(Struct):
    id: str
    kind: Literal["dm", "group"]
    name: str | None
    last_seq: int
    read_seq: int
    unread: int
    last_at: float | None
    peer_id: int | msgspec.UnsetType = msgspec.UNSET


class ChannelList(Struct):
    channels: list[ChannelItem]  # ordered by channel id
    next: str | None = None  # the cursor of the next page; null: this was the last


class DmAnswer(Struct):
    channel_id: str


class Members(Struct):
    channel_id: str
    members: list[int]
    owner_id: int | None  # the group's owner (null for a 1:1 channel)
    # the members' public profiles, in the order of ``members`` (one read for a group of 1,000,
    # instead of a GET /v1/users/<id> per member)
    users: list[User]


class ReceiptCursor(Struct):
    user_id: int
    delivered_seq: int  # the highest seq one of the member's devices holds
    read_seq: int


class Receipts(Struct):
    channel_id: str
    members: list[ReceiptCursor]  # every member, by delivered_seq then read_seq descending


class ConnectAnswer(Struct):
    ws_url: str
    shard_id: str
    device_id: str
    stream_url: str
    poll_url: str
    frames_url: str


class MemberAdded(Struct):
    channel_id: str
    user_id: int
    added: bool
    invited: bool = False  # (202) the user had left the group: invited back, not added


class Invitation(Struct):
    channel_id: str
    name: str
    invited_by: int
    invited_at: float


class InvitationList(Struct):
    invitations: list[Invitation]  # the latest first


class MemberRemoved(Struct):
    channel_id: str
    user_id: int
    removed: bool


class Thumbnail(Struct):
    px: int  # the longer side's bound it was made for (320, 1280)
    width: int
    height: int
    mime: str
    size: int
    url: str


class Media(Struct):
    """An upload, as the upload answers it and as each attachment of a message carries it."""
    id: str
    kind: Literal["image", "audio", "video", "file"]  # image/audio/video: shown inline; file: a download
    mime: str  # sniffed from the bytes, never the client's claim; GET serves a `file` as application/octet-stream
    name: str
    size: int  # bytes served by `url`
    sha256: str  # hex, of the bytes served by `url`
    url: str
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None
    # audio: 64 peak amplitudes, 0-255 linear (255 = full scale), one per 64th of the duration; null if not decoded
    waveform: list[int] | None = None
    placeholder: str | None = None  # a 16-px JPEG as a data: URL, to show before the image loads
    thumbnails: list[Thumbnail] = []


class MediaAnswer(Struct):
    media: Media


class MediaLimits(Struct):
    max_bytes: int  # media.max_bytes: the largest upload
    max_attachments: int  # per message


class MediaUploadQuery(Struct, forbid_unknown_fields=True):
    name: text(0, 255, description="the file's name, shown to others and offered on download") = ""


class Message(Struct):
    type: Literal["message"]
    channel_id: str
    seq: int
    sender_id: int
    client_msg_id: str
    body: str
    created_at: float
    attachments: list[Media] = []  # only present when the message has some


class History(Struct):
    channel_id: str
    messages: list[Message]
    more: bool


class PushToken(Struct):
    device_id: str
    provider: str
    token: str
    app_id: str
    created_at: float


class PushTokenAnswer(Struct):
    push_token: PushToken


class PushTokens(Struct):
    push_tokens: list[PushToken]


class Removed(Struct):
    removed: int


class Health(Struct):
    status: str
    shards: list[str]
    connections: int


def all_models() -> list[type[Struct]]:
    """Every model of this module (for the spec's components)."""
    return [v for v in globals().values() if isinstance(v, type) and issubclass(v, Struct) and v is not Struct]
