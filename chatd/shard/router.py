"""Where frames go: the routing of one shard, the same code with one shard (``chatd run``) or many.

* A ``send`` goes to the channel's **owner** (rendezvous hash of the channel over the view): here,
  or over the link to the owner shard, which answers with the ack (or ``stale_view``, after which
  we wait for our view to catch up and route again).
* The owner fans a committed message out to each member's **home** shard, one frame per home
  shard (not per member). The home knows on which shards its users have devices (``locations``)
  and forwards one frame per device shard, which pushes it to the local sessions.
* Device locations are announced to the home when a user's first session opens on a shard and
  when its last one closes, and re-announced to the new homes whenever the view changes.

Delivery is synchronous and non-blocking (``Session.push`` / ``Link.send_nowait``), so a channel's
fan-out leaves the owner in seq order. Anything dropped on the way (full link queue, a home that
just moved) is recovered by the sessions: they fill holes from the store, and a ``resync`` (after
a view change, or after a link dropped frames) makes each session re-read its channels' heads.

Frames on the links (``t``): ``send`` (request) / ``reply``; ``deliver`` (owner → home); ``push``
(home → device shard); ``device`` / ``devices`` (location announcements); ``invalidate``
(membership changed); ``resync``. Each routed frame carries ``view``, the view version it was
routed under.
"""

from __future__ import annotations

import logging

import trio

from ..errors import ChatError
from ..store.base import AppendResult, Message
from .stall import StallWatch

log = logging.getLogger(__name__)

RESYNC_DELAY_S = 1.0
SEND_ATTEMPTS = 5
VIEW_WAIT_S = 5.0
# A send waits this long for a missing link to its owner (a shard that just joined, a link being
# redialled) before it is answered `unavailable`; a view change ends the wait at once.
LINK_WAIT_S = 0.5
RETRY_AFTER_MS = 500  # what `unavailable` answers to a send suggest (the client resends then)


def pack(m: Message) -> list:
    return [m.channel_id, m.seq, m.sender_id, m.client_msg_id, m.body, m.created_at]


def unpack(row) -> Message:
    return Message(*row)


class Router:
    def __init__(self, node):
        self.node = node
        self.hub = node.hub
        self.me = node.config.server.shard_id
        self.locations: dict[int, set[str]] = {}  # users homed here -> shards with their devices
        self.links = None  # LinkManager in cluster mode
        self.dropped = 0
        self._resync_pending = False
        self._topology = trio.Event()  # set (and replaced) when a link comes up or the view changes
        self._stall = StallWatch()

    @property
    def view(self):
        return self.node.discovery.view

    # ---- sessions --------------------------------------------------------------------------
    def attach(self, session) -> None:
        self._stall.start(self.node.nursery)
        first = not self.hub.sessions_of(session.user_id)
        self.hub.add(session)
        if first:
            self._announce(session.user_id, True)

    def detach(self, session) -> None:
        if session in self.hub.sessions_of(session.user_id):
            self.hub.remove(session)
            if not self.hub.sessions_of(session.user_id):
                self._announce(session.user_id, False)

    def _announce(self, user_id: int, on: bool) -> None:
        if not self.view.shards:
            return
        home = self.view.home_of(user_id)
        if home == self.me:
            self._set_location(user_id, self.me, on)
        else:
            self._to(home, {"t": "device", "view": self.view.version, "u": user_id, "s": self.me, "on": on})

    def _set_location(self, user_id: int, shard: str, on: bool) -> None:
        if on:
            self.locations.setdefault(user_id, set()).add(shard)
        else:
            shards = self.locations.get(user_id)
            if shards is not None:
                shards.discard(shard)
                if not shards:
                    del self.locations[user_id]

    # ---- sends -----------------------------------------------------------------------------
    async def send(self, user_id: int, channel_id: str, client_msg_id: str, body: str, on_submit=None,
                   on_stored=None, timeout_s: float = 10.0) -> AppendResult:
        """Store a message through its owner; ``on_stored(result)`` is called once it is durable.

        Fails fast: ``ChatError("unavailable", retry_after_ms=...)`` as soon as the owner is known
        unreachable (no link to it within ``LINK_WAIT_S``, its link closed, no reply within
        ``timeout_s``); a view change while waiting for a link re-routes at once. Waits for a
        newer view (``stale_view``) are bounded too; the caller bounds the whole (the session's
        ``limits.send_answer_s``)."""
        for _ in range(SEND_ATTEMPTS):
            if not self.view.shards:  # starting up, or every shard gone from the view
                await self.wait_for_view()
            view = self.view
            if not view.shards:
                raise ChatError("unavailable", "no chat shard is live; retry", retry_after_ms=RETRY_AFTER_MS)
            owner = view.owner_of(channel_id)
            if owner == self.me:
                self._check_writable()
                return await self.node.owners.send(user_id, channel_id, client_msg_id, body, on_submit=on_submit,
                                                   on_stored=on_stored)
            link = await self._wait_link(owner, view.version)
            if link is None:
                continue  # the view changed meanwhile: route again
            reply = await self.links.request_on(link, {"t": "send", "view": view.version, "ch": channel_id,
                                                       "u": user_id, "cmid": client_msg_id, "body": body},
                                                timeout_s, on_sent=on_submit)
            if "ok" in reply:
                result = AppendResult(unpack(reply["ok"]), bool(reply.get("dup")))
                if on_stored is not None:
                    on_stored(result)
                return result
            err = reply.get("err") or {}
            if err.get("code") == "stale_view":
                await self.node.discovery.wait_view(int(err.get("view", 0)), 2.0)
                continue
            raise _remote_error(err)
        raise ChatError("unavailable", "the channel's owner could not be reached; retry",
                        retry_after_ms=RETRY_AFTER_MS)

    def send_nowait(self, user_id: int, channel_id: str, client_msg_id: str, body: str, done) -> bool:
        """The common case of :meth:`send` without a task: this shard owns the channel and can
        queue the append at once (``ChannelOwners.send_nowait``), or another shard does and its
        link can take the request at once; ``done(result, error)`` follows, exactly once.
        False, with nothing done, otherwise: use :meth:`send`."""
        view = self.view
        if not view.shards:
            return False
        owner = view.owner_of(channel_id)
        if owner != self.me:
            return self._send_remote_nowait(owner, view.version, user_id, channel_id, client_msg_id, body, done)
        if not self._writable_now():
            return False
        return self.node.owners.send_nowait(user_id, channel_id, client_msg_id, body, done)

    def _writable_now(self) -> bool:
        """May a send be queued in the store at once (the task-free paths)? Not while this shard
        is not writable, nor just after a stall, when ``writable`` may be stale (chatd/shard/stall.py)."""
        return self.node.discovery.writable and not self._stall.recently_stalled()

    def _send_remote_nowait(self, owner: str, version: int, user_id: int, channel_id: str, client_msg_id: str,
                            body: str, done) -> bool:
        """The remote case of :meth:`send_nowait`: the request queued on the owner's link at once
        (False when there is no link or its queue is full: :meth:`send` waits for those), the
        reply handled by a callback. ``stale_view`` (rare: views differ) is retried by a task
        with :meth:`send`; no reply within ``limits.send_answer_s`` or a closed link answers
        ``unavailable``, as :meth:`send` does."""
        links = self.links
        link = links.links.get(owner) if links is not None else None
        if link is None:
            return False

        def on_reply(reply: dict) -> None:
            if "ok" in reply:
                try:
                    result = AppendResult(unpack(reply["ok"]), bool(reply.get("dup")))
                except (TypeError, ValueError):
                    done(None, ChatError("unavailable", "malformed reply from the owner; retry"))
                    return
                done(result, None)
                return
            err = reply.get("err") or {}
            if err.get("code") == "stale_view" and self.node.nursery is not None:
                self.node.nursery.start_soon(self._send_again, user_id, channel_id, client_msg_id, body, done,
                                             int(err.get("view", 0)))
                return
            done(None, _remote_error(err))
        return links.request_nowait(link, {"t": "send", "view": version, "ch": channel_id, "u": user_id,
                                           "cmid": client_msg_id, "body": body}, on_reply,
                                    self.node.config.limits.send_answer_s)

    async def _send_again(self, user_id: int, channel_id: str, client_msg_id: str, body: str, done,
                          view: int) -> None:
        """A :meth:`send_nowait` answered ``stale_view``: once our view caught up, :meth:`send`."""
        try:
            with trio.fail_after(self.node.config.limits.send_answer_s + 1.0):
                await self.node.discovery.wait_view(view, 2.0)
                result = await self.send(user_id, channel_id, client_msg_id, body)
        except ChatError as e:
            done(None, e)
        except trio.TooSlowError:
            done(None, ChatError("unavailable", "the channel's owner could not be reached; retry",
                                 retry_after_ms=RETRY_AFTER_MS))
        else:
            done(result, None)

    async def _wait_link(self, owner: str, version: int):
        """The link to ``owner``; None if the view moved past ``version`` meanwhile (route
        again); ``unavailable`` when no link comes up within ``LINK_WAIT_S``."""
        with trio.move_on_after(LINK_WAIT_S):
            while (link := self.links.links.get(owner)) is None:
                if self.view.version != version:
                    return None
                await self._topology_event().wait()
            return link
        if self.view.version != version:
            return None
        raise ChatError("unavailable", f"the channel's owner ({owner}) is unreachable; retry",
                        retry_after_ms=RETRY_AFTER_MS)

    def _topology_event(self) -> trio.Event:
        if self._topology.is_set():
            self._topology = trio.Event()
        return self._topology

    def topology_changed(self) -> None:
        """A link came up or the view changed: wake the sends waiting for a link."""
        self._topology.set()

    async def wait_for_view(self) -> bool:
        """Until this shard's view has shards in it (at start-up clients can reach us before our
        first view is read), at most ``VIEW_WAIT_S``; whether it has."""
        with trio.move_on_after(VIEW_WAIT_S):
            while not self.view.shards:
                await self.node.discovery.wait_view(self.view.version + 1, VIEW_WAIT_S)
        return bool(self.view.shards)

    def _owns(self, channel_id: str) -> bool:
        view = self.view
        return bool(view.shards) and view.owner_of(channel_id) == self.me

    def _check_writable(self) -> None:
        if not self.node.discovery.writable:
            raise ChatError("unavailable", "this shard is not registered in the cluster; retry",
                            retry_after_ms=RETRY_AFTER_MS)

    async def on_remote_send(self, link, frame: dict, previous: trio.Event | None, submitted: trio.Event) -> None:
        """Serve a ``send`` routed to us as owner; keeps the link's order like a session does."""
        rid = frame.get("rid")
        try:
            if previous is not None and not previous.is_set():
                await previous.wait()
            ch = frame["ch"]
            if not self._owns(ch) and int(frame.get("view", 0)) > self.view.version:
                await self.node.discovery.wait_view(int(frame["view"]), 2.0)
            if not self._owns(ch):
                raise _Stale(self.view.version)
            self._check_writable()
            result = await self.node.owners.send(int(frame["u"]), ch, str(frame["cmid"]), str(frame["body"]),
                                                 on_submit=submitted.set)
            await self.links.reply(link, rid, ok=pack(result.message), dup=result.duplicate)
        except _Stale as e:
            await self.links.reply(link, rid, err={"code": "stale_view", "view": e.version,
                                                   "message": "not the owner under the current view"})
        except ChatError as e:
            await self.links.reply(link, rid, err=e.to_dict())
        except (KeyError, TypeError, ValueError) as e:
            log.warning("malformed send from %s: %s", link.peer_id, e)
            await self.links.reply(link, rid, err={"code": "bad_frame", "message": "malformed send"})
        finally:
            submitted.set()

    def remote_send_nowait(self, link, frame: dict) -> bool:
        """:meth:`on_remote_send` without a task, when this shard owns the channel and can queue
        the append at once (``ChannelOwners.send_nowait``); the store's completion replies. False,
        with nothing done, otherwise (the caller then runs :meth:`on_remote_send`, which also
        answers malformed frames). The caller keeps the link's per-channel order: it only asks
        when no earlier send of the same channel from this link waits to be queued."""
        try:
            ch, uid, cmid, body, rid = frame["ch"], int(frame["u"]), str(frame["cmid"]), str(frame["body"]), frame["rid"]
        except (KeyError, TypeError, ValueError):
            return False
        if type(ch) is not str or not self._owns(ch) or not self._writable_now():
            return False
        links = self.links

        def done(result, error) -> None:
            if error is None:
                links.reply_nowait(link, rid, ok=pack(result.message), dup=result.duplicate)
            else:
                links.reply_nowait(link, rid, err=error.to_dict())
        return self.node.owners.send_nowait(uid, ch, cmid, body, done)

    # ---- fan-out ---------------------------------------------------------------------------
    def deliver_message(self, message: Message, member_ids) -> None:
        self._fan_out(message, None, member_ids, None)

    def deliver_event(self, frame: dict, member_ids, skip: str | None = None) -> None:
        """A transient event (typing, read receipt) to every device of ``member_ids`` but the device
        ``skip`` (a device id: the one that caused the event, wherever its connection lives)."""
        self._fan_out(None, frame, member_ids, skip)

    def _fan_out(self, message, event, member_ids, skip) -> None:
        view = self.view
        if not view.shards:  # stopping, or not started: nobody to route to (stored messages wait)
            self.dropped += 1
            return
        by_home: dict[str, list[int]] = {}
        for uid in member_ids:
            by_home.setdefault(view.home_of(uid), []).append(uid)
        packed = None
        for home, uids in by_home.items():
            if home == self.me:
                self._home_deliver(message, event, uids, skip)
            else:
                if packed is None:
                    packed = {"t": "deliver", "view": view.version}
                    if message is not None:
                        packed["m"] = pack(message)
                    else:
                        packed["e"] = event
                    if skip is not None:
                        packed["x"] = skip
                self._to(home, {**packed, "u": uids})

    def _home_deliver(self, message, event, uids, skip=None, hops: int = 0) -> None:
        by_shard: dict[str, list[int]] = {}
        offline: list[int] = []
        view = self.view
        for uid in uids:
            shards = self.locations.get(uid)
            if shards:
                for shard in shards:
                    by_shard.setdefault(shard, []).append(uid)
            elif hops == 0 and view.shards and view.home_of(uid) != self.me:
                by_shard.setdefault("->" + view.home_of(uid), []).append(uid)  # home moved: forward once
            elif message is not None and uid != message.sender_id:
                offline.append(uid)  # no device connected anywhere: a push notification instead
        push = getattr(self.node, "push", None)
        if offline and push is not None:
            push.notify_offline(message, offline)  # only enqueues (chatd/push/service.py)
        for shard, us in by_shard.items():
            if shard == self.me:
                self.push_local(message if message is not None else event, us, skip)
            else:
                if shard.startswith("->"):
                    frame = {"t": "deliver", "view": view.version, "u": us, "hops": 1}
                else:
                    frame = {"t": "push", "view": view.version, "u": us}
                frame.update({"m": pack(message)} if message is not None else {"e": event})
                if skip is not None:
                    frame["x"] = skip
                self._to(shard.removeprefix("->"), frame)

    def push_local(self, item, user_ids, skip: str | None = None) -> None:
        for uid in user_ids:  # (push never adds or removes sessions: no copy of the set)
            for session in self.hub.sessions_of(uid):
                if skip is None or session.device_id != skip:
                    session.push(item)

    def _to(self, shard: str, frame: dict) -> None:
        if self.links is None or not self.links.send_nowait(shard, frame):
            self.dropped += 1
            log.debug("frame %s to %s dropped (no link or queue full)", frame.get("t"), shard)

    # ---- frames from links -----------------------------------------------------------------
    def on_frame(self, link, frame: dict) -> None:
        t = frame.get("t")
        try:
            if t == "deliver":
                item = unpack(frame["m"]) if "m" in frame else frame["e"]
                is_msg = "m" in frame
                self._home_deliver(item if is_msg else None, None if is_msg else item,
                                   [int(u) for u in frame["u"]], _skip(frame), hops=int(frame.get("hops", 0)))
            elif t == "push":
                self.push_local(unpack(frame["m"]) if "m" in frame else frame["e"], [int(u) for u in frame["u"]],
                                _skip(frame))
            elif t == "device":
                self._set_location(int(frame["u"]), str(frame["s"]), bool(frame["on"]))
            elif t == "devices":
                shard = str(frame["s"])
                for uid in frame["u"]:
                    self._set_location(int(uid), shard, True)
            elif t == "invalidate":
                self.node.membership.invalidate(str(frame["ch"]))
            elif t == "resync":
                self.schedule_resync(0)
            else:
                log.warning("unknown link frame %r from %s", t, link.peer_id)
        except (KeyError, TypeError, ValueError) as e:
            log.warning("malformed %r frame from %s: %s", t, link.peer_id, e)

    # ---- view changes ----------------------------------------------------------------------
    def on_view_change(self, old, new) -> None:
        self.topology_changed()
        if not new.shards:
            return
        # forget devices on shards that left, and users that are no longer homed here
        for uid in list(self.locations):
            shards = {s for s in self.locations[uid] if s in new.shards}
            if shards and new.home_of(uid) == self.me:
                self.locations[uid] = shards
            else:
                del self.locations[uid]
        self.announce_all()
        self.schedule_resync(RESYNC_DELAY_S)

    def announce_all(self, only_to: str | None = None) -> None:
        """Tell every (or one) home shard which of its users have sessions here."""
        view = self.view
        if not view.shards:
            return
        by_home: dict[str, list[int]] = {}
        for session in self.hub.all_sessions():
            by_home.setdefault(view.home_of(session.user_id), []).append(session.user_id)
        for home, uids in by_home.items():
            if only_to is not None and home != only_to:
                continue
            if home == self.me:
                for uid in uids:
                    self._set_location(uid, self.me, True)
            else:
                self._to(home, {"t": "devices", "view": view.version, "s": self.me, "u": sorted(set(uids))})

    def schedule_resync(self, delay_s: float) -> None:
        if self._resync_pending or self.node.nursery is None:
            return
        self._resync_pending = True

        async def later():
            await trio.sleep(delay_s)
            self._resync_pending = False
            for session in self.hub.all_sessions():
                session.resync()
        self.node.nursery.start_soon(later)


def _remote_error(err: dict) -> ChatError:
    """The ChatError of an owner's error reply (``unavailable`` gets a ``retry_after_ms``)."""
    details = {k: v for k, v in err.items() if k not in ("code", "message")}
    if err.get("code") == "unavailable":
        details.setdefault("retry_after_ms", RETRY_AFTER_MS)
    return ChatError(err.get("code", "internal"), err.get("message", "remote error"), **details)


class _Stale(Exception):
    def __init__(self, version: int):
        self.version = version


def _skip(frame: dict) -> str | None:
    x = frame.get("x")
    return x if isinstance(x, str) else None
