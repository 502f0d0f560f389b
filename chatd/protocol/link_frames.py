"""The catalog of link frames: every frame two cluster processes exchange, typed and frozen.

Sans-I/O: definitions, one encoder and one decoder, nothing that reads or writes a socket
(:mod:`chatd.protocol.link` frames the bytes; :mod:`chatd.cluster.links` runs the links).

On the wire a frame is a msgpack map: ``"t"`` (its type, the tag below) and its fields under
their short wire names; a field at its default is left out. Each type is a ``msgspec`` Struct;
one decoder over the union of all of them decodes and validates a frame in one call.

======================  ==================  =============================================  ==========================================
``t``                   direction           fields (wire name: meaning)                    meaning
======================  ==================  =============================================  ==========================================
``challenge``           acceptor → dialer   ``v`` version, ``id`` acceptor id,             handshake 1: prove you hold the cluster
                                            ``nonce`` (16 bytes)                           secret for this fresh nonce
``hello``               dialer → acceptor   ``v``, ``id`` dialer id, ``role`` shard|api,   handshake 2: HMAC(K, "c", C, S, Ns, Nc)
                                            ``nonce`` Nc, ``proof``
``welcome``             acceptor → dialer   ``proof``                                      handshake 3: HMAC(K, "s", S, C, Nc, Ns)
``ping``                either way          (none)                                         heartbeat after ``link_heartbeat_s`` idle
``resync``              either way          (none)                                         "I dropped frames to you": re-read the
                                                                                           store heads for every session
``send``                shard → owner       ``view``, ``ch`` channel, ``u`` sender,        request: store a message as the channel's
                                            ``cmid`` client_msg_id, ``body``, ``rid``,     owner; answered by ``reply``
                                            ``att`` attachments JSON (optional)
``reply``               answerer → asker    ``rid``; ``ok`` packed message and ``dup``,    the answer to a request (``send``,
                                            or ``err`` {code, message, ...}; or           ``p_query``); ``err.code`` ``stale_view``
                                            ``users`` {user id: status}                    carries the owner's ``view``
``deliver``             owner, API or       ``view``, ``u`` user ids, ``m`` packed         hand a message or an event to the users'
                        presence → home     message or ``e`` event, ``x`` skip device,     home shard, which fans it out to their
                                            ``hops``                                       device shards; ``hops`` 1: forwarded once
                                                                                           by a shard that was home (never again)
``push``                home → device       ``view``, ``u``, ``m`` or ``e``, ``x``         push to the local sessions of ``u``
                        shard
``device``              shard → home        ``view``, ``u`` user, ``s`` shard, ``on``      the user's first session opened (``on``)
                                                                                           or last one closed on shard ``s``
``devices``             shard → home        ``view``, ``s`` shard, ``u`` user ids          these users have sessions on ``s``
                                                                                           (re-announced after view changes)
``invalidate``          API, shard → shard  ``ch`` channel                                 the channel's members changed: drop the
                                                                                           cached membership
``logout``              API, shard → shard  ``u`` user, ``d`` device, ``k`` token key,     a token was revoked (and with ``b`` every
                                            ``b`` cut-off (optional)                       token of the device issued before ``b``):
                                                                                           close the device's sessions here
``logout_all``          API, shard → shard  ``u`` user, ``d`` device ("": every device),   every token of the user's device (or of
                                            ``b`` cut-off (unix seconds)                   all its devices) issued before ``b`` was
                                                                                           revoked: close those sessions here
``p_hb``                shard → presence    ``pv`` presence view, ``hb`` [[user, device]]  batched connects and heartbeats
``p_logout``            shard → presence    ``pv``, ``u``, ``d``                           a device logged out
``p_sub``               shard, API →        ``pv``, ``from`` source node, ``s``            (un)subscribe ``s`` to the presence of
                        presence            subscriber, ``u`` targets, ``on``              ``u``
``p_query``             shard, API →        ``u`` user ids, ``rid``                        request: statuses; answered by ``reply``
                        presence                                                           with ``users``
======================  ==================  =============================================  ==========================================

A packed message (``m``, and ``ok`` of a send's reply) is the list ``[channel_id, seq, sender_id,
client_msg_id, body, created_at]`` (a row's lifecycle fields and attachments beside it in ``mx``). Frames routed by a view (``deliver``, ``push``, ``device``,
``devices``: :data:`VIEW_ROUTED`) carry ``view``, the version they were routed under: the
receiver catches up to it before routing them further.

Decoding policy (:func:`decode`):

* bytes that are not a msgpack map with a string ``"t"`` raise :class:`LinkProtocolError`: the
  link is closed (a peer that speaks garbage is broken or hostile);
* a frame of a type not in this catalog decodes to :class:`Unknown`: logged and skipped (a newer
  peer may speak a frame we do not know yet);
* a frame of a known type whose fields do not fit decodes to :class:`Malformed`: logged and
  skipped; a malformed request (one with a ``rid``) is answered ``bad_frame``;
* fields a frame does not define are ignored (a newer peer may add some).
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar, Union

import msgspec

VERSION = 1
HEADER = struct.Struct(">I")  # each frame on the wire: its body's length, then the body

# [channel_id, seq, sender_id, client_msg_id, body, created_at] (chatd.store.base.Message's first
# fields; a row's lifecycle fields and attachments (JSON text) travel beside it in ``mx``)
PackedMessage = tuple[str, int, int, str, str, float]


class LinkProtocolError(Exception):
    """The peer sent something that is not the link protocol; close the link."""


class Frame(msgspec.Struct, frozen=True, tag_field="t", omit_defaults=True, gc=False):
    """A link frame (a subclass per type, its tag the wire name ``t``)."""

    REQUEST: ClassVar[bool] = False  # answered by a `reply` carrying its `rid`


# ---- handshake -----------------------------------------------------------------------------------

class Challenge(Frame, tag="challenge"):
    v: int
    id: str
    nonce: bytes


class Hello(Frame, tag="hello"):
    v: int
    id: str
    role: str
    nonce: bytes
    proof: bytes


class Welcome(Frame, tag="welcome"):
    proof: bytes


# ---- link upkeep ---------------------------------------------------------------------------------

class Ping(Frame, tag="ping"):
    pass


class Resync(Frame, tag="resync"):
    pass


# ---- requests and replies ------------------------------------------------------------------------

class Send(Frame, tag="send"):
    REQUEST: ClassVar[bool] = True
    view: int
    channel_id: str = msgspec.field(name="ch")
    user_id: int = msgspec.field(name="u")
    client_msg_id: str = msgspec.field(name="cmid")
    body: str
    rid: int = 0
    ev: dict[str, Any] | None = None  # a lifecycle row (chatd.lifecycle.EventSpec.as_dict), not a plain send
    force: bool = False  # with ``ev``: a trusted delete (moderation, erasure)
    attachments: str = msgspec.field(default="", name="att")  # JSON of the attachments' metadata


class Reply(Frame, tag="reply"):
    rid: int = 0
    ok: PackedMessage | None = None
    dup: bool | None = None  # with ``ok``: whether the message was stored before (always sent then)
    mx: dict[str, Any] | None = None  # with ``ok``: the row's lifecycle fields (message_extra)
    err: dict[str, Any] | None = None
    users: dict[str, dict[str, Any]] | None = None


# ---- delivery ------------------------------------------------------------------------------------

class Deliver(Frame, tag="deliver"):
    view: int
    user_ids: list[int] = msgspec.field(name="u")
    message: PackedMessage | None = msgspec.field(default=None, name="m")
    event: dict[str, Any] | None = msgspec.field(default=None, name="e")
    skip: str | None = msgspec.field(default=None, name="x")
    hops: int = 0
    mx: dict[str, Any] | None = None  # with ``message``: its lifecycle fields (message_extra)


class Push(Frame, tag="push"):
    view: int
    user_ids: list[int] = msgspec.field(name="u")
    message: PackedMessage | None = msgspec.field(default=None, name="m")
    event: dict[str, Any] | None = msgspec.field(default=None, name="e")
    skip: str | None = msgspec.field(default=None, name="x")
    mx: dict[str, Any] | None = None


class Device(Frame, tag="device"):
    view: int
    user_id: int = msgspec.field(name="u")
    shard: str = msgspec.field(name="s")
    on: bool


class Devices(Frame, tag="devices"):
    view: int
    shard: str = msgspec.field(name="s")
    user_ids: list[int] = msgspec.field(name="u")


# ---- cluster-wide notices ------------------------------------------------------------------------

class Invalidate(Frame, tag="invalidate"):
    channel_id: str = msgspec.field(name="ch")


class Logout(Frame, tag="logout"):
    user_id: int = msgspec.field(name="u")
    device_id: str = msgspec.field(name="d")
    token_key: str = msgspec.field(name="k")
    before: float = msgspec.field(default=0.0, name="b")


class LogoutAll(Frame, tag="logout_all"):
    user_id: int = msgspec.field(name="u")
    before: float = msgspec.field(name="b")
    device_id: str = msgspec.field(default="", name="d")


# ---- presence ------------------------------------------------------------------------------------

class PHeartbeats(Frame, tag="p_hb"):
    pv: int
    heartbeats: list[tuple[int, str]] = msgspec.field(name="hb")


class PLogout(Frame, tag="p_logout"):
    pv: int
    user_id: int = msgspec.field(name="u")
    device_id: str = msgspec.field(name="d")


class PSubscribe(Frame, tag="p_sub"):
    pv: int
    source: str = msgspec.field(name="from")
    subscriber: int = msgspec.field(name="s")
    targets: list[int] = msgspec.field(name="u")
    on: bool


class PQuery(Frame, tag="p_query"):
    REQUEST: ClassVar[bool] = True
    user_ids: list[int] = msgspec.field(name="u")
    rid: int = 0


FRAMES = (Challenge, Hello, Welcome, Ping, Resync, Send, Reply, Deliver, Push, Device, Devices, Invalidate,
          Logout, LogoutAll, PHeartbeats, PLogout, PSubscribe, PQuery)
NAMES: dict[type, str] = {cls: cls.__struct_config__.tag for cls in FRAMES}
# frames routed by a view: the receiver must route them by at least that view
VIEW_ROUTED = frozenset({Deliver, Push, Device, Devices})
_KNOWN = frozenset(NAMES.values())


# ---- what decoding gives besides a frame ---------------------------------------------------------

class Unknown(msgspec.Struct, frozen=True):
    """A frame of a type this catalog does not know (skipped)."""
    t: str


class Malformed(msgspec.Struct, frozen=True):
    """A frame of a known type whose fields do not fit (skipped; a request is answered ``bad_frame``)."""
    t: str
    rid: int | None
    error: str


# ---- encoding and decoding -----------------------------------------------------------------------

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Union[FRAMES])  # type: ignore[valid-type]
encode = _ENCODER.encode  # a frame's body (no length header)
_encode_into = _ENCODER.encode_into
_ZERO = bytes(HEADER.size)


def append(buf: bytearray, frame: Frame, max_bytes: int) -> int:
    """Append ``frame`` with its header to ``buf``; its body's size, or -1 (nothing appended)
    when that is above ``max_bytes`` (the peer would refuse it and drop the link)."""
    start = len(buf)
    buf += _ZERO
    _encode_into(frame, buf, -1)
    n = len(buf) - start - HEADER.size
    if n > max_bytes:
        del buf[start:]
        return -1
    HEADER.pack_into(buf, start, n)
    return n


def decode(body) -> Frame | Unknown | Malformed:
    """One frame's body (bytes or a memoryview); see the module docstring for what comes back."""
    try:
        return _DECODER.decode(body)
    except msgspec.ValidationError as e:
        return _classify(body, str(e))
    except (msgspec.DecodeError, RecursionError) as e:
        raise LinkProtocolError(f"undecodable frame: {e}") from None


def _classify(body, error: str) -> Unknown | Malformed:
    """Why a well-formed msgpack body is not a frame of the catalog (the slow path: errors only)."""
    try:
        obj = msgspec.msgpack.decode(body)
    except (msgspec.DecodeError, RecursionError, TypeError, ValueError) as e:
        raise LinkProtocolError(f"undecodable frame: {e}") from None
    t = obj.get("t") if isinstance(obj, dict) else None
    if not isinstance(t, str):
        raise LinkProtocolError("a frame must be a map with a string 't'")
    if t not in _KNOWN:
        return Unknown(t[:40])
    rid = obj.get("rid")
    return Malformed(t, rid if type(rid) is int else None, error)


def packed(m) -> PackedMessage:
    """A message (``chatd.store.base.Message``) as the frames carry it."""
    return (m.channel_id, m.seq, m.sender_id, m.client_msg_id, m.body, m.created_at)


_EXTRA = ("kind", "target_seq", "reply_to", "meta", "reply", "attachments")  # what a fresh row may carry besides


def message_extra(m) -> dict | None:
    """A fresh row's lifecycle fields and attachments (None for a plain message: the frame stays
    as it was)."""
    if m.kind == "message" and not m.reply_to and not m.attachments:
        return None
    return {k: getattr(m, k) for k in _EXTRA if getattr(m, k)}


def unpacked(t: PackedMessage, mx: dict | None):
    """The ``Message`` of a packed tuple and its :func:`message_extra` (unknown keys ignored)."""
    from ..store.base import Message
    if not mx:
        return Message(*t)
    return Message(*t, **{k: v for k, v in mx.items() if k in _EXTRA})
