"""The client WebSocket protocol as a sans-I/O codec: bytes/str in, validated request objects out;
dicts in, wire frames out. No trio, no sockets; unit-tested in memory.

Formats: JSON objects in text frames (subprotocol ``chatd.v1.json`` or none), or the same objects
as msgpack maps in binary frames (subprotocol ``chatd.v1.msgpack``).

Error policy: anything wrong with what the peer sent raises :class:`ProtocolError` carrying a
stable code (``bad_frame``, ``unknown_type``, ``bad_field``, ``frame_too_large``) and, when it could
be read, the request ``id`` so the error reply can echo it. The caller replies with
:func:`error_frame` and goes on; nothing here is fatal to a connection. Any other exception out of
:func:`parse` is a bug (tests/test_fuzz.py looks for them).

What passes is safe to store and to echo: every string is valid Unicode (no lone surrogates, which
JSON's ``\\ud83d`` escapes can produce and UTF-8 cannot carry), only ``body`` may contain NUL, and a
decoded frame nests at most ``MAX_DEPTH`` levels (JSON deep enough to exhaust the decoder's stack
raises ``RecursionError`` inside the C decoder, which unwinds cleanly and is a ``bad_frame`` too;
msgpack's unpacker refuses depth above 1024 itself).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import msgpack

from ..errors import ChatError
from ..ids import is_valid_channel_id

JSON = "json"
MSGPACK = "msgpack"
SUBPROTOCOLS = {"chatd.v1.json": JSON, "chatd.v1.msgpack": MSGPACK}

MAX_SEQ = 2**63 - 1
MAX_ID_LEN = 64
MAX_CLIENT_MSG_ID_LEN = 128
MAX_TOKEN_LEN = 4096
MAX_CURSORS = 10_000
MAX_DEPTH = 8  # the deepest valid frame nests 2 levels ({"cursors": {...}})


class ProtocolError(ChatError):
    """The peer sent something we cannot accept; ``request_id`` is echoed if known."""

    def __init__(self, code: str, message: str, request_id=None):
        super().__init__(code, message)
        self.request_id = request_id


# ---- requests (client -> server) -------------------------------------------------------------

@dataclass(frozen=True)
class Auth:
    id: object
    token: str
    cursors: dict | None = None


@dataclass(frozen=True)
class Send:
    id: object
    channel_id: str
    client_msg_id: str
    body: str


@dataclass(frozen=True)
class Sync:
    id: object
    cursors: dict = field(default_factory=dict)


@dataclass(frozen=True)
class History:
    id: object
    channel_id: str
    before: int | None = None
    after: int | None = None
    limit: int | None = None


@dataclass(frozen=True)
class Heartbeat:
    id: object


@dataclass(frozen=True)
class Typing:
    id: object
    channel_id: str


@dataclass(frozen=True)
class Read:
    id: object
    channel_id: str
    seq: int


@dataclass(frozen=True)
class PresenceQuery:
    id: object
    user_ids: tuple


@dataclass(frozen=True)
class SubscribePresence:
    id: object
    user_ids: tuple


@dataclass(frozen=True)
class UnsubscribePresence:
    id: object
    user_ids: tuple


@dataclass(frozen=True)
class Logout:
    id: object


# field checkers: value -> value or raise ValueError(reason)
def _text(v: str, allow_nul: bool = False) -> str:
    """``v`` if the store can keep it and UTF-8 can carry it: no lone surrogate, NUL only if allowed."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (it contains a lone surrogate, e.g. half an emoji)") from None
    if not allow_nul and "\x00" in v:
        raise ValueError("must not contain NUL (U+0000)")
    return v


def _str(maxlen):
    def check(v):
        if not isinstance(v, str):
            raise ValueError("must be a string")
        if len(v) > maxlen:
            raise ValueError(f"must be at most {maxlen} characters")
        return _text(v)
    return check


def _nonempty_str(maxlen):
    inner = _str(maxlen)

    def check(v):
        if not inner(v):
            raise ValueError("must not be empty")
        return v
    return check


def _seq(v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("must be an integer")
    if not 0 <= v <= MAX_SEQ:
        raise ValueError("must be between 0 and 2**63-1")
    return v


def _limit(v):
    v = _seq(v)
    if v < 1:
        raise ValueError("must be >= 1")
    return v


def _channel(v):
    if not isinstance(v, str) or not is_valid_channel_id(v):
        raise ValueError("must be a channel id ('dm:<a>:<b>' with a<b, or 'g:<16 hex>')")
    return v


def _body(v):
    if not isinstance(v, str):
        raise ValueError("must be a string")
    return _text(v, allow_nul=True)  # length is a semantic limit (body_too_long), checked by the session


def _cursors(v):
    if not isinstance(v, dict):
        raise ValueError("must be an object of channel id -> seq")
    if len(v) > MAX_CURSORS:
        raise ValueError(f"must have at most {MAX_CURSORS} entries")
    for k, s in v.items():
        _channel(k)
        _seq(s)
    return dict(v)


MAX_USER_IDS = 1000


def _user_ids(v):
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_USER_IDS:
        raise ValueError(f"must be a list of 1 to {MAX_USER_IDS} user ids")
    for u in v:
        if isinstance(u, bool) or not isinstance(u, int) or not 1 <= u <= MAX_SEQ:
            raise ValueError("must contain positive integer user ids")
    return tuple(dict.fromkeys(v))


# type -> (class, {field: (checker, required)})
_SCHEMAS = {
    "auth": (Auth, {"token": (_nonempty_str(MAX_TOKEN_LEN), True), "cursors": (_cursors, False)}),
    "send": (Send, {"channel_id": (_channel, True),
                    "client_msg_id": (_nonempty_str(MAX_CLIENT_MSG_ID_LEN), True),
                    "body": (_body, True)}),
    "sync": (Sync, {"cursors": (_cursors, True)}),
    "history": (History, {"channel_id": (_channel, True), "before": (_seq, False),
                          "after": (_seq, False), "limit": (_limit, False)}),
    "heartbeat": (Heartbeat, {}),
    "typing": (Typing, {"channel_id": (_channel, True)}),
    "read": (Read, {"channel_id": (_channel, True), "seq": (_seq, True)}),
    "presence": (PresenceQuery, {"user_ids": (_user_ids, True)}),
    "subscribe_presence": (SubscribePresence, {"user_ids": (_user_ids, True)}),
    "unsubscribe_presence": (UnsubscribePresence, {"user_ids": (_user_ids, True)}),
    "logout": (Logout, {}),
}
REQUEST_TYPES = frozenset(_SCHEMAS)


def _check_id(v):
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError("must be a string or an integer")
    if isinstance(v, str) and len(v) > MAX_ID_LEN:
        raise ValueError(f"must be at most {MAX_ID_LEN} characters")
    if isinstance(v, str):
        _text(v)
    if isinstance(v, int) and not -(2**63) <= v <= MAX_SEQ:
        raise ValueError("is out of range")
    return v


def parse(data: str | bytes, fmt: str, max_bytes: int):
    """Decode one WebSocket message into a request object; raise :class:`ProtocolError`."""
    size = len(data)
    if isinstance(data, str) and size * 4 > max_bytes:  # only encode when it could matter
        size = len(data.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise ProtocolError("frame_too_large", f"frame of {size} bytes exceeds the limit of {max_bytes}")
    obj = loads(data, fmt)
    return from_object(obj)


def peek_id(data: str | bytes, fmt: str, max_bytes: int):
    """The request ``id`` of a frame we will not serve (rate limited), if it can be read; never raises."""
    try:
        obj = loads(data, fmt) if len(data) <= max_bytes else None
        return _check_id(obj["id"]) if isinstance(obj, dict) and "id" in obj else None
    except (ProtocolError, ValueError):
        return None


def _depth_ok(obj, limit: int = MAX_DEPTH) -> bool:
    """Whether ``obj`` nests at most ``limit`` containers deep (iterative: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            children = o.values()
        elif isinstance(o, list):
            children = o
        else:
            continue
        if d > limit:
            return False
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return True


def loads(data: str | bytes, fmt: str):
    try:
        if isinstance(data, str):
            if fmt != JSON:
                raise ProtocolError("bad_frame", "this connection speaks msgpack: send binary frames")
            obj = json.loads(data)
        else:
            if fmt != MSGPACK:
                raise ProtocolError("bad_frame", "this connection speaks JSON: send text frames")
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except ProtocolError:
        raise
    except (ValueError, TypeError, RecursionError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as e:
        raise ProtocolError("bad_frame", f"cannot decode {fmt}: {type(e).__name__}") from None
    if not _depth_ok(obj):
        raise ProtocolError("bad_frame", f"frame nests deeper than {MAX_DEPTH} levels")
    return obj


def from_object(obj):
    if not isinstance(obj, dict):
        raise ProtocolError("bad_frame", "a frame must be an object")
    rid = obj.get("id")
    try:
        rid = _check_id(rid) if "id" in obj else None
    except ValueError as e:
        raise ProtocolError("bad_field", f"field 'id' {e}") from None
    ftype = obj.get("type")
    if not isinstance(ftype, str):
        raise ProtocolError("bad_field", "field 'type' is required and must be a string", rid)
    schema = _SCHEMAS.get(ftype)
    if schema is None:
        raise ProtocolError("unknown_type", f"unknown frame type {ftype[:40]!r}", rid)
    if rid is None:
        raise ProtocolError("bad_field", "field 'id' is required", rid)
    cls, fields = schema
    kwargs = {}
    for name, (check, required) in fields.items():
        if name not in obj or obj[name] is None:
            if required:
                raise ProtocolError("bad_field", f"field {name!r} is required", rid)
            continue
        try:
            kwargs[name] = check(obj[name])
        except ValueError as e:
            raise ProtocolError("bad_field", f"field {name!r} {e}", rid) from None
    return cls(id=rid, **kwargs)


# ---- frames (server -> client) ----------------------------------------------------------------

def dumps(obj: dict, fmt: str) -> str | bytes:
    if fmt == MSGPACK:
        return msgpack.packb(obj, use_bin_type=True)
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def error_frame(code: str, message: str, request_id=None, **details) -> dict:
    out = {"type": "error", "id": request_id, "code": code, "message": message}
    out.update(details)
    return out


def message_frame(m) -> dict:
    """The ``message`` event for a stored message (``chatd.store.base.Message``)."""
    return {"type": "message", "channel_id": m.channel_id, "seq": m.seq, "sender_id": m.sender_id,
            "client_msg_id": m.client_msg_id, "body": m.body, "created_at": m.created_at}
