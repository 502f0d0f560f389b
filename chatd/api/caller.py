"""Who is calling: the bearer token of an authenticated HTTP request, checked once.

:func:`authenticate` is the API's one token check (:func:`chatd.api.spec.route` runs it for every
route with ``auth``, before the body is decoded, and hands the :class:`Caller` to the handler): the
signature and expiry (:func:`chatd.auth.token_claims`), then, in one store read, the token's
revocation record and the cut-offs of its user and device (:mod:`chatd.revocation`). Nothing is read from the store for a token that is missing, forged
or expired.

Errors: no ``Authorization: Bearer`` header is ``not_authenticated``; a forged or malformed token
``invalid_token``; an expired one ``token_expired``; a revoked one ``invalid_token``
(:data:`chatd.revocation.REVOKED_MESSAGE`); a store failure while checking the revocation is the
store's ``unavailable`` (the token is never accepted unchecked). All 401 but the last (503).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..auth import Claims, token_claims
from ..errors import ChatError
from ..revocation import REVOKED_MESSAGE, token_key
from ..store.base import Store


@dataclass(frozen=True, slots=True)
class Caller:
    """The user and device an authenticated request acts for, with its token's expiry, issue time
    and store key (what a logout revokes). The token itself is left out of ``repr``: it is a
    credential."""
    user_id: int
    device_id: str
    expires_at: int
    token_key: str
    token: str = field(repr=False)
    issued_at: float = 0.0


async def authenticate(secret: str, store: Store, authorization: str,
                       on_revoked: Callable[[int, str], None] | None = None,
                       claims: Claims | None = None) -> Caller:
    """The caller of a request whose ``Authorization`` header is ``authorization``, or raise
    (module docstring). ``on_revoked(user_id, device_id)`` is told of a revoked token's use;
    ``claims``: the token's, when this request's signature check already ran (not repeated)."""
    if not authorization.startswith("Bearer "):
        raise ChatError("not_authenticated", "send 'Authorization: Bearer <token>' (from /v1/login)")
    token = authorization[len("Bearer "):].strip()
    user_id, device_id, expires_at, iat = claims if claims is not None else token_claims(secret, token)
    key = token_key(token)
    if await store.token_revoked(key, user_id, device_id, iat):
        if on_revoked is not None:
            on_revoked(user_id, device_id)
        raise ChatError("invalid_token", REVOKED_MESSAGE)
    return Caller(user_id, device_id, expires_at, key, token, iat)
