"""Who may call the operator routes (``/v1/admin/...``, :mod:`chatd.api.routes.operator`): whoever
holds the token secret (``auth.secret``, or the data directory's ``secret.key`` of ``chatd run``) -
that is, the operator with the config file, through ``chatd admin``.

An admin token is ``chatd-admin.v1.<iat>.<exp>.<mac>``: unix seconds it was made and expires
(at most ``MAX_TTL_S`` later), and HMAC-SHA256 over ``<iat>.<exp>`` under a key derived from the
secret for this use only (a user token's MAC never verifies as an admin token, nor the reverse).
``chatd admin`` makes a fresh one for each command (valid 60 s). It is a bearer credential: send it
over TLS between machines (docs/security.md).

Errors: ``not_authenticated`` (401) without one; ``invalid_token`` (401) for a forged, expired or
malformed one.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from ..errors import ChatError

PREFIX = "chatd-admin.v1."
DEFAULT_TTL_S = 60
MAX_TTL_S = 3600
CLOCK_SKEW_S = 60


def _key(secret: str) -> bytes:
    return hmac.new(secret.encode(), b"chatd admin api v1", hashlib.sha256).digest()


def issue_admin_token(secret: str, ttl_s: float = DEFAULT_TTL_S, now: float | None = None) -> str:
    now = time.time() if now is None else now
    payload = f"{int(now)}.{int(now + min(ttl_s, MAX_TTL_S))}"
    return PREFIX + payload + "." + hmac.new(_key(secret), payload.encode(), hashlib.sha256).hexdigest()


def check_admin_token(secret: str, authorization: str, now: float | None = None) -> None:
    """Accept ``Authorization: Bearer <admin token>`` or raise (see the module docstring)."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ChatError("not_authenticated", "the operator routes need an admin token (chatd admin)")
    now = time.time() if now is None else now
    try:
        if not token.startswith(PREFIX):
            raise ValueError
        iat_s, exp_s, mac = token[len(PREFIX):].split(".")
        iat, exp = int(iat_s), int(exp_s)
    except ValueError:
        raise ChatError("invalid_token", "not an admin token") from None
    want = hmac.new(_key(secret), f"{iat_s}.{exp_s}".encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, mac):
        raise ChatError("invalid_token", "not an admin token of this deployment")
    if exp < now or iat > now + CLOCK_SKEW_S or exp - iat > MAX_TTL_S:
        raise ChatError("invalid_token", "the admin token has expired; run the command again")
