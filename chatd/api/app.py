"""The HTTP API as a quart-trio application bound to a :class:`~chatd.node.Node`.

JSON in, JSON out; the contract is ``/openapi.json``, generated from :mod:`chatd.api.models`
through which every request is decoded (:mod:`chatd.api.spec`, which also reads every body before
any answer). Errors are ``{"error": {"code", "message"}}`` with a 4xx status for client mistakes
(codes from :mod:`chatd.errors`); an unexpected exception is logged and answered with
``internal``/500 without details. Authentication: ``Authorization: Bearer <token>`` from /v1/login.
Password hashing runs in worker threads, at most two at a time (scrypt is memory-hard).
"""

from __future__ import annotations

import logging
import math
import secrets
import time

import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .. import revocation
from ..auth import hash_password, issue_token, token_claims, verify_password, verify_token
from ..errors import ChatError
from ..ids import MAX_INT64, dm_channel_id, dm_members, is_group, is_valid_channel_id, new_group_id
from ..protocol.client import message_frame
from ..membership import announce_member_change
from ..store.base import PushToken
from ..store.pages import read_page
from . import models as m
from .loginguard import LoginGuard
from .spec import hide, install, route, set_authenticate
from .web import add_web_client

log = logging.getLogger(__name__)

_HTTP_CODES = {400: "bad_request", 401: "not_authenticated", 403: "forbidden", 404: "not_found",
               405: "bad_request", 413: "frame_too_large", 429: "rate_limited"}


def create_app(node) -> QuartTrio:
    app = QuartTrio("chatd")
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True

    @app.before_request
    async def started():  # first: before the body is read
        g.started = time.perf_counter()

    install(app, "chatd HTTP API")
    cfg = node.config
    GroupCreate = m.group_create(cfg.limits.max_group_members)
    HistoryQuery = m.history_query(cfg.limits.history_page_max)
    PresenceQuery = m.presence_query(cfg.presence.max_query)
    store = node.store
    hash_limiter = trio.CapacityLimiter(2)
    dummy_hash = hash_password("not-a-password", cfg.auth.scrypt_n)
    a = cfg.auth
    guard = LoginGuard(a.login_failures_per_user_burst, a.login_failures_per_user_per_min,
                       a.login_failures_per_ip_burst, a.login_failures_per_ip_per_min)

    def err(code: str, message: str, status: int | None = None):
        node.metrics.errors.inc(code=code)
        e = ChatError(code, message)
        return {"error": e.to_dict()}, status or e.http_status

    @app.errorhandler(ChatError)
    async def on_chat_error(e: ChatError):
        node.metrics.errors.inc(code=e.code)
        return {"error": e.to_dict()}, e.http_status

    @app.errorhandler(HTTPException)
    async def on_http_error(e: HTTPException):
        body_, status = err(_HTTP_CODES.get(e.code, "bad_request"), e.description or e.name, e.code)
        return body_, status, [h for h in e.get_headers() if h[0] == "Allow"]  # 405 names the methods

    @app.errorhandler(Exception)
    async def on_unexpected(e: Exception):
        log.exception("unexpected error in %s %s", request.method, request.path)
        return err("internal", "internal server error", 500)

    @app.after_request
    async def count(response):
        node.metrics.http_requests.inc(status=str(response.status_code))
        if "started" in g:
            node.metrics.http_latency.observe(time.perf_counter() - g.started)
        return response

    @app.before_request
    async def note_revoked_token():  # current_user() is sync: the store is asked here
        g.token_revoked = await revocation.header_revoked(node.secret, store, request.headers.get("Authorization", ""))

    def current_user() -> tuple[int, str]:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            raise ChatError("not_authenticated", "send 'Authorization: Bearer <token>' (from /v1/login)")
        user = verify_token(node.secret, header[len("Bearer "):].strip())
        if g.get("token_revoked"):
            raise ChatError("invalid_token", revocation.REVOKED_MESSAGE)
        return user

    set_authenticate(app, current_user)

    async def require_member(channel_id: str, user_id: int) -> frozenset[int]:
        if not is_valid_channel_id(channel_id):
            raise ChatError("no_such_channel", f"{channel_id[:70]!r} is not a channel id")
        return await node.membership.require_member(channel_id, user_id)

    # ---- health and metrics --------------------------------------------------------------
    @app.get("/healthz")
    @route(m.Health, auth=False)
    async def healthz():
        return {"status": "ok", "shards": sorted(s.shard_id for s in node.discovery.live()),
                "connections": node.connection_count()}

    @app.get("/metrics")
    @hide  # Prometheus text, not JSON (docs/operations.md)
    async def metrics():
        return Response(node.metrics.render(), content_type=node.metrics.CONTENT_TYPE)

    # ---- users ---------------------------------------------------------------------------
    @app.post("/v1/users")
    @route(m.UserAnswer, 201, body=m.SignUp, errors=(409,), auth=False)
    async def sign_up(data: m.SignUp):
        display = data.username if data.display_name is None else data.display_name
        async with hash_limiter:
            pw_hash = await trio.to_thread.run_sync(hash_password, data.password, cfg.auth.scrypt_n)
        user = await store.create_user(data.username, pw_hash, display, time.time())
        return {"user": user.public()}, 201

    @app.post("/v1/login")
    @route(m.LoginAnswer, body=m.Login, errors=(401, 429, 503), auth=False)
    async def login(data: m.Login):
        name, password, device_id = data.username, data.password, data.device_id
        ip = request.remote_addr or "?"
        wait = guard.retry_after(name, ip, trio.current_time())
        if wait > 0:
            body_, status = err("rate_limited", f"too many failed logins; retry in {math.ceil(wait)} s")
            return body_, status, {"Retry-After": str(math.ceil(wait))}
        user = await store.get_user_by_name(name)
        async with hash_limiter:
            ok = await trio.to_thread.run_sync(verify_password, password,
                                               user.password_hash if user else dummy_hash)
        if user is None or not ok:
            guard.failed(name, ip, trio.current_time())
            raise ChatError("bad_credentials", "wrong username or password")
        guard.succeeded(name)
        if device_id is None or await store.device_owner(device_id) != user.id:
            device_id = secrets.token_hex(8)
            await store.add_device(user.id, device_id, time.time())
        token, expires_at = issue_token(node.secret, user.id, device_id, cfg.auth.token_ttl_s)
        try:
            shard = node.discovery.pick_shard(user.id)
        except LookupError:
            raise ChatError("unavailable", "no chat shard is available; retry") from None
        return {"token": token, "expires_at": expires_at, "user": user.public(), "device_id": device_id,
                "ws_url": shard.ws_url, "shard_id": shard.shard_id}

    @app.get("/v1/users/me")
    @route(m.UserAnswer, errors=(404,))
    async def get_me():
        uid, _ = current_user()
        user = await store.get_user(uid)
        if user is None:
            raise ChatError("no_such_user", "your user no longer exists")
        return {"user": user.public()}

    @app.patch("/v1/users/me")
    @route(m.UserAnswer, body=m.ProfilePatch, errors=(404,))
    async def patch_me(data: m.ProfilePatch):
        uid, _ = current_user()
        user = await store.update_profile(uid, data.display_name, data.about)
        return {"user": user.public()}

    @app.get("/v1/users/by-name/<username>")
    @route(m.UserAnswer, errors=(404,))
    async def get_user_by_name(username: str):
        current_user()
        user = await store.get_user_by_name(username[:64])
        if user is None:
            raise ChatError("no_such_user", f"there is no user named {username[:64]!r}")
        return {"user": user.public()}

    @app.get("/v1/connect")
    @route(m.ConnectAnswer, errors=(503,))
    async def connect_url():
        uid, device_id = current_user()
        try:
            shard = node.discovery.pick_shard(uid)
        except LookupError:
            raise ChatError("unavailable", "no chat shard is available; retry") from None
        return {"ws_url": shard.ws_url, "shard_id": shard.shard_id, "device_id": device_id}

    @app.get("/v1/users/<int:user_id>")
    @route(m.UserAnswer, errors=(404,))
    async def get_user(user_id: int):
        current_user()
        user = await store.get_user(user_id) if user_id <= MAX_INT64 else None
        if user is None:
            raise ChatError("no_such_user", f"user {user_id} does not exist")
        return {"user": user.public()}

    # ---- presence ------------------------------------------------------------------------
    @app.get("/v1/presence")
    @route(m.PresenceAnswer, query=PresenceQuery)
    async def presence_batch(query: m.PresenceQuery):
        current_user()
        ids = list(dict.fromkeys(int(x) for x in query.user_ids.split(",")))  # the model's pattern checked them
        users = await node.presence.statuses(ids)
        return {"users": {str(u): st for u, st in users.items()}}

    @app.get("/v1/users/<int:user_id>/presence")
    @route(m.UserPresence, errors=(404,))
    async def presence_one(user_id: int):
        current_user()
        if not 1 <= user_id <= MAX_INT64 or await store.get_user(user_id) is None:
            raise ChatError("no_such_user", f"user {user_id} does not exist")
        return {"user_id": user_id, **(await node.presence.statuses([user_id]))[user_id]}

    @app.post("/v1/logout")
    @route(m.LogoutAnswer)
    async def logout():
        uid, device_id = current_user()
        token = revocation.bearer(request.headers["Authorization"])
        _, _, expires_at = token_claims(node.secret, token)
        await revocation.log_out(node, uid, device_id, revocation.token_key(token), expires_at)
        return {"user_id": uid, "device_id": device_id, "logged_out": True}

    # ---- channels ------------------------------------------------------------------------
    @app.post("/v1/groups")
    @route(m.GroupAnswer, 201, body=GroupCreate, errors=(404, 409))
    async def create_group(data: m.GroupCreate):
        uid, _ = current_user()
        name, members = data.name, data.members
        channel = await store.create_group(new_group_id(), name, uid, members, time.time(),
                                           cfg.limits.max_group_members)
        return {"channel": {"id": channel.id, "kind": "group", "name": channel.name, "owner_id": uid,
                            "members": await store.members(channel.id)}}, 201

    @app.get("/v1/channels")
    @route(m.ChannelList)
    async def my_channels():
        uid, _ = current_user()
        out = []
        for c in await store.channels_of(uid):
            item = {"id": c.id, "kind": c.kind, "name": c.name, "last_seq": c.last_seq,
                    "read_seq": c.read_seq, "unread": c.unread, "last_at": c.last_at}
            pair = dm_members(c.id)
            if pair:
                item["peer_id"] = pair[1] if pair[0] == uid else pair[0]
            out.append(item)
        return {"channels": out}

    @app.get("/v1/dm/<int:peer_id>")
    @route(m.DmAnswer, errors=(404,))
    async def dm_channel(peer_id: int):
        uid, _ = current_user()
        if peer_id == uid or peer_id > MAX_INT64 or await store.get_user(peer_id) is None:
            raise ChatError("no_such_user", f"user {peer_id} does not exist (or is you)")
        return {"channel_id": dm_channel_id(uid, peer_id)}

    @app.get("/v1/channels/<string:channel_id>/members")
    @route(m.Members, errors=(403, 404))
    async def channel_members(channel_id: str):
        uid, _ = current_user()
        members = await require_member(channel_id, uid)
        channel = await store.get_channel(channel_id) if is_group(channel_id) else None
        return {"channel_id": channel_id, "members": sorted(members),
                "owner_id": channel.owner_id if channel else None}

    async def group_for_change(channel_id: str, uid: int):
        if not is_valid_channel_id(channel_id) or not is_group(channel_id):
            raise ChatError("no_such_channel", "membership changes need a group channel id")
        channel = await store.get_channel(channel_id)
        if channel is None:
            raise ChatError("no_such_channel", f"channel {channel_id} does not exist")
        return channel

    @app.post("/v1/channels/<string:channel_id>/members")
    @route(m.MemberAdded, body=m.MemberAdd, errors=(403, 404, 409))
    async def add_member(channel_id: str, data: m.MemberAdd):
        uid, _ = current_user()
        channel = await group_for_change(channel_id, uid)
        if channel.owner_id != uid:
            raise ChatError("forbidden", "only the group's owner adds members")
        new = data.user_id
        added = await store.add_member(channel_id, new, cfg.limits.max_group_members, time.time())
        node.membership_changed(channel_id)
        if added:
            await announce_member_change(node, "member_added", channel_id, new, uid)
        return {"channel_id": channel_id, "user_id": new, "added": added}

    @app.delete("/v1/channels/<string:channel_id>/members/<int:member_id>")
    @route(m.MemberRemoved, errors=(403, 404))
    async def remove_member(channel_id: str, member_id: int):
        uid, _ = current_user()
        channel = await group_for_change(channel_id, uid)
        if not 1 <= member_id <= MAX_INT64:
            raise ChatError("no_such_user", f"user {member_id} does not exist")
        if uid not in (channel.owner_id, member_id):
            raise ChatError("forbidden", "only the group's owner removes others; anyone may leave")
        removed = await store.remove_member(channel_id, member_id)
        node.membership_changed(channel_id)
        if removed:
            await announce_member_change(node, "member_removed", channel_id, member_id, uid)
        return {"channel_id": channel_id, "user_id": member_id, "removed": removed}

    @app.get("/v1/channels/<string:channel_id>/messages")
    @route(m.History, query=HistoryQuery, errors=(403, 404))
    async def history(channel_id: str, query: m.HistoryQuery):
        uid, _ = current_user()
        await require_member(channel_id, uid)
        after, before = m.unset_to_none(query.after), m.unset_to_none(query.before)
        msgs, more = await read_page(store, channel_id, after, before, query.limit)
        return {"channel_id": channel_id, "messages": [message_frame(m) for m in msgs], "more": more}

    # ---- push tokens (docs/push.md) ----------------------------------------------------------
    def push_tokens_changed(uid: int) -> None:
        push = getattr(node, "push", None)
        if push is not None:
            push.tokens_changed(uid)

    @app.post("/v1/push/tokens")
    @route(m.PushTokenAnswer, 201, body=m.PushTokenCreate)
    async def register_push_token(data: m.PushTokenCreate):
        uid, device_id = current_user()
        registered = PushToken(uid, device_id, data.provider, data.token, data.app_id, time.time())
        await store.add_push_token(registered)
        push_tokens_changed(uid)
        return {"push_token": registered.public()}, 201

    @app.get("/v1/push/tokens")
    @route(m.PushTokens)
    async def list_push_tokens():
        uid, _ = current_user()
        return {"push_tokens": [t.public() for t in await store.push_tokens(uid)]}

    @app.delete("/v1/push/tokens")
    @route(m.Removed, body=m.PushTokenDelete)
    async def unregister_push_tokens(data: m.PushTokenDelete):
        uid, device_id = current_user()
        token = data.token  # no body (or no token): every token of this device; {"token": ...}: that one
        targets = [token] if token is not None else \
            [t.token for t in await store.push_tokens(uid) if t.device_id == device_id]
        removed = 0
        for t in targets:
            removed += await store.remove_push_token(uid, t)
        push_tokens_changed(uid)
        return {"removed": removed}

    add_web_client(app)
    return app
