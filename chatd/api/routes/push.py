"""Push tokens (docs/push.md): register one for the caller's device (``POST /v1/push/tokens``),
list the caller's, remove one or all of this device's (``DELETE``). A node with a push service
is told when a user's tokens changed (the API role has none).

A push token names one physical device. One that another user holds is not taken over silently:
while the holder's device is still logged in (listed in their ``GET /v1/devices`` and logged in
within ``auth.token_ttl_s``) the registration is refused with ``push_token_taken`` (409) - else
whoever learnt a victim's token could cut the victim's notifications off and have their own sent
to the victim's phone. Once that device is logged out (or its last login is older than any token
it can hold) the token moves, as Matrix's pushers do for a device that changed hands. Both
outcomes are security events (``push_token`` ``refused`` / ``moved``). The check and the move are
two store calls: two users registering the same token at the same moment can both pass the check
(the later write holds it).

Errors: ``push_token_taken`` (409), what every authenticated route answers (400, 401, 413) and the
store's ``unavailable``; removing a token the caller does not hold removes nothing (``{"removed": 0}``).
"""

from __future__ import annotations

import time

from quart_trio import QuartTrio

from ...errors import ChatError
from ...store.base import PushToken
from .. import models as m
from .. import securitylog as security
from ..caller import Caller
from ..clientaddr import request_address
from ..host import ApiHost
from ..spec import route


def register(app: QuartTrio, node: ApiHost) -> None:
    store = node.store

    def tokens_changed(uid: int) -> None:
        push = getattr(node, "push", None)
        if push is not None:
            push.tokens_changed(uid)

    async def still_logged_in(holder: PushToken, now: float) -> bool:
        ttl = node.config.auth.token_ttl_s
        devices = await store.devices_of(holder.user_id)
        return any(d.id == holder.device_id and d.last_login_at > now - ttl for d in devices)

    @app.post("/v1/push/tokens")
    @route(m.PushTokenAnswer, 201, body=m.PushTokenCreate, errors=(409,))
    async def register_push_token(data: m.PushTokenCreate, caller: Caller):
        now = time.time()
        holder = await store.push_token_holder(data.token)
        if holder is not None and holder.user_id != caller.user_id:
            fields = {"user": caller.user_id, "device": caller.device_id, "holder": holder.user_id,
                      "addr": request_address()}
            if await still_logged_in(holder, now):
                security.event("push_token", "refused", **fields)
                raise ChatError("push_token_taken", "this push token is registered to a device of another account "
                                "that is still logged in; log that account out on the device first")
            security.event("push_token", "moved", **fields)
        registered = PushToken(caller.user_id, caller.device_id, data.provider, data.token, data.app_id, now)
        await store.add_push_token(registered)
        if holder is not None and holder.user_id != caller.user_id:
            tokens_changed(holder.user_id)
        tokens_changed(caller.user_id)
        return {"push_token": registered.public()}, 201

    @app.get("/v1/push/tokens")
    @route(m.PushTokens)
    async def list_push_tokens(caller: Caller):
        return {"push_tokens": [t.public() for t in await store.push_tokens(caller.user_id)]}

    @app.delete("/v1/push/tokens")
    @route(m.Removed, body=m.PushTokenDelete)
    async def unregister_push_tokens(data: m.PushTokenDelete, caller: Caller):
        uid = caller.user_id
        token = data.token  # no body (or no token): every token of this device; {"token": ...}: that one
        targets = [token] if token is not None else \
            [t.token for t in await store.push_tokens(uid) if t.device_id == caller.device_id]
        removed = 0
        for t in targets:
            removed += await store.remove_push_token(uid, t)
        tokens_changed(uid)
        return {"removed": removed}
