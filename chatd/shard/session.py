"""One client WebSocket connection: one task (its reader), one method per client verb.

The same class serves an SSE stream, a poller or ``POST /v1/frames`` (chatd/shard/httpsession.py):
there its ``ws`` is a :class:`~chatd.shard.pipe.Pipe` and its outbox a ``StreamOutbox``; nothing
below knows the difference.

Resources and policies

* **Per connection**, idle and authenticated: one task (the connection's handler, which reads),
  the :class:`Session` (``__slots__``), its :class:`~chatd.shard.outbox.Outbox`, its wsproto
  connection (chatd/shard/wsconn.py), a rate bucket, and two timer handles on the server's
  shared timer wheel (chatd/shard/timers.py: the auth timeout, then the token's expiry; the
  liveness tick). What a send needs (its semaphore, the answer clock and its task) is made with
  the connection's first send, the request semaphore with its first request in a task; a task
  per request only for verbs that wait (history, presence, a cold send, ...).
  tests/test_session_resources.py counts the tasks.
* **Outgoing**: every frame to the client goes through the connection's outbox
  (chatd/shard/outbox.py: the bounded queue, the direct write of a live message, the flusher's
  pass, the writer task, the per-channel delivery cursors with their gap fill and sync, the 1013
  slow-consumer close, whole frames only). ``Session.push`` *is* the outbox's ``push`` (bound
  once: no extra call per frame).
* **Verbs**: one method per client verb, found by the request's type in one table (``@verb``),
  which says whether the verb runs in the reader (it answers without waiting, or waits as TCP
  backpressure on this client only) or in a task of its own (it waits on the store or a peer).
* **Incoming**: a token bucket over all frames (``rate_limited`` errors; a flood of them closes
  with 1008); at most ``max_inflight_sends`` sends whose work (a store write) goes on, answered
  or not (see :meth:`Session._send`), and ``max_inflight_requests`` requests served in tasks in
  flight, and nothing read while the outbox is over its byte budget (``send_queue_bytes``): the
  reader then waits (TCP backpressure on that client only). A sync
  names at most ``sync_max_channels`` channels (``bad_field``). Bad frames get an ``error`` frame
  and the connection goes on.
* **Connections**: at most ``max_connections_per_user`` authenticated connections of one user on
  this shard (per client address: chatd/shard/server.py); one more gets a
  ``too_many_connections`` error and is closed with 4029.
* **Liveness**: once authenticated, a tick on the shared timer wheel every ``ping_interval_s``:
  when nothing arrived since the last tick the server sends a ping; when nothing (no frame, no
  pong) arrived for ``idle_timeout_s`` (counted in ticks: between that and one interval more)
  the connection is closed with 4000. No task per connection.
* **Auth**: nothing but ``auth`` is served before it succeeds; a connection that has not
  authenticated within ``auth_timeout_s`` is closed with 1008. A token revoked by a logout is
  refused (store record, chatd/revocation.py); when the token expires, or another connection
  logs the device out, the connection gets an ``error`` frame and is closed with 4001.
* **Bugs**: any exception that is not a :class:`ChatError` is a bug. It is logged ("session
  crashed"), counted (``chatd_session_crashes_total``), answered with an ``internal`` error frame
  and the connection is closed with 1011 once what is queued is sent; other connections and the
  stored data are unaffected.

Close codes: 1000 after the client's own ``logout``, 1001 server going away, 1007 text frame that
is not UTF-8 and 1002 protocol violation (chatd/shard/wsconn.py), 1008 policy (auth timeout,
flood, repeated bad tokens), 1009 frame above the hard cap, 1011 server bug, 1013 slow consumer
(chatd/shard/outbox.py) or shard not ready, 4000 idle timeout, 4001 token expired or revoked (log
in again), 4029 too many connections (of this user, or from this address).
"""

from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

import trio

from .. import lifecycle as lc
from .. import revocation
from ..auth import token_claims
from ..errors import ChatError
from ..ids import dm_members
from ..presence.visibility import hidden, visibility
from ..protocol import client as proto
from ..store.pages import read_page, within_budget
from .answers import AnswerClock
from .outbox import CLOSE_INTERNAL, CLOSE_TRY_AGAIN, Outbox
from .router import RETRY_AFTER_MS
from .wsconn import PING, ConnectionClosed

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_IDLE = 4000  # nothing received (no frame, no pong) for limits.idle_timeout_s
CLOSE_LOG_IN_AGAIN = 4001  # token expired or revoked (logout of this device elsewhere)
CLOSE_TOO_MANY_CONNECTIONS = 4029  # limits.max_connections_per_user / _per_address
MAX_BAD_TOKENS = 5

VERBS: dict[type, tuple[Callable[..., Awaitable[None]], bool]] = {}  # request type -> (method, in a task)


def verb(request_type: type, *, task: bool):
    """Register the decorated method as the verb for ``request_type``; ``task``: it runs in a task
    of its own (errors answered by :meth:`Session._guarded`), else the reader awaits it."""
    def register(method):
        VERBS[request_type] = (method, task)
        return method
    return register


def _ack(req, result) -> dict:
    """The ``ack`` of a stored send or lifecycle event (``result``: the store's AppendResult)."""
    m = result.message
    out = {"type": "ack", "id": req.id, "channel_id": m.channel_id, "seq": m.seq,
           "client_msg_id": m.client_msg_id, "created_at": m.created_at, "duplicate": result.duplicate}
    if m.kind != "message":
        out["kind"] = m.kind
    return out


def _spec(req, attachments: str = "") -> lc.EventSpec:
    """The lifecycle row a request asks for (a send with ``reply_to``, edit, delete, react, unreact)."""
    t = type(req)
    if t is proto.Send:
        return lc.EventSpec(lc.MESSAGE, body=req.body, reply_to=req.reply_to, attachments=attachments)
    if t is proto.Edit:
        return lc.EventSpec(lc.EDIT, target_seq=req.target_seq, body=req.body)
    if t is proto.Delete:
        return lc.EventSpec(lc.DELETE, target_seq=req.target_seq)
    return lc.EventSpec(lc.REACT if t is proto.React else lc.UNREACT, target_seq=req.target_seq, body=req.emoji)


def _retryable(error: ChatError) -> ChatError:
    """A send's error as answered: ``unavailable`` always says when to resend."""
    if error.code == "unavailable" and "retry_after_ms" not in error.details:
        error.details["retry_after_ms"] = RETRY_AFTER_MS
    return error


class Session:
    """``push`` (an instance attribute: the outbox's bound ``push``), ``resync``, ``user_id``,
    ``device_id``, ``token_key``, ``close_reason`` and :meth:`logged_out_elsewhere` are what the
    router, the hub and the node use."""

    OUTBOX = Outbox  # the outgoing side's class (an HTTP device session's: chatd/shard/httpsession.py)

    __slots__ = ("node", "ws", "fmt", "limits", "_timers", "_outbox", "push", "user_id", "device_id",
                 "token_key", "_token_exp", "_bucket", "_limited_in_row", "_bad_tokens", "_unanswered",
                 "_unfinished", "_send_room", "_answers", "_last_send", "_subscribed", "_nursery", "_timer",
                 "_requests", "_tick", "_silent", "token_issued_at")

    def __init__(self, node, ws, fmt: str, flusher, timers):
        self.node = node
        self.ws = ws
        self.fmt = fmt
        self.limits = node.config.limits
        self._timers = timers  # chatd/shard/timers.py: the auth timeout, then the token's expiry
        limits = self.limits
        self._outbox = self.OUTBOX(ws, fmt, max_queued=limits.send_queue_frames, sync_page=limits.sync_page,
                              flusher=flusher, store=node.store, membership=node.membership, metrics=node.metrics,
                              max_bytes=limits.send_queue_bytes, slow_consumer_s=limits.slow_consumer_s,
                              timers=timers, sync_max_errors=limits.sync_max_errors)
        self.push = self._outbox.push  # a frame dict or a Message: never blocks (chatd/shard/outbox.py)
        self.user_id: int | None = None
        self.device_id: str | None = None
        self.token_key: str | None = None
        self._token_exp: float | None = None
        self.token_issued_at = 0.0  # the token's iat: a cut-off closes sessions of older tokens
        self._bucket = node.rate_bucket()
        self._limited_in_row = 0
        self._bad_tokens = 0
        # Made with the first send (an idle connection has none of them):
        self._unanswered = 0  # sends not answered yet
        self._unfinished = 0  # sends whose work (a store write, a link request) has not ended
        self._send_room: trio.lowlevel.ParkingLot | None = None  # the reader, waiting at the cap
        self._answers: AnswerClock | None = None
        self._last_send: dict[str, trio.Event] | None = None  # channel -> its last send's 'submitted' event
        self._subscribed: set[int] | None = None  # explicit presence subscriptions of this connection
        self._nursery: trio.Nursery | None = None  # the connection's: its reader, requests and writer
        self._timer = None
        self._requests: trio.Semaphore | None = None  # max_inflight_requests (made with the first)
        self._tick = None  # the liveness tick (once authenticated)
        self._silent = 0  # ticks in a row with nothing received

    # ---- outgoing --------------------------------------------------------------------------
    @property
    def close_reason(self) -> tuple[int, str] | None:
        """(code, reason) once the connection is closing."""
        return self._outbox.close_reason

    def close_soon(self, code: int, reason: str) -> None:
        self._outbox.close_soon(code, reason)

    def resync(self) -> None:
        """Re-read every channel this connection follows from its cursor (after a view change or
        dropped link frames): whatever was missed arrives in order, nothing twice."""
        self._outbox.resync()

    def push_error(self, err: ChatError, request_id=None) -> None:
        self.node.metrics.errors.inc(code=err.code)
        self.push(proto.error_frame(err.code, err.message, request_id, **err.details))

    def crashed(self, exc: BaseException, request_id=None) -> None:
        """A bug (any exception that is not a ChatError): say ``internal``, then close with 1011."""
        log.error("session crashed (user %s): internal error, closing with 1011", self.user_id, exc_info=exc)
        self.node.metrics.session_crashes.inc()
        self.push_error(ChatError("internal", "internal server error; please report it"), request_id)
        self._outbox.close_after(CLOSE_INTERNAL, "internal server error")

    def logged_out_elsewhere(self) -> None:
        """This device logged out on another connection (any shard): its token is revoked."""
        self.push_error(ChatError("invalid_token", "this device logged out; log in again"))
        self._outbox.close_after(CLOSE_LOG_IN_AGAIN, "device logged out; log in again")

    async def _close_after_queued(self, code: int, reason: str) -> None:
        """Stop reading; the outbox sends what is queued (an error frame), then closes."""
        self._outbox.close_after(code, reason)
        await trio.sleep_forever()

    # ---- incoming --------------------------------------------------------------------------
    async def _reader(self, nursery: trio.Nursery) -> None:
        limits = self.limits
        outbox = self._outbox
        while True:
            if outbox._over is not None:  # over the byte budget: read nothing until it is written
                await outbox.wait_for_room()
            data = await self.ws.get_message()
            if not self._bucket.take(trio.current_time()):
                self._limited_in_row += 1
                if self._limited_in_row >= limits.flood_close_after:
                    self.close_soon(CLOSE_POLICY, "flood: too many frames over the rate limit")
                    return
                self.push_error(ChatError("rate_limited", "too many frames; slow down",
                                          retry_after_ms=int(self._bucket.retry_after_s() * 1000) + 1),
                                proto.peek_id(data, self.fmt, limits.max_frame_bytes))
                continue
            self._limited_in_row = 0
            req = None
            try:
                req = proto.parse(data, self.fmt, limits.max_frame_bytes)
                await self._serve(req, nursery)
            except proto.ProtocolError as e:
                self.push_error(e, e.request_id)
            except ChatError as e:
                self.push_error(e, getattr(req, "id", None))
            except Exception as e:  # noqa: BLE001 - a bug: answered 'internal', connection closed
                self.crashed(e, getattr(req, "id", None))
                await trio.sleep_forever()  # the writer sends what is queued, then closes

    async def _serve(self, req, nursery: trio.Nursery) -> None:
        """The verb of ``req`` (see :data:`VERBS`); before ``auth`` succeeds, only ``auth``."""
        if self.user_id is None:
            if isinstance(req, proto.Auth):
                await self._authenticate(req)
            else:
                self.push_error(ChatError("not_authenticated", "send an 'auth' frame first"), req.id)
            return
        method, in_task = VERBS[type(req)]
        if in_task:
            slots = self._requests
            if slots is None:
                slots = self._requests = trio.Semaphore(self.limits.max_inflight_requests)
            try:
                slots.acquire_nowait()
            except trio.WouldBlock:  # the reader waits for a slot: backpressure on this client only
                await slots.acquire()
            nursery.start_soon(self._guarded, method, req)
        else:
            await method(self, req)

    async def _guarded(self, method, req) -> None:
        try:
            await method(self, req)
        except ChatError as e:
            self.push_error(e, req.id)
        except Exception as e:  # noqa: BLE001 - a bug: answered 'internal', connection closed
            self.crashed(e, req.id)
        finally:
            self._requests.release()

    def _check_sync(self, cursors: dict) -> None:
        if len(cursors) > self.limits.sync_max_channels:
            raise ChatError("bad_field", f"field 'cursors' names at most {self.limits.sync_max_channels} "
                            "channels; split the sync")

    # ---- liveness ----------------------------------------------------------------------------
    def _on_tick(self) -> None:
        """The timer wheel, every ``ping_interval_s`` (no task): ping a silent client; close one
        silent for ``idle_timeout_s``."""
        limits = self.limits
        ws = self.ws
        if ws.heard:
            ws.heard = False
            self._silent = 0
        else:
            self._silent += 1
            if self._silent * limits.ping_interval_s >= limits.idle_timeout_s:
                self._tick = None
                self.close_soon(CLOSE_IDLE, "idle timeout: nothing received; reconnect")
                return
            self.push(PING)
        self._tick = self._timers.call_later(limits.ping_interval_s, self._on_tick)

    # ---- auth --------------------------------------------------------------------------------
    async def _authenticate(self, req: proto.Auth) -> None:
        # A session attached before this shard has a view would be announced to
        # no home shard, and miss live messages: wait for the first view.
        if not self.node.router.view.shards and not await self.node.router.wait_for_view():
            self.push_error(ChatError("unavailable", "this shard is starting; reconnect"), req.id)
            await self._close_after_queued(CLOSE_TRY_AGAIN, "shard not ready; reconnect")
        if not await self._on_auth(req):
            await self._close_after_queued(CLOSE_POLICY, "too many invalid tokens")
        if self.user_id is not None:  # the auth timeout's timer becomes the token's
            self._timers.cancel(self._timer)
            self._timer = self._timers.call_later(self._token_exp - time.time(), self._expired)
            self._tick = self._timers.call_later(self.limits.ping_interval_s, self._on_tick)

    async def _on_auth(self, req: proto.Auth) -> bool:
        """False once the connection has presented too many bad tokens (it must be closed)."""
        try:
            user_id, device_id, exp, iat = token_claims(self.node.secret, req.token)
            key = revocation.token_key(req.token)
            if (await self.node.store.token_revoked(key, user_id, device_id, iat)
                    or self.node.revoked_here.refuses(key, user_id, device_id, iat)):
                raise ChatError("invalid_token", revocation.REVOKED_MESSAGE)
        except ChatError as e:
            if e.code == "unavailable":
                self.push_error(e, req.id)
                return True
            self._bad_tokens += 1
            self.push_error(e, req.id)
            return self._bad_tokens < MAX_BAD_TOKENS
        cap = self.limits.max_connections_per_user
        if len(self.node.hub.sessions_of(user_id)) >= cap:
            self.push_error(ChatError("too_many_connections", f"this user has {cap} connections to this "
                                      "server already; close one first"), req.id)
            await self._close_after_queued(CLOSE_TOO_MANY_CONNECTIONS, "too many connections of this user")
        self.user_id, self.device_id, self.token_key, self._token_exp = user_id, device_id, key, exp
        self.token_issued_at = iat
        self._outbox.user_id = user_id
        # No await from here on: every live message routed to us is queued after this sync job.
        self.node.router.attach(self)
        self.node.presence.heartbeat(self.user_id, self.device_id)
        self.push({"type": "auth", "id": req.id, "user_id": self.user_id, "device_id": self.device_id,
                   "heartbeat_interval_s": self.limits.heartbeat_interval_s, "server_time": time.time()})
        if req.cursors:
            try:
                self._check_sync(req.cursors)
            except ChatError as e:
                self.push_error(e, req.id)
                return True
            self._outbox.sync(req.id, req.cursors)
        return True

    def _expired(self) -> None:
        """Tokens expire while connected too: at ``exp`` the connection is closed with 4001."""
        self.push_error(ChatError("token_expired", "token has expired; log in again"))
        self._outbox.close_after(CLOSE_LOG_IN_AGAIN, "token expired; log in again")

    def _auth_timeout(self) -> None:
        if self.user_id is None:
            self.close_soon(CLOSE_POLICY, "authentication timeout")

    # ---- verbs (one method each; the reader awaits it unless it runs in a task) ---------------
    @verb(proto.Auth, task=False)
    async def _auth_again(self, req: proto.Auth) -> None:
        self.push_error(ChatError("already_authenticated", "this connection is authenticated"), req.id)

    @verb(proto.Send, task=False)
    async def _send(self, req: proto.Send) -> None:
        """At most ``max_inflight_sends`` sends whose work goes on. At the cap, while all of them
        are unanswered (a busy but healthy store), the reader waits -- backpressure on this client
        only, and at most until the oldest one's answer deadline (``send_answer_s``). Once one of
        them was answered and its write still goes on (``unavailable`` at the deadline: the write
        is shielded, chatd/shard/owner.py), the store is not keeping up: a send at the cap is
        answered ``unavailable`` at once, without touching the store. So the store never holds
        more of one connection's writes than before, and the reader never stops for a store that
        hangs: heartbeats and the other verbs are answered meanwhile.
        The task-free path when it can (:meth:`_send_nowait`), else a task (:meth:`_send_waiting`)."""
        limits = self.limits
        if len(req.body) > limits.max_body_chars:
            self.push_error(ChatError("body_too_long", f"a message body has at most "
                                      f"{limits.max_body_chars} characters"), req.id)
            return
        if not await self._admit(req):
            return
        if self._last_send is None:
            self._last_send = {}
        previous = self._last_send.get(req.channel_id)
        if (previous is None or previous.is_set()) and not req.reply_to and not req.attachments:
            try:
                if self._send_nowait(req):
                    return
            except Exception as e:  # noqa: BLE001 - a bug: answered 'internal', connection closed
                self._answered()
                self._finished()
                self.crashed(e, req.id)
                return
        submitted = self._last_send[req.channel_id] = trio.Event()
        self._nursery.start_soon(self._send_waiting, req, previous, submitted)

    async def _admit(self, req) -> bool:
        """Room for one more send or lifecycle request (see :meth:`_send`): True once it counts
        as unanswered and unfinished; False when it was answered ``unavailable`` at once."""
        limits = self.limits
        while self._unfinished >= limits.max_inflight_sends:
            if self._unfinished > self._unanswered:  # answered, still writing: the store lags
                self.push_error(ChatError("unavailable", "the store is not keeping up with this connection's "
                                          "writes; resend with the same client_msg_id",
                                          retry_after_ms=RETRY_AFTER_MS), req.id)
                return False
            if self._send_room is None:
                self._send_room = trio.lowlevel.ParkingLot()
            await self._send_room.park()  # woken by an answer or an end of work
        self._unanswered += 1
        self._unfinished += 1
        return True

    def _send_nowait(self, req: proto.Send) -> bool:
        """The send's fast path: no earlier send of this channel waits to be queued and
        this shard can queue it at once -- then no task and no event: the store's completion
        answers it (the answer clock still answers ``unavailable`` at the deadline, and the late
        ack is then dropped, as in :meth:`_send_waiting`). False when :meth:`_send_waiting` must
        serve it."""
        ticket = None

        def done(result, error) -> None:
            self._finished()
            try:
                answer(result, error)
            except Exception as e:  # noqa: BLE001 - a bug: answered 'internal', connection closed
                self._drop(ticket)
                self.crashed(e, req.id)

        def answer(result, error) -> None:
            ticket.answer(_ack(req, result) if error is None else _retryable(error))
        if not self.node.router.send_nowait(self.user_id, req.channel_id, req.client_msg_id, req.body, done):
            return False
        ticket = self._ticket(req)
        return True

    def _ticket(self, req):
        """The send's answer-deadline ticket; the connection's clock task starts with its first
        send (an idle connection has none)."""
        if self._answers is None:
            budget = self.limits.send_answer_s
            self._answers = AnswerClock(budget, lambda: ChatError(
                "unavailable", f"no answer from the channel's owner within {budget:g} s; resend with the "
                "same client_msg_id", retry_after_ms=RETRY_AFTER_MS))
            self._nursery.start_soon(self._answers.run)
        return self._answers.ticket(self._answer_send(req))

    def _answer_send(self, req):
        def answer(reply) -> None:  # once per send (the ticket's first answer)
            self._answered()
            if isinstance(reply, ChatError):
                self.push_error(reply, req.id)
            else:
                self.push(reply)
        return answer

    def _drop(self, ticket) -> None:
        """A send that will get no answer of its own (a bug answered it ``internal``)."""
        if not ticket.answered:
            ticket.answered = True
            self._answered()

    def _answered(self) -> None:
        self._unanswered -= 1
        if self._send_room:  # (the reader waits at the cap: it may answer the next at once now)
            self._send_room.unpark_all()

    def _finished(self) -> None:
        self._unfinished -= 1
        if self._send_room:
            self._send_room.unpark_all()

    async def _send_waiting(self, req, previous: trio.Event | None, submitted: trio.Event) -> None:
        """Sends run concurrently (their commits share a group commit) but enter the store in
        the order the client sent them *per channel*: each waits until the previous send to
        the same channel is queued (a send stuck on one channel holds no other channel's). The
        ack is queued the moment the message is durable, ahead of its fan-out.

        Every send is answered exactly once, within ``limits.send_answer_s``: an ``ack``, or an
        error; ``unavailable`` (with ``retry_after_ms``) when the owner is unreachable or did not
        answer in time. After such an answer the message may still be stored: the client resends
        it with the same ``client_msg_id`` and gets the original ``(channel_id, seq)``."""
        ticket = self._ticket(req)

        def ack(result) -> None:
            ticket.answer(_ack(req, result))
        try:
            with ticket.scope:  # cancelled at the deadline, once the ticket answered `unavailable`
                if previous is not None and not previous.is_set():
                    await previous.wait()
                attachments = await self._attach(req) if type(req) is proto.Send and req.attachments else ""
                if type(req) is proto.Send and not req.reply_to:
                    await self.node.router.send(self.user_id, req.channel_id, req.client_msg_id, req.body,
                                                on_submit=submitted.set, on_stored=ack,
                                                timeout_s=self._answers.budget_s, attachments=attachments)
                else:  # a lifecycle row: checked and sequenced by the owner (chatd/lifecycle.py); the
                    # connection's next row of the channel waits until this one is stored (order kept)
                    def stored(result) -> None:
                        submitted.set()
                        ack(result)
                    await self.node.router.append_event(self.user_id, req.channel_id, req.client_msg_id,
                                                        _spec(req, attachments), on_stored=stored,
                                                        timeout_s=self._answers.budget_s)
        except ChatError as e:
            ticket.answer(_retryable(e))
        except Exception as e:  # noqa: BLE001 - a bug: answered 'internal', connection closed
            self._drop(ticket)  # (the deadline must not answer it again)
            self.crashed(e, req.id)
        finally:
            submitted.set()
            if self._last_send.get(req.channel_id) is submitted:
                del self._last_send[req.channel_id]
            self._finished()

    @verb(proto.Edit, task=False)
    async def _edit(self, req: proto.Edit) -> None:
        """Edit, delete, react, unreact: sequenced like a send (same in-flight cap, per-channel
        order, answer deadline ``limits.send_answer_s``), by the task path (:meth:`_send_waiting`)."""
        if type(req) is proto.Edit and len(req.body) > self.limits.max_body_chars:
            self.push_error(ChatError("body_too_long", f"a message body has at most "
                                      f"{self.limits.max_body_chars} characters"), req.id)
            return
        if type(req) in (proto.React, proto.Unreact):
            lc.check_emoji(req.emoji)  # bad_emoji, before anything is routed
        if not await self._admit(req):
            return
        if self._last_send is None:
            self._last_send = {}
        previous = self._last_send.get(req.channel_id)
        submitted = self._last_send[req.channel_id] = trio.Event()
        self._nursery.start_soon(self._send_waiting, req, previous, submitted)

    VERBS[proto.Delete] = VERBS[proto.React] = VERBS[proto.Unreact] = (_edit, False)

    async def _attach(self, req: proto.Send) -> str:
        """A send's attachments, checked (the sender's own uploads, a member of the channel) and
        referenced from the message before it is stored (chatd/media/service.py)."""
        await self.node.membership.require_member(req.channel_id, self.user_id)
        return await self.node.media.attach(self.user_id, req.channel_id, req.client_msg_id, list(req.attachments))

    @verb(proto.Sync, task=False)
    async def _sync(self, req: proto.Sync) -> None:
        self._check_sync(req.cursors)
        self._outbox.sync(req.id, req.cursors)  # streamed by the outbox, in order with live messages

    @verb(proto.Heartbeat, task=False)
    async def _heartbeat(self, req: proto.Heartbeat) -> None:
        self.node.presence.heartbeat(self.user_id, self.device_id)
        self.push({"type": "heartbeat", "id": req.id, "server_time": time.time()})

    @verb(proto.History, task=True)
    async def _history(self, req: proto.History) -> None:
        page_max = self.limits.history_page_max
        if req.limit is not None and req.limit > page_max:  # as over HTTP: refused, not clamped
            raise ChatError("bad_field", f"field 'limit' must be between 1 and {page_max}")
        await self.node.membership.require_member(req.channel_id, self.user_id)
        limit = req.limit or 50
        msgs, more = await read_page(self.node.store, req.channel_id, req.after, req.before, limit)
        # Keep the reply under the frame limit (dropped from the far end: then there is more).
        kept, trimmed = within_budget(msgs, req.after is not None, self.limits.max_frame_bytes)
        self.push({"type": "history", "id": req.id, "channel_id": req.channel_id, "more": more or trimmed,
                   "messages": [proto.message_frame(m, self.user_id) for m in kept]})

    @verb(proto.Typing, task=True)
    async def _typing(self, req: proto.Typing) -> None:
        members = await self.node.membership.require_member(req.channel_id, self.user_id)
        event = {"type": "typing", "channel_id": req.channel_id, "user_id": self.user_id}
        self.node.router.deliver_event(event, members - {self.user_id})
        self.push({"type": "typing", "id": req.id})

    @verb(proto.Read, task=True)
    async def _read(self, req: proto.Read) -> None:
        members = await self.node.membership.require_member(req.channel_id, self.user_id)
        try:
            seq = await self.node.store.set_read(req.channel_id, self.user_id, req.seq)
        except ChatError as e:
            # a member of a 1:1 channel with no message yet (no rows stored): nothing to read
            if e.code != "not_member" or dm_members(req.channel_id) is None:
                raise
            self.push({"type": "read", "id": req.id, "channel_id": req.channel_id, "seq": 0})
            return
        self.push({"type": "read", "id": req.id, "channel_id": req.channel_id, "seq": seq})
        # to the members, coalesced (chatd/shard/receipts.py): one `receipts` event per interval
        self.node.receipts.note(req.channel_id, self.user_id, members, seq, seq)

    @verb(proto.Received, task=True)
    async def _received(self, req: proto.Received) -> None:
        """The highest seq this device holds: the member's ``delivered_seq`` rises (✓✓)."""
        members = await self.node.membership.require_member(req.channel_id, self.user_id)
        try:
            seq = await self.node.store.set_delivered(req.channel_id, self.user_id, req.seq)
        except ChatError as e:
            if e.code != "not_member" or dm_members(req.channel_id) is None:
                raise
            seq = 0  # a 1:1 channel with no message yet
        self.push({"type": "received", "id": req.id, "channel_id": req.channel_id, "seq": seq})
        if seq:
            self.node.receipts.note(req.channel_id, self.user_id, members, seq)

    @verb(proto.SubscribePresence, task=True)
    async def _subscribe_presence(self, req: proto.SubscribePresence) -> None:
        """Subscribe to the users this one may see (chatd/presence/visibility.py), then answer with
        the current statuses; the others answer like unknown users and are not subscribed."""
        limit = self.node.config.presence.max_subscriptions
        if len(self._subscribed or ()) + len(req.user_ids) > limit:
            self._check_subscription_limit(req.user_ids, limit)
        gate = visibility(self.node)
        generation = gate.generation
        seen = await gate.visible(self.user_id, list(req.user_ids))
        # from here on synchronous: no unsubscribe nor other subscribe comes in between
        new = self._check_subscription_limit([u for u in req.user_ids if u in seen], limit)
        self._subscribed.update(new)
        self.node.presence.subscribe(self.user_id, new, {u: seen[u] for u in new if seen[u] is not None})
        if new and generation != gate.generation:  # a membership changed while we looked
            self.presence_revisit(new)
        users = await gate.statuses(self.user_id, list(req.user_ids), seen)
        self.push({"type": "subscribe_presence", "id": req.id, "users": {str(u): st for u, st in users.items()}})

    def _check_subscription_limit(self, user_ids, limit: int) -> list[int]:
        """The users of ``user_ids`` not yet subscribed; ``bad_field`` if they exceed the limit."""
        if self._subscribed is None:
            self._subscribed = set()
        new = [u for u in dict.fromkeys(user_ids) if u not in self._subscribed and u != self.user_id]
        if len(self._subscribed) + len(new) > limit:
            raise ChatError("bad_field", f"too many presence subscriptions on this connection (at most {limit})")
        return new

    def presence_revisit(self, targets) -> None:
        """A group these subscriptions are seen through changed members: check them again; the
        ended ones answer like unknown users from now on (an event says so)."""
        if self._nursery is not None:
            self._nursery.start_soon(self._presence_revisit, targets)

    async def _presence_revisit(self, targets) -> None:
        for uid in await visibility(self.node).revisit(self.user_id, self._subscribed or set(), targets):
            self.push({"type": "presence", "user_id": uid, **hidden()})

    @verb(proto.UnsubscribePresence, task=False)
    async def _unsubscribe_presence(self, req: proto.UnsubscribePresence) -> None:
        gone = [u for u in req.user_ids if u in (self._subscribed or ())]
        if gone:
            self._subscribed.difference_update(gone)
        self.node.presence.unsubscribe(self.user_id, gone)
        self.push({"type": "unsubscribe_presence", "id": req.id, "user_ids": list(req.user_ids)})

    @verb(proto.PresenceQuery, task=True)
    async def _presence(self, req: proto.PresenceQuery) -> None:
        if len(req.user_ids) > self.node.config.presence.max_query:
            raise ChatError("bad_field", f"ask for at most {self.node.config.presence.max_query} users at once")
        users = await visibility(self.node).statuses(self.user_id, list(req.user_ids))
        self.push({"type": "presence", "id": req.id, "users": {str(u): st for u, st in users.items()}})

    @verb(proto.Logout, task=True)
    async def _logout(self, req: proto.Logout) -> None:
        """Revoke this connection's token (durably, before the reply), close the device's other
        connections everywhere, then close this one with 1000."""
        await revocation.log_out(self.node, self.user_id, self.device_id, self.token_key, self._token_exp,
                                 except_session=self)
        self.push({"type": "logout", "id": req.id})
        self._outbox.close_after(CLOSE_NORMAL, "logged out")

    # ---- lifecycle -------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve the connection until the client leaves or we close it; always unregisters."""
        metrics = self.node.metrics
        metrics.connections_total.inc()
        outbox = self._outbox
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                outbox.start(nursery)
                self._timer = self._timers.call_later(self.limits.auth_timeout_s, self._auth_timeout)
                try:
                    await self._reader(nursery)
                except ConnectionClosed:
                    pass
                nursery.cancel_scope.cancel()
        except Exception as e:  # noqa: BLE001 - a bug that escaped the handlers above: still 1011
            log.error("session crashed (user %s): closing with 1011", self.user_id, exc_info=e)
            metrics.session_crashes.inc()
            outbox.close_soon(CLOSE_INTERNAL, "internal server error")
        finally:
            outbox.stop()  # push() drops, the flusher skips this connection from now on
            self._timers.cancel(self._timer)
            self._timers.cancel(self._tick)
            if self.user_id is not None:
                self.node.router.detach(self)
                if self._subscribed:
                    self.node.presence.unsubscribe(self.user_id, list(self._subscribed))
            if outbox.close_reason is not None and not self.ws.closed:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await self.ws.aclose(*outbox.close_reason)
                    except ConnectionClosed:
                        pass
