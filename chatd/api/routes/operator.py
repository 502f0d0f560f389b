"""The operator routes, ``/v1/admin/...``: what ``chatd admin`` asks an API server to do (users,
devices, channels, stats). Only for an admin token (:mod:`chatd.api.adminauth`); every change is a
security event (``event=admin``).

Why through an API server and not straight into the store: the effects must reach every process
at once, and an API server already has the paths that do it. A disable, a password reset, an erase
and a device revocation write a cut-off (:func:`chatd.revocation.log_out_before`), which this server
broadcasts to every shard (link frame ``logout_all``; in ``chatd run``, its own shard) so their
sockets close with 4001; every API server checks the store on each request. A membership change
goes through the same store calls as the user routes, then ``invalidate`` to every shard and a
``member_added``/``member_removed`` event (``by`` 0: an operator) to the members' devices.

Each answer carries ``done``, the one line ``chatd admin`` prints. Listing scans the store in pages
(``Store.export_rows``: a position ``next`` to pass back as ``after``); ``search`` and ``stats``
scan it whole (on Cassandra: a full table scan; run them off-peak on a large keyspace).

A purge (history before a date) is retention applied to one channel now (``Store.expire_messages``:
the oldest messages go, what is kept stays one gap-free range, devices learn the horizon at their
next ``sync``).

A moderation delete and an erase redact messages through the lifecycle's ``delete``
(chatd/lifecycle.py), forced and by the operator (user 0), sent to each channel's owner
(``node.append_system_event``: in a cluster over the link to the owner shard): the owner erases the
body, every edit and the reactions from the store, releases the message's media, and the ``delete``
row takes the channel's next seq, so every device sees it live and by ``sync``. Its
``client_msg_id`` is ``admin-delete:<seq>``: a command run again after ``unavailable`` does not add
a second row. An erase pages through each of the user's channels (``ERASE_PAGE`` rows a read) and
redacts every message the user sent: its work grows with the size of those channels.
"""

from __future__ import annotations

import json
import os
import secrets
import time

import trio
from msgspec import Struct
from quart import request
from quart_trio import QuartTrio

from ...auth import hash_password
from ...errors import ChatError
from ...ids import MAX_INT64, is_group, is_valid_channel_id
from ...lifecycle import DELETE, MESSAGE, EventSpec
from ...membership import announce_member_change
from ...revocation import log_out_before
from ...store.records import KINDS
from .. import securitylog as security
from ..adminauth import check_admin_token
from ..host import ApiHost
from ..spec import route

KIND = KINDS["messages"].index("kind")  # a message record's kind field (None: a message)

OPERATOR = 0  # the ``by`` of an operator's membership change
PAGE_MAX = 1000
ERASE_PAGE = 500  # rows of a channel read at a time while an erase looks for the user's messages


class UserRef(Struct):
    user: str  # a user id or a username


class Purge(Struct):
    before: float  # unix seconds: every message written before it goes (and those below them)


class PasswordReset(Struct):
    password: str = ""  # empty: a random one is made and returned


def register(app: QuartTrio, node: ApiHost) -> None:
    store, limits = node.store, node.config.limits

    def admin() -> None:
        check_admin_token(node.secret, request.headers.get("Authorization", ""))

    def done(action: str, text: str, **fields) -> dict:
        security.event("admin", action, **{k: v for k, v in fields.items() if isinstance(v, (int, str))})
        return {"done": text, **fields}

    async def user_of(ref: str):
        user = None
        if ref.isdigit() and 1 <= int(ref) <= MAX_INT64:
            user = await store.get_user(int(ref))
        if user is None:
            user = await store.get_user_by_name(ref)
        if user is None:
            raise ChatError("no_such_user", f"no user {ref!r} (give an id or a username)")
        return user

    def view(user) -> dict:
        return {**user.public(), "disabled": user.disabled}

    def page_args() -> tuple[object, int]:
        try:
            limit = int(request.args.get("limit", "100"))
            after = json.loads(request.args["after"]) if request.args.get("after") else None
        except ValueError:
            raise ChatError("bad_field", "limit must be an integer and after a position from a previous page") \
                from None
        if not 1 <= limit <= PAGE_MAX:
            raise ChatError("bad_field", f"limit must be 1..{PAGE_MAX}")
        return after, limit

    async def group_of(channel_id: str):
        if not is_valid_channel_id(channel_id):
            raise ChatError("no_such_channel", f"no channel {channel_id!r}")
        channel = await store.get_channel(channel_id)
        if channel is None:
            raise ChatError("no_such_channel", f"no channel {channel_id!r}")
        return channel

    async def redact(channel_id: str, seq: int):
        """The lifecycle ``delete`` of message ``seq``, forced, by the operator, through its owner."""
        return await node.append_system_event(OPERATOR, channel_id, EventSpec(DELETE, target_seq=seq),
                                              f"admin-delete:{seq}", force=True)

    async def erase_bodies(user_id: int, channel_ids: list[str]) -> int:
        """Redact every message ``user_id`` sent in these channels, a page of rows at a time."""
        erased = 0
        for channel_id in channel_ids:
            after, head = 0, await store.head_seq(channel_id)  # (the deletes added below are not read)
            while after < head:
                rows = await store.read_messages(channel_id, after=after, before=head + 1, limit=ERASE_PAGE)
                if not rows:
                    break
                for m in rows:
                    if m.sender_id == user_id and m.kind == MESSAGE and not m.deleted_at:
                        await redact(channel_id, m.seq)
                        erased += 1
                after = rows[-1].seq
        return erased

    # ---- users -----------------------------------------------------------------------------
    @app.get("/v1/admin/users")
    @route(auth=False, errors=(401,))
    async def admin_users():
        admin()
        after, limit = page_args()
        query = request.args.get("q", "").casefold()
        users, nxt = [], None
        while True:
            rows, after = await store.export_rows("users", after, limit)
            for r in rows:
                if not query or query in r[1].casefold() or query in r[3].casefold():
                    users.append({"id": r[0], "username": r[1], "display_name": r[3], "created_at": r[5],
                                  "disabled": bool(r[6])})
            if not query or after is None:  # a search reads every page; a listing one
                nxt = after
                break
        what = f"matching {query!r}" if query else ""
        return {"done": f"{len(users)} users {what}".strip(), "users": users,
                "next": None if nxt is None else json.dumps(nxt)}

    @app.get("/v1/admin/users/<string:ref>")
    @route(auth=False, errors=(401, 404))
    async def admin_user(ref: str):
        admin()
        user = await user_of(ref)
        devices = await store.devices_of(user.id)
        channels = await store.channels_of(user.id)
        state = "disabled" if user.disabled else "enabled"
        return {"done": f"user {user.id} {user.username!r}: {state}, {len(devices)} devices, "
                        f"{len(channels)} channels", "user": view(user),
                "devices": [{"id": d.id, "created_at": d.created_at, "last_login_at": d.last_login_at}
                            for d in devices],
                "channels": [{"id": c.id, "kind": c.kind, "name": c.name, "last_seq": c.last_seq} for c in channels]}

    async def revoke_all(user_id: int) -> int:
        devices = [d.id for d in await store.devices_of(user_id)]
        await log_out_before(node, user_id, None, devices)
        return len(devices)

    @app.post("/v1/admin/users/<string:ref>/disable")
    @route(auth=False, errors=(401, 404))
    async def admin_disable(ref: str):
        admin()
        user = await user_of(ref)
        await store.set_user_disabled(user.id, True)  # first: a login from now on is refused ...
        n = await revoke_all(user.id)  # ... and every token issued before this is revoked
        return done("disable", f"disabled user {user.id} {user.username!r}: logins refused, {n} devices "
                               "logged out, their connections closed", user_id=user.id)

    @app.post("/v1/admin/users/<string:ref>/enable")
    @route(auth=False, errors=(401, 404))
    async def admin_enable(ref: str):
        admin()
        user = await user_of(ref)
        await store.set_user_disabled(user.id, False)
        return done("enable", f"enabled user {user.id} {user.username!r}: they may log in again", user_id=user.id)

    @app.post("/v1/admin/users/<string:ref>/password")
    @route(auth=False, body=PasswordReset, errors=(401, 404))
    async def admin_password(ref: str, data: PasswordReset):
        admin()
        user = await user_of(ref)
        password = data.password or secrets.token_urlsafe(12)
        if len(password) < 8:
            raise ChatError("bad_field", "a password has at least 8 characters")
        await store.set_password_hash(user.id, await trio.to_thread.run_sync(
            hash_password, password, node.config.auth.scrypt_n))
        n = await revoke_all(user.id)
        answer = done("reset_password", f"reset the password of user {user.id} {user.username!r}; {n} devices "
                                        "logged out", user_id=user.id)
        if not data.password:
            answer["password"] = password
        return answer

    @app.post("/v1/admin/users/<string:ref>/erase")
    @route(auth=False, errors=(401, 404))
    async def admin_erase(ref: str):
        admin()
        user = await user_of(ref)
        await store.set_user_disabled(user.id, True)
        n = await revoke_all(user.id)
        tokens = await store.push_tokens(user.id)
        for t in tokens:
            await store.remove_push_token(user.id, t.token)
        # the bodies first, then the removals: an erase cut off half-way, run again, still finds the groups
        channels = await store.channels_of(user.id)
        bodies = await erase_bodies(user.id, [c.id for c in channels])
        left = 0
        for c in channels:
            if c.kind == "group" and await store.remove_member(c.id, user.id):
                node.membership_changed(c.id)
                await announce_member_change(node, "member_removed", c.id, user.id, OPERATOR)
                left += 1
        anonymous = f"deleted-{user.id}"
        await store.rename_user(user.id, anonymous)
        await store.update_profile(user.id, "", "")
        await store.set_password_hash(user.id, "!erased")  # matches no password
        return done("erase", f"erased user {user.id}: now {anonymous!r}, {n} devices logged out, {len(tokens)} push "
                             f"tokens dropped, removed from {left} groups, {bodies} messages erased "
                             f"in {len(channels)} channels",
                    user_id=user.id, username=anonymous, bodies=bodies)

    # ---- devices ----------------------------------------------------------------------------
    @app.get("/v1/admin/users/<string:ref>/devices")
    @route(auth=False, errors=(401, 404))
    async def admin_devices(ref: str):
        admin()
        user = await user_of(ref)
        devices = await store.devices_of(user.id)
        return {"done": f"user {user.id} {user.username!r} has {len(devices)} devices",
                "devices": [{"id": d.id, "created_at": d.created_at, "last_login_at": d.last_login_at}
                            for d in devices]}

    @app.delete("/v1/admin/users/<string:ref>/devices/<string:device_id>")
    @route(auth=False, errors=(401, 404))
    async def admin_revoke_device(ref: str, device_id: str):
        admin()
        user = await user_of(ref)
        if device_id not in {d.id for d in await store.devices_of(user.id)}:
            raise ChatError("not_found", f"user {user.id} has no device {device_id!r} logged in")
        await log_out_before(node, user.id, device_id, [device_id])
        return done("revoke_device", f"logged out device {device_id} of user {user.id} {user.username!r}",
                    user_id=user.id, device_id=device_id)

    # ---- channels ---------------------------------------------------------------------------
    @app.get("/v1/admin/channels")
    @route(auth=False, errors=(401,))
    async def admin_channels():
        admin()
        after, limit = page_args()
        rows, nxt = await store.export_rows("channels", after, limit)
        channels = [{"id": r[0], "kind": r[1], "name": r[2], "owner_id": r[3], "created_at": r[4],
                     "last_seq": r[5], "last_at": r[6]} for r in rows]
        return {"done": f"{len(channels)} channels", "channels": channels,
                "next": None if nxt is None else json.dumps(nxt)}

    @app.get("/v1/admin/channels/<string:channel_id>")
    @route(auth=False, errors=(401, 404))
    async def admin_channel(channel_id: str):
        admin()
        channel = await group_of(channel_id)
        members = await store.members(channel_id)
        return {"done": f"{channel.kind} {channel.id} {channel.name!r}: {len(members)} members, owner "
                        f"{channel.owner_id}, {channel.last_seq} messages",
                "channel": {"id": channel.id, "kind": channel.kind, "name": channel.name, "owner_id": channel.owner_id,
                            "created_at": channel.created_at, "last_seq": channel.last_seq},
                "members": members}

    async def group_for_change(channel_id: str):
        channel = await group_of(channel_id)
        if not is_group(channel_id):
            raise ChatError("no_such_channel", "membership changes need a group channel")
        return channel

    @app.post("/v1/admin/channels/<string:channel_id>/members")
    @route(auth=False, body=UserRef, errors=(401, 404, 409))
    async def admin_add_member(channel_id: str, data: UserRef):
        admin()
        await group_for_change(channel_id)
        user = await user_of(data.user)
        added = await store.add_member(channel_id, user.id, limits.max_group_members, time.time())
        node.membership_changed(channel_id)
        if added:
            await announce_member_change(node, "member_added", channel_id, user.id, OPERATOR)
        verb = "added" if added else "already a member:"
        return done("add_member", f"{verb} user {user.id} {user.username!r} to {channel_id}", channel_id=channel_id,
                    user_id=user.id, added=added)

    @app.delete("/v1/admin/channels/<string:channel_id>/members/<string:ref>")
    @route(auth=False, errors=(401, 404))
    async def admin_remove_member(channel_id: str, ref: str):
        admin()
        channel = await group_for_change(channel_id)
        user = await user_of(ref)
        if user.id == channel.owner_id:
            raise ChatError("forbidden", "the owner cannot be removed: transfer the ownership first")
        removed = await store.remove_member(channel_id, user.id)
        node.membership_changed(channel_id)
        if removed:
            await announce_member_change(node, "member_removed", channel_id, user.id, OPERATOR)
        verb = "removed" if removed else "not a member:"
        return done("remove_member", f"{verb} user {user.id} {user.username!r} from {channel_id}",
                    channel_id=channel_id, user_id=user.id, removed=removed)

    @app.post("/v1/admin/channels/<string:channel_id>/owner")
    @route(auth=False, body=UserRef, errors=(401, 403, 404))
    async def admin_transfer(channel_id: str, data: UserRef):
        admin()
        channel = await group_for_change(channel_id)
        user = await user_of(data.user)
        if user.id not in await store.members(channel_id):
            raise ChatError("forbidden", f"user {user.id} is not a member of {channel_id}: add them first")
        await store.set_owner(channel_id, user.id)
        return done("transfer", f"{channel_id} is now owned by user {user.id} {user.username!r} "
                                f"(was {channel.owner_id})", channel_id=channel_id, user_id=user.id)

    @app.post("/v1/admin/channels/<string:channel_id>/purge")
    @route(auth=False, body=Purge, errors=(401, 404))
    async def admin_purge(channel_id: str, data: Purge):
        admin()
        channel = await group_of(channel_id)
        n = await store.expire_messages(channel_id, data.before)
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(data.before))
        return done("purge", f"purged {n} messages of {channel.id} written before {when}", channel_id=channel_id,
                    deleted=n)

    @app.delete("/v1/admin/channels/<string:channel_id>/messages/<int:seq>")
    @route(auth=False, errors=(401, 404, 409))
    async def admin_delete_message(channel_id: str, seq: int):
        admin()
        await group_of(channel_id)
        target = await store.get_message(channel_id, seq)
        if target is None or target.kind != MESSAGE:
            raise ChatError("no_such_message", f"there is no message {seq} in {channel_id}")
        if target.deleted_at:
            raise ChatError("message_deleted", f"message {seq} of {channel_id} is already deleted")
        result = await redact(channel_id, seq)
        return done("delete_message", f"deleted message {seq} of {channel_id} (sent by user {target.sender_id}): "
                                      f"its body, edits and reactions erased; delete row seq {result.message.seq}",
                    channel_id=channel_id, seq=seq, sender_id=target.sender_id, delete_seq=result.message.seq)

    # ---- stats ------------------------------------------------------------------------------
    @app.get("/v1/admin/stats")
    @route(auth=False, errors=(401,))
    async def admin_stats():
        admin()
        try:
            days = int(request.args.get("days", "7"))
        except ValueError:
            raise ChatError("bad_field", "days must be an integer") from None
        counts = {}
        for kind in ("users", "devices", "channels", "members"):
            counts[kind] = await _count(store, kind)
        per_day: dict[str, int] = {}
        since = time.time() - days * 86400
        messages, log_rows, after = 0, 0, None
        while True:
            rows, after = await store.export_rows("messages", after, 1000)
            log_rows += len(rows)
            for r in rows:
                if r[KIND]:  # a lifecycle or system row of the log, not a message someone sent
                    continue
                messages += 1
                if r[5] >= since:
                    day = time.strftime("%Y-%m-%d", time.gmtime(r[5]))
                    per_day[day] = per_day.get(day, 0) + 1
            if after is None:
                break
        size = None
        if node.config.store.backend == "sqlite":
            path = str(node.config.resolve(node.config.store.sqlite_path))
            size = sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
        where = f", {size:,} bytes on disk" if size is not None else " (storage: nodetool tablestats)"
        return {"done": f"{counts['users']} users, {counts['channels']} channels, {messages} messages{where}",
                **counts, "messages": messages, "log_rows": log_rows, "messages_per_day": dict(sorted(per_day.items())),
                "storage_bytes": size}


async def _count(store, kind: str) -> int:
    n = await store.count_rows(kind)
    if n is not None:
        return n
    n, after = 0, None
    while True:
        rows, after = await store.export_rows(kind, after, 1000)
        n += len(rows)
        if after is None:
            return n
