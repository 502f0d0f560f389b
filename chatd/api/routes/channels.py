"""Channels: groups (``POST /v1/groups``), the caller's channel list, the 1:1 channel with a peer
(``GET /v1/dm/<peer>``), a channel's members (list, add, remove) and its history (paged).

Who may do what: any member reads members and history; only a group's owner adds members; the
owner removes anyone, anyone removes (that is: leaves) themselves. A user who left a group on
their own is not put back by the owner's add: it becomes an invitation (202, ``invited: true``,
a ``group_invite`` event to the user's devices, listed in their ``GET /v1/invitations``) that only
the user's own ``POST /v1/channels/<id>/join`` accepts; without one the join is ``not_invited`` (403). Each user
creates at most ``limits.groups_created_per_hour`` groups per rolling hour, counted in the store
(every API server sees the same count; racing requests of one user may pass it by the number in
flight at once): ``too_many_groups`` (429) with ``Retry-After``, when the oldest of them turns an
hour old.

``GET /v1/channels`` pages through the caller's channels in channel-id order (ids never change, so
a walk lists every channel the caller stays a member of exactly once): ``limit`` (default
``CHANNELS_PAGE_DEFAULT``, at most ``CHANNELS_PAGE_MAX``), ``cursor`` = the previous page's ``next``
(opaque; ``null`` on the last page; one the server did not write is still a position: no error). A membership change
invalidates the membership caches of the cluster and becomes a sequenced system row of the
channel's log (``member_added``, ``member_removed``, ``member_left``: chatd/lifecycle.py), which
the members (and the user added or removed) receive like a message; a change that changes nothing
(already a member, not a member) logs nothing.

A history page holds at most ``limit`` messages and at most ``limits.max_frame_bytes`` of answer
(as the WebSocket ``history`` reply): a page trimmed to that says ``more: true``; paging on from its
last (or first) message reads the rest.

Group and channel names refuse control and format characters (``bad_field``, :mod:`chatd.api.names`).

Errors: ``no_such_channel`` (404: no such id, or membership changes on a 1:1 channel),
``not_member`` / ``forbidden`` / ``not_invited`` (403), ``no_such_user`` (404), ``group_full`` (409),
``too_many_groups`` (429).
"""

from __future__ import annotations

import base64
import binascii
import time

from quart_trio import QuartTrio

from ...errors import ChatError
from ...ids import MAX_INT64, dm_channel_id, dm_members, is_group, is_valid_channel_id, new_group_id
from ...membership import announce_member_change
from ...protocol.client import message_frame
from ...store.base import Channel
from ...store.pages import read_page, within_budget
from .. import models as m
from ..caller import Caller
from ..common import RetryLater, require_member
from ..host import ApiHost
from ..names import check_name
from ..spec import route

INVITATIONS_MAX = 100  # GET /v1/invitations lists the latest this many
GROUP_RATE_WINDOW_S = 3600.0  # limits.groups_created_per_hour counts the groups of this long
CHANNELS_PAGE_DEFAULT = m.CHANNELS_PAGE_DEFAULT
CHANNELS_PAGE_MAX = m.CHANNELS_PAGE_MAX


def channels_cursor(last_id: str) -> str:
    """The opaque ``next`` of a page that ended at channel ``last_id``."""
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def after_cursor(cursor: str) -> str:
    """Where a ``cursor`` (a ``next``) continues: after the channel id it encodes. Total: a cursor
    that encodes no channel id is a position in id order like any other (nothing to refuse)."""
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, ValueError):
        return cursor


def register(app: QuartTrio, node: ApiHost) -> None:
    store, limits = node.store, node.config.limits
    GroupCreate = m.group_create(limits.max_group_members)
    HistoryQuery = m.history_query(limits.history_page_max)

    async def group_for_change(channel_id: str) -> Channel:
        if not is_valid_channel_id(channel_id) or not is_group(channel_id):
            raise ChatError("no_such_channel", "membership changes need a group channel id")
        channel = await store.get_channel(channel_id)
        if channel is None:
            raise ChatError("no_such_channel", f"channel {channel_id} does not exist")
        return channel

    async def check_group_rate(uid: int, now: float) -> None:
        cap = limits.groups_created_per_hour
        if not cap:
            return
        recent = await store.groups_created_since(uid, now - GROUP_RATE_WINDOW_S, cap)
        if len(recent) >= cap:
            wait = recent[0] + GROUP_RATE_WINDOW_S - now
            raise RetryLater("too_many_groups", f"at most {cap} new groups per hour (limits.groups_created_per_hour); "
                             f"retry in {max(1, int(wait) + 1)} s", wait)

    @app.post("/v1/groups")
    @route(m.GroupAnswer, 201, body=GroupCreate, errors=(404, 409, 429))
    async def create_group(data: m.GroupCreate, caller: Caller):
        uid = caller.user_id
        check_name("name", data.name)
        await check_group_rate(uid, time.time())
        channel = await store.create_group(new_group_id(), data.name, uid, data.members, time.time(),
                                           limits.max_group_members)
        return {"channel": {"id": channel.id, "kind": "group", "name": channel.name, "owner_id": uid,
                            "members": await store.members(channel.id)}}, 201

    @app.get("/v1/channels")
    @route(m.ChannelList, query=m.ChannelsQuery)
    async def my_channels(query: m.ChannelsQuery, caller: Caller):
        uid = caller.user_id
        cursor = m.unset_to_none(query.cursor)
        page = await store.channels_page(uid, after_cursor(cursor) if cursor is not None else None, query.limit)
        out = []
        for c in page:
            item = {"id": c.id, "kind": c.kind, "name": c.name, "last_seq": c.last_seq,
                    "read_seq": c.read_seq, "unread": c.unread, "last_at": c.last_at}
            pair = dm_members(c.id)
            if pair:
                item["peer_id"] = pair[1] if pair[0] == uid else pair[0]
            out.append(item)
        return {"channels": out, "next": channels_cursor(page[-1].id) if len(page) == query.limit else None}

    @app.get("/v1/dm/<int:peer_id>")
    @route(m.DmAnswer, errors=(404,))
    async def dm_channel(peer_id: int, caller: Caller):
        uid = caller.user_id
        if peer_id == uid or peer_id > MAX_INT64 or await store.get_user(peer_id) is None:
            raise ChatError("no_such_user", f"user {peer_id} does not exist (or is you)")
        return {"channel_id": dm_channel_id(uid, peer_id)}

    @app.get("/v1/channels/<string:channel_id>/members")
    @route(m.Members, errors=(403, 404))
    async def channel_members(channel_id: str, caller: Caller):
        members = await require_member(node.membership, channel_id, caller.user_id)
        channel = await store.get_channel(channel_id) if is_group(channel_id) else None
        ids = sorted(members)
        profiles = await store.get_users(ids)
        return {"channel_id": channel_id, "members": ids, "owner_id": channel.owner_id if channel else None,
                "users": [profiles[u].public() for u in ids if u in profiles]}

    async def add(channel_id: str, user_id: int, by: int) -> bool:
        added = await store.add_member(channel_id, user_id, limits.max_group_members, time.time())
        node.membership_changed(channel_id)
        if added:
            await announce_member_change(node, "member_added", channel_id, user_id, by)
        return added

    @app.post("/v1/channels/<string:channel_id>/members")
    @route(m.MemberAdded, body=m.MemberAdd, errors=(403, 404, 409), also=((202, m.MemberAdded),))
    async def add_member(channel_id: str, data: m.MemberAdd, caller: Caller):
        uid = caller.user_id
        channel = await group_for_change(channel_id)
        if channel.owner_id != uid:
            raise ChatError("forbidden", "only the group's owner adds members")
        new = data.user_id
        if await store.departure(channel_id, new) is not None:  # they left: ask, do not add
            if await store.invite_back(channel_id, new, uid, time.time()):
                node.notify_members({"type": "group_invite", "channel_id": channel_id, "name": channel.name,
                                     "by": uid}, [new])
                return {"channel_id": channel_id, "user_id": new, "added": False, "invited": True}, 202
        return {"channel_id": channel_id, "user_id": new, "added": await add(channel_id, new, uid)}

    @app.get("/v1/invitations")
    @route(m.InvitationList)
    async def invitations(caller: Caller):
        out = []
        for d in await store.invitations_of(caller.user_id, INVITATIONS_MAX):
            channel = await store.get_channel(d.channel_id)
            if channel is not None and channel.owner_id == d.invited_by:  # what a join accepts
                out.append({"channel_id": d.channel_id, "name": channel.name, "invited_by": d.invited_by,
                            "invited_at": d.invited_at})
        return {"invitations": out}

    @app.post("/v1/channels/<string:channel_id>/join")
    @route(m.MemberAdded, errors=(403, 404, 409))
    async def join(channel_id: str, caller: Caller):
        uid = caller.user_id
        channel = await group_for_change(channel_id)
        departed = await store.departure(channel_id, uid)
        if departed is None or departed.invited_by is None or departed.invited_by != channel.owner_id:
            if uid in await store.members(channel_id):
                return {"channel_id": channel_id, "user_id": uid, "added": False}
            raise ChatError("not_invited", "you join a group you left when its owner invites you back")
        return {"channel_id": channel_id, "user_id": uid, "added": await add(channel_id, uid, uid)}

    @app.patch("/v1/channels/<string:channel_id>")
    @route(m.GroupRenamed, body=m.GroupRename, errors=(403, 404))
    async def rename_group(channel_id: str, data: m.GroupRename, caller: Caller):
        """The group's owner renames it; the members learn it by a ``renamed`` row of the log."""
        channel = await group_for_change(channel_id)
        if channel.owner_id != caller.user_id:
            raise ChatError("forbidden", "only the group's owner renames it")
        check_name("name", data.name)
        await store.rename_channel(channel_id, data.name)
        seq = await announce_member_change(node, "renamed", channel_id, 0, caller.user_id, name=data.name)
        return {"channel_id": channel_id, "name": data.name, "seq": seq}

    @app.delete("/v1/channels/<string:channel_id>/members/<int:member_id>")
    @route(m.MemberRemoved, errors=(403, 404))
    async def remove_member(channel_id: str, member_id: int, caller: Caller):
        uid = caller.user_id
        channel = await group_for_change(channel_id)
        if not 1 <= member_id <= MAX_INT64:
            raise ChatError("no_such_user", f"user {member_id} does not exist")
        if uid not in (channel.owner_id, member_id):
            raise ChatError("forbidden", "only the group's owner removes others; anyone may leave")
        removed = await store.remove_member(channel_id, member_id, time.time() if member_id == uid else None)
        node.membership_changed(channel_id)
        if removed:
            await announce_member_change(node, "member_left" if member_id == uid else "member_removed",
                                         channel_id, member_id, uid)
        return {"channel_id": channel_id, "user_id": member_id, "removed": removed}

    @app.get("/v1/channels/<string:channel_id>/receipts")
    @route(m.Receipts, errors=(403, 404))
    async def receipts(channel_id: str, caller: Caller):
        """Every member's delivered and read positions (members only): a message ``seq`` is
        delivered to the members with ``delivered_seq >= seq`` and read by those with
        ``read_seq >= seq`` (chatd/shard/receipts.py ``receipt_counts``)."""
        members = await require_member(node.membership, channel_id, caller.user_id)
        cursors = await store.receipts(channel_id)
        rows = sorted(((u, *cursors.get(u, (0, 0))) for u in members), key=lambda r: (-r[1], -r[2], r[0]))
        return {"channel_id": channel_id,
                "members": [{"user_id": u, "delivered_seq": d, "read_seq": r} for u, d, r in rows]}

    @app.get("/v1/channels/<string:channel_id>/messages")
    @route(m.History, query=HistoryQuery, errors=(403, 404))
    async def history(channel_id: str, query: m.HistoryQuery, caller: Caller):
        await require_member(node.membership, channel_id, caller.user_id)
        after, before = m.unset_to_none(query.after), m.unset_to_none(query.before)
        msgs, more = await read_page(store, channel_id, after, before, query.limit)
        msgs, trimmed = within_budget(msgs, after is not None, limits.max_frame_bytes)
        return {"channel_id": channel_id, "messages": [message_frame(msg, caller.user_id) for msg in msgs], "more": more or trimmed}

