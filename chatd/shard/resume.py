"""Resume tokens: a device's per-channel cursors as one opaque, URL-safe string. Pure functions, no I/O.

The SSE ``id:`` of every event that advances a channel (a ``message``, and whatever else takes a
channel's seq), the poll answers' ``cursor`` and a ``Last-Event-ID`` carry one. A token is
self-contained -- ``{channel id: the last seq delivered}`` for every channel the stream follows --
so any shard resumes from it (after a failover too) with no server state: a channel absent from
the token is one the device has seen nothing of (it is read from its start).

Format (docs/protocol.md, "Resume tokens"): ``1.`` + base64url (no padding) of the text
``<channel>=<seq>,<channel>=<seq>...``; above ``ZLIB_ABOVE`` bytes of text the text is deflated
and the prefix is ``1z.``. Errors: :func:`decode` raises ``ValueError`` for anything that is not
a token this module made (the HTTP routes answer ``bad_cursor``); nothing else is raised.
"""

from __future__ import annotations

import base64
import binascii
import zlib

from ..ids import is_valid_channel_id
from ..protocol.client import MAX_SEQ

ZLIB_ABOVE = 256  # bytes of text above which the token is deflated
MAX_TOKEN_CHARS = 16384  # a longer token is refused (an HTTP header or a URL must carry it)
MAX_CHANNELS = 10_000  # protocol.client.MAX_CURSORS


def encode(cursors: dict[str, int]) -> str:
    """The token of ``cursors``. A channel at 0 stays in it: it is followed from its start even
    if the store lists no message of it yet (a 1:1 channel whose first message is in flight)."""
    text = ",".join(f"{ch}={seq}" for ch, seq in cursors.items()).encode()
    if len(text) > ZLIB_ABOVE:
        return "1z." + base64.urlsafe_b64encode(zlib.compress(text, 6)).rstrip(b"=").decode()
    return "1." + base64.urlsafe_b64encode(text).rstrip(b"=").decode()


def decode(token: str) -> dict[str, int]:
    """The cursors of ``token``; ``ValueError`` if it is not a valid token."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise ValueError("too long")
    prefix, _, body = token.partition(".")
    if prefix not in ("1", "1z") or not body.isascii():
        raise ValueError("not a chatd resume token")
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
        if prefix == "1z":
            d = zlib.decompressobj()
            raw = d.decompress(raw, MAX_TOKEN_CHARS * 8)
            if d.unconsumed_tail or not d.eof:
                raise ValueError("bad deflate stream")
        text = raw.decode("ascii")
    except (binascii.Error, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(f"cannot decode: {type(e).__name__}") from None
    out: dict[str, int] = {}
    if not text:
        return out
    for item in text.split(","):
        ch, sep, seq = item.rpartition("=")
        if not sep or not is_valid_channel_id(ch) or not seq.isdigit() or len(seq) > 19:
            raise ValueError("bad entry")
        n = int(seq)
        if n > MAX_SEQ or ch in out:
            raise ValueError("bad entry")
        out[ch] = n
        if len(out) > MAX_CHANNELS:
            raise ValueError("too many channels")
    return out
