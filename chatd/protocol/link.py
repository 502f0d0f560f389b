"""The inter-shard link protocol as a sans-I/O codec: length-prefixed msgpack frames.

Wire format: each frame is a 4-byte big-endian unsigned length followed by that many bytes of
msgpack encoding a map with at least ``"t"`` (the frame type, a string). The frames themselves,
their fields and what happens to unknown or malformed ones: :mod:`chatd.protocol.link_frames`.

:class:`LinkCodec` is fed bytes with :meth:`receive_data` and yields frames from
:meth:`next_frame` (``None`` = need more data). A declared length above ``max_frame_bytes`` raises
:class:`LinkProtocolError` *before* anything is buffered for it: the peer cannot make us allocate.
Garbage raises the same error; the link is then closed. The sending side checks the same limit
(:meth:`LinkCodec.append`): a frame the peer would refuse is never sent.

Handshake (dialer C, acceptor S), mutual and replay-safe with the cluster secret K:

1. S → C ``challenge`` {v: 1, id: S, nonce: Ns}
2. C → S ``hello`` {v: 1, id: C, role: "shard"|"api", nonce: Nc, proof: HMAC(K, "c", C, S, Ns, Nc)}
3. S → C ``welcome`` {proof: HMAC(K, "s", S, C, Nc, Ns)}

A recorded ``hello`` is useless later: it is bound to the acceptor's fresh nonce Ns.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from .link_frames import (HEADER, NAMES, VERSION, Challenge, Frame, Hello, LinkProtocolError, Malformed, Unknown,
                          Welcome, append, decode, encode)

__all__ = ["LinkCodec", "LinkProtocolError", "new_nonce", "challenge", "hello", "check_hello", "welcome",
           "check_welcome", "VERSION"]

NONCE_BYTES = 16


class LinkCodec:
    def __init__(self, max_frame_bytes: int):
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._need: int | None = None  # body length of the frame being read

    def receive_data(self, data: bytes) -> None:
        self._buf += data
        self._check_header()

    def _check_header(self) -> None:
        if self._need is None and len(self._buf) >= 4:
            (n,) = HEADER.unpack_from(self._buf)
            if n > self.max_frame_bytes:
                raise LinkProtocolError(f"frame of {n} bytes exceeds the limit of {self.max_frame_bytes}")
            self._need = n

    def next_frame(self) -> Frame | Unknown | Malformed | None:
        n = self._need
        if n is None or len(self._buf) < 4 + n:
            return None
        with memoryview(self._buf) as view:
            body = view[4:4 + n]
            try:
                frame = decode(body)
            finally:
                body.release()
        del self._buf[:4 + n]
        self._need = None
        self._check_header()
        return frame

    def next_body(self) -> bytes | None:
        """The next frame's body undecoded (framing only: for a tool with frames of its own)."""
        n = self._need
        if n is None or len(self._buf) < 4 + n:
            return None
        body = bytes(self._buf[4:4 + n])
        del self._buf[:4 + n]
        self._need = None
        self._check_header()
        return body

    def buffered(self) -> int:
        return len(self._buf)

    @staticmethod
    def encode(frame: Frame) -> bytes:
        body = encode(frame)
        return HEADER.pack(len(body)) + body

    def encode_checked(self, frame: Frame) -> bytes:
        """Encode, refusing (ValueError) a frame the peer would refuse."""
        data = self.encode(frame)
        if len(data) - 4 > self.max_frame_bytes:
            raise ValueError(f"frame of {len(data) - 4} bytes exceeds the link limit")
        return data

    def append(self, buf: bytearray, frame: Frame) -> int:
        """Append ``frame`` (header and body) to ``buf``; its size, or -1 with nothing appended
        when the peer would refuse it (above ``max_frame_bytes``)."""
        return append(buf, frame, self.max_frame_bytes)


# ---- handshake ---------------------------------------------------------------------------------

def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def _proof(secret: str, *parts) -> bytes:
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha256)
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        mac.update(HEADER.pack(len(b)) + b)  # length-prefixed: no ambiguity between parts
    return mac.digest()


def challenge(server_id: str, nonce: bytes) -> Challenge:
    return Challenge(VERSION, server_id, nonce)


def hello(secret: str, client_id: str, role: str, chal, client_nonce: bytes) -> Hello:
    _expect(chal, Challenge)
    return Hello(VERSION, client_id, role, client_nonce,
                 _proof(secret, "c", client_id, chal.id, chal.nonce, client_nonce))


def check_hello(secret: str, server_id: str, server_nonce: bytes, frame) -> tuple[str, str]:
    """Return ``(peer id, role)`` or raise :class:`LinkProtocolError`."""
    _expect(frame, Hello)
    if frame.role not in ("shard", "api"):
        raise LinkProtocolError("malformed hello")
    if not hmac.compare_digest(frame.proof, _proof(secret, "c", frame.id, server_id, server_nonce, frame.nonce)):
        raise LinkProtocolError("hello proof does not match: wrong cluster secret or replay")
    return frame.id, frame.role


def welcome(secret: str, server_id: str, client_id: str, client_nonce: bytes, server_nonce: bytes) -> Welcome:
    return Welcome(_proof(secret, "s", server_id, client_id, client_nonce, server_nonce))


def check_welcome(secret: str, server_id: str, client_id: str, client_nonce: bytes, server_nonce: bytes,
                  frame) -> None:
    _expect(frame, Welcome)
    if not hmac.compare_digest(frame.proof, _proof(secret, "s", server_id, client_id, client_nonce, server_nonce)):
        raise LinkProtocolError("welcome proof does not match: wrong cluster secret")


def _expect(frame, cls: type) -> None:
    """``frame`` is a well-formed ``cls`` of our version (decoded frames are typed; one built in
    memory by hand might not be)."""
    if type(frame) is not cls:
        got = getattr(frame, "t", None) or NAMES.get(type(frame), type(frame).__name__)
        raise LinkProtocolError(f"expected {NAMES[cls]!r}, got {str(got)[:40]!r}")
    if cls is not Welcome and frame.v != VERSION:
        raise LinkProtocolError(f"unsupported link protocol version {frame.v!r}")
    fields = {"id": str, "nonce": bytes, "proof": bytes, "role": str}
    for name in cls.__struct_fields__:
        want = fields.get(name)
        if want is not None and type(getattr(frame, name)) is not want:
            raise LinkProtocolError(f"malformed {NAMES[cls]}")
