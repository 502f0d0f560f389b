"""Channels: groups (``POST /v1/groups``), the caller's channel list, the 1:1 channel with a peer
(``GET /v1/dm/<peer>``), a channel's members (list, add, remove) and its history (paged).

Who may do what: any member reads members and history; only a group's owner adds members; the
owner removes anyone, anyone removes (that is: leaves) themselves. A membership change
invalidates the membership caches of the cluster and is announced to the channel's members
(and to the user added or removed) as ``member_added`` / ``member_removed``; a change that changes
nothing (already a member, not a member) announces nothing.

A history page holds at most ``limit`` messages and at most ``limits.max_frame_bytes`` of answer
(as the WebSocket ``history`` reply): a page trimmed to that says ``more: true``; paging on from its
last (or first) message reads the rest.

Group and channel names refuse control and format characters (``bad_field``, :mod:`chatd.api.names`).

Errors: ``no_such_channel`` (404: no such id, or membership changes on a 1:1 channel),
``not_member`` / ``forbidden`` (403), ``no_such_user`` (404), ``group_full`` (409).
"""

from __future__ import annotations

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
from ..common import require_member
from ..host import ApiHost
from ..names import check_name
from ..spec import route


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

    @app.post("/v1/groups")
    @route(m.GroupAnswer, 201, body=GroupCreate, errors=(404, 409))
    async def create_group(data: m.GroupCreate, caller: Caller):
        uid = caller.user_id
        check_name("name", data.name)
        channel = await store.create_group(new_group_id(), data.name, uid, data.members, time.time(),
                                           limits.max_group_members)
        return {"channel": {"id": channel.id, "kind": "group", "name": channel.name, "owner_id": uid,
                            "members": await store.members(channel.id)}}, 201

    @app.get("/v1/channels")
    @route(m.ChannelList)
    async def my_channels(caller: Caller):
        uid = caller.user_id
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

    @app.post("/v1/channels/<string:channel_id>/members")
    @route(m.MemberAdded, body=m.MemberAdd, errors=(403, 404, 409))
    async def add_member(channel_id: str, data: m.MemberAdd, caller: Caller):
        uid = caller.user_id
        channel = await group_for_change(channel_id)
        if channel.owner_id != uid:
            raise ChatError("forbidden", "only the group's owner adds members")
        new = data.user_id
        added = await store.add_member(channel_id, new, limits.max_group_members, time.time())
        node.membership_changed(channel_id)
        if added:
            await announce_member_change(node, "member_added", channel_id, new, uid)
        return {"channel_id": channel_id, "user_id": new, "added": added}

    @app.delete("/v1/channels/<string:channel_id>/members/<int:member_id>")
    @route(m.MemberRemoved, errors=(403, 404))
    async def remove_member(channel_id: str, member_id: int, caller: Caller):
        uid = caller.user_id
        channel = await group_for_change(channel_id)
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
    async def history(channel_id: str, query: m.HistoryQuery, caller: Caller):
        await require_member(node.membership, channel_id, caller.user_id)
        after, before = m.unset_to_none(query.after), m.unset_to_none(query.before)
        msgs, more = await read_page(store, channel_id, after, before, query.limit)
        msgs, trimmed = within_budget(msgs, after is not None, limits.max_frame_bytes)
        return {"channel_id": channel_id, "messages": [message_frame(msg) for msg in msgs], "more": more or trimmed}

