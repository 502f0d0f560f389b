"""The inter-shard link codec, the frame catalog and the handshake, in memory."""

from __future__ import annotations

import msgpack
import msgspec
import pytest

from chatd.protocol import link
from chatd.protocol import link_frames as lf

M = ("d:1:2", 7, 1, "c-1", "hé", 1700000000.5)


def _body(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _framed(obj) -> bytes:
    body = _body(obj)
    return len(body).to_bytes(4, "big") + body


def test_frames_round_trip_across_arbitrary_chunking():
    frames = [lf.Ping(), lf.Send(3, "g:x", 9, "c1", "é" * 1000, rid=1), lf.Deliver(2, [1, 2, 3], M, skip="dev"),
              lf.Deliver(2, [4], event={"type": "typing", "user_id": 4}, hops=1), lf.Reply(1, ok=M, dup=True),
              lf.PHeartbeats(1, [(1, "a"), (2, "b")])]
    data = b"".join(link.LinkCodec.encode(f) for f in frames)
    for chunk in (1, 3, 7, 100, len(data)):
        codec = link.LinkCodec(1 << 20)
        out = []
        for i in range(0, len(data), chunk):
            codec.receive_data(data[i:i + chunk])
            while (f := codec.next_frame()) is not None:
                out.append(f)
        assert out == frames and codec.buffered() == 0


# the wire of each frame type: a msgpack map with "t" and the short keys, defaults left out
WIRE = [
    (lf.Send(3, "g:x", 9, "c1", "hi", rid=5),
     {"t": "send", "view": 3, "ch": "g:x", "u": 9, "cmid": "c1", "body": "hi", "rid": 5}),
    (lf.Reply(5, ok=M, dup=True), {"t": "reply", "rid": 5, "ok": list(M), "dup": True}),
    (lf.Reply(5, ok=M, dup=False), {"t": "reply", "rid": 5, "ok": list(M), "dup": False}),
    (lf.Reply(5, err={"code": "stale_view", "view": 4}), {"t": "reply", "rid": 5, "err": {"code": "stale_view", "view": 4}}),
    (lf.Reply(6, users={"1": {"status": "online"}}), {"t": "reply", "rid": 6, "users": {"1": {"status": "online"}}}),
    (lf.Deliver(2, [1, 2], M, skip="d1"), {"t": "deliver", "view": 2, "u": [1, 2], "m": list(M), "x": "d1"}),
    (lf.Deliver(2, [1], event={"type": "x"}, hops=1), {"t": "deliver", "view": 2, "u": [1], "e": {"type": "x"}, "hops": 1}),
    (lf.Push(2, [1], M), {"t": "push", "view": 2, "u": [1], "m": list(M)}),
    (lf.Device(2, 7, "s1", True), {"t": "device", "view": 2, "u": 7, "s": "s1", "on": True}),
    (lf.Devices(2, "s1", [1, 7]), {"t": "devices", "view": 2, "s": "s1", "u": [1, 7]}),
    (lf.Invalidate("g:x"), {"t": "invalidate", "ch": "g:x"}),
    (lf.Logout(7, "d1", "k1"), {"t": "logout", "u": 7, "d": "d1", "k": "k1"}),
    (lf.Logout(7, "d1", "k1", 1700000000.123), {"t": "logout", "u": 7, "d": "d1", "k": "k1", "b": 1700000000.123}),
    (lf.LogoutAll(7, 1700000000.5), {"t": "logout_all", "u": 7, "b": 1700000000.5}),
    (lf.LogoutAll(7, 1700000000.5, "d1"), {"t": "logout_all", "u": 7, "b": 1700000000.5, "d": "d1"}),
    (lf.Resync(), {"t": "resync"}),
    (lf.Ping(), {"t": "ping"}),
    (lf.PHeartbeats(3, [(1, "a")]), {"t": "p_hb", "pv": 3, "hb": [[1, "a"]]}),
    (lf.PLogout(3, 1, "a"), {"t": "p_logout", "pv": 3, "u": 1, "d": "a"}),
    (lf.PSubscribe(3, "s1", 1, [2, 3], False), {"t": "p_sub", "pv": 3, "from": "s1", "s": 1, "u": [2, 3], "on": False}),
    (lf.PQuery([1, 2], rid=8), {"t": "p_query", "u": [1, 2], "rid": 8}),
    (lf.Challenge(1, "s2", b"n" * 16), {"t": "challenge", "v": 1, "id": "s2", "nonce": b"n" * 16}),
    (lf.Hello(1, "s1", "shard", b"c" * 16, b"p"), {"t": "hello", "v": 1, "id": "s1", "role": "shard",
                                                  "nonce": b"c" * 16, "proof": b"p"}),
    (lf.Welcome(b"p"), {"t": "welcome", "proof": b"p"}),
]


def test_the_catalog_covers_every_frame_type_once():
    assert {lf.NAMES[type(f)] for f, _ in WIRE} == set(lf.NAMES.values())
    assert len(set(lf.NAMES.values())) == len(lf.FRAMES)
    for name in lf.NAMES.values():  # and the module docstring's table lists each
        assert f"``{name}``" in lf.__doc__


@pytest.mark.parametrize("frame,wire", WIRE, ids=lambda x: lf.NAMES.get(type(x), ""))
def test_wire_format_of_each_frame(frame, wire):
    """The bytes decode to the map peers always exchanged, and that map decodes to the frame."""
    assert msgpack.unpackb(lf.encode(frame), raw=False) == wire
    assert lf.decode(_body(wire)) == frame


def test_frames_are_frozen():
    with pytest.raises(AttributeError):
        lf.Invalidate("g:x").channel_id = "g:y"


def test_unknown_frame_types_and_fields():
    assert lf.decode(_body({"t": "lifecycle", "x": 1})) == lf.Unknown("lifecycle")
    # fields a newer peer adds are ignored
    assert lf.decode(_body({"t": "invalidate", "ch": "g:x", "new": [1]})) == lf.Invalidate("g:x")


def test_malformed_frames_of_known_types():
    bad = lf.decode(_body({"t": "send", "view": 1, "ch": "g:x", "u": "nine", "cmid": "c", "body": "b", "rid": 4}))
    assert type(bad) is lf.Malformed and bad.t == "send" and bad.rid == 4 and "u" in bad.error
    bad = lf.decode(_body({"t": "deliver", "u": [1]}))  # no view, no rid
    assert type(bad) is lf.Malformed and bad.rid is None and "view" in bad.error


def test_oversized_frame_is_refused_from_its_header():
    codec = link.LinkCodec(100)
    big = link.LinkCodec.encode(lf.Invalidate("a" * 200))
    with pytest.raises(link.LinkProtocolError, match="exceeds"):
        codec.receive_data(big[:4])  # refused before the body arrives, nothing allocated for it
    with pytest.raises(ValueError):
        link.LinkCodec(100).encode_checked(lf.Invalidate("a" * 200))


def test_append_refuses_what_the_peer_would_refuse():
    codec = link.LinkCodec(100)
    buf = bytearray()
    assert codec.append(buf, lf.Invalidate("g:x")) > 0
    before = bytes(buf)
    assert codec.append(buf, lf.Invalidate("a" * 200)) == -1 and bytes(buf) == before  # nothing appended
    assert codec.append(buf, lf.Ping()) > 0
    reader = link.LinkCodec(100)
    reader.receive_data(bytes(buf))
    assert [reader.next_frame(), reader.next_frame(), reader.next_frame()] == [lf.Invalidate("g:x"), lf.Ping(), None]


@pytest.mark.parametrize("body", [b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa1t\x01", b"\xa3abc", b"\x81\xa1t\xa4ping\x00"])
def test_garbage_frames_raise(body):
    codec = link.LinkCodec(100)
    codec.receive_data(len(body).to_bytes(4, "big") + body)
    with pytest.raises(link.LinkProtocolError):
        codec.next_frame()


def test_handshake_mutual_and_replay_safe():
    secret = "cluster-secret"
    ns, nc = link.new_nonce(), link.new_nonce()
    chal = link.challenge("s2", ns)
    h = link.hello(secret, "s1", "shard", chal, nc)
    assert link.check_hello(secret, "s2", ns, h) == ("s1", "shard")
    w = link.welcome(secret, "s2", "s1", nc, ns)
    link.check_welcome(secret, "s2", "s1", nc, ns, w)
    # a replayed hello fails against a fresh challenge
    with pytest.raises(link.LinkProtocolError, match="proof"):
        link.check_hello(secret, "s2", link.new_nonce(), h)
    # a peer without the secret fails both ways
    with pytest.raises(link.LinkProtocolError):
        link.check_hello(secret, "s2", ns, link.hello("wrong", "s1", "shard", chal, nc))
    with pytest.raises(link.LinkProtocolError):
        link.check_welcome(secret, "s2", "s1", nc, ns, link.welcome("wrong", "s2", "s1", nc, ns))
    # impersonation: a hello for another id does not verify
    forged = msgspec.structs.replace(h, id="s3")
    with pytest.raises(link.LinkProtocolError):
        link.check_hello(secret, "s2", ns, forged)
    # a hello that does not decode as one (id not a string) is not a hello
    with pytest.raises(link.LinkProtocolError, match="expected 'hello'"):
        link.check_hello(secret, "s2", ns, lf.decode(_body({"t": "hello", "v": 1, "id": 5})))
    with pytest.raises(link.LinkProtocolError, match="malformed"):
        link.check_hello(secret, "s2", ns, msgspec.structs.replace(h, role="presence"))
    with pytest.raises(link.LinkProtocolError, match="version"):
        link.hello(secret, "s1", "shard", msgspec.structs.replace(chal, v=99), nc)
    with pytest.raises(link.LinkProtocolError, match="expected 'challenge'"):
        link.hello(secret, "s1", "shard", w, nc)


def test_next_body_is_framing_only():
    codec = link.LinkCodec(100)
    codec.receive_data(_framed({"t": "tool", "p": 1}) + _framed({"t": "ping"})[:3])
    assert msgpack.unpackb(codec.next_body()) == {"t": "tool", "p": 1}
    assert codec.next_body() is None and codec.buffered() == 3
