"""Users and their tokens: sign-up (``POST /v1/users``), login, logout (of the caller's device, or
with ``all`` of every device of the user), the user's devices (``GET /v1/devices``, ``DELETE
/v1/devices/<id>``), password change (``POST /v1/users/me/password``), where to connect, the caller's
profile (``/v1/users/me``) and other users by id or name.

Sessions (:mod:`chatd.revocation`): a logout revokes the token and every older token of its
device; ``all``, a device's removal and a password change revoke every token of the user (or of
the device) issued before them, on every API server and shard, and close those WebSockets with
4001. A password change re-issues the caller's session: its answer carries a fresh token for the
same device, the only token of the user that still works afterwards. The old password is checked
like a login (throttled per device and address; a wrong one is ``forbidden``, 403, so that a
client does not take it for a dead token); the new hash is stored before the revocation, so a
``unavailable`` answer may leave the password changed and the old tokens alive: retry with the
new password as ``old_password``.

Password hashing (scrypt, memory-hard) runs in worker threads, logins and sign-ups in pools of
their own with bounded queues (:mod:`chatd.api.hashing`); a login for an unknown name hashes a
dummy password, so the answer's timing does not tell which names exist; a successful login re-hashes
a password hashed with weaker parameters than ``auth.scrypt_n`` (best effort: a busy pool or a store
failure leaves the old hash, which still works). Failed logins are throttled per name, per known
device and per client address (:class:`~chatd.api.loginguard.LoginGuard`; the address is
:func:`~chatd.api.clientaddr.request_address`), sign-ups per client address: ``rate_limited``
(429) with ``Retry-After``, before any hashing. Who may sign up is ``auth.registration``; with
``"invite"`` the body carries an invite (``chatd admin invite``), whose use is counted in the store
after the name was found free. Every outcome is a security event (:mod:`chatd.api.securitylog`).

Errors: ``username_taken`` (409); ``bad_credentials`` (401, wrong name or password alike);
``registration_closed`` / ``invite_invalid`` (403); ``bad_field`` (400) for a display name with
control or format characters (:mod:`chatd.api.names`); ``no_such_user`` (404); no live shard to
hand out, or a hashing queue over its bound, is ``unavailable`` (503, the latter with
``Retry-After``); a logout's store failure is ``unavailable`` with nothing revoked
(:func:`chatd.revocation.log_out`); a device the caller does not have is ``not_found`` (404).
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import secrets
import time

import trio
from quart_trio import QuartTrio

from ... import revocation
from ...auth import hash_password, invite_claims, issue_token, needs_rehash, verify_password
from ...errors import ChatError
from ...ids import MAX_INT64
from .. import models as m
from .. import securitylog as security
from ..caller import Caller
from ..clientaddr import parse_networks, request_address
from ..common import error_answer, shard_for, transport_urls
from ..hashing import HashingPool, retry_after_header
from ..host import ApiHost
from ..loginguard import BucketTable, LoginGuard
from ..names import check_name
from ..spec import route

def register(app: QuartTrio, node: ApiHost) -> None:
    store, auth = node.store, node.config.auth
    login_hashing = HashingPool("login", auth.login_hashing_threads, auth.hashing_queue_max)
    signup_hashing = HashingPool("sign-up", auth.signup_hashing_threads, auth.hashing_queue_max)
    dummy_hash = hash_password("not-a-password", auth.scrypt_n)
    guard = LoginGuard(auth.login_failures_per_user_burst, auth.login_failures_per_user_per_min,
                       auth.login_failures_per_ip_burst, auth.login_failures_per_ip_per_min)
    signups = BucketTable(auth.signups_per_ip_per_hour / 3600.0, auth.signups_per_ip_burst)
    unthrottled = parse_networks(auth.signups_unthrottled)

    def signup_wait(addr: str) -> float:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            ip = None
        if ip is not None and any(ip in net for net in unthrottled):
            return 0.0
        return signups.take(addr, trio.current_time())

    def throttled(message: str, wait: float):
        body, status = error_answer(node.metrics, "rate_limited", f"{message}; retry in {math.ceil(wait)} s")
        return body, status, retry_after_header(wait)

    async def check_invite(invite: str | None, addr: str) -> tuple[str, int, int] | None:
        """The invite's claims when sign-up needs one (``auth.registration``), else None."""
        if auth.registration == "closed":
            security.event("signup", "refused", reason="closed", addr=addr)
            raise ChatError("registration_closed", "sign-up is closed on this server")
        if auth.registration == "open":
            return None
        if invite is None:
            security.event("signup", "refused", reason="invite", addr=addr)
            raise ChatError("invite_invalid", "sign-up on this server needs an invite (field 'invite')")
        try:
            return invite_claims(node.secret, invite)
        except ChatError:
            security.event("signup", "refused", reason="invite", addr=addr)
            raise

    @app.post("/v1/users")
    @route(m.UserAnswer, 201, body=m.SignUp, errors=(403, 409, 429, 503), auth=False)
    async def sign_up(data: m.SignUp):
        addr = request_address()
        invite = await check_invite(data.invite, addr)
        display = data.username if data.display_name is None else check_name("display_name", data.display_name)
        wait = signup_wait(addr)
        if wait > 0:
            security.event("signup", "refused", reason="throttled", addr=addr)
            return throttled("too many sign-ups from your address", wait)
        try:
            pw_hash = await signup_hashing.run(hash_password, data.password, auth.scrypt_n)
        except ChatError:
            security.event("signup", "refused", reason="busy", addr=addr)
            raise
        if invite is not None:
            if await store.get_user_by_name(data.username) is not None:  # spend no use on a taken name
                raise ChatError("username_taken", f"username {data.username!r} is taken")
            if not await store.use_invite(*invite):
                security.event("signup", "refused", reason="invite", addr=addr)
                raise ChatError("invite_invalid", "the invite has been used up")
        try:
            user = await store.create_user(data.username, pw_hash, display, time.time())
        except ChatError as e:
            if e.code == "username_taken":
                security.event("signup", "refused", reason="taken", addr=addr)
            raise
        if invite is not None:
            security.event("invite", "used", invite_id=invite[0], user=user.id, addr=addr)
        security.event("signup", "ok", user=user.id, username=user.username, addr=addr)
        return {"user": user.public()}, 201

    @app.post("/v1/login")
    @route(m.LoginAnswer, body=m.Login, errors=(401, 429, 503), auth=False)
    async def login(data: m.Login):
        name, password, device_id = data.username, data.password, data.device_id
        addr = request_address()
        user = await store.get_user_by_name(name)
        # a device the account already has; looked up whether or not the name exists (same timing)
        owner = await store.device_owner(device_id) if device_id is not None else None
        known = device_id if user is not None and owner == user.id else None
        wait = guard.retry_after(name, addr, trio.current_time(), known)
        if wait > 0:
            security.event("login", "throttled", user=user.id if user else None, device=known,
                           username=name, addr=addr)
            return throttled("too many failed logins", wait)
        try:
            ok = await login_hashing.run(verify_password, password, user.password_hash if user else dummy_hash)
        except ChatError:
            security.event("login", "busy", username=name, addr=addr)
            raise
        if user is None or not ok:
            guard.failed(name, addr, trio.current_time(), known)
            security.event("login", "failed", user=user.id if user else None, device=known, username=name,
                           addr=addr)
            raise ChatError("bad_credentials", "wrong username or password")
        guard.succeeded(name, known)
        if needs_rehash(user.password_hash, auth.scrypt_n):
            with contextlib.suppress(ChatError):  # the old hash still works: a busy pool or store waits
                await store.set_password_hash(user.id, await login_hashing.run(hash_password, password,
                                                                               auth.scrypt_n))
        if known is None:
            device_id = secrets.token_hex(8)
        token, expires_at = issue_token(node.secret, user.id, device_id, auth.token_ttl_s)
        # read after the token's iat: a disable that wrote its cut-off before the iat wrote its
        # flag before this read (chatd admin: flag first, then the cut-off)
        current = await store.get_user(user.id)
        if current is None or current.disabled:
            security.event("login", "disabled", user=user.id, device=device_id, addr=addr)
            raise ChatError("account_disabled", "this account is disabled; ask the operator")
        await store.add_device(user.id, device_id, time.time())  # its first or latest login
        shard = shard_for(node.discovery, user.id)
        security.event("login", "ok", user=user.id, device=device_id, addr=addr)
        return {"token": token, "expires_at": expires_at, "user": user.public(), "device_id": device_id,
                **transport_urls(shard)}

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
        if data.display_name is not None:
            check_name("display_name", data.display_name)
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
        return {**transport_urls(shard), "device_id": caller.device_id}

    @app.get("/v1/users/<int:user_id>")
    @route(m.UserAnswer, errors=(404,))
    async def get_user(user_id: int):
        user = await store.get_user(user_id) if user_id <= MAX_INT64 else None
        if user is None:
            raise ChatError("no_such_user", f"user {user_id} does not exist")
        return {"user": user.public()}

    @app.post("/v1/logout")
    @route(m.LogoutAnswer, body=m.LogoutRequest)
    async def logout(data: m.LogoutRequest, caller: Caller):
        if data.all:
            devices = [d.id for d in await store.devices_of(caller.user_id)]
            await store.revoke_token(caller.token_key, caller.user_id, caller.device_id, float(caller.expires_at))
            await revocation.log_out_before(node, caller.user_id, None, list(dict.fromkeys([caller.device_id, *devices])))
        else:
            await revocation.log_out(node, caller.user_id, caller.device_id, caller.token_key, caller.expires_at)
        security.event("logout", "ok", user=caller.user_id, device=caller.device_id, all=data.all or None,
                       addr=request_address())
        return {"user_id": caller.user_id, "device_id": caller.device_id, "logged_out": True, "all": data.all}

    @app.get("/v1/devices")
    @route(m.DeviceList)
    async def list_devices(caller: Caller):
        return {"devices": [{"id": d.id, "created_at": d.created_at, "last_login_at": d.last_login_at,
                             "current": d.id == caller.device_id} for d in await store.devices_of(caller.user_id)]}

    @app.delete("/v1/devices/<device_id>")
    @route(m.DeviceLoggedOut, errors=(404,))
    async def delete_device(device_id: str, caller: Caller):
        if len(device_id) > 64 or await store.device_owner(device_id) != caller.user_id:
            raise ChatError("not_found", f"you have no device {device_id[:64]!r}")
        if device_id == caller.device_id:  # its own token by key too (whatever the issuing server's clock)
            await store.revoke_token(caller.token_key, caller.user_id, caller.device_id, float(caller.expires_at))
        await revocation.log_out_before(node, caller.user_id, device_id, [device_id])
        security.event("device", "logged_out", user=caller.user_id, device=device_id, by=caller.device_id,
                       addr=request_address())
        return {"device_id": device_id, "logged_out": True}

    @app.post("/v1/users/me/password")
    @route(m.PasswordChanged, body=m.PasswordChange, errors=(403, 404, 429, 503))
    async def change_password(data: m.PasswordChange, caller: Caller):
        addr = request_address()
        user = await store.get_user(caller.user_id)
        if user is None:
            raise ChatError("no_such_user", "your user no longer exists")
        wait = guard.retry_after(user.username, addr, trio.current_time(), caller.device_id)
        if wait > 0:
            security.event("password", "throttled", user=user.id, device=caller.device_id, addr=addr)
            return throttled("too many wrong passwords", wait)
        if not await login_hashing.run(verify_password, data.old_password, user.password_hash):
            guard.failed(user.username, addr, trio.current_time(), caller.device_id)
            security.event("password", "failed", user=user.id, device=caller.device_id, addr=addr)
            raise ChatError("forbidden", "the old password is wrong")
        guard.succeeded(user.username, caller.device_id)
        await store.set_password_hash(user.id, await login_hashing.run(hash_password, data.new_password,
                                                                       auth.scrypt_n))
        devices = [d.id for d in await store.devices_of(user.id)]
        await store.revoke_token(caller.token_key, user.id, caller.device_id, float(caller.expires_at))
        await revocation.log_out_before(node, user.id, None, [d for d in devices if d != caller.device_id])
        await store.add_device(user.id, caller.device_id, time.time())  # listed again: its new session
        token, expires_at = issue_token(node.secret, user.id, caller.device_id, auth.token_ttl_s)
        security.event("password", "changed", user=user.id, device=caller.device_id, addr=addr)
        return {"token": token, "expires_at": expires_at, "device_id": caller.device_id}
