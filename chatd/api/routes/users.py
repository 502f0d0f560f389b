"""Users and their tokens: sign-up (``POST /v1/users``), login, logout, where to connect, the
caller's profile (``/v1/users/me``) and other users by id or name.

Password hashing (scrypt, memory-hard) runs in worker threads, at most two at a time, for sign-up
and login alike; a login for an unknown name hashes a dummy password, so the answer's timing does
not tell which names exist. Failed logins are throttled per name and per client address
(:class:`~chatd.api.loginguard.LoginGuard`): ``rate_limited`` (429) with ``Retry-After``, before any
hashing.

Errors: ``username_taken`` (409); ``bad_credentials`` (401, wrong name or password alike);
``no_such_user`` (404); no live shard to hand out is ``unavailable`` (503); a logout's store
failure is ``unavailable`` with nothing revoked (:func:`chatd.revocation.log_out`).
"""

from __future__ import annotations

import math
import secrets
import time

import trio
from quart import request
from quart_trio import QuartTrio

from ... import revocation
from ...auth import hash_password, issue_token, verify_password
from ...errors import ChatError
from ...ids import MAX_INT64
from .. import models as m
from ..caller import Caller
from ..common import error_answer, shard_for
from ..host import ApiHost
from ..loginguard import LoginGuard
from ..spec import route

HASHING_THREADS = 2


def register(app: QuartTrio, node: ApiHost) -> None:
    store, auth = node.store, node.config.auth
    hashing = trio.CapacityLimiter(HASHING_THREADS)
    dummy_hash = hash_password("not-a-password", auth.scrypt_n)
    guard = LoginGuard(auth.login_failures_per_user_burst, auth.login_failures_per_user_per_min,
                       auth.login_failures_per_ip_burst, auth.login_failures_per_ip_per_min)

    @app.post("/v1/users")
    @route(m.UserAnswer, 201, body=m.SignUp, errors=(409,), auth=False)
    async def sign_up(data: m.SignUp):
        display = data.username if data.display_name is None else data.display_name
        async with hashing:
            pw_hash = await trio.to_thread.run_sync(hash_password, data.password, auth.scrypt_n)
        user = await store.create_user(data.username, pw_hash, display, time.time())
        return {"user": user.public()}, 201

    @app.post("/v1/login")
    @route(m.LoginAnswer, body=m.Login, errors=(401, 429, 503), auth=False)
    async def login(data: m.Login):
        name, password, device_id = data.username, data.password, data.device_id
        ip = request.remote_addr or "?"
        wait = guard.retry_after(name, ip, trio.current_time())
        if wait > 0:
            body, status = error_answer(node.metrics, "rate_limited",
                                        f"too many failed logins; retry in {math.ceil(wait)} s")
            return body, status, {"Retry-After": str(math.ceil(wait))}
        user = await store.get_user_by_name(name)
        async with hashing:
            ok = await trio.to_thread.run_sync(verify_password, password,
                                               user.password_hash if user else dummy_hash)
        if user is None or not ok:
            guard.failed(name, ip, trio.current_time())
            raise ChatError("bad_credentials", "wrong username or password")
        guard.succeeded(name)
        if device_id is None or await store.device_owner(device_id) != user.id:
            device_id = secrets.token_hex(8)
            await store.add_device(user.id, device_id, time.time())
        token, expires_at = issue_token(node.secret, user.id, device_id, auth.token_ttl_s)
        shard = shard_for(node.discovery, user.id)
        return {"token": token, "expires_at": expires_at, "user": user.public(), "device_id": device_id,
                "ws_url": shard.ws_url, "shard_id": shard.shard_id}

    @app.get("/v1/users/me")
    @route(m.UserAnswer, errors=(404,))
    async def get_me(caller: Caller):
        user = await store.get_user(caller.user_id)
        if user is None:
            raise ChatError("no_such_user", "your user no longer exists")
        return {"user": user.public()}

    @app.patch("/v1/users/me")
    @route(m.UserAnswer, body=m.ProfilePatch, errors=(404,))
    async def patch_me(data: m.ProfilePatch, caller: Caller):
        user = await store.update_profile(caller.user_id, data.display_name, data.about)
        return {"user": user.public()}

    @app.get("/v1/users/by-name/<username>")
    @route(m.UserAnswer, errors=(404,))
    async def get_user_by_name(username: str):
        user = await store.get_user_by_name(username[:64])
        if user is None:
            raise ChatError("no_such_user", f"there is no user named {username[:64]!r}")
        return {"user": user.public()}

    @app.get("/v1/connect")
    @route(m.ConnectAnswer, errors=(503,))
    async def connect_url(caller: Caller):
        shard = shard_for(node.discovery, caller.user_id)
        return {"ws_url": shard.ws_url, "shard_id": shard.shard_id, "device_id": caller.device_id}

    @app.get("/v1/users/<int:user_id>")
    @route(m.UserAnswer, errors=(404,))
    async def get_user(user_id: int):
        user = await store.get_user(user_id) if user_id <= MAX_INT64 else None
        if user is None:
            raise ChatError("no_such_user", f"user {user_id} does not exist")
        return {"user": user.public()}

    @app.post("/v1/logout")
    @route(m.LogoutAnswer)
    async def logout(caller: Caller):
        await revocation.log_out(node, caller.user_id, caller.device_id, caller.token_key, caller.expires_at)
        return {"user_id": caller.user_id, "device_id": caller.device_id, "logged_out": True}
