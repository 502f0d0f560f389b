"""The client codec in memory: no sockets, no trio."""

from __future__ import annotations

import json

import msgpack
import pytest

from chatd.protocol import client as proto
from chatd.store.base import Message

CH = "dm:1:2"


@pytest.mark.parametrize("fmt", [proto.JSON, proto.MSGPACK])
def test_every_request_type_parses_in_both_formats(fmt):
    frames = [
        ({"type": "auth", "id": 1, "token": "t"}, proto.Auth(1, "t", None)),
        ({"type": "auth", "id": 1, "token": "t", "cursors": {CH: 3}}, proto.Auth(1, "t", {CH: 3})),
        ({"type": "send", "id": "a", "channel_id": CH, "client_msg_id": "c", "body": "héllo ✓"},
         proto.Send("a", CH, "c", "héllo ✓")),
        ({"type": "sync", "id": 2, "cursors": {CH: 0, "g:0123456789abcdef": 9}},
         proto.Sync(2, {CH: 0, "g:0123456789abcdef": 9})),
        ({"type": "history", "id": 3, "channel_id": CH, "before": 10, "limit": 5}, proto.History(3, CH, 10, None, 5)),
        ({"type": "heartbeat", "id": 4}, proto.Heartbeat(4)),
        ({"type": "typing", "id": 5, "channel_id": CH}, proto.Typing(5, CH)),
        ({"type": "read", "id": 6, "channel_id": CH, "seq": 7}, proto.Read(6, CH, 7)),
    ]
    for obj, expected in frames:
        data = proto.dumps(obj, fmt)
        assert isinstance(data, str if fmt == proto.JSON else bytes)
        assert proto.parse(data, fmt, 1 << 20) == expected


@pytest.mark.parametrize("data,code,rid", [
    ("{", "bad_frame", None),
    ("null", "bad_frame", None),
    ("[]", "bad_frame", None),
    ('{"type": "nope", "id": 1}', "unknown_type", 1),
    ('{"type": "send", "id": 1}', "bad_field", 1),
    ('{"id": 1}', "bad_field", 1),
    ('{"type": "heartbeat"}', "bad_field", None),
    ('{"type": "heartbeat", "id": 1.5}', "bad_field", None),
    ('{"type": "heartbeat", "id": true}', "bad_field", None),
    ('{"type": "read", "id": 1, "channel_id": "dm:2:1", "seq": 1}', "bad_field", 1),  # not canonical
    ('{"type": "read", "id": 1, "channel_id": "dm:1:1", "seq": 1}', "bad_field", 1),
    ('{"type": "read", "id": 1, "channel_id": "g:XYZ", "seq": 1}', "bad_field", 1),
    ('{"type": "read", "id": 1, "channel_id": "dm:1:2", "seq": 1.0}', "bad_field", 1),
    ('{"type": "auth", "id": 1, "token": ""}', "bad_field", 1),
    ('{"type": "sync", "id": 1, "cursors": {"dm:1:2": -5}}', "bad_field", 1),
])
def test_bad_json_frames(data, code, rid):
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse(data, proto.JSON, 1 << 20)
    assert info.value.code == code and info.value.request_id == rid
    assert info.value.message


def test_wrong_frame_kind_and_size_limit():
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse(b"\x80", proto.JSON, 100)
    assert info.value.code == "bad_frame"
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse("{}", proto.MSGPACK, 100)
    assert info.value.code == "bad_frame"
    big = json.dumps({"type": "send", "id": 1, "channel_id": CH, "client_msg_id": "c", "body": "é" * 60}, ensure_ascii=False)
    limit = len(big) + 10
    assert len(big) < limit < len(big.encode())  # the limit counts bytes, not characters
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse(big, proto.JSON, limit)
    assert info.value.code == "frame_too_large"


@pytest.mark.parametrize("data", [b"\xc1", b"\x92\x01", msgpack.packb({1: 2}), msgpack.packb({"type": "x"}) + b"\x00",
                                  msgpack.packb([{"type": "heartbeat", "id": 1}])])
def test_bad_msgpack_frames(data):
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse(data, proto.MSGPACK, 1 << 20)
    assert info.value.code in ("bad_frame", "bad_field")


def test_msgpack_binary_body_is_a_wrong_type():
    data = msgpack.packb({"type": "send", "id": 1, "channel_id": CH, "client_msg_id": "c", "body": b"raw"})
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse(data, proto.MSGPACK, 1 << 20)
    assert info.value.code == "bad_field" and "'body'" in info.value.message


def test_outgoing_frames_round_trip():
    m = Message(CH, 3, 1, "c", "hi", 1.5)
    frame = proto.message_frame(m)
    assert frame == {"type": "message", "channel_id": CH, "seq": 3, "sender_id": 1, "client_msg_id": "c",
                     "body": "hi", "created_at": 1.5}
    assert json.loads(proto.dumps(frame, proto.JSON)) == frame
    assert msgpack.unpackb(proto.dumps(frame, proto.MSGPACK)) == frame
    err = proto.error_frame("not_member", "no", 5, extra=1)
    assert err == {"type": "error", "id": 5, "code": "not_member", "message": "no", "extra": 1}
    assert "é" in proto.dumps({"b": "é"}, proto.JSON)  # UTF-8, not \\u escapes
