"""Logout revokes the token: one record per revoked token in the store, checked wherever a token is
accepted (WebSocket ``auth`` on every shard; every authenticated HTTP request on every API server,
:mod:`chatd.api.caller`).

A token is stored as a key: the first 32 hex digits of its SHA-256, never the token itself (the
store would otherwise hold live credentials). A record lives until the token's own expiry (after
that the signature check refuses the token anyway); backends drop expired records themselves.

Error policy: a revoked token is ``invalid_token`` (``"this token was revoked by a logout"``); a
store failure while checking is ``unavailable`` (the token is never accepted unchecked).
"""

from __future__ import annotations

import hashlib

REVOKED_MESSAGE = "this token was revoked by a logout; log in again"


def token_key(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:32]


async def log_out(node, user_id: int, device_id: str, key: str, expires_at: float, except_session=None) -> None:
    """The logout use case, the same over HTTP (``POST /v1/logout``) and WebSocket (``logout``):
    record the token (its ``key``) as revoked -- durable when this returns, before any answer --,
    take the device offline, and close the device's connections on every shard (except
    ``except_session``, the connection that asked, which closes itself after its answer).
    A store failure raises ``ChatError("unavailable")`` with nothing else done."""
    await node.store.revoke_token(key, user_id, device_id, float(expires_at))
    node.presence.logout(user_id, device_id)
    node.device_logged_out(user_id, device_id, key, except_session=except_session)
