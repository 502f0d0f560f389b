"""The inter-shard link protocol as a sans-I/O codec: length-prefixed msgpack frames.

Wire format: each frame is a 4-byte big-endian unsigned length followed by that many bytes of
msgpack encoding a map with at least ``"t"`` (the frame type, a string).

:class:`LinkCodec` is fed bytes with :meth:`receive_data` and yields frames from
:meth:`next_frame` (``None`` = need more data). A declared length above ``max_frame_bytes`` raises
:class:`LinkProtocolError` *before* anything is buffered for it: the peer cannot make us allocate.
Anything else malformed raises the same error; the link is then closed (a peer that speaks garbage
is broken or hostile; there is no request id to answer).

Handshake (dialer C, acceptor S), mutual and replay-safe with the cluster secret K:

1. S → C ``{"t": "challenge", "v": 1, "id": S, "nonce": Ns}``
2. C → S ``{"t": "hello", "v": 1, "id": C, "role": "shard"|"api", "nonce": Nc, "proof": HMAC(K, "c", C, S, Ns, Nc)}``
3. S → C ``{"t": "welcome", "proof": HMAC(K, "s", S, C, Nc, Ns)}``

A recorded ``hello`` is useless later: it is bound to the acceptor's fresh nonce Ns.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import msgpack

VERSION = 1
_HEADER = struct.Struct(">I")
NONCE_BYTES = 16


class LinkProtocolError(Exception):
    """The peer sent something that is not the link protocol; close the link."""


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
            (n,) = _HEADER.unpack_from(self._buf)
            if n > self.max_frame_bytes:
                raise LinkProtocolError(f"frame of {n} bytes exceeds the limit of {self.max_frame_bytes}")
            self._need = n

    def next_frame(self) -> dict | None:
        if self._need is None or len(self._buf) < 4 + self._need:
            return None
        body = bytes(self._buf[4:4 + self._need])
        del self._buf[:4 + self._need]
        self._need = None
        self._check_header()
        try:
            frame = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
            raise LinkProtocolError(f"undecodable frame: {type(e).__name__}") from None
        if not isinstance(frame, dict) or not isinstance(frame.get("t"), str):
            raise LinkProtocolError("a frame must be a map with a string 't'")
        return frame

    def buffered(self) -> int:
        return len(self._buf)

    @staticmethod
    def encode(frame: dict) -> bytes:
        body = msgpack.packb(frame, use_bin_type=True)
        return _HEADER.pack(len(body)) + body

    def encode_checked(self, frame: dict) -> bytes:
        """Encode, refusing (ValueError) a frame the peer would refuse."""
        data = self.encode(frame)
        if len(data) - 4 > self.max_frame_bytes:
            raise ValueError(f"frame of {len(data) - 4} bytes exceeds the link limit")
        return data


# ---- handshake ---------------------------------------------------------------------------------

def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def _proof(secret: str, *parts) -> bytes:
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha256)
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        mac.update(_HEADER.pack(len(b)) + b)  # length-prefixed: no ambiguity between parts
    return mac.digest()


def challenge(server_id: str, nonce: bytes) -> dict:
    return {"t": "challenge", "v": VERSION, "id": server_id, "nonce": nonce}


def hello(secret: str, client_id: str, role: str, chal: dict, client_nonce: bytes) -> dict:
    _expect(chal, "challenge")
    return {"t": "hello", "v": VERSION, "id": client_id, "role": role, "nonce": client_nonce,
            "proof": _proof(secret, "c", client_id, chal["id"], chal["nonce"], client_nonce)}


def check_hello(secret: str, server_id: str, server_nonce: bytes, frame: dict) -> tuple[str, str]:
    """Return ``(peer id, role)`` or raise :class:`LinkProtocolError`."""
    _expect(frame, "hello")
    peer, role, nonce, proof = frame.get("id"), frame.get("role"), frame.get("nonce"), frame.get("proof")
    if not (isinstance(peer, str) and role in ("shard", "api") and isinstance(nonce, bytes)
            and isinstance(proof, bytes)):
        raise LinkProtocolError("malformed hello")
    if not hmac.compare_digest(proof, _proof(secret, "c", peer, server_id, server_nonce, nonce)):
        raise LinkProtocolError("hello proof does not match: wrong cluster secret or replay")
    return peer, role


def welcome(secret: str, server_id: str, client_id: str, client_nonce: bytes, server_nonce: bytes) -> dict:
    return {"t": "welcome", "proof": _proof(secret, "s", server_id, client_id, client_nonce, server_nonce)}


def check_welcome(secret: str, server_id: str, client_id: str, client_nonce: bytes, server_nonce: bytes,
                  frame: dict) -> None:
    _expect(frame, "welcome")
    proof = frame.get("proof")
    if not isinstance(proof, bytes) or not hmac.compare_digest(
            proof, _proof(secret, "s", server_id, client_id, client_nonce, server_nonce)):
        raise LinkProtocolError("welcome proof does not match: wrong cluster secret")


def _expect(frame: dict, t: str) -> None:
    if frame.get("t") != t:
        raise LinkProtocolError(f"expected {t!r}, got {str(frame.get('t'))[:40]!r}")
    if t != "welcome" and frame.get("v") != VERSION:
        raise LinkProtocolError(f"unsupported link protocol version {frame.get('v')!r}")
    if t == "challenge" and not (isinstance(frame.get("id"), str) and isinstance(frame.get("nonce"), bytes)):
        raise LinkProtocolError("malformed challenge")
