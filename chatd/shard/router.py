"""Where sends go: the routing of one shard, the same code with one shard (``chatd run``) or many.

* A ``send`` goes to the channel's **owner** (rendezvous hash of the channel over the view): here
  (:class:`~chatd.shard.owner.ChannelOwners`), or over the link to the owner shard, which answers
  with the ack (or ``stale_view``, after which we wait for our view to catch up and route again).
* The owner side of a ``send`` frame from a link keeps that link's order per channel, like a
  session does: concurrent, but entering the store in the order the link carried them (a send
  stuck on one channel holds no other channel's).
* Committed messages and events go out through the fan-out (:class:`~chatd.shard.fanout.FanOut`);
  the router tells it when sessions attach and detach and when the view or the links change, and
  after a view change (or a link coming up) has every session re-read its channels' heads
  (``resync``), which recovers whatever was routed by the old view.

The link frames themselves, and which component handles each: :mod:`chatd.protocol.link_frames`
and :meth:`chatd.node.Node.on_link_frame`.

Resources: :meth:`Router.run` holds the nursery of the router's background work (the delayed
resync, a send retried after ``stale_view``, the stall watch where discovery has a session to
lose). Every wait of a send is bounded.
"""

from __future__ import annotations

import logging

import trio

from ..cluster.links import LinkManager
from ..discovery.base import Discovery
from ..errors import CODES, ChatError
from ..lifecycle import DELETE, EventSpec
from ..protocol.link_frames import Reply, Send, message_extra, packed, unpacked
from ..store.base import AppendResult
from .fanout import FanOut
from .hub import Hub
from .owner import ChannelOwners
from .stall import StallWatch

log = logging.getLogger(__name__)

RESYNC_DELAY_S = 1.0
SEND_ATTEMPTS = 5
VIEW_WAIT_S = 5.0
# A send waits this long for a missing link to its owner (a shard that just joined, a link being
# redialled) before it is answered `unavailable`; a view change ends the wait at once.
LINK_WAIT_S = 0.5
RETRY_AFTER_MS = 500  # what `unavailable` answers to a send suggest (the client resends then)


class Router:
    def __init__(self, shard_id: str, hub: Hub, discovery: Discovery, owners: ChannelOwners, fanout: FanOut,
                 links: LinkManager | None = None, send_answer_s: float = 2.0):
        """``links``: the cluster's links (None with one shard in process); ``send_answer_s``: how
        long a task-free remote send waits for its owner's reply (``limits.send_answer_s``)."""
        self.me = shard_id
        self.hub = hub
        self.discovery = discovery
        self.owners = owners
        self.fanout = fanout
        self.links = links
        self.send_answer_s = send_answer_s
        # the sessions' way to fan out an event: the fan-out's own method (no call in between)
        self.deliver_event = fanout.deliver_event
        self._nursery: trio.Nursery | None = None
        self._resync_pending = False
        self._topology = trio.Event()  # set (and replaced) when a link comes up or the view changes
        # A stall matters only where a session can be lost meanwhile (ZooKeeper): in-process
        # discovery has none, and there the guard would only send every send of a loaded
        # machine down the task path (ticks late by > 0.5 s at load 13: issue 24's DM profile).
        self._stall = StallWatch() if discovery.can_lose_session else None
        self._link_chains: dict = {}  # (link, channel) -> the last remote send's 'submitted' event

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Host the router's background work until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    @property
    def view(self):
        return self.discovery.view

    # ---- sessions --------------------------------------------------------------------------
    def attach(self, session) -> None:
        if self._stall is not None:
            self._stall.start(self._nursery)
        first = not self.hub.sessions_of(session.user_id)
        self.hub.add(session)
        if first:
            self.fanout.announce(session.user_id, True)

    def detach(self, session) -> None:
        if session in self.hub.sessions_of(session.user_id):
            self.hub.remove(session)
            if not self.hub.sessions_of(session.user_id):
                self.fanout.announce(session.user_id, False)

    # ---- sends -----------------------------------------------------------------------------
    async def send(self, user_id: int, channel_id: str, client_msg_id: str, body: str, on_submit=None,
                   on_stored=None, timeout_s: float = 10.0, attachments: str = "") -> AppendResult:
        """Store a message through its owner; ``on_stored(result)`` is called once it is durable.
        ``attachments``: the message's attachments (JSON, :meth:`chatd.media.service.MediaService.attach`).

        Fails fast: ``ChatError("unavailable", retry_after_ms=...)`` as soon as the owner is known
        unreachable (no link to it within ``LINK_WAIT_S``, its link closed, no reply within
        ``timeout_s``); a view change while waiting for a link re-routes at once. Waits for a
        newer view (``stale_view``) are bounded too; the caller bounds the whole (the session's
        ``limits.send_answer_s``)."""
        return await self._route(
            channel_id,
            lambda: self.owners.send(user_id, channel_id, client_msg_id, body, on_submit=on_submit,
                                     on_stored=on_stored, attachments=attachments),
            lambda version: Send(version, channel_id, user_id, client_msg_id, body, attachments=attachments),
            on_stored, timeout_s, on_sent=on_submit)

    async def append_event(self, user_id: int, channel_id: str, client_msg_id: str, spec: EventSpec,
                           on_stored=None, timeout_s: float = 10.0, force: bool = False) -> AppendResult:
        """A lifecycle row (edit, delete, react, unreact, a reply, a system event) through the
        channel's owner, routed and bounded exactly like :meth:`send` (``unavailable`` when the
        owner is unreachable or silent; ``stale_view`` routed again)."""
        return await self._route(
            channel_id,
            lambda: self.owners.append_event(user_id, channel_id, client_msg_id, spec, on_stored=on_stored,
                                             force=force),
            lambda version: Send(version, channel_id, user_id, client_msg_id, "", ev=spec.as_dict(), force=force),
            on_stored, timeout_s)

    async def _route(self, channel_id: str, local, frame_of, on_stored, timeout_s: float,
                     on_sent=None) -> AppendResult:
        """The routing of :meth:`send` and :meth:`append_event`: ``local()`` (awaited) when this
        shard owns the channel, else the request ``frame_of(view version)`` over the owner's link,
        its reply an :class:`AppendResult` (``on_stored(result)`` called with it) or the owner's
        error; ``stale_view`` waits for a newer view and routes again, at most ``SEND_ATTEMPTS``
        times, then ``unavailable``."""
        for _ in range(SEND_ATTEMPTS):
            if not self.view.shards:  # starting up, or every shard gone from the view
                await self.wait_for_view()
            view = self.view
            if not view.shards:
                raise ChatError("unavailable", "no chat shard is live; retry", retry_after_ms=RETRY_AFTER_MS)
            owner = view.owner_of(channel_id)
            if owner == self.me:
                self._check_writable()
                return await local()
            link = await self._wait_link(owner, view.version)
            if link is None:
                continue  # the view changed meanwhile: route again
            reply = await self.links.request_on(link, frame_of(view.version), timeout_s, on_sent=on_sent)
            if reply.ok is not None:
                result = AppendResult(unpacked(reply.ok, reply.mx), reply.dup is True)
                if on_stored is not None:
                    on_stored(result)
                return result
            err = reply.err or {}
            if err.get("code") == "stale_view":
                await self.discovery.wait_view(_int(err.get("view")), 2.0)
                continue
            raise _remote_error(err)
        raise ChatError("unavailable", "the channel's owner could not be reached; retry",
                        retry_after_ms=RETRY_AFTER_MS)

    async def delete_message(self, user_id: int, channel_id: str, seq: int, client_msg_id: str, *,
                             force: bool = False, timeout_s: float = 10.0) -> AppendResult:
        """Redact message ``seq`` of the channel through its owner (the one entry point for a
        moderator or an erasure job: ``force`` skips the author / owner check). The text of the
        message and of every edit, and its reactions, are erased from the store; a ``delete`` row by
        ``user_id`` takes the channel's next seq. Resend with the same ``client_msg_id`` after
        ``unavailable``. Errors: ``no_such_message``, ``message_deleted``, ``not_author`` (without
        ``force``), ``unavailable``."""
        return await self.append_event(user_id, channel_id, client_msg_id, EventSpec(DELETE, target_seq=seq),
                                       timeout_s=timeout_s, force=force)

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
        return self.owners.send_nowait(user_id, channel_id, client_msg_id, body, done)

    def _writable_now(self) -> bool:
        """May a send be queued in the store at once (the task-free paths)? Not while this shard
        is not writable, nor just after a stall, when ``writable`` may be stale (chatd/shard/stall.py;
        only with a discovery that has a session to lose)."""
        return self.discovery.writable and not (self._stall is not None and self._stall.recently_stalled())

    def _send_remote_nowait(self, owner: str, version: int, user_id: int, channel_id: str, client_msg_id: str,
                            body: str, done) -> bool:
        """The remote case of :meth:`send_nowait`: the request queued on the owner's link at once
        (False when there is no link or its queue is full: :meth:`send` waits for those), the
        reply handled by a callback. ``stale_view`` (rare: views differ) is retried by a task
        with :meth:`send`; no reply within ``send_answer_s`` or a closed link answers
        ``unavailable``, as :meth:`send` does."""
        links = self.links
        link = links.links.get(owner) if links is not None else None
        if link is None:
            return False

        def on_reply(reply: Reply) -> None:
            if reply.ok is not None:
                done(AppendResult(unpacked(reply.ok, reply.mx), reply.dup is True), None)
                return
            err = reply.err or {}
            if err.get("code") == "stale_view" and self._nursery is not None:
                self._nursery.start_soon(self._send_again, user_id, channel_id, client_msg_id, body, done,
                                         _int(err.get("view")))
                return
            done(None, _remote_error(err))
        return links.request_nowait(link, Send(version, channel_id, user_id, client_msg_id, body), on_reply,
                                    self.send_answer_s)

    async def _send_again(self, user_id: int, channel_id: str, client_msg_id: str, body: str, done,
                          view: int) -> None:
        """A :meth:`send_nowait` answered ``stale_view``: once our view caught up, :meth:`send`."""
        try:
            with trio.fail_after(self.send_answer_s + 1.0):
                await self.discovery.wait_view(view, 2.0)
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
                await self.discovery.wait_view(self.view.version + 1, VIEW_WAIT_S)
        return bool(self.view.shards)

    def _owns(self, channel_id: str) -> bool:
        view = self.view
        return bool(view.shards) and view.owner_of(channel_id) == self.me

    def _check_writable(self) -> None:
        if not self.discovery.writable:
            raise ChatError("unavailable", "this shard is not registered in the cluster; retry",
                            retry_after_ms=RETRY_AFTER_MS)

    # ---- sends from links (this shard as the owner) ---------------------------------------------
    def on_send(self, link, frame: Send) -> None:
        """A ``send`` frame: served without a task when it can be (:meth:`remote_send_nowait`),
        else by a task (:meth:`on_remote_send`), keeping the link's order per channel."""
        key = (link, frame.channel_id)
        previous = self._link_chains.get(key)
        if (previous is None or previous.is_set()) and frame.ev is None and self.remote_send_nowait(link, frame):
            return  # queued in the store already: no task, no event
        if self._nursery is None:  # not running: the requester gets `unavailable` by its timeout
            return
        submitted = self._link_chains[key] = trio.Event()
        self._nursery.start_soon(self._remote_send, key, frame, previous, submitted)

    async def _remote_send(self, key, frame: Send, previous, submitted: trio.Event) -> None:
        try:
            await self.on_remote_send(key[0], frame, previous, submitted)
        finally:
            if self._link_chains.get(key) is submitted:
                del self._link_chains[key]

    async def on_remote_send(self, link, frame: Send, previous: trio.Event | None, submitted: trio.Event) -> None:
        """Serve a ``send`` routed to us as owner; keeps the link's order like a session does."""
        rid = frame.rid
        try:
            if previous is not None and not previous.is_set():
                await previous.wait()
            ch = frame.channel_id
            if not self._owns(ch) and frame.view > self.view.version:
                await self.discovery.wait_view(frame.view, 2.0)
            if not self._owns(ch):
                raise _Stale(self.view.version)
            self._check_writable()
            if frame.ev is not None:
                submitted.set()  # (a lifecycle row waits on its channel's lock, not on this chain)
                result = await self.owners.append_event(frame.user_id, ch, frame.client_msg_id,
                                                        EventSpec.from_dict(frame.ev), force=frame.force)
            else:
                result = await self.owners.send(frame.user_id, ch, frame.client_msg_id, frame.body,
                                                on_submit=submitted.set, attachments=frame.attachments)
            await self.links.reply(link, Reply(rid, ok=packed(result.message), dup=result.duplicate,
                                               mx=message_extra(result.message)))
        except _Stale as e:
            await self.links.reply(link, Reply(rid, err={"code": "stale_view", "view": e.version,
                                                         "message": "not the owner under the current view"}))
        except ChatError as e:
            await self.links.reply(link, Reply(rid, err=e.to_dict()))
        finally:
            submitted.set()

    def remote_send_nowait(self, link, frame: Send) -> bool:
        """:meth:`on_remote_send` without a task, when this shard owns the channel and can queue
        the append at once (``ChannelOwners.send_nowait``); the store's completion replies. False,
        with nothing done, otherwise (the caller then runs :meth:`on_remote_send`). The caller
        keeps the link's per-channel order: it only asks when no earlier send of the same channel
        from this link waits to be queued."""
        ch = frame.channel_id
        if not self._owns(ch) or not self._writable_now() or frame.attachments:
            return False
        links, rid = self.links, frame.rid

        def done(result, error) -> None:
            if error is None:
                links.reply_nowait(link, Reply(rid, ok=packed(result.message), dup=result.duplicate))
            else:
                links.reply_nowait(link, Reply(rid, err=error.to_dict()))
        return self.owners.send_nowait(frame.user_id, ch, frame.client_msg_id, frame.body, done)

    # ---- view and link changes -------------------------------------------------------------------
    def on_view_change(self, old, new) -> None:
        self.topology_changed()
        if not new.shards:
            return
        self.fanout.on_view_change(old, new)
        self.schedule_resync(RESYNC_DELAY_S)

    def on_link_up(self, link) -> None:
        self.topology_changed()
        self.fanout.announce_all(only_to=link.peer_id)
        self.schedule_resync(1.0)

    def on_resync(self, link, frame) -> None:
        """A peer dropped frames to us: every session re-reads its channels' heads."""
        self.schedule_resync(0)

    def schedule_resync(self, delay_s: float) -> None:
        if self._resync_pending or self._nursery is None:
            return
        self._resync_pending = True

        async def later():
            await trio.sleep(delay_s)
            self._resync_pending = False
            for session in self.hub.all_sessions():
                session.resync()
        self._nursery.start_soon(later)


def _int(value) -> int:
    return value if type(value) is int else 0


def _remote_error(err: dict) -> ChatError:
    """The ChatError of an owner's error reply (``unavailable`` gets a ``retry_after_ms``)."""
    details = {k: v for k, v in err.items() if k not in ("code", "message")}
    code = err.get("code")
    if code == "unavailable":
        details.setdefault("retry_after_ms", RETRY_AFTER_MS)
    return ChatError(code if code in CODES else "internal", str(err.get("message", "remote error")), **details)


class _Stale(Exception):
    def __init__(self, version: int):
        self.version = version
