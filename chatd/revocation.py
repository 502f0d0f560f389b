"""Revoking tokens: logout of one device, of every device of a user, of a device by id, and a
password change. Two kinds of durable record in the store, both checked (in one store read) wherever
a token is accepted (WebSocket ``auth`` on every shard; every authenticated HTTP request on every
API server, :mod:`chatd.api.caller`):

* **a token by key**: the first 32 hex digits of its SHA-256, never the token itself (the store would
  otherwise hold live credentials), kept until the token's own expiry;
* **a cut-off**: "every token of this user (of this one device, or of all of them) issued before T
  is revoked", T taken with :func:`chatd.auth.issued_at` and compared with the token's ``iat`` (a
  token without ``iat`` is older than any cut-off). Kept for ``auth.token_ttl_s`` (+ 60 s of skew)
  after T: every token it revokes has expired by then. A later, earlier cut-off never lowers it.

A logout (``POST /v1/logout``, the WebSocket ``logout``) writes both: the token's key and the
device's cut-off, so the device's older tokens go too. ``POST /v1/logout`` with ``all``, ``DELETE
/v1/devices/<id>`` and a password change write a cut-off only (:func:`log_out_before`).

After the write, the node closes the matching connections here and on every shard (link frames
``logout`` / ``logout_all``) with 4001, and keeps the revocation in a bounded in-memory window
(:class:`RecentRevocations`): a connection whose store check ran before the write but attaches after
the frame arrived is refused by the window instead. Cut-offs compare clocks of different
processes (the issuing API server's and the revoking one's): keep them synchronised (NTP); a token
issued by a server whose clock runs ahead by more than the gap between its login and the cut-off
survives the cut-off (it is still revoked by key when it logs itself out).

Error policy: a revoked token is ``invalid_token`` (``"this token was revoked by a logout"``); a
store failure while checking is ``unavailable`` (the token is never accepted unchecked); a store
failure while revoking is ``unavailable`` with no connection closed (the client retries).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from .auth import issued_at

REVOKED_MESSAGE = "this token was revoked by a logout; log in again"
SKEW_S = 60  # a cut-off outlives the tokens it revokes by this much
REMEMBERED = 10_000  # revocations kept in a node's in-memory window (each kind)


def token_key(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class RecentRevocations:
    """The revocations this process saw lately (its own and its peers' link frames), bounded:
    ``key in window`` for a token key; :meth:`refuses` for a token's whole identity."""

    __slots__ = ("_keys", "_cutoffs")

    def __init__(self) -> None:
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._cutoffs: OrderedDict[tuple[int, str], float] = OrderedDict()  # (user, device or "") -> T

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def add_key(self, key: str) -> None:
        self._keys[key] = None
        if len(self._keys) > REMEMBERED:
            self._keys.popitem(last=False)

    def add_cutoff(self, user_id: int, device_id: str | None, before: float) -> None:
        at = (user_id, device_id or "")
        self._cutoffs[at] = max(before, self._cutoffs.pop(at, before))
        if len(self._cutoffs) > REMEMBERED:
            self._cutoffs.popitem(last=False)

    def refuses(self, key: str, user_id: int, device_id: str, iat: float) -> bool:
        if key in self._keys:
            return True
        if not self._cutoffs:
            return False
        return iat < max(self._cutoffs.get((user_id, ""), 0.0), self._cutoffs.get((user_id, device_id), 0.0))


def keep_until(node, before: float) -> float:
    """How long a cut-off taken at ``before`` is kept: until every token it revokes has expired."""
    return before + node.config.auth.token_ttl_s + SKEW_S


async def log_out(node, user_id: int, device_id: str, key: str, expires_at: float, except_session=None) -> None:
    """The logout use case, the same over HTTP (``POST /v1/logout``) and WebSocket (``logout``):
    record the token (its ``key``) and every older token of the device as revoked -- durable when
    this returns, before any answer --, take the device offline, and close the device's
    connections on every shard (except ``except_session``, the connection that asked, which closes
    itself after its answer). A store failure raises ``ChatError("unavailable")``; what was written
    before it stays (the retry writes it again, harmlessly), no connection is closed."""
    before = issued_at()
    await node.store.revoke_token(key, user_id, device_id, float(expires_at))
    await node.store.revoke_before(user_id, device_id, before, keep_until(node, before))
    node.presence.logout(user_id, device_id)
    node.device_logged_out(user_id, device_id, key, except_session=except_session, before=before)


async def log_out_before(node, user_id: int, device_id: str | None, devices: list[str]) -> float:
    """Revoke every token of the user's device ``device_id`` (None: of all the user's devices)
    issued before now, durably before this returns; take ``devices`` (the devices that go) offline;
    close their connections on every shard (4001). Returns the cut-off. A store failure raises
    ``ChatError("unavailable")`` with no connection closed."""
    before = issued_at()
    await node.store.revoke_before(user_id, device_id, before, keep_until(node, before))
    for device in devices:
        node.presence.logout(user_id, device)
    node.tokens_revoked_before(user_id, device_id, before)
    return before
