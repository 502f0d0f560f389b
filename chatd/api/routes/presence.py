"""Presence: ``GET /v1/presence?user_ids=...`` (many users at once, at most
``presence.max_query``) and ``GET /v1/users/<id>/presence`` (one user, who must exist).
Answers come from the node's presence service (local, or remote on the API role), as the caller
may see them (``presence.visibility``, :mod:`chatd.presence.visibility`): a user outside the
caller's contacts answers ``offline`` with ``last_active_at: null``, exactly as an id nobody has does
in the batch. The one-user route answers ``no_such_user`` (404) for a user who does not exist (as
``GET /v1/users/<id>`` does: profiles are public, presence is not)."""

from __future__ import annotations

from quart_trio import QuartTrio

from ...errors import ChatError
from ...ids import MAX_INT64
from ...presence.visibility import visibility
from .. import models as m
from ..caller import Caller
from ..host import ApiHost
from ..spec import route


def register(app: QuartTrio, node: ApiHost) -> None:
    store = node.store
    PresenceQuery = m.presence_query(node.config.presence.max_query)

    @app.get("/v1/presence")
    @route(m.PresenceAnswer, query=PresenceQuery)
    async def presence_batch(query: m.PresenceQuery, caller: Caller):
        ids = list(dict.fromkeys(int(x) for x in query.user_ids.split(",")))  # the model's pattern checked them
        users = await visibility(node).statuses(caller.user_id, ids)
        return {"users": {str(u): st for u, st in users.items()}}

    @app.get("/v1/users/<int:user_id>/presence")
    @route(m.UserPresence, errors=(404,))
    async def presence_one(user_id: int, caller: Caller):
        if not 1 <= user_id <= MAX_INT64 or await store.get_user(user_id) is None:
            raise ChatError("no_such_user", f"user {user_id} does not exist")
        return {"user_id": user_id, **(await visibility(node).statuses(caller.user_id, [user_id]))[user_id]}
