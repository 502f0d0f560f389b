"""HTTP device sessions: one :class:`~chatd.shard.session.Session` per SSE stream, per poller
and per token's ``POST /v1/frames``, over a :class:`~chatd.shard.pipe.Pipe` instead of a
WebSocket -- the same verbs, outbox, cursors, gap fill, sync, limits and slow-consumer policy.

Where a session's state lives, and what survives what (docs/protocol.md, "Transports"):

* A session is made by the first request that needs one (:meth:`HTTPSessions.open`): the
  token is checked, the start point is the resume token's cursors (a channel of the user that
  the token does not name is read from its start) or, without one, the heads of the user's
  channels ("from now"). The session authenticates with those cursors exactly as a WebSocket's
  ``auth`` does (the sync job is queued before any live message), and is counted in
  ``max_connections_per_user`` like a WebSocket.
* ``sse``: the session lives as long as its response; ``poll``: between polls, until no poll came
  for ``limits.http_session_idle_s``; ``frames``: one per token (its rate bucket and in-flight
  caps persist between POSTs), also until idle that long; its events are dropped (it serves
  replies only). Any may end earlier like a WebSocket session (1013 slow consumer, 4001 token
  expired or revoked, 1001 shard going away): its transport says so with a ``close`` event.
* State lost with a session (a shard's kill -9 included) costs nothing that was promised: log
  events resume exactly from the client's resume token on any shard; typing, presence and other
  ephemeral events are best effort, as on a WebSocket that reconnects.
* Presence: while a stream is attached, a poll waits, or the last poll ended within
  ``heartbeat_interval_s``, the session heartbeats for its device every ``heartbeat_interval_s``
  (the device counts as online); then presence's grace applies as after a WebSocket closes.

Resources: per session one task running it (the server's handler nursery) and one keeper task
(presence, the idle expiry); the pipe's event buffer (``limits.http_flush_bytes``) and the
outbox's budget. Errors: :meth:`HTTPSessions.open` raises :class:`~chatd.errors.ChatError` with the
code the HTTP answer carries (``invalid_token``/``token_expired`` 401, ``too_many_connections``
429, ``unavailable`` 503).
"""

from __future__ import annotations

import logging
import secrets

import trio

from .. import revocation
from ..auth import token_claims
from ..errors import ChatError
from ..protocol.client import JSON, dumps
from . import resume
from .outbox import Outbox
from .pipe import Pipe, mark
from .session import CLOSE_IDLE, Session

log = logging.getLogger(__name__)

AUTH_WAIT_S = 10.0  # a session not authenticated by then is given up (503)
CLOSE_STREAM_ENDED = 1000


class StreamOutbox(Outbox):
    """The outbox of an HTTP device session: a mark (chatd/shard/pipe.py) in front of every frame
    that advances a channel's cursor, so that the pipe can give that event its resume token."""
    __slots__ = ()

    def _emit_message(self, m) -> None:
        self._out.append(mark(m.channel_id, m.seq))
        Outbox._emit_message(self, m)


class DeviceSession(Session):
    __slots__ = ()
    OUTBOX = StreamOutbox


class HTTPSession:
    """One HTTP device session and its transport's state."""
    __slots__ = ("sid", "transport", "token_key", "user_id", "device_id", "pipe", "session", "attached",
                 "last_seen", "answer", "last_answer", "delivered", "poll_scope", "poll_gen")

    def __init__(self, sid: str, transport: str, token_key: str, pipe: Pipe, session: DeviceSession):
        self.sid = sid
        self.transport = transport
        self.token_key = token_key
        self.user_id = None
        self.device_id = None
        self.pipe = pipe
        self.session = session
        self.attached = 0  # streams / polls / POSTs being served now
        self.last_seen = trio.current_time()
        self.answer = 0  # poll: the number of the last answer with events
        self.last_answer = None  # poll: that answer, until the next poll acknowledges it
        self.delivered = None  # the resume token of the last log event handed out
        self.poll_scope = None  # poll: the waiting poll's cancel scope (a newer poll cancels it)
        self.poll_gen = 0

    def take(self, max_bytes: int) -> list:
        """The pipe's next events (:meth:`Pipe.take`); remembers the last resume token handed out."""
        events = self.pipe.take(max_bytes)
        for _, token in events:
            if token is not None:
                self.delivered = token
        self.last_seen = trio.current_time()
        return events

    def end(self, code: int = CLOSE_STREAM_ENDED, reason: str = "stream ended") -> None:
        self.pipe.close_now(code, reason)


class HTTPSessions:
    """The shard's HTTP device sessions (chatd/shard/server.py owns one)."""

    def __init__(self, server):
        self.server = server
        self.node = server.node
        self.by_sid: dict[str, HTTPSession] = {}
        self.frames_of: dict[str, HTTPSession] = {}  # token key -> its frames session

    def get(self, sid: str | None, token: str) -> HTTPSession | None:
        """The live session ``sid`` if ``token`` is the one that opened it (else None)."""
        hs = self.by_sid.get(sid) if sid else None
        if hs is None or hs.token_key != revocation.token_key(token) or hs.pipe.closed is not None:
            return None
        return hs

    async def frames_session(self, token: str) -> HTTPSession:
        hs = self.frames_of.get(revocation.token_key(token))
        if hs is not None and hs.pipe.closed is None:
            return hs
        return await self.open(token, None, "frames")

    async def open(self, token: str, start: dict | None, transport: str) -> HTTPSession:
        """A new authenticated session of ``token``'s device starting at ``start`` (resume-token
        cursors; None: the heads of the user's channels). Raises ChatError (see the module)."""
        node = self.node
        limits = node.config.limits
        user_id = token_claims(node.secret, token).user_id  # (the session checks it all again)
        cursors: dict[str, int] = {}
        if transport != "frames":
            channels = await node.store.channels_of(user_id)
            if start is None:
                cursors = {c.id: c.last_seq for c in channels if c.last_seq}
            else:
                cursors = dict(start)
                for c in channels:
                    cursors.setdefault(c.id, 0)  # not in the token: nothing of it seen yet
        pipe = Pipe(cursors, capacity=limits.http_flush_bytes,
                    max_requests=2 * limits.http_frames_per_post, events=transport != "frames")
        server = self.server
        session = DeviceSession(node, pipe, JSON, server.flusher, server.timers)
        hs = HTTPSession(secrets.token_urlsafe(16), transport, revocation.token_key(token), pipe, session)
        pipe.auth_id = "chatd.start." + secrets.token_hex(8)
        catch_up = bool(cursors)  # a sync event follows the catch-up
        pipe.ready = lambda reply: {"type": "ready", "transport": transport, "session": hs.sid, "catch_up": catch_up,
                                    "user_id": reply["user_id"], "device_id": reply["device_id"],
                                    "heartbeat_interval_s": reply["heartbeat_interval_s"],
                                    "server_time": reply["server_time"]}
        waiter = pipe.expect(pipe.auth_id)
        auth = {"type": "auth", "id": pipe.auth_id, "token": token}
        if cursors:
            auth["cursors"] = cursors
        server.start_http_session(self._run, hs)
        with trio.move_on_after(AUTH_WAIT_S):
            await pipe.feed(dumps(auth, JSON))
            await waiter.event.wait()
        reply = waiter.reply
        if reply is None or reply.get("type") != "auth":
            hs.end(CLOSE_STREAM_ENDED, "not authenticated")
            if reply is None:
                raise ChatError("unavailable", "this shard did not start the session in time; retry")
            raise ChatError(reply.get("code", "internal"), reply.get("message", ""),
                            **({"retry_after_ms": reply["retry_after_ms"]} if "retry_after_ms" in reply else {}))
        hs.user_id, hs.device_id = reply["user_id"], reply["device_id"]
        hs.delivered = resume.encode(cursors)  # (the ready event's id, until it is handed out)
        self.by_sid[hs.sid] = hs
        if transport == "frames":
            self.frames_of[hs.token_key] = hs
        return hs

    async def _run(self, hs: HTTPSession) -> None:
        """The session, and its keeper, until it ends; then it is forgotten."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keeper, hs)
                await self.server.run_session(hs.session)
                nursery.cancel_scope.cancel()
        finally:
            hs.pipe.close_now(CLOSE_STREAM_ENDED, "session ended")
            if self.by_sid.get(hs.sid) is hs:
                del self.by_sid[hs.sid]
            if self.frames_of.get(hs.token_key) is hs:
                del self.frames_of[hs.token_key]
            if hs.poll_scope is not None:
                hs.poll_scope.cancel()

    async def _keeper(self, hs: HTTPSession) -> None:
        """Presence for a device that streams or polls; the end of a session nobody uses."""
        limits = self.node.config.limits
        every = limits.heartbeat_interval_s
        idle_s = limits.http_session_idle_s
        while True:
            await trio.sleep(min(every, idle_s))
            now = trio.current_time()
            if hs.attached or now - hs.last_seen <= every:
                hs.pipe.heard = True
                if hs.user_id is not None and hs.transport != "frames":
                    self.node.presence.heartbeat(hs.user_id, hs.device_id)
            elif now - hs.last_seen >= idle_s:
                hs.session.close_soon(CLOSE_IDLE, "idle: no stream, poll or request; start again")
                return

