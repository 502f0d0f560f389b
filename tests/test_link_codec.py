"""The inter-shard link codec and handshake, in memory."""

from __future__ import annotations

import pytest

from chatd.protocol import link


def test_frames_round_trip_across_arbitrary_chunking():
    frames = [{"t": "ping"}, {"t": "send", "rid": 1, "body": "é" * 1000}, {"t": "deliver", "u": [1, 2, 3]}]
    data = b"".join(link.LinkCodec.encode(f) for f in frames)
    for chunk in (1, 3, 7, 100, len(data)):
        codec = link.LinkCodec(1 << 20)
        out = []
        for i in range(0, len(data), chunk):
            codec.receive_data(data[i:i + chunk])
            while (f := codec.next_frame()) is not None:
                out.append(f)
        assert out == frames and codec.buffered() == 0


def test_oversized_frame_is_refused_from_its_header():
    codec = link.LinkCodec(100)
    big = link.LinkCodec.encode({"t": "x", "pad": "a" * 200})
    with pytest.raises(link.LinkProtocolError, match="exceeds"):
        codec.receive_data(big[:4])  # refused before the body arrives, nothing allocated for it
    with pytest.raises(ValueError):
        link.LinkCodec(100).encode_checked({"t": "x", "pad": "a" * 200})


@pytest.mark.parametrize("body", [b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa1t\x01", b"\xa3abc"])
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
    forged = dict(h, id="s3")
    with pytest.raises(link.LinkProtocolError):
        link.check_hello(secret, "s2", ns, forged)
    with pytest.raises(link.LinkProtocolError):
        link.check_hello(secret, "s2", ns, {"t": "hello", "v": 1, "id": 5})
    with pytest.raises(link.LinkProtocolError, match="version"):
        link.hello(secret, "s1", "shard", dict(chal, v=99), nc)
