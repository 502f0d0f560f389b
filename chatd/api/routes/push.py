"""Push tokens (docs/push.md): register one for the caller's device (``POST /v1/push/tokens``),
list the caller's, remove one or all of this device's (``DELETE``). A node with a push service
is told when a user's tokens changed (the API role has none).

Errors: only what every authenticated route answers (400, 401, 413) and the store's
``unavailable``; removing a token the caller does not hold removes nothing (``{"removed": 0}``).
"""

from __future__ import annotations

import time

from quart_trio import QuartTrio

from ...store.base import PushToken
from .. import models as m
from ..caller import Caller
from ..host import ApiHost
from ..spec import route


def register(app: QuartTrio, node: ApiHost) -> None:
    store = node.store

    def tokens_changed(uid: int) -> None:
        push = getattr(node, "push", None)
        if push is not None:
            push.tokens_changed(uid)

    @app.post("/v1/push/tokens")
    @route(m.PushTokenAnswer, 201, body=m.PushTokenCreate)
    async def register_push_token(data: m.PushTokenCreate, caller: Caller):
        registered = PushToken(caller.user_id, caller.device_id, data.provider, data.token, data.app_id, time.time())
        await store.add_push_token(registered)
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
