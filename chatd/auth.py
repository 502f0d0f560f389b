"""Passwords (scrypt) and signed, expiring tokens. Pure functions; callers run the slow
``hash_password`` / ``verify_password`` in a worker thread.

Hashes are ``scrypt$N$r$p$salt$key``; :func:`needs_rehash` tells whether a stored hash was made
with weaker parameters than the configured ones (a successful login then stores a new one). The
memory bound (``MAX_SCRYPT_MEMORY``) admits N up to 2**18 with r=8; a stored hash above it
verifies as false.

Token format: ``v1.<base64url(JSON payload)>.<base64url(HMAC-SHA256(secret, "v1." + payload))>``;
the payload is ``{"u": user_id, "d": device_id, "iat": unix_seconds, "exp": unix_seconds, "n": nonce}``;
``iat`` (issued at) is floored to the millisecond (:func:`issued_at`), so a revocation cut-off taken
the same way ("every token of this device or user issued before T", chatd/revocation.py) refuses
every token issued before it and none issued after it by the same clock. A token without ``iat`` (issued
before chatd had cut-offs) counts as issued at 0: older than any cut-off. The random nonce makes
every issued token distinct, so the revocation of one token by its key never revokes the token of a
later login. Verification is constant-time; a bad signature is ``invalid_token``, a past ``exp`` is
``token_expired``.

Invite format (``chatd admin invite``; sign-up with ``auth.registration = "invite"``):
``inv1.<base64url(JSON {"i": invite_id, "m": max_uses, "exp": unix_seconds})>.<base64url(HMAC-SHA256(secret,
"inv1." + payload))>``. The signature makes an invite unforgeable without ``auth.secret``; how often it
was used is counted in the store (:meth:`chatd.store.base.Store.use_invite`). Another prefix than the
tokens' so neither passes for the other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import secrets
import time
from typing import NamedTuple

from .errors import ChatError

_R, _P, _DKLEN = 8, 1, 32
MAX_SCRYPT_MEMORY = 2**29  # bytes; 128 * r * N is 256 MiB at N = 2**18
INVITE_PREFIX = "inv1"


def hash_password(password: str, n: int) -> str:
    salt = os.urandom(16)
    dk = hashlib.scrypt(password.encode(), salt=salt, n=n, r=_R, p=_P, dklen=_DKLEN, maxmem=MAX_SCRYPT_MEMORY)
    return f"scrypt${n}${_R}${_P}${_b64(salt)}${_b64(dk)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, dk = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(_unb64(dk)), maxmem=MAX_SCRYPT_MEMORY)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, _unb64(dk))


def needs_rehash(stored: str, n: int) -> bool:
    """Whether ``stored`` was hashed with weaker parameters than scrypt ``n`` with r=8, p=1."""
    try:
        kind, sn, r, p, _, _ = stored.split("$")
        return kind != "scrypt" or int(sn) < n or int(r) < _R or int(p) < _P
    except ValueError:
        return True


def new_secret() -> str:
    return secrets.token_urlsafe(32)


class Claims(NamedTuple):
    """What a valid token says: who, which device, until when, since when (``issued_at`` 0.0 for a
    token without ``iat``)."""
    user_id: int
    device_id: str
    expires_at: int
    issued_at: float


def issued_at(now: float | None = None) -> float:
    """``now`` (default: the wall clock) floored to the millisecond: a token's ``iat``, and a
    revocation cut-off (tokens with ``iat`` below it are revoked)."""
    return math.floor((time.time() if now is None else now) * 1000) / 1000


def issue_token(secret: str, user_id: int, device_id: str, ttl_s: float, now: float | None = None) -> tuple[str, float]:
    now = time.time() if now is None else now
    exp = int(now + ttl_s)
    claims = {"u": user_id, "d": device_id, "iat": issued_at(now), "exp": exp, "n": secrets.token_hex(6)}
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signed = "v1." + payload
    return f"{signed}.{_sign(secret, signed)}", exp


def verify_token(secret: str, token: str, now: float | None = None) -> tuple[int, str]:
    """Return ``(user_id, device_id)`` or raise ``invalid_token`` / ``token_expired``."""
    claims = token_claims(secret, token, now)
    return claims.user_id, claims.device_id


def token_claims(secret: str, token: str, now: float | None = None) -> Claims:
    """The token's :class:`Claims`, or raise ``invalid_token`` / ``token_expired``.
    (Revocation by logout is checked against the store: chatd/revocation.py.)"""
    try:
        token.encode("ascii")
        version, payload, sig = token.split(".")
    except (ValueError, AttributeError):
        raise ChatError("invalid_token", "token is malformed") from None
    if version != "v1" or not hmac.compare_digest(sig, _sign(secret, f"{version}.{payload}")):
        raise ChatError("invalid_token", "token signature is not valid")
    try:
        data = json.loads(_unb64(payload))
        user_id, device_id, exp, iat = data["u"], data["d"], data["exp"], data.get("iat", 0.0)
        if not (isinstance(user_id, int) and isinstance(device_id, str) and isinstance(exp, int)
                and isinstance(iat, (int, float)) and not isinstance(iat, bool) and math.isfinite(iat)):
            raise TypeError
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ChatError("invalid_token", "token payload is malformed") from None
    if (time.time() if now is None else now) >= exp:
        raise ChatError("token_expired", "token has expired; log in again")
    return Claims(user_id, device_id, exp, float(iat))


def issue_invite(secret: str, max_uses: int, ttl_s: float, now: float | None = None) -> tuple[str, str, int]:
    """A fresh invite: ``(invite, invite_id, expires_at)``."""
    invite_id = secrets.token_hex(8)
    exp = int((time.time() if now is None else now) + ttl_s)
    payload = _b64(json.dumps({"i": invite_id, "m": max_uses, "exp": exp}, separators=(",", ":")).encode())
    signed = f"{INVITE_PREFIX}.{payload}"
    return f"{signed}.{_sign(secret, signed)}", invite_id, exp


def invite_claims(secret: str, invite: str, now: float | None = None) -> tuple[str, int, int]:
    """``(invite_id, max_uses, expires_at)`` of a valid invite, or raise ``invite_invalid``."""
    try:
        invite.encode("ascii")
        prefix, payload, sig = invite.split(".")
    except (ValueError, AttributeError):
        raise ChatError("invite_invalid", "the invite is malformed") from None
    if prefix != INVITE_PREFIX or not hmac.compare_digest(sig, _sign(secret, f"{prefix}.{payload}")):
        raise ChatError("invite_invalid", "the invite is not valid")
    try:
        data = json.loads(_unb64(payload))
        invite_id, max_uses, exp = data["i"], data["m"], data["exp"]
        if not (isinstance(invite_id, str) and isinstance(max_uses, int) and isinstance(exp, int)):
            raise TypeError
    except (ValueError, TypeError, KeyError):
        raise ChatError("invite_invalid", "the invite is malformed") from None
    if (time.time() if now is None else now) >= exp:
        raise ChatError("invite_invalid", "the invite has expired")
    return invite_id, max_uses, exp


def _sign(secret: str, data: str) -> str:
    return _b64(hmac.new(secret.encode(), data.encode(), hashlib.sha256).digest())


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
