"""The client codec's msgspec fast path answers exactly what its reference path answers.

``proto.parse`` decodes and validates with msgspec Structs and hands anything they refuse to
``proto.parse_reference`` (json/msgpack + hand-written checks), so each frame's answer - the
request, or the error's code, message and request id - must be the reference's. Checked on the
fuzzer's mutated frames (both formats) and on the cases where the two decoders could differ.
"""

from __future__ import annotations

import json

import msgpack
import pytest
from hypothesis import given

from chatd.protocol import client as proto
from chatd.store.base import Message
from tests.fuzz_frames import CODEC_BASES, FRAMES, fuzz_settings, wire_frame

LIMIT = 64 * 1024


def answer(parse, data, fmt):
    try:
        req = parse(data, fmt, LIMIT)
    except proto.ProtocolError as e:
        return ("error", e.code, e.message, e.request_id)
    return ("ok", type(req), req)


def assert_same(data, fmt):
    fast, ref = answer(proto.parse, data, fmt), answer(proto.parse_reference, data, fmt)
    assert fast == ref, (data, fast, ref)
    return fast


@pytest.mark.parametrize("fmt", [proto.JSON, proto.MSGPACK])
def test_fast_path_answers_as_the_reference_on_fuzzed_frames(fmt):
    @fuzz_settings(max(200, FRAMES // 8))
    @given(wire_frame(CODEC_BASES, fmt))
    def check(data):
        assert_same(data, fmt)
    check()


def _enc(frame, fmt):
    return json.dumps(frame) if fmt == proto.JSON else msgpack.packb(frame, use_bin_type=True)


@pytest.mark.parametrize("fmt", [proto.JSON, proto.MSGPACK])
def test_valid_frames_take_the_fast_path(fmt):
    """What a client sends every second is served by msgspec (it is not merely correct by falling
    back on every frame)."""
    for frame in CODEC_BASES:
        data = _enc(frame, fmt)
        req = proto._parse_fast(data, fmt)
        assert req is not None, frame
        assert req == proto.parse_reference(data, fmt, LIMIT)


JSON_EDGES = [
    # duplicate keys: the last one wins in both decoders (or the fast one refuses)
    '{"type":"send","id":1,"channel_id":"dm:1:2","channel_id":"dm:1:3","client_msg_id":"c","body":"b"}',
    '{"type":"send","id":1,"channel_id":5,"channel_id":"dm:1:3","client_msg_id":"c","body":"b"}',
    '{"type":"send","id":1,"channel_id":"dm:1:3","channel_id":5,"client_msg_id":"c","body":"b"}',
    '{"type":"heartbeat","id":1,"type":"send"}',
    '{"type":"send","id":1,"type":"heartbeat"}',
    '{"type":"heartbeat","id":1,"type":"heartbeat"}',
    '{"type":"sync","id":1,"cursors":{"dm:1:2":1,"dm:1:2":2}}',
    # unknown fields: accepted by the reference unless they nest too deep
    '{"type":"heartbeat","id":1,"extra":{"a":[1,2]}}',
    '{"type":"heartbeat","id":1,"extra":[[[[[[[[[[]]]]]]]]]]}',
    # strings: lone surrogates, NUL (allowed in body only), escapes in keys
    '{"type":"heartbeat","id":"\\ud83d"}',
    '{"type":"heartbeat","id":"a\\u0000"}',
    '{"type":"send","id":1,"channel_id":"dm:1:2","client_msg_id":"c\\u0000","body":"b"}',
    '{"type":"send","id":1,"channel_id":"dm:1:2","client_msg_id":"c","body":"b\\u0000\\ud83d\\ude00"}',
    '{"type":"send","id":1,"channel_id":"dm:1:2","client_msg_id":"c","body":"\\udc00"}',
    '{"t\\u0079pe":"heartbeat","id":1}',
    # numbers: ranges, floats, bools, huge ints, NaN
    '{"type":"heartbeat","id":9223372036854775807}', '{"type":"heartbeat","id":9223372036854775808}',
    '{"type":"heartbeat","id":-9223372036854775808}', '{"type":"heartbeat","id":-9223372036854775809}',
    '{"type":"heartbeat","id":123456789012345678901234567890}', '{"type":"heartbeat","id":1e2}',
    '{"type":"heartbeat","id":NaN}', '{"type":"read","id":1,"channel_id":"dm:1:2","seq":-0}',
    '{"type":"history","id":1,"channel_id":"dm:1:2","limit":0}',
    '{"type":"history","id":1,"channel_id":"dm:1:2","before":null,"after":null,"limit":null}',
    '{"type":"auth","id":1,"token":"t","cursors":null}', '{"type":"sync","id":1,"cursors":null}',
    '{"type":"sync","id":1}', '{"type":"send","id":null,"channel_id":"dm:1:2","client_msg_id":"c","body":"b"}',
    # lengths
    '{"type":"heartbeat","id":"%s"}' % ("i" * 64), '{"type":"heartbeat","id":"%s"}' % ("i" * 65),
    '{"type":"send","id":1,"channel_id":"dm:1:2","client_msg_id":"%s","body":""}' % ("c" * 128),
    '{"type":"send","id":1,"channel_id":"dm:1:2","client_msg_id":"%s","body":""}' % ("c" * 129),
    '{"type":"send","id":1,"channel_id":"dm:1:2","client_msg_id":"","body":""}',
    '{"type":"presence","id":1,"user_ids":[3,1,3,2,1]}', '{"type":"presence","id":1,"user_ids":[]}',
    '{"type":"subscribe_presence","id":1,"user_ids":[0]}', '{"type":"unsubscribe_presence","id":1,"user_ids":[true]}',
    '{"type":"presence","id":1,"user_ids":[%s]}' % ",".join(["1"] * 1001),
    # channel ids
    '{"type":"typing","id":1,"channel_id":"dm:2:1"}', '{"type":"typing","id":1,"channel_id":"g:0123456789abcdef"}',
    '{"type":"typing","id":1,"channel_id":"dm:1:9223372036854775808"}',
    '{"type":"typing","id":1,"channel_id":"DM:1:2"}',
    # framing
    ' {"type":"heartbeat","id":1} ', '{"type":"heartbeat","id":1}x', '\ufeff{"type":"heartbeat","id":1}',
    '{"type":"heartbeat","id":"\ud83d"}', '[{"type":"heartbeat","id":1}]', '{"type":"logout","id":"x"}',
]


@pytest.mark.parametrize("data", JSON_EDGES)
def test_json_edge_cases_answer_as_the_reference(data):
    assert_same(data, proto.JSON)


def _raw_map(*pairs) -> bytes:
    """A msgpack map from already-packed key/value pairs (duplicate keys, odd key types)."""
    return bytes([0x80 | len(pairs)]) + b"".join(k + v for k, v in pairs)


P = msgpack.packb
MSGPACK_EDGES = [
    _raw_map((P("type"), P("send")), (P("id"), P(1)), (P("channel_id"), P("dm:1:2")),
             (P("channel_id"), P("dm:1:3")), (P("client_msg_id"), P("c")), (P("body"), P("b"))),
    _raw_map((P("type"), P("heartbeat")), (P("id"), P(1)), (P("type"), P("logout"))),
    _raw_map((P(b"type", use_bin_type=True), P("heartbeat")), (P("id"), P(1))),
    _raw_map((P("type"), P("heartbeat")), (P("id"), P(1.0))),
    _raw_map((P("type"), P("heartbeat")), (P("id"), P(2**64 - 1))),
    _raw_map((P("type"), P("heartbeat")), (P("id"), b"\xa3\xed\xa0\xbd")),  # UTF-8 of a lone surrogate
    _raw_map((P("type"), P("send")), (P("id"), P(1)), (P("channel_id"), P("dm:1:2")), (P("client_msg_id"), P("c")),
             (P("body"), P(b"raw", use_bin_type=True))),
    _raw_map((P("type"), P("sync")), (P("id"), P(1)), (P("cursors"), _raw_map((P(1), P(2))))),
    _raw_map((P("type"), P("heartbeat")), (P("id"), P(1)), (P("x"), P([[[[[[[[[[]]]]]]]]]]))),
    P({"type": "heartbeat", "id": 1}) + b"\x00",
    P({"type": "auth", "id": "r", "token": "v1.a.b", "cursors": {"dm:1:2": 2**63 - 1}}),
    P({"type": "auth", "id": "r", "token": "v1.a.b", "cursors": {"dm:1:2": 2**63}}),
]


@pytest.mark.parametrize("data", MSGPACK_EDGES)
def test_msgpack_edge_cases_answer_as_the_reference(data):
    assert_same(data, proto.MSGPACK)


def test_wrong_frame_kind_answers_as_the_reference():
    assert_same(P({"type": "heartbeat", "id": 1}), proto.JSON)
    assert_same('{"type":"heartbeat","id":1}', proto.MSGPACK)


def test_outgoing_frames_are_the_bytes_json_and_msgpack_wrote():
    """dumps (msgspec) writes what json.dumps(separators, ensure_ascii=False) and msgpack.packb
    wrote for the frames chatd sends: times as floats, ids, escapes, non-ASCII text."""
    m = Message("dm:123456789012:123456789099", 1234, 123456789012, "b1-x-17", 'hé "q" \\ \n\t\x00\x7f 💬',
                1764539123.123456)
    frames = [proto.message_frame(m), {"type": "ack", "id": "r-1", "seq": 2**63 - 1},
              proto.error_frame("rate_limited", "slow down", None, retry_after_ms=12),
              {"type": "sync", "id": 3, "cursors": {"dm:1:2": 5}, "heads": {}, "errors": {"g:0123456789abcdef": "x"}},
              {"type": "presence", "id": 4, "users": [{"user_id": 7, "online": True, "last_active_at": 0.5}]}]
    for f in frames:
        assert proto.dumps(f, proto.JSON) == json.dumps(f, separators=(",", ":"), ensure_ascii=False)
        assert proto.dumps(f, proto.MSGPACK) == msgpack.packb(f, use_bin_type=True)


def test_dumps_falls_back_for_what_msgspec_cannot_encode():
    with pytest.raises(TypeError):
        proto.dumps({"a": object()}, proto.JSON)  # neither encoder takes it: raises as before
    assert proto.dumps({"a": 2**64}, proto.JSON) == '{"a":18446744073709551616}'  # beyond msgspec's ints
